"""The PyTorch + lightly side of `benchmarks.race`: the same recipe as embedspace's, run in torch.

- `ReferenceRun`: the ResNet + projector twin of `benchmarks.train_step.torch_model`, a method's
  objective (below), `torch.optim.AdamW` with embedspace's decay groups and learning rate of
  every step (`core.optim.learning_rate_schedule`), torchvision's augmentation of
  `config.data.augment` (`reference_transform`) in a shuffling `DataLoader`.
- the objectives, `(config, model) -> torch.nn.Module` with `forward(model, v1, v2) -> loss`:
  `vicreg_objective` (lightly's `VICRegLoss`), `simclr_objective` (`NTXentLoss`),
  `byol_objective` (a predictor twin, a momentum target updated with lightly's
  `update_momentum` and `cosine_schedule`, `NegativeCosineSimilarity`; see there).
- `ReferenceSetup` and `tune_reference`: eager or `torch.compile`, NCHW or channels-last,
  DataLoader workers, measured on this machine; and the initialisation ablation.

torch, torchvision and lightly are imported inside the functions that use them, so that
importing this module (and `python -m benchmarks.race --help`) does not import torch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import common  # Sets OMP_WAIT_POLICY before torch is imported.
from benchmarks import train_step as train_step_bench
from benchmarks.race_common import REFERENCE, Data, timed
from embedspace import methods
from embedspace.core import optim
from embedspace.data.augment import AugmentConfig

Objective = Callable[[Any, Any], Any]
"""`(config, model) -> torch.nn.Module` whose `forward(model, v1, v2)` is a batch's loss."""


# ----------------------------------------------------------------------------------------------
# The methods' objectives.


def _pair_objective(loss: Any) -> Any:
  """`(model, v1, v2) -> loss(model(v1), model(v2))` as a torch module (no parameters)."""
  from torch import nn

  class PairObjective(nn.Module):
    def __init__(self):
      super().__init__()
      self.loss = loss

    def forward(self, model, v1, v2):
      return self.loss(model(v1), model(v2))

  return PairObjective()


def vicreg_objective(config: Any, model: Any) -> Any:
  """lightly's `VICRegLoss` with the config's three weights."""
  del model
  from lightly.loss import VICRegLoss
  return _pair_objective(VICRegLoss(lambda_param=config.loss.invariance_weight,
                                    mu_param=config.loss.variance_weight,
                                    nu_param=config.loss.covariance_weight))


def simclr_objective(config: Any, model: Any) -> Any:
  """lightly's `NTXentLoss` with the config's temperature (cosine similarity only)."""
  del model
  from lightly.loss import NTXentLoss
  if config.loss.similarity != "cosine":
    raise ValueError(f"lightly's NTXentLoss has no similarity {config.loss.similarity!r}")
  return _pair_objective(NTXentLoss(temperature=config.loss.temperature))


def byol_momentum(config: Any, step: int) -> float:
  """The target's momentum at `step`: lightly's `cosine_schedule(step, K + 1, tau_base, 1)`.

  lightly divides by `max_steps - 1`, embedspace's `losses.ema_momentum(step, base=tau_base,
  total_steps=K)` by K, so `max_steps = K + 1` (K = `config.num_steps`) gives the same cosine
  from tau_base at step 0 to 1 at step K (the same float32 values); the step is clamped to K as
  embedspace's is (a tuning run may take more steps than K).
  """
  from lightly.utils.scheduler import cosine_schedule
  k = config.num_steps
  return cosine_schedule(min(step, k), k + 1, config.loss.momentum_base, 1.0)


