"""End-to-end race: one recipe trained by embedspace and by PyTorch + lightly, scored alike.

  python -m benchmarks.race --quick                      # smoke: tiny model, ~1 min
  python -m benchmarks.race                              # VICReg + SimCLR, 300 x 256, seeds 0, 1
  python -m benchmarks.race --methods=vicreg --steps=200 --seeds=0,1,2 --points=4
  python -m benchmarks.run_all --only=race               # the same, into RESULTS.md

What races is a whole training run, input pipeline to last step, on the shipped Fashion-MNIST
train split (60,000 images), and what is scored is the encoder it leaves:

- embedspace: `configs/<method>.py` with the budget overridden (`num_steps`, `batch_size`,
  `seed`, `warmup_steps` = the same 1/8 of the steps as the default 100 of 800), run through
  the real path: `core.train.prepare(methods.task(config.method), config, mesh)` builds the
  grain two-view loader, the model, AdamW with its decay mask and the warm-up + cosine schedule,
  and the compiled step (`Prepared.parallel_step`), which this module calls batch after batch
  as `core.loop.run_loop` does (without its checkpoints and metric files, which the reference
  does not write either).
- reference: PyTorch + lightly with the same recipe: the ResNet + projector twin of
  `benchmarks.train_step.torch_model` (same layers, zero-initialised last BN of each block, no
  projector biases, BN momentum/eps), lightly's `VICRegLoss(25, 25, 1)` or
  `NTXentLoss(temperature)`, `torch.optim.AdamW` with the same decay groups (weight decay on
  tensors of rank > 1) and the learning rate of every step taken from embedspace's own schedule
  function (`core.optim.learning_rate_schedule`), the same batch and number of steps; the
  augmentation is torchvision's (`transforms.v2`) with the parameters of `config.data.augment`
  (`reference_transform`): random resized crop (scale, ratio), horizontal flip, brightness +
  contrast jitter with its probability, normalisation with the dataset's mean/std; a shuffling
  `DataLoader` over the same 60,000 images. Seed policy on both sides: the seed drives the
  initialisation, the data order and the augmentation. Initialisation is each framework's own
  default (flax: LeCun-normal kernels; torch: Kaiming-uniform with a = sqrt(5)).
- the reference's set-up is its best one measured on this machine before the race
  (`tune_reference`): torch eager or `torch.compile`, NCHW or channels-last, 0, 1 or 2 DataLoader
  workers, one thread per core.

Both runs of a seed are built side by side in this process and trained in alternating
segments (the segment order alternates too), so a burst of load from another process hits both;
each segment's wall time is recorded with the 1-minute load average and the CPU that other
processes used meanwhile (`/proc/stat`, minus this process and its DataLoader workers). At each
point of the curve (`--points` evenly spaced step counts) both encoders embed the train split
(the kNN database, all 60,000 images; `--eval_train` limits it) and the test split (10,000) in
inference mode (BN running statistics), each with its own framework, and the SAME code scores
both sets of features: `measure.probes.knn_classify` (k=20, cosine, weighted, T=0.07) and
`measure.probes.linear_probe` (fitted on the first `PROBE_TRAIN` = 10,000 train features, to
keep its L-BFGS fits to ~25 s). Evaluation time is not training time: it is reported apart.

Reported per method, side and seed: kNN and probe accuracy at each point, setup time (data,
model, optimizer), training wall time (includes compilation, the input pipeline and the first
steps), images/s (both views), and the mean over seeds; per method, the time-to-accuracy ratio:
the wall time embedspace needs to reach the kNN accuracy the reference reaches at its last step
(mean over seeds; interpolated linearly between curve points, on embedspace's mean curve), over
the reference's mean wall time. A ratio <= 1 means embedspace gets there no later.

Adding a method (BYOL, DINO): a `Recipe` in `RECIPES` with its config module and a reference
objective (see `Recipe`); nothing else here is method-specific.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # Sets OMP_WAIT_POLICY before torch is imported.
from benchmarks import train_step as train_step_bench
from configs import simclr as simclr_config
from configs import vicreg as vicreg_config
from embedspace import methods
from embedspace import parallel
from embedspace.core import optim
from embedspace.core import train as core_train
from embedspace.data import shipped
from embedspace.data.augment import AugmentConfig
from embedspace.measure import probes
from embedspace.space import image as image_space

DATASET = "embedded_fashion_mnist"
WARMUP_FRACTION = 100 / 800
"""Warm-up steps as a fraction of the run: the default configs' 100 of 800."""

