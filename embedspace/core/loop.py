"""The training loop every method runs: progress, metrics, checkpoints, SIGTERM, monitors.

`run_loop` feeds host batches to a compiled step (`step.make_parallel_step`), writes metrics every
`config.log_every` steps (TensorBoard and `metrics.jsonl`, process 0 only), saves orbax
checkpoints every `config.checkpoint_every` steps and at the end, stops with the last good state
when a step was non-finite, and on SIGTERM (or Ctrl-C) saves the step in progress and exits with
`PREEMPTED_EXIT_CODE` (`INTERRUPTED_EXIT_CODE`) so the same command resumes it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from embedspace import parallel
from embedspace.core import checkpointing
from embedspace.core import console
from embedspace.core import metrics as metrics_lib
from embedspace.core import optim

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM; rerun the same command.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C, after saving a checkpoint the same way.


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf and the config does not ask to skip such updates."""


class Preemption:
  """SIGTERM, seen between steps: `reached(step)` says when to save and exit PREEMPTED_EXIT_CODE.

  One process: a Python handler turns SIGTERM, and a first Ctrl-C (SIGINT), into a flag, so
  Ctrl-C saves the step in progress too (exit INTERRUPTED_EXIT_CODE); a second Ctrl-C while it
  saves interrupts at once (KeyboardInterrupt). Several processes must all stop
  after the same step, whichever of them got the signal: there JAX's preemption service decides
  (`jax.distributed.initialize` installs its SIGTERM handler on every process and shares the
  notice through the coordination service; `multihost_utils.reached_preemption_sync_point(step)`
  is then True on every process at the same step). Its handler is kept, so with several
  processes SIGTERM outside the training loop (start-up, final evaluation) is noted, not fatal.
  """

  def __init__(self):
    self.requested = False
    self.signal = signal.SIGTERM
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if self._multi_process:
      return self

    def handler(signum, frame):
      del frame
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # A second Ctrl-C: stop now.
      self.requested, self.signal = True, signal.Signals(signum)
    try:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no preemption handling.
      self._previous = {}
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call once per step, on every process, same step)."""
    if not self._multi_process:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM keeps its default.
      return False


class Preempted(SystemExit):
  """Raised after the checkpoint on SIGTERM (or Ctrl-C) is written; exits with
  PREEMPTED_EXIT_CODE (INTERRUPTED_EXIT_CODE)."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    super().__init__(INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE)
    self.step = step


def to_host(tree: Any) -> Any:
  """Every leaf of `tree` as a NumPy array on the host."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def restore_or_start(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                     state: Any, data_state: Any
                     ) -> tuple[checkpointing.Checkpointer, Any, int]:
  """The run's checkpointer, and the newest intact checkpoint's `(state, step)` or `(state, 0)`.

  `data_state` (the sampler or data iterator) is restored in place with the state.
  """
  ckpt = checkpointing.Checkpointer(epath.Path(workdir) / "checkpoints",
                                    every=config.checkpoint_every, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(checkpointing.abstract_like(state), data_state)
  if restored is not None:
    state, start = restored
    console.say(f"resumed from step {start} in {workdir}", everywhere=True)
    return ckpt, state, start
  if (epath.Path(workdir) / "metrics.jsonl").exists():
    logging.warning("%s holds metrics of an earlier start but no checkpoint: training starts "
                    "from step 0", workdir)
  return ckpt, state, 0


def run_loop(config: ml_collections.ConfigDict, state: Any, *, step_fn: Callable[..., Any],
             batches: Iterator[Any], data_state: Any, mesh: jax.sharding.Mesh,
             ckpt: checkpointing.Checkpointer, writer: metrics_lib.MetricWriter, workdir: str,
             start: int, items_per_step: int, rate_name: str, shown: tuple[str, ...] = (),
             after_step: Callable[[int, Any, Any], None] | None = None) -> Any:
  """Steps `start + 1 .. config.num_steps` of any trainer here; returns the last state, saved.

  Every `config.log_every` steps the metrics go to `writer` and the console (with `rate_name`:
  items per second from `items_per_step`, leaving out the first step of the start, which
  compiles, and the learning rate) after the non-finite check; every
  `config.checkpoint_every` steps and at the end the state and `data_state` (the sampler or data
  iterator, an orbax item) are saved. SIGTERM or Ctrl-C saves the step and raises `Preempted`.

  Args:
    step_fn: `(state, sharded batch) -> (state, metrics)`, e.g. from `make_parallel_step`.
    batches: host batches of this process's rows (`parallel.shard_batch` places them).
    shown: metric names shown beside the loss on the progress bar and in the metric lines.
    after_step: `f(step, state, progress)` after each step (e.g. a kNN monitor, which prints
      with `progress.write`, a `console.TrainProgress`); its time is not counted in the rate
      (before waiting for the device it calls `progress.sync()`).
  """
  schedule = optim.learning_rate_schedule(config)
  progress = console.TrainProgress(start, config.num_steps, items_per_step=items_per_step)
  metrics = None
  with progress, Preemption() as preemption:  # An error closes the bar, then prints below it.
    for step in range(start, config.num_steps):
      state, metrics = step_fn(state, parallel.shard_batch(mesh, next(batches)))
      done = step + 1
      progress.dispatched(done, metrics)
      if step % config.log_every == 0 or done == config.num_steps:
        m = to_host(metrics)
        progress.finished(done)
        rate = progress.rate(done)  # None at the first step of a start: it compiled
        with progress.paused():  # Logging is not training time.
          check_finite(m, done, config, ckpt)
          if rate is not None:
            m[rate_name] = rate
          m["learning_rate"] = schedule(step)
          writer.write_scalars(done, m)
          progress.log(done, m, shown)
      if preemption.reached(done):
        progress.close()  # The warning below starts on its own line.
        check_finite(to_host(metrics), done, config, ckpt)
        ckpt.save(done, state, data_state, force=True)
        ckpt.close()
        writer.close()
        logging.warning("%s: saved step %d to %s; rerun the same command to resume",
                        "Ctrl-C" if preemption.signal == signal.SIGINT else "SIGTERM", done,
                        workdir)
        raise Preempted(done, preemption.signal)
      with progress.paused():  # Monitors and checkpoints are not training time.
        if after_step is not None:
          after_step(done, state, progress)
        if done % config.checkpoint_every == 0 and done != config.num_steps:
          progress.sync()  # The queued steps are training time.
          check_finite(to_host(metrics), done, config, ckpt)
          ckpt.save(done, state, data_state)
  if config.num_steps > start:
    check_finite(to_host(metrics), config.num_steps, config, ckpt)
    ckpt.save(config.num_steps, state, data_state, force=True)
  ckpt.close()
  return state


def check_finite(m: dict[str, Any], step: int, config: ml_collections.ConfigDict,
                ckpt: checkpointing.Checkpointer) -> None:
  """Stops the run (stop mode) once a step was non-finite; its state is the last good one."""
  skipped = int(m["skipped"])
  if skipped and not config.skip_nonfinite:
    ckpt.close()
    first = step - skipped + 1
    good = ckpt.all_steps()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {first}; the run stopped. Last good checkpoint: "
        f"{'step ' + str(good[-1]) if good else 'none'}. Lower config.optimizer.base_lr, set "
        "config.optimizer.grad_clip_norm, or set config.skip_nonfinite=True to skip such steps.")


def flatten_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric leaves of a nested dict, keyed "a/b/c" (for TensorBoard)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_scalars(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, np.floating, np.integer)):
      out[f"{prefix}{k}"] = float(v)
  return out
