"""The training loop every method runs: progress, metrics, checkpoints, SIGTERM, monitors.

`run_loop` feeds host batches to a compiled step (`step.make_parallel_step`), writes metrics every
`config.log_every` steps (TensorBoard and `metrics.jsonl`, process 0 only), saves orbax
checkpoints every `config.checkpoint_every` steps and at the end, stops with the last good state
when a step was non-finite, and on SIGTERM saves the step in progress and exits with
`PREEMPTED_EXIT_CODE` so the same command resumes it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from embedspace import parallel
from embedspace.core import checkpointing
from embedspace.core import metrics as metrics_lib
from embedspace.core import optim

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM; rerun the same command.


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf and the config does not ask to skip such updates."""


class Preemption:
  """SIGTERM, seen between steps: `reached(step)` says when to save and exit PREEMPTED_EXIT_CODE.

  One process: a Python handler turns SIGTERM into a flag. Several processes must all stop
  after the same step, whichever of them got the signal: there JAX's preemption service decides
  (`jax.distributed.initialize` installs its SIGTERM handler on every process and shares the
  notice through the coordination service; `multihost_utils.reached_preemption_sync_point(step)`
  is then True on every process at the same step). Its handler is kept, so with several
  processes SIGTERM outside the training loop (start-up, final evaluation) is noted, not fatal.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if self._multi_process:
      return self

    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. a notebook worker): no preemption handling.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call once per step, on every process, same step)."""
    if not self._multi_process:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM keeps its default.
      return False


class Preempted(SystemExit):
  """Raised after the checkpoint on SIGTERM is written; exits with PREEMPTED_EXIT_CODE."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


def to_host(tree: Any) -> Any:
  """Every leaf of `tree` as a NumPy array on the host."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def restore_or_start(config: ml_collections.ConfigDict, workdir: str, state: Any,
                     data_state: Any) -> tuple[checkpointing.Checkpointer, Any, int]:
  """The run's checkpointer, and the newest intact checkpoint's `(state, step)` or `(state, 0)`.

  `data_state` (the sampler or data iterator) is restored in place with the state.
  """
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every=config.checkpoint_every, keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(checkpointing.abstract_like(state), data_state)
  if restored is not None:
    state, start = restored
    logging.info("resumed from step %d in %s", start, workdir)
    return ckpt, state, start
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    logging.warning("%s holds metrics of an earlier start but no checkpoint: training starts "
                    "from step 0", workdir)
  return ckpt, state, 0


def run_loop(config: ml_collections.ConfigDict, state: Any, *, step_fn: Callable[..., Any],
             batches: Iterator[Any], data_state: Any, mesh: jax.sharding.Mesh,
             ckpt: checkpointing.Checkpointer, writer: metrics_lib.MetricWriter, workdir: str,
             start: int, items_per_step: int, rate_name: str, shown: tuple[str, ...] = (),
             after_step: Callable[[int, Any, Any], None] | None = None) -> Any:
  """Steps `start + 1 .. config.num_steps` of any trainer here; returns the last state, saved.

  Every `config.log_every` steps the metrics go to `writer` (with `rate_name`: items per second
  from `items_per_step`, and the learning rate) after the non-finite check; every
  `config.checkpoint_every` steps and at the end the state and `data_state` (the sampler or data
  iterator, an orbax item) are saved. SIGTERM saves the step and raises `Preempted`.

  Args:
    step_fn: `(state, sharded batch) -> (state, metrics)`, e.g. from `make_parallel_step`.
    batches: host batches of this process's rows (`parallel.shard_batch` places them).
    shown: metric names shown beside the loss on the progress bar.
    after_step: `f(step, state, progress_bar)` after each step (e.g. a kNN monitor).
  """
  schedule = optim.learning_rate_schedule(config)
  progress = progress_bar(start, config.num_steps)
  t_last, step_last, metrics = time.perf_counter(), start, None
  with Preemption() as preemption:
    for step in range(start, config.num_steps):
      state, metrics = step_fn(state, parallel.shard_batch(mesh, next(batches)))
      done = step + 1
      if step % config.log_every == 0 or done == config.num_steps:
        m = to_host(metrics)
        check_finite(m, done, config, ckpt)
        now = time.perf_counter()
        m[rate_name] = items_per_step * (done - step_last) / max(now - t_last, 1e-9)
        m["learning_rate"] = schedule(step)
        t_last, step_last = now, done
        writer.write_scalars(done, m)
        progress.set_postfix({k: f"{m[k]:.4g}" for k in ("loss",) + tuple(shown)})
      progress.update(1)
      if preemption.reached(done):
        check_finite(to_host(metrics), done, config, ckpt)
        ckpt.save(done, state, data_state, force=True)
        ckpt.close()
        writer.close()
        logging.warning("SIGTERM: saved step %d to %s; rerun the same command to resume",
                        done, workdir)
        raise Preempted(done)
      if after_step is not None:
        after_step(done, state, progress)
      if done % config.checkpoint_every == 0 and done != config.num_steps:
        check_finite(to_host(metrics), done, config, ckpt)
        ckpt.save(done, state, data_state)
  progress.close()
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


def progress_bar(start: int, total: int):
  """A tqdm bar from `start` to `total` steps, shown by process 0 only."""
  # `disable` only where it must be, so TQDM_DISABLE=1 still silences process 0's bar.
  hidden = {"disable": True} if jax.process_index() != 0 else {}
  return tqdm.tqdm(initial=start, total=total, desc="train", unit="step", dynamic_ncols=True,
                   **hidden)


def flatten_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric leaves of a nested dict, keyed "a/b/c" (for TensorBoard)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_scalars(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, np.floating, np.integer)):
      out[f"{prefix}{k}"] = float(v)
  return out