PROBE_TRAIN = 10_000
"""Train images the linear probe is fitted on (the first of the kNN database)."""

EMBEDSPACE = "embedspace (jax)"
REFERENCE = "PyTorch + lightly"


# ----------------------------------------------------------------------------------------------
# The methods in the race.


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


def _vicreg_reference(config: Any, model: Any) -> Any:
  del model
  from lightly.loss import VICRegLoss
  return _pair_objective(VICRegLoss(lambda_param=config.loss.invariance_weight,
                                    mu_param=config.loss.variance_weight,
                                    nu_param=config.loss.covariance_weight))


def _simclr_reference(config: Any, model: Any) -> Any:
  del model
  from lightly.loss import NTXentLoss
  if config.loss.similarity != "cosine":
    raise ValueError(f"lightly's NTXentLoss has no similarity {config.loss.similarity!r}")
  return _pair_objective(NTXentLoss(temperature=config.loss.temperature))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method in the race.

  Attributes:
    get_config: `configs/<method>.py`'s `get_config` (called with "smoke" under `--quick`).
    reference_objective: `(config, model) -> torch.nn.Module` whose `forward(model, v1, v2)` is
      the reference's loss of a batch of view pairs `[B, C, H, W]` (`model` maps images to
      projections; it may be the `torch.compile`d one). Its own parameters (a predictor head)
      are trained with the model's. A method with a target network (BYOL, DINO: lightly's
      `BYOLPredictionHead` + `NegativeCosineSimilarity`, `DINOLoss`) keeps that network inside
      this module (a deep copy of `model` taken here) and defines `after_step(model, step)`, which
      the reference loop calls after every optimizer step (lightly's `update_momentum` with
      `cosine_schedule`), the order embedspace's `core.step` uses for its EMA.
  """
  get_config: Callable[[str | None], Any]
  reference_objective: Callable[[Any, Any], Any]


RECIPES: dict[str, Recipe] = {
    "vicreg": Recipe(vicreg_config.get_config, _vicreg_reference),
    "simclr": Recipe(simclr_config.get_config, _simclr_reference),
    # "byol": Recipe(byol_config.get_config, _byol_reference),   # once configs/byol.py lands
    # "dino": Recipe(dino_config.get_config, _dino_reference),
}


def race_config(method: str, *, steps: int, batch_size: int, seed: int, quick: bool,
                kernel_init: str | None = None) -> Any:
  """The method's config (`:smoke` under `quick`) with the race's budget (and, for an ablation,
  another `model.kernel_init`)."""
  c = RECIPES[method].get_config("smoke" if quick else None)
  if kernel_init is not None:
    c.model.kernel_init = kernel_init
  c.num_steps = steps
  c.batch_size = batch_size
  c.seed = seed
  c.optimizer.warmup_steps = max(1, round(steps * WARMUP_FRACTION))
  c.eval_every = 0
  return c


# ----------------------------------------------------------------------------------------------
# Data, shared by both sides.


@dataclasses.dataclass(frozen=True)
class Data:
  """The shipped splits in memory and the pipeline's normalisation."""
  train_images: np.ndarray  # uint8 [N, 28, 28, 1]
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int

  @classmethod
  def load(cls) -> Data:
    ds = shipped.dataset(DATASET)
    train, test = shipped.load(DATASET, split="train"), shipped.load(DATASET, split="test")
    return cls(train.images, train.labels, test.images, test.labels, ds.mean, ds.std,
               len(ds.class_names))

  def normalized(self, images: np.ndarray) -> np.ndarray:
    """float32 `[n, H, W, C]`: `(x / 255 - mean) / std`, embedspace's evaluation view of a 28 px
    image (`augment.center_view` at size 28 is this, its resize being the identity)."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


# ----------------------------------------------------------------------------------------------
# The two runs. Both: `setup_s`, `done`, `train(to_step) -> loss`, `features(x) -> [n, F]`.


class EmbedspaceRun:
  """A run of `config` through `core.train.prepare` on a 1-device mesh."""

  impl = EMBEDSPACE

  def __init__(self, config: Any):
    t0 = time.perf_counter()
    self.config = config
    self.mesh = parallel.make_mesh(jax.devices()[:1])
    self.run = core_train.prepare(methods.task(config.method), config, self.mesh)
    self.state = parallel.replicate(self.mesh, self.run.state)
    self.step_fn = self.run.parallel_step(self.mesh)
    self.batches = self.run.setup.batches
    self.done = 0
    self.setup_s = time.perf_counter() - t0

  def next_batch(self) -> dict[str, np.ndarray]:
    return next(self.batches)

  def step(self, batch: Any = None) -> Any:
    batch = self.next_batch() if batch is None else batch
    self.state, metrics = self.step_fn(self.state, parallel.shard_batch(self.mesh, batch))
    self.done += 1
    return metrics["loss"]

  def train(self, to_step: int) -> float:
    loss = None
    while self.done < to_step:
      loss = self.step()
    return float(jax.block_until_ready(loss)) if loss is not None else float("nan")

  def features(self, x: np.ndarray) -> np.ndarray:
    """Encoder features `[n, F]` of normalised images `[n, H, W, C]` (BN running statistics)."""
    b = self.config.eval.batch_size
    variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
    n = len(x)

    def batches():
      for s in range(0, n, b):
        part = x[s:s + b]
        mask = np.ones((b,), bool)
        if len(part) < b:
          mask[len(part):] = False
          part = np.concatenate([part, np.zeros((b - len(part), *x.shape[1:]), x.dtype)])
        yield {"image": part, "label": np.zeros((b,), np.int32), "mask": mask}

    apply_fn = functools.partial(self.run.setup.model.apply, train=False)
    return image_space.embed(apply_fn, variables, batches(), mesh=self.mesh)["features"]

  def close(self) -> None:
    pass


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
  """The shapes (`jax.ShapeDtypeStruct`s) of embedspace's model parameters for `config`."""
  from embedspace.ssl import task as ssl_task
  model = ssl_task.build_model(config, bn_axis_name=None)
  shape = (2, config.data.image_size, config.data.image_size, 1)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, np.float32))
  return variables["params"]


