"""End-to-end race: one recipe trained by embedspace and by PyTorch + lightly, scored alike.

  python -m benchmarks.race --quick                  # smoke: tiny model, ~1 min
  python -m benchmarks.race                          # VICReg, SimCLR, BYOL: 300 x 256, seeds 0, 1
  python -m benchmarks.race --methods=byol --steps=200 --seeds=0,1,2 --points=4
  python -m benchmarks.run_all --only=race           # the same, into RESULTS.md

What races is a whole training run, input pipeline to last step, on the shipped Fashion-MNIST
train split (60,000 images), and what is scored is the encoder it leaves:

- embedspace: `configs/<method>.py` with the budget overridden (`num_steps`, `batch_size`,
  `seed`, `warmup_steps` = the same 1/8 of the steps as the default 100 of 800), run through
  the real path: `core.train.prepare(methods.task(config.method), config, mesh)` builds the
  grain two-view loader, the model, AdamW with its decay mask and the warm-up + cosine schedule,
  and the compiled step (`Prepared.parallel_step`), which this module calls batch after batch
  as `core.loop.run_loop` does (without its checkpoints and metric files, which the reference
  does not write either).
- reference (`benchmarks.race_reference`): PyTorch + lightly with the same recipe: the ResNet +
  projector twin of `benchmarks.train_step.torch_model` (same layers, zero-initialised last BN
  of each block, no projector biases, BN momentum/eps), lightly's `VICRegLoss(25, 25, 1)`,
  `NTXentLoss(temperature)`, or for BYOL a predictor twin, a momentum target (lightly's
  `update_momentum` with `cosine_schedule`, before each step's forward pass as embedspace's core
  does) and `NegativeCosineSimilarity` in `losses.byol_loss`'s scale (`byol_objective`),
  `torch.optim.AdamW` with the same decay groups (weight decay on
  tensors of rank > 1) and the learning rate of every step taken from embedspace's own schedule
  function (`core.optim.learning_rate_schedule`), the same batch and number of steps; the
  augmentation is torchvision's (`transforms.v2`) with the parameters of `config.data.augment`
  (`reference_transform`): random resized crop (scale, ratio), horizontal flip, brightness +
  contrast jitter with its probability, normalisation with the dataset's mean/std; a shuffling
  `DataLoader` over the same 60,000 images. Seed policy on both sides: the seed drives the
  initialisation, the data order and the augmentation. Initialisation follows the same law on
  both sides: the configs' `model.kernel_init = "kaiming_uniform"` is torch's default for
  `Conv2d` and `Linear` (`--embedspace_init=lecun_normal` gives embedspace flax's default back,
  `--reference_init=flax` gives it to the reference: the ablations).
- the reference's set-up is its best one measured on this machine before the race
  (`race_reference.tune_reference`): torch eager or `torch.compile`, NCHW or channels-last, 0, 1
  or 2 DataLoader workers, one thread per core.

Both runs of a seed are built side by side in this process and trained in alternating
segments (the segment order alternates too), so a burst of load from another process hits both;
each segment's wall time is recorded with the 1-minute load average and the CPU that other
processes used meanwhile (`/proc/stat`, minus this process and its DataLoader workers). At each
point of the curve (`--points` evenly spaced step counts) both encoders embed the train split
(the kNN database, all 60,000 images; `--eval_train` limits it) and the test split (10,000) in
inference mode (BN running statistics), each with its own framework, and the SAME code scores
both sets of features: `measure.probes.knn_classify` (k=20, cosine, weighted, T=0.07) and
`measure.probes.linear_probe` (fitted on the first `race_scores.PROBE_TRAIN` = 10,000 train
features, to keep its L-BFGS fits to ~25 s). Evaluation time is not training time: it is reported apart.

Reported per method, side and seed: kNN and probe accuracy at each point, setup time (data,
model, optimizer), training wall time (includes compilation, the input pipeline and the first
steps), images/s (both views), and the mean over seeds; per method, the time-to-accuracy ratio:
the wall time embedspace needs to reach the kNN accuracy the reference reaches at its last step
(mean over seeds; interpolated linearly between curve points, on embedspace's mean curve), over
the reference's mean wall time. A ratio <= 1 means embedspace gets there no later.

Adding a method: a `Recipe` in `RECIPES` with its config module and a reference objective in
`benchmarks.race_reference` (see `Recipe`); nothing else here is method-specific. DINO has none
yet: its recipe would need a torch twin of embedspace's ViT encoder and DINO head, a multi-crop
torchvision pipeline matching embedspace's global and local crops, and lightly's `DINOLoss` with
its centre and teacher-temperature schedules.

Modules: this one (recipes, configs, embedspace's run, the race's schedule, CLI),
`benchmarks.race_reference` (the PyTorch + lightly side; torch is imported only where used, so
`--help` does not import it), `benchmarks.race_scores` (scoring both encoders, the summary rows)
and `benchmarks.race_common` (data, the sides' names, timing under load).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # Sets OMP_WAIT_POLICY before torch is imported.
from benchmarks import race_reference
from benchmarks import race_scores
from benchmarks.race_common import EMBEDSPACE, REFERENCE, Data, log, timed
from configs import byol as byol_config
from configs import simclr as simclr_config
from configs import vicreg as vicreg_config
from embedspace import methods
from embedspace import models
from embedspace import parallel
from embedspace.core import train as core_train
from embedspace.space import image as image_space

WARMUP_FRACTION = 100 / 800
"""Warm-up steps as a fraction of the run: the default configs' 100 of 800."""