def byol_objective(config: Any, model: Any) -> Any:
  """BYOL as embedspace's `ssl.byol` trains it, in torch + lightly.

  - online: `model` (encoder + projector) and a predictor, `train_step.torch_mlp` with
    `config.model.predictor_dims` (the twin of `models.MLP`: no Linear bias, the last Linear
    without one either; lightly's `BYOLPredictionHead` has biases, so it is not used). The
    predictor's parameters are this module's, trained with the model's.
  - target: a deep copy of `model` taken here (after any re-initialisation of `model`), without
    gradients (lightly's `deactivate_requires_grad`) and kept OUT of this module's registered
    modules, so that `parameters()` (what the optimizer trains) never holds it. It runs in
    training mode (batch statistics), as embedspace's target does; its running statistics are
    never used.
  - `before_step(model, step)`, which `ReferenceRun` calls before the forward pass of every
    step: lightly's `update_momentum(model, target, byol_momentum(config, step))`. This is
    embedspace's order (`core.step.make_train_step`): the target moves with tau(step) towards
    the parameters the step starts from, then the step's loss sees it. (lightly's BYOL example
    calls `update_momentum` at the same place: before the forward pass of each step.)
  - loss: `0.5 * (NegativeCosineSimilarity(p1, t2) + NegativeCosineSimilarity(p2, t1))`,
    lightly's scale, in [-1, 1]: exactly `losses.byol_loss(p1, t2, p2, t1)`.
  """
  import torch
  from lightly.loss import NegativeCosineSimilarity
  from lightly.models.utils import deactivate_requires_grad, update_momentum
  from torch import nn

  class ByolObjective(nn.Module):
    def __init__(self):
      super().__init__()
      self.predictor = train_step_bench.torch_mlp(config.model.projector_dims[-1],
                                                  config.model.predictor_dims)
      self.criterion = NegativeCosineSimilarity()
      target = copy.deepcopy(model).train()
      deactivate_requires_grad(target)
      object.__setattr__(self, "target", target)  # Not a registered submodule: not trained.

    def before_step(self, model, step):
      update_momentum(model, self.target, byol_momentum(config, step))

    def forward(self, model, v1, v2):
      z1, z2 = model(v1), model(v2)
      p1, p2 = self.predictor(z1), self.predictor(z2)
      with torch.no_grad():
        t1, t2 = self.target(v1), self.target(v2)
      return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))

  return ByolObjective()


# ----------------------------------------------------------------------------------------------
# The reference run.


@dataclasses.dataclass(frozen=True)
class ReferenceSetup:
  """How the reference runs: `torch.compile`, memory format, DataLoader workers, and (for the
  ablation of initialisation, not speed) `init`: "torch" (PyTorch's default,
  Kaiming-uniform a=sqrt(5): variance 1/(3 fan_in)) or "flax" (flax's default LeCun-normal,
  truncated at 2 sigma: variance 1/fan_in) for every convolution and linear weight."""
  compile: bool = False
  channels_last: bool = False
  workers: int = 0
  init: str = "torch"

  def describe(self, workers: bool = True) -> str:
    text = (f"{'torch.compile' if self.compile else 'eager'}, "
            f"{'channels-last' if self.channels_last else 'NCHW'}")
    if workers:
      text += f", {self.workers} DataLoader worker{'s' if self.workers != 1 else ''}"
    if self.init != "torch":
      text += f", {self.init} init"
    return text


def reference_transform(augment: Any, *, size: int, mean: Sequence[float],
                        std: Sequence[float]) -> Any:
  """torchvision's version of `data.augment.random_views` for `augment` (a config or mapping).

  uint8 `[C, H, W]` -> float32 `[C, size, size]`: to float in [0, 1], random resized crop
  (bilinear, antialiased) with the same area scale and aspect ratio ranges, horizontal flip,
  brightness then contrast jitter with the same strengths applied with the same probability
  (torchvision picks the order of the two at random and clamps to [0, 1] after each; embedspace
  applies brightness first and clamps once, at the end), normalisation.

  Raises:
    NotImplementedError: for augmentations embedspace would apply that are not mapped here
      (blur, noise, erasing, grayscale, colour saturation of RGB images).
  """
  import torch
  from torchvision.transforms import v2

  a = AugmentConfig.create(augment)
  unmapped = {k: getattr(a, k) for k in ("blur_prob", "noise_prob", "erase_prob",
                                          "grayscale_prob") if getattr(a, k) > 0}
  if len(mean) == 3 and a.saturation > 0:
    unmapped["saturation"] = a.saturation
  if unmapped:
    raise NotImplementedError(f"reference_transform does not map {unmapped}")
  return v2.Compose([
      v2.ToDtype(torch.float32, scale=True),
      v2.RandomResizedCrop(size, scale=a.crop_scale, ratio=a.crop_ratio,
                           interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
      v2.RandomHorizontalFlip(a.flip_prob),
      v2.RandomApply([v2.ColorJitter(brightness=a.brightness, contrast=a.contrast)],
                     p=a.jitter_prob),
      v2.Normalize(list(mean), list(std)),
  ])


def _two_view_dataset(images: np.ndarray, transform: Any) -> Any:
  import torch

  class TwoViews(torch.utils.data.Dataset):
    def __init__(self):
      self.images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # Writable.

    def __len__(self):
      return len(self.images)

    def __getitem__(self, i):
      x = self.images[i]
      return transform(x), transform(x)

  return TwoViews()


# DataLoader workers are forked from this process, in which JAX has started its threads; JAX
# warns at every fork. The workers run only torchvision code on the images (never JAX), so the
# warning does not apply to them.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


def _forever(loader: Any) -> Iterator[Any]:
  while True:
    yield from loader


def flax_params(config: Any) -> Any:
  """The shapes (`jax.ShapeDtypeStruct`s) of all of embedspace's trained parameters for
  `config`: the method's `init` (BYOL's include its predictor beside encoder and projector)."""
  task = methods.task(config.method)
  model = task.build(config, bn_axis_name=None)
  shape = (2, config.data.image_size, config.data.image_size, 1)
  variables = jax.eval_shape(functools.partial(task.init, config, model),
                             jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, np.float32))
  return variables["params"]