def flax_param_count(config: Any) -> int:
  """Parameters of embedspace's model for `config` (what the torch twin must also have)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(flax_params(config)))


class ReferenceRun:
  """The same recipe in PyTorch + lightly."""

  impl = REFERENCE

  def __init__(self, config: Any, recipe: Recipe, data: Data, setup: ReferenceSetup):
    import torch
    from torch import nn

    t0 = time.perf_counter()
    self.config = config
    self.setup = setup
    torch.manual_seed(config.seed)
    model = train_step_bench.torch_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != flax_param_count(config):
      raise AssertionError(f"the torch twin has {n_params} parameters, embedspace's model "
                           f"{flax_param_count(config)}")
    if setup.init == "flax":
      for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          std = (1.0 / m.weight[0].numel()) ** 0.5 / 0.87962566103423978  # flax's truncation
          nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
    elif setup.init != "torch":
      raise ValueError(f"ReferenceSetup.init={setup.init!r}: 'torch' or 'flax'")
    cut = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten)) + 1
    self.encoder = model[:cut]  # Shares its modules with `model`.
    self.memory_format = torch.channels_last if setup.channels_last else torch.contiguous_format
    self.model = model.to(memory_format=self.memory_format).train()
    self.objective = recipe.reference_objective(config, self.model)
    params = list(self.model.parameters()) + list(self.objective.parameters())
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
    v1, v2 = self.next_batch() if batch is None else batch
    v1 = v1.contiguous(memory_format=self.memory_format)
    v2 = v2.contiguous(memory_format=self.memory_format)
    lr = self.lrs[min(self.done, len(self.lrs) - 1)]
    for group in self.opt.param_groups:
      group["lr"] = lr
    self.opt.zero_grad(set_to_none=True)
    loss = self.objective(self.forward, v1, v2)
    loss.backward()
    self.opt.step()
    after = getattr(self.objective, "after_step", None)
    if after is not None:
      after(self.model, self.done)
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
# Timing with the load beside it.


def _tree_cpu_seconds() -> float:
  """CPU seconds of this process, its reaped children and its live descendants (/proc)."""
  t = os.times()
  total = t.user + t.system + t.children_user + t.children_system
  children: dict[int, list[int]] = {}
  ticks: dict[int, int] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    pid = int(name)
    children.setdefault(int(fields[1]), []).append(pid)
    ticks[pid] = int(fields[11]) + int(fields[12])
  todo, own = list(children.get(os.getpid(), [])), 0
  while todo:
    pid = todo.pop()
    own += ticks.get(pid, 0)
    todo += children.get(pid, [])
  return total + own / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
  """`fn()` and `{"s": wall seconds, "other_cores": CPU others used meanwhile, "load": 1-min}`."""
  load = os.getloadavg()[0]
  busy0, own0 = common._busy_jiffies(), _tree_cpu_seconds()  # pylint: disable=protected-access
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  busy = (common._busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")  # pylint: disable=protected-access
  other = max(busy - (_tree_cpu_seconds() - own0), 0.0) / max(wall, 1e-9)
  return out, {"s": wall, "other_cores": other, "load": load}


def _log(message: str) -> None:
  print(f"[race] {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}: {message}",
        file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The reference's best set-up, measured.


def tune_reference(config: Any, recipe: Recipe, data: Data, *, repeats: int = 6,
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
  runs = {v: ReferenceRun(config, recipe, data, v) for v in variants}
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
    run = ReferenceRun(config, recipe, data, dataclasses.replace(best, workers=w))
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


def pipeline_costs(config: Any, recipe: Recipe, data: Data, setup: ReferenceSetup, *,
                   batches: int = 8, repeats: int = 5) -> list[str]:
  """Where a step's time goes: producing a batch in-process, and the step on a batch in memory.

  Both steps are timed interleaved (`common.compare`); batch production alone, `batches` each.
  """
  es = EmbedspaceRun(config)
  ref = ReferenceRun(config, recipe, data, dataclasses.replace(setup, workers=0))
  out = {}
  for run in (es, ref):
    run.next_batch()
    _, t = timed(lambda run=run: [run.next_batch() for _ in range(batches)])
    out[run.impl] = t["s"] / batches
  es_batch, ref_batch = es.next_batch(), ref.next_batch()
  stats = common.compare({
      EMBEDSPACE: lambda: float(jax.block_until_ready(es.step(es_batch))),
      REFERENCE: lambda: ref.step(ref_batch).item()}, repeats=repeats, warmup=2)
  ref.close()
  b = config.batch_size
  return [f"{config.method}, where a step's time goes (in-process batch / step on a batch in "
          f"memory, interleaved): embedspace {out[EMBEDSPACE] * 1e3:.0f} ms (grain + numpy "
          f"augmentation) / {stats[EMBEDSPACE]['median_s'] * 1e3:.0f} ms "
          f"({2 * b / stats[EMBEDSPACE]['median_s']:.0f} img/s); reference "
          f"{out[REFERENCE] * 1e3:.0f} ms (torchvision v2 per image) / "
          f"{stats[REFERENCE]['median_s'] * 1e3:.0f} ms "
          f"({2 * b / stats[REFERENCE]['median_s']:.0f} img/s, {setup.describe(workers=False)})"]


# ----------------------------------------------------------------------------------------------
# The race.


@dataclasses.dataclass
class EvalSets:
  """Normalised images and labels both encoders are scored on."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int

  @classmethod
  def build(cls, data: Data, *, train_limit: int = 0, test_limit: int = 0) -> EvalSets:
    n_train = train_limit or len(data.train_labels)
    n_test = test_limit or len(data.test_labels)
    return cls(data.normalized(data.train_images[:n_train]), data.train_labels[:n_train],
               data.normalized(data.test_images[:n_test]), data.test_labels[:n_test],
               data.num_classes)


