"""What a method gives the core: the Task protocol and the Setup of one run.

A method (VICReg, CLIP, the PaLM-E-style interface, ...) is a `Task`: it checks its config,
builds what one run needs (`setup`: model, initial variables, batches, loss function) and
measures the result (`evaluate`); `load` turns a finished workdir into a space to embed with.
The core (`core.train.train_and_evaluate`) owns everything else: mesh, train state, optimizer,
the compiled step, checkpoints, the loop, metrics and the evaluation report on disk. The table
`embedspace.methods.TASKS` maps `config.method` to its task; the core imports no method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections

from embedspace.core.step import Ema, LossFn, MetricsFn, TrainState

Monitor = Callable[[int, TrainState], tuple[dict[str, float], str]]
"""`(step, state) -> (scalars, message)`: a measurement during training (e.g. kNN accuracy)."""


@dataclasses.dataclass
class Setup:
  """Everything one run of a method needs, built before any training.

  Attributes:
    model: the flax module (or the method's bundle of modules).
    init: `rng -> {"params", "batch_stats"?}`, the initial variables (host arrays).
    loss_fn: the per-device loss (`step.LossFn`).
    batches: host batches of this process's rows, endless.
    data_state: what to checkpoint of the input (the grain iterator or the sampler).
    items_per_step: items a step consumes over all devices (for the rate).
    rate_name: the rate's metric name, e.g. "images_per_sec".
    shown: metric names shown beside the loss on the progress bar.
    metrics_fn: the step's metrics from its outputs (`step.MetricsFn`; default: the loss terms).
    ema: a target network kept as a moving average (`step.Ema`), or None.
    frozen: arrays the step reads but never changes (frozen encoders), or None.
    monitor: a measurement every `config.eval_every` steps and after the last (a learning
      curve), or None.
    context: whatever `evaluate` needs besides the state (splits, banks, encoders).
  """
  model: Any
  init: Callable[[jax.Array], Mapping[str, Any]]
  loss_fn: LossFn
  batches: Iterator[Any]
  data_state: Any
  items_per_step: int
  rate_name: str = "items_per_sec"
  shown: tuple[str, ...] = ()
  metrics_fn: MetricsFn | None = None
  ema: Ema | None = None
  frozen: Any = None
  monitor: Monitor | None = None
  context: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(Protocol):
  """A method, as the core sees it (see the module docstring)."""

  def validate(self, config: ml_collections.ConfigDict) -> None:
    """Raises `config_checks.ConfigError` naming the first key that cannot work, before any work
    (and before the workdir is written)."""

  def setup(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """Builds the run; may read data and frozen encoders, writes nothing."""

  def evaluate(self, config: ml_collections.ConfigDict, setup: Setup, state: TrainState, *,
               initial: Mapping[str, Any], out_dir: str | None) -> dict[str, Any]:
    """The report of the trained `state` (`initial`: the step-0 variables, a baseline).

    `out_dir` receives the report's files (report.md, plots); every process gets it, only
    process 0 writes."""

  def load(self, workdir: str) -> Any:
    """The space of a finished run of this method (what `embedspace.load` returns)."""