def flax_param_count(config: Any) -> int:
  """Parameters embedspace trains for `config` (what the torch twin must also train)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(flax_params(config)))


def _flax_init_(module: Any) -> None:
  """Every convolution and linear weight of `module` re-drawn from flax's LeCun-normal."""
  from torch import nn
  for m in module.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      std = (1.0 / m.weight[0].numel()) ** 0.5 / 0.87962566103423978  # flax's truncation
      nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)


class ReferenceRun:
  """The same recipe in PyTorch + lightly: `objective` (e.g. `byol_objective`) on `data`."""

  impl = REFERENCE

  def __init__(self, config: Any, objective: Objective, data: Data, setup: ReferenceSetup):
    import torch
    from torch import nn

    t0 = time.perf_counter()
    self.config = config
    self.setup = setup
    if setup.init not in ("torch", "flax"):
      raise ValueError(f"ReferenceSetup.init={setup.init!r}: 'torch' or 'flax'")
    torch.manual_seed(config.seed)
    model = train_step_bench.torch_model(config)
    if setup.init == "flax":
      _flax_init_(model)  # Before the objective, which may copy the model (a target).
    cut = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten)) + 1
    self.encoder = model[:cut]  # Shares its modules with `model`.
    self.memory_format = torch.channels_last if setup.channels_last else torch.contiguous_format
    self.model = model.to(memory_format=self.memory_format).train()
    self.objective = objective(config, self.model)
    if setup.init == "flax":
      _flax_init_(self.objective)  # Its own layers (a predictor); a target is not among them.
    params = list(self.model.parameters()) + list(self.objective.parameters())
    if sum(p.numel() for p in params) != flax_param_count(config):
      raise AssertionError(f"the torch twin trains {sum(p.numel() for p in params)} "
                           f"parameters, embedspace {flax_param_count(config)}")
    self.opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1],
          "weight_decay": config.optimizer.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=0.0)
    schedule = optim.learning_rate_schedule(config)
    self.lrs = [float(v) for v in np.asarray(schedule(np.arange(config.num_steps)))]
    if setup.compile:
      # Dynamo keys its cache on the code of `nn.Sequential.forward`, which every run's model
      # shares: after `recompile_limit` models it would silently run the next ones eagerly.
      # Each compiled run starts from an empty cache and pays for its own compilation.
      torch._dynamo.reset()  # pylint: disable=protected-access
    self.forward = torch.compile(self.model) if setup.compile else self.model
    transform = reference_transform(config.data.augment, size=config.data.image_size,
                                    mean=data.mean, std=data.std)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    self.loader = torch.utils.data.DataLoader(
        _two_view_dataset(data.train_images, transform), batch_size=config.batch_size,
        shuffle=True, drop_last=True, num_workers=setup.workers, generator=generator,
        persistent_workers=setup.workers > 0)
    self.batches = _forever(self.loader)
    self.done = 0
    self.setup_s = time.perf_counter() - t0

  def next_batch(self) -> tuple[Any, Any]:
    return next(self.batches)

  def step(self, batch: Any = None) -> Any:
    """One optimizer step (step index `self.done`); the loss tensor."""
    v1, v2 = self.next_batch() if batch is None else batch
    v1 = v1.contiguous(memory_format=self.memory_format)
    v2 = v2.contiguous(memory_format=self.memory_format)
    lr = self.lrs[min(self.done, len(self.lrs) - 1)]
    for group in self.opt.param_groups:
      group["lr"] = lr
    before = getattr(self.objective, "before_step", None)
    if before is not None:  # A target's EMA, before the forward pass as embedspace's core does.
      before(self.model, self.done)
    self.opt.zero_grad(set_to_none=True)
    loss = self.objective(self.forward, v1, v2)
    loss.backward()
    self.opt.step()
    self.done += 1
    return loss

  def train(self, to_step: int) -> float:
    loss = None
    while self.done < to_step:
      loss = self.step()
    return float(loss.item()) if loss is not None else float("nan")

  def features(self, x: np.ndarray) -> np.ndarray:
    """Encoder features `[n, F]` of normalised images `[n, H, W, C]` (BN running statistics)."""
    import torch
    b = self.config.eval.batch_size
    self.model.eval()
    out = []
    with torch.inference_mode():
      for s in range(0, len(x), b):
        part = torch.from_numpy(np.ascontiguousarray(x[s:s + b].transpose(0, 3, 1, 2)))
        out.append(self.encoder(part.contiguous(memory_format=self.memory_format)).numpy())
    self.model.train()
    return np.concatenate(out)

  def close(self) -> None:
    """Stops the DataLoader workers."""
    self.batches.close()
    self.loader = self.batches = None