def score(run: Any, sets: EvalSets, config: Any, *, probe_train: int = PROBE_TRAIN
          ) -> dict[str, float]:
  """kNN and linear-probe accuracy of `run`'s encoder, and the time each part took.

  The kNN database is every train image of `sets`; the probe is fitted on the first
  `probe_train` of them (0: all; its L-BFGS fits cost ~140 s on 60,000 x 128 features on a
  shared 2-core CPU, ~25 s on 10,000).
  """
  (train_f, test_f), t_embed = timed(lambda: (run.features(sets.train_x),
                                              run.features(sets.test_x)))
  knn, t_knn = timed(lambda: probes.knn_classify(
      train_f, sets.train_y, test_f, sets.test_y, num_classes=sets.num_classes,
      k=config.eval.knn_k, temperature=config.eval.knn_temperature, metric="cosine",
      weighted=True))
  n = probe_train or len(train_f)
  probe, t_probe = timed(lambda: probes.linear_probe(
      train_f[:n], sets.train_y[:n], test_f, sets.test_y,
      num_classes=sets.num_classes)["accuracy"])
  return {"knn": float(knn), "probe": float(probe), "embed_s": t_embed["s"],
          "knn_s": t_knn["s"], "probe_s": t_probe["s"]}


def curve_steps(steps: int, points: int) -> list[int]:
  """`points` step counts evenly spaced up to `steps` (the last is `steps`)."""
  return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