# ----------------------------------------------------------------------------------------------
# The methods in the race.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method in the race.

  Attributes:
    get_config: `configs/<method>.py`'s `get_config` (called with "smoke" under `--quick`).
    reference_objective: `(config, model) -> torch.nn.Module` whose `forward(model, v1, v2)` is
      the reference's loss of a batch of view pairs `[B, C, H, W]` (`model` maps images to
      projections; it may be the `torch.compile`d one), from `benchmarks.race_reference`. Its
      own parameters (a predictor head) are trained with the model's, and counted with them
      against all of embedspace's parameters. A method with a target network keeps that network
      inside this module but not among its registered parameters (a deep copy of `model` taken
      here, `race_reference.byol_objective`) and defines `before_step(model, step)`, which the
      reference loop calls before the forward pass of every step (lightly's `update_momentum`
      with `cosine_schedule`), the order embedspace's `core.step` uses for its EMA.
  """
  get_config: Callable[[str | None], Any]
  reference_objective: race_reference.Objective


RECIPES: dict[str, Recipe] = {
    "vicreg": Recipe(vicreg_config.get_config, race_reference.vicreg_objective),
    "simclr": Recipe(simclr_config.get_config, race_reference.simclr_objective),
    "byol": Recipe(byol_config.get_config, race_reference.byol_objective),
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
# embedspace's run; `race_reference.ReferenceRun` is the other. Both: `setup_s`, `done`,
# `train(to_step) -> loss`, `features(x) -> [n, F]`.


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


def pipeline_costs(config: Any, recipe: Recipe, data: Data,
                   setup: race_reference.ReferenceSetup, *,
                   batches: int = 8, repeats: int = 5) -> list[str]:
  """Where a step's time goes: producing a batch in-process, and the step on a batch in memory.

  Both steps are timed interleaved (`common.compare`); batch production alone, `batches` each.
  """
  es = EmbedspaceRun(config)
  ref = race_reference.ReferenceRun(config, recipe.reference_objective, data,
                                   dataclasses.replace(setup, workers=0))
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


def curve_steps(steps: int, points: int) -> list[int]:
  """`points` step counts evenly spaced up to `steps` (the last is `steps`)."""
  return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


def race_seed(method: str, seed: int, *, steps: int, batch_size: int, points: int, quick: bool,
              data: Data, sets: race_scores.EvalSets, setup: race_reference.ReferenceSetup,
              reference_first: bool,
              kernel_init: str | None = None) -> dict[str, dict[str, Any]]:
  """Both runs of one seed, trained in alternating segments and scored at every curve point.

  Returns:
    impl -> {"setup_s", "segments": [timed], "curve": [{"step", "wall_s", "loss", score...}]}.
  """
  config = race_config(method, steps=steps, batch_size=batch_size, seed=seed, quick=quick,
                       kernel_init=kernel_init)
  builders = {REFERENCE: lambda: race_reference.ReferenceRun(
                  config, RECIPES[method].reference_objective, data, setup),
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
      log(f"{method} seed {seed} {impl}: step {step}, loss {loss:.4g}, segment {t['s']:.1f} s "
           f"(load {t['load']:.1f}, others {t['other_cores']:.2f} cores)")
      r["curve"].append({"step": step, "wall_s": wall, "loss": loss})
    for impl in order:
      s = race_scores.score(runs[impl], sets, config)
      out[impl]["curve"][-1].update(s)
      log(f"{method} seed {seed} {impl}: step {step} kNN {s['knn']:.4f} probe "
           f"{s['probe']:.4f} (embed {s['embed_s']:.0f} s, kNN {s['knn_s']:.0f} s, probe "
           f"{s['probe_s']:.0f} s)")
  for run in runs.values():
    run.close()
  return out


def race(methods_: Sequence[str], *, seeds: Sequence[int], steps: int, batch_size: int,
         points: int, quick: bool, setup: race_reference.ReferenceSetup | None = None,
         eval_train: int = 0, eval_test: int = 0, tune: bool = True,
         profile: bool = True, kernel_init: str | None = None) -> list[dict[str, Any]]:
  """The race of every method in `methods_`; returns the result rows (see
  `race_scores.summarize`)."""
  common.torch_device()  # One torch thread per core.
  import torch
  if torch.cuda.is_available():
    raise NotImplementedError("the race runs both sides on the CPU; a CUDA reference is not "
                              "wired in (pass a CPU-only machine)")
  data = Data.load()
  sets = race_scores.EvalSets.build(data, train_limit=eval_train, test_limit=eval_test)
  notes = [f"machine: {common._lscpu_model()}, {os.cpu_count()} cores; load average at the "  # pylint: disable=protected-access
           f"start {os.getloadavg()[0]:.1f}; kNN database {len(sets.train_y)} train images, "
           f"linear probe fitted on the first "
           f"{min(race_scores.PROBE_TRAIN, len(sets.train_y))} of them, "
           f"both scored on {len(sets.test_y)} test images"]
  rows: list[dict[str, Any]] = []
  for i, method in enumerate(methods_):
    config = race_config(method, steps=steps, batch_size=batch_size, seed=seeds[0], quick=quick)
    if tune and not (quick and i > 0):  # --quick measures the set-ups once, for the first method.
      log(f"{method}: measuring the reference's set-ups")
      setup, tune_notes = race_reference.tune_reference(
          config, RECIPES[method].reference_objective, data, repeats=3 if quick else 6,
          loader_steps=2 if quick else 8, compile_=(False,) if quick else (False, True),
          workers=(0, 1) if quick else (0, 1, 2))
      notes += [f"{method}: {n}" for n in tune_notes]
    elif setup is None:
      setup = race_reference.ReferenceSetup()
    if profile:
      notes += pipeline_costs(config, RECIPES[method], data, setup,
                              batches=2 if quick else 8, repeats=3 if quick else 5)
    results = {}
    for i, seed in enumerate(seeds):
      results[seed] = race_seed(method, seed, steps=steps, batch_size=batch_size, points=points,
                                quick=quick, data=data, sets=sets, setup=setup,
                                reference_first=i % 2 == 0, kernel_init=kernel_init)
    rows += race_scores.summarize(method, results, steps=steps, batch_size=batch_size)
  return [{"benchmark": "race", "case": "notes", "impl": "", "summary": True, "note": n}
          for n in notes] + rows


QUICK = {"steps": 6, "batch_size": 32, "points": 2, "seeds": (0,), "eval_train": 2000,
         "eval_test": 500}
FULL = {"steps": 300, "batch_size": 256, "points": 3, "seeds": (0, 1), "eval_train": 0,
        "eval_test": 0}


def run(quick: bool) -> list[dict[str, Any]]:
  """`benchmarks.run_all`'s interface: every method in `RECIPES` at the quick or the full
  budget."""
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
                      choices=tuple(models.KERNEL_INITS),
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
    setup = race_reference.ReferenceSetup(
        compile="compile" in parts, channels_last="channels_last" in parts,
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