# ----------------------------------------------------------------------------------------------
# The reference's best set-up, measured.


def tune_reference(config: Any, objective: Objective, data: Data, *, repeats: int = 6,
                   loader_steps: int = 8, compile_: Sequence[bool] = (False, True),
                   channels_last: Sequence[bool] = (False, True),
                   workers: Sequence[int] = (0, 1, 2)) -> tuple[ReferenceSetup, list[str]]:
  """The fastest reference set-up for `config` on this machine, and notes on what was measured.

  First the train step alone on one batch in memory, every (compile, channels_last) variant
  interleaved (`common.compare`, compilation in the warm-up); then, with the fastest, the whole
  loop (DataLoader + step) with each worker count, `loader_steps` timed steps after 3 warm-up
  steps, in the order 0 1 2 2 1 0 so that a drift in load hits every count alike.
  """
  import torch
  variants = [ReferenceSetup(c, cl, 0) for c in compile_ for cl in channels_last]
  runs = {v: ReferenceRun(config, objective, data, v) for v in variants}
  batch = next(iter(runs.values())).next_batch()
  fns = {v: functools.partial(runs[v].step, batch) for v in variants}
  stats = common.compare({v: (lambda f=f: f().item()) for v, f in fns.items()},
                         repeats=repeats, warmup=2)
  for r in runs.values():
    r.close()
  best = min(variants, key=lambda v: stats[v]["median_s"])
  b = config.batch_size
  notes = ["reference step alone (one batch in memory, interleaved): " + ", ".join(
      f"{v.describe(workers=False)} {stats[v]['median_s'] * 1e3:.0f} ms "
      f"({2 * b / stats[v]['median_s']:.0f} img/s)" for v in variants)]

  loop_s: dict[int, list[float]] = {w: [] for w in workers}
  for w in list(workers) + list(reversed(workers)):
    run = ReferenceRun(config, objective, data, dataclasses.replace(best, workers=w))
    run.train(3)
    _, t = timed(lambda run=run: run.train(3 + loader_steps))
    loop_s[w].append(t["s"] / loader_steps)
    run.close()
  per_step = {w: statistics.mean(s) for w, s in loop_s.items()}
  best = dataclasses.replace(best, workers=min(per_step, key=per_step.get))
  notes.append("reference loop with DataLoader (" + best.describe(workers=False) + "): "
               + ", ".join(f"{w} workers {s * 1e3:.0f} ms/step ({2 * b / s:.0f} img/s)"
                           for w, s in per_step.items())
               + f"; torch threads {torch.get_num_threads()}")
  notes.append(f"reference set-up chosen: {best.describe()}")
  return best, notes