def race_seed(method: str, seed: int, *, steps: int, batch_size: int, points: int, quick: bool,
              data: Data, sets: EvalSets, setup: ReferenceSetup, reference_first: bool,
              kernel_init: str | None = None) -> dict[str, dict[str, Any]]:
  """Both runs of one seed, trained in alternating segments and scored at every curve point.

  Returns:
    impl -> {"setup_s", "segments": [timed], "curve": [{"step", "wall_s", "loss", score...}]}.
  """
  config = race_config(method, steps=steps, batch_size=batch_size, seed=seed, quick=quick,
                       kernel_init=kernel_init)
  builders = {REFERENCE: lambda: ReferenceRun(config, RECIPES[method], data, setup),
              EMBEDSPACE: lambda: EmbedspaceRun(config)}
  order = [REFERENCE, EMBEDSPACE] if reference_first else [EMBEDSPACE, REFERENCE]
  runs, out = {}, {}
  for impl in order:
    runs[impl], t = timed(builders[impl])
    out[impl] = {"setup_s": runs[impl].setup_s, "setup": t, "segments": [], "curve": []}
  for k, step in enumerate(curve_steps(steps, points)):
    for impl in (order if k % 2 == 0 else order[::-1]):
      loss, t = timed(lambda impl=impl, step=step: runs[impl].train(step))
      r = out[impl]
      r["segments"].append({"to_step": step, **t})
      wall = r["setup_s"] + sum(s["s"] for s in r["segments"])
      _log(f"{method} seed {seed} {impl}: step {step}, loss {loss:.4g}, segment {t['s']:.1f} s "
           f"(load {t['load']:.1f}, others {t['other_cores']:.2f} cores)")
      r["curve"].append({"step": step, "wall_s": wall, "loss": loss})
    for impl in order:
      s = score(runs[impl], sets, config)
      out[impl]["curve"][-1].update(s)
      _log(f"{method} seed {seed} {impl}: step {step} kNN {s['knn']:.4f} probe "
           f"{s['probe']:.4f} (embed {s['embed_s']:.0f} s, kNN {s['knn_s']:.0f} s, probe "
           f"{s['probe_s']:.0f} s)")
  for run in runs.values():
    run.close()
  return out


def time_to_accuracy(curve: Sequence[tuple[float, float]], target: float
                     ) -> tuple[float | None, str]:
  """Wall time at which a curve of (wall_s, accuracy) first reaches `target`.

  Linear between points; before the first point the curve is unknown, so reaching the target
  there returns the first point's time (an upper bound, flagged "<=").
  """
  for i, (t, acc) in enumerate(curve):
    if acc >= target:
      if i == 0:
        return t, "<="
      t0, a0 = curve[i - 1]
      return t0 + (target - a0) / (acc - a0) * (t - t0), ""
  return None, ">"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(method: str, results: dict[int, dict[str, dict[str, Any]]], *, steps: int,
              batch_size: int) -> list[dict[str, Any]]:
  """Rows of one method: one per side and seed, one mean row per side (with the ratio)."""
  rows = []
  budget = f"{steps} x {batch_size}"
  cpu = common._lscpu_model()  # pylint: disable=protected-access
  curves = {}
  for impl in (REFERENCE, EMBEDSPACE):
    per_seed = []
    for seed, res in results.items():
      r = res[impl]
      curve = r["curve"]
      train_s = sum(s["s"] for s in r["segments"])
      loads = [s["load"] for s in r["segments"]]
      others = [s["other_cores"] for s in r["segments"]]
      per_seed.append({"curve": curve, "train_s": train_s, "setup_s": r["setup_s"]})
      rows.append({
          "method": method, "impl": impl, "seed": str(seed), "steps x batch": budget,
          "kNN curve": " ".join(f"{c['step']}:{c['knn']:.3f}" for c in curve),
          "probe curve": " ".join(f"{c['step']}:{c['probe']:.3f}" for c in curve),
          "final kNN": curve[-1]["knn"], "final probe": curve[-1]["probe"],
          "loss": curve[-1]["loss"], "setup s": r["setup_s"], "train s": train_s,
          "wall s": r["setup_s"] + train_s, "img/s": 2 * batch_size * steps / train_s,
          "eval s": sum(c["embed_s"] + c["knn_s"] + c["probe_s"] for c in curve),
          "time-to-acc": "", "load 1 min": f"{min(loads):.1f}-{max(loads):.1f}",
          "others (cores)": f"{statistics.mean(others):.2f}"})
    n_points = len(per_seed[0]["curve"])
    mean_curve = [{
        "step": per_seed[0]["curve"][i]["step"],
        "knn": statistics.mean(p["curve"][i]["knn"] for p in per_seed),
        "probe": statistics.mean(p["curve"][i]["probe"] for p in per_seed),
        "wall_s": statistics.mean(p["curve"][i]["wall_s"] for p in per_seed)}
        for i in range(n_points)]
    curves[impl] = mean_curve
    knn_m, knn_sd = _mean_sd([p["curve"][-1]["knn"] for p in per_seed])
    probe_m, probe_sd = _mean_sd([p["curve"][-1]["probe"] for p in per_seed])
    train_m = statistics.mean(p["train_s"] for p in per_seed)
    rows.append({
        "method": method, "impl": impl, "seed": f"mean of {len(per_seed)}",
        "steps x batch": budget,
        "kNN curve": " ".join(f"{c['step']}:{c['knn']:.3f}" for c in mean_curve),
        "probe curve": " ".join(f"{c['step']}:{c['probe']:.3f}" for c in mean_curve),
        "final kNN": f"{knn_m:.4f} +- {knn_sd:.4f}", "final probe": f"{probe_m:.4f} +- "
        f"{probe_sd:.4f}", "loss": "", "setup s": statistics.mean(p["setup_s"]
                                                                   for p in per_seed),
        "train s": train_m, "wall s": mean_curve[-1]["wall_s"],
        "img/s": 2 * batch_size * steps / train_m, "eval s": "", "time-to-acc": "",
        "load 1 min": "", "others (cores)": ""})
  target = curves[REFERENCE][-1]["knn"]
  ref_wall = curves[REFERENCE][-1]["wall_s"]
  t, flag = time_to_accuracy([(c["wall_s"], c["knn"]) for c in curves[EMBEDSPACE]], target)
  if t is None:
    ratio = f"> {curves[EMBEDSPACE][-1]['wall_s'] / ref_wall:.2f}x (not reached)"
  else:
    ratio = f"{flag}{t / ref_wall:.2f}x"
  rows[-1]["time-to-acc"] = ratio
  gap = curves[EMBEDSPACE][-1]["knn"] - target
  rows.append({"benchmark": "race", "case": method, "impl": "", "summary": True,
               "ratio": ratio, "knn_gap_points": 100 * gap, "note": (
      f"{method} ({cpu}): final kNN embedspace {curves[EMBEDSPACE][-1]['knn']:.4f} vs reference "
      f"{target:.4f} ({100 * gap:+.2f} points, mean of {len(results)} seeds); time to the "
      f"reference's final kNN {ratio} of the reference's {ref_wall:.0f} s "
      f"(embedspace's whole run {curves[EMBEDSPACE][-1]['wall_s'] / ref_wall:.2f}x)")})
  return rows


def race(methods_: Sequence[str], *, seeds: Sequence[int], steps: int, batch_size: int,
         points: int, quick: bool, setup: ReferenceSetup | None = None,
         eval_train: int = 0, eval_test: int = 0, tune: bool = True,
         profile: bool = True, kernel_init: str | None = None) -> list[dict[str, Any]]:
  """The race of every method in `methods_`; returns the result rows (see `summarize`)."""
  common.torch_device()  # One torch thread per core.
  import torch
  if torch.cuda.is_available():
    raise NotImplementedError("the race runs both sides on the CPU; a CUDA reference is not "
                              "wired in (pass a CPU-only machine)")
  data = Data.load()
  sets = EvalSets.build(data, train_limit=eval_train, test_limit=eval_test)
  notes = [f"machine: {common._lscpu_model()}, {os.cpu_count()} cores; load average at the "  # pylint: disable=protected-access
           f"start {os.getloadavg()[0]:.1f}; kNN database {len(sets.train_y)} train images, "
           f"linear probe fitted on the first {min(PROBE_TRAIN, len(sets.train_y))} of them, "
           f"both scored on {len(sets.test_y)} test images"]
  rows: list[dict[str, Any]] = []
  for i, method in enumerate(methods_):
    config = race_config(method, steps=steps, batch_size=batch_size, seed=seeds[0], quick=quick)
    if tune and not (quick and i > 0):  # --quick measures the set-ups once, for the first method.
      _log(f"{method}: measuring the reference's set-ups")
      setup, tune_notes = tune_reference(config, RECIPES[method], data,
                                         repeats=3 if quick else 6,
                                         loader_steps=2 if quick else 8,
                                         compile_=(False,) if quick else (False, True),
                                         workers=(0, 1) if quick else (0, 1, 2))
      notes += [f"{method}: {n}" for n in tune_notes]
    elif setup is None:
      setup = ReferenceSetup()
    if profile:
      notes += pipeline_costs(config, RECIPES[method], data, setup,
                              batches=2 if quick else 8, repeats=3 if quick else 5)
    results = {}
    for i, seed in enumerate(seeds):
      results[seed] = race_seed(method, seed, steps=steps, batch_size=batch_size, points=points,
                                quick=quick, data=data, sets=sets, setup=setup,
                                reference_first=i % 2 == 0, kernel_init=kernel_init)
    rows += summarize(method, results, steps=steps, batch_size=batch_size)
  return [{"benchmark": "race", "case": "notes", "impl": "", "summary": True, "note": n}
          for n in notes] + rows


QUICK = {"steps": 6, "batch_size": 32, "points": 2, "seeds": (0,), "eval_train": 2000,
         "eval_test": 500}
FULL = {"steps": 300, "batch_size": 256, "points": 3, "seeds": (0, 1), "eval_train": 0,
        "eval_test": 0}


def run(quick: bool) -> list[dict[str, Any]]:
  """`benchmarks.run_all`'s interface: both methods at the quick or the full budget."""
  return race(tuple(RECIPES), quick=quick, **(QUICK if quick else FULL))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke model and budget (~1 min)")
  parser.add_argument("--methods", default=",".join(RECIPES))
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--points", type=int, default=None, help="curve points per run")
  parser.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1")
  parser.add_argument("--eval_train", type=int, default=None,
                      help="train images in the kNN database / probe set (0: all 60,000)")
  parser.add_argument("--eval_test", type=int, default=None, help="test images (0: all)")
  parser.add_argument("--reference", default="tune",
                      help="'tune' (measure and take the fastest) or e.g. "
                           "'compile,channels_last,workers=1', 'eager,workers=0'")
  parser.add_argument("--reference_init", default="torch", choices=("torch", "flax"),
                      help="the reference's weight initialisation (an ablation; see "
                           "ReferenceSetup)")
  parser.add_argument("--embedspace_init", default=None,
                      choices=("lecun_normal", "kaiming_uniform"),
                      help="embedspace's config.model.kernel_init (default: the config's)")
  parser.add_argument("--no_profile", action="store_true",
                      help="skip the step / input-pipeline breakdown")
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args(argv)
  budget = dict(QUICK if args.quick else FULL)
  for key in ("steps", "batch_size", "points", "eval_train", "eval_test"):
    if getattr(args, key) is not None:
      budget[key] = getattr(args, key)
  if args.seeds is not None:
    budget["seeds"] = tuple(int(s) for s in args.seeds.split(","))
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(RECIPES))
  if unknown:
    parser.error(f"unknown methods {unknown}; valid: {', '.join(RECIPES)}")
  setup = None
  if args.reference != "tune":
    parts = args.reference.split(",")
    workers = [int(p.split("=")[1]) for p in parts if p.startswith("workers=")]
    setup = ReferenceSetup(compile="compile" in parts, channels_last="channels_last" in parts,
                           workers=workers[0] if workers else 0, init=args.reference_init)
  elif args.reference_init != "torch":
    parser.error("--reference_init needs an explicit --reference set-up (not 'tune')")
  rows = race(names, quick=args.quick, setup=setup, tune=setup is None,
              profile=not args.no_profile, kernel_init=args.embedspace_init, **budget)
  if args.out:
    import json
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": common.machine_info(), "argv": sys.argv, "rows": rows}, f,
                indent=1, default=str)
  print(common.markdown_table([r for r in rows if not r.get("summary")]))
  for r in rows:
    if r.get("note"):
      print(f"\n- {r['note']}")


if __name__ == "__main__":
  main()
