"""Checkpoints with orbax: train state + grain iterator state, restore the newest intact one.

A checkpoint is an orbax `Composite` of the train state (`StandardSave`), the data iterator
(`grain.checkpoint.CheckpointSave`, one JSON per process) and an integrity record (`JsonSave`:
the sha256 of every array of the train state), so a restarted run continues with the same
parameters, optimizer state, RNG step and data order.

orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a process killed
mid-write leaves no half checkpoint under a step name (the temporary directory is removed on the
next start). Damage done afterwards is another matter. Measured with orbax 0.12.8 (OCDBT + zstd,
no checksums): a truncated or deleted array file, a deleted or garbled `_METADATA` /
`manifest.ocdbt`, a deleted item, or a broken grain JSON make the restore raise, but garbage bytes
inside an array file usually restore *silently wrong values*. Hence the integrity record: after a
restore, the arrays are hashed again and compared. A checkpoint that fails either way is skipped
with a warning naming it, the next older one is tried, and the skipped ones are moved to
`<checkpoints>_damaged/` so the resumed run can save those steps again.

The record covers the train state (replicated, identical on every process, so all processes
reach the same verdict); the per-process grain state is covered by its JSON parse only. A missing
record is damage unless orbax's step metadata shows the checkpoint predates records.

Elastic resume: the train state restores onto whatever devices this run has (the abstract
state's shardings), and a data iterator with `seek(step)` (`data.ResumableBatches`,
`StepSampler`) whose saved state does not fit this run (another process count, another worker
count) is positioned from the restored step instead: the data order is a function of the step.
A data state of other data (another source, seed or global batch) is refused, not seeked.

A save that fails (a full disk, a file size limit) is one `CheckpointWriteError` naming the step,
the cause and the checkpoint to resume from; the tracebacks orbax's background threads log for
it, and the "Event loop is closed" noise of their abandoned reads and writes, are kept quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging as py_logging
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from embedspace.core import integrity
from embedspace.core.integrity import (INTEGRITY_ITEM, DamagedCheckpointError,
                                       has_integrity_record, path_name, state_digest,
                                       verify_restored)

__all__ = ["INTEGRITY_ITEM", "CheckpointWriteError", "Checkpointer", "DamagedCheckpointError",
           "IncompatibleCheckpointError", "NoIntactCheckpointError", "ProcessCountError",
           "abstract_like", "failure_reason", "from_saved_tree", "has_integrity_record",
           "restore_state", "saved_tree", "state_digest", "verify_restored"]



class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class ProcessCountError(NoIntactCheckpointError):
  """The checkpoints were written by another number of processes than this run has."""


class IncompatibleCheckpointError(NoIntactCheckpointError):
  """The checkpoints hold arrays of other shapes than this run's state: another model, not
  damage."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, a file size limit, a lost mount)."""


class _ShortOrbaxErrors(py_logging.Filter):
  """Drops the tracebacks orbax's background threads log with a failed save (a dozen for one
  full disk): the error is raised to the caller, which reports it in one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


_SHORT_ORBAX_ERRORS = _ShortOrbaxErrors()


def _drop_closed_loop_noise(unraisable: Any, *, previous: Any) -> None:
  """`sys.unraisablehook` that drops "Event loop is closed": after a failed save or read, the
  pending TensorStore callbacks of orbax's abandoned event loop end with it, each printed as a
  traceback that says nothing (dozens, burying the one-line error); anything else is printed."""
  value = getattr(unraisable, "exc_value", None)
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  previous(unraisable)


def _quiet_closed_loops() -> None:
  """Installs `_drop_closed_loop_noise` once per process."""
  hook = sys.unraisablehook
  if getattr(hook, "func", None) is not _drop_closed_loop_noise:
    sys.unraisablehook = functools.partial(_drop_closed_loop_noise, previous=hook)


class Checkpointer:
  """Saves every `every` steps (or forced), keeps the newest `keep`, restores the newest intact."""

  def __init__(self, directory: str | epath.Path, *, every: int, keep: int):
    logging.get_absl_logger().addFilter(_SHORT_ORBAX_ERRORS)  # Once: filters are a set.
    _quiet_closed_loops()
    self.directory = epath.Path(directory)
    self._pending: int | None = None  # The step of the save in flight.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(every, 1), max_to_keep=keep, create=True,
            cleanup_tmp_directories=True))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether a save started.

    The save continues in the background; the integrity record is computed before returning,
    so `state` may be donated afterwards.
    """
    if not (force or self._manager.should_save(step)):
      return False
    with self._writing(self._pending or step):  # orbax first waits for the save in flight.
      started = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(saved_tree(state)),
              data=grain.checkpoint.CheckpointSave(data_iterator),
              **{INTEGRITY_ITEM: ocp.args.JsonSave({"sha256": state_digest(state)})}),
          force=force)
    self._pending = step if started else self._pending
    return started

  @contextlib.contextmanager
  def _writing(self, step: int | None = None) -> Iterator[None]:
    """Turns a failed save (this one, or the one still in flight, which orbax reports at the
    next save or wait) into `CheckpointWriteError`. orbax writes into a temporary directory, so
    the complete checkpoints are untouched and the next start removes the partial one."""
    try:
      yield
    except Exception as e:  # orbax and TensorStore raise many types for a failed write.
      try:
        self._manager.close()
      except Exception:  # The same failure again: already being reported.
        pass
      # The run ends with the error below: the abandoned writes' tasks, finalised from now to
      # the interpreter's exit, would each print "Task exception was never retrieved" with the
      # same failure's traceback, burying the one line.
      py_logging.getLogger("asyncio").disabled = True
      complete = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
      code = re.search(r"os_error_code='(\d+)'", str(e))  # TensorStore's wrapped OS error
      reason = os.strerror(int(code.group(1))) if code else failure_reason(e)
      raise CheckpointWriteError(
          f"writing the checkpoint{f' of step {step}' if step else ''} under {self.directory} "
          f"failed ({reason}); the complete checkpoints are "
          "intact: free disk space (or raise the file size limit) and rerun the same command to "
          + (f"resume from step {complete[-1]}" if complete else "start again")) from None

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest intact checkpoint into `data_iterator`; returns (state, step).

    Damaged checkpoints newer than the one restored are logged and moved to
    `<directory>_damaged/<step>`.

    Returns:
      None when the directory holds no checkpoint at all.

    Elastic resume: when the checkpoint's data state was saved by another number of processes
    (each saves its own) or for another layout (`data_iterator.fits(saved)` is False, e.g.
    another worker count), an iterator with `seek(step)` is positioned from the restored step
    instead, with a warning; the state itself restores onto any devices (`abstract_state`'s
    shardings).

    Raises:
      ProcessCountError: the newest checkpoint holds the data iterator states of another number
        of processes and `data_iterator` cannot `seek` (nothing is moved).
      NoIntactCheckpointError: checkpoints exist but none can be restored (nothing is moved).
    """
    steps = self.all_steps()
    if not steps:
      return None
    elastic = hasattr(data_iterator, "seek")
    if not elastic:
      self._check_process_count(steps[-1])
    self._check_shapes(steps[-1], abstract_state)
    self._check_data(steps[-1], data_iterator)
    failures = []
    for step in reversed(steps):
      try:
        other_layout = elastic and self._other_data_layout(step, data_iterator)
        state = from_saved_tree(abstract_state, self._restore_verified(
            step, saved_tree(abstract_state), None if other_layout else data_iterator))
        if other_layout:
          data_iterator.seek(step)
          logging.warning("checkpoint %s: %s; the data order continues from step %d as on this "
                          "topology (elastic resume)", self.directory / str(step), other_layout,
                          step)
      except Exception as e:  # orbax raises many types for damaged files; we report each one.
        reason = failure_reason(e)
        logging.warning("checkpoint %s is damaged and is skipped (%s)",
                        self.directory / str(step), reason)
        failures.append((step, reason))
        continue
      if failures:
        self._move_aside([s for s, _ in failures])
        logging.warning("resuming from the newest intact checkpoint, step %d", step)
      return state, step
    raise NoIntactCheckpointError(
        f"no checkpoint under {self.directory} can be restored ("
        + "; ".join(f"step {s}: {r}" for s, r in failures)
        + f"). Move {self.directory} away to start from scratch.")

  def _data_file(self, step: int) -> epath.Path:
    """This process's data iterator state in `step` (`data/process_<i>-of-<n>.json`)."""
    return (self.directory / str(step) / "data" /
            f"process_{jax.process_index()}-of-{jax.process_count()}.json")

  def _saved_process_counts(self, step: int) -> list[int]:
    """The process counts whose data states `step` holds (one file per process)."""
    data = self.directory / str(step) / "data"
    return sorted({int(m.group(1)) for f in (data.iterdir() if data.is_dir() else [])
                   if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))})

  def _check_process_count(self, step: int) -> None:
    """Raises ProcessCountError when `step` was saved by another number of processes.

    Each process saves its own data iterator state; a run with another process count finds no
    state of its own there, which is not damage. (Iterators with `seek` resume anyway.)
    """
    counts = self._saved_process_counts(step)
    if not self._data_file(step).exists() and counts and jax.process_count() not in counts:
      raise ProcessCountError(
          f"the checkpoints under {self.directory} were written by {counts[0]} process(es) and "
          f"this run has {jax.process_count()}: each process's data position is saved "
          f"separately, so resume with --num_processes={counts[0]}, or use a new --workdir.")

  def _other_data_layout(self, step: int, data_iterator: Any) -> str:
    """Why `step`'s data state cannot be restored into `data_iterator` as it is ('' when it
    can): another process count, or another layout (`data_iterator.fits`)."""
    mine = self._data_file(step)
    if not mine.exists():
      counts = self._saved_process_counts(step)
      if not counts:
        return ""  # No data state at all: damage, which the restore reports.
      return (f"its data position was saved by {counts[0]} process(es) and this run has "
              f"{jax.process_count()}")
    fits = getattr(data_iterator, "fits", None)
    if fits is not None and not fits(mine.read_bytes()):
      return "its data position was saved for another data layout (worker count or sampler)"
    return ""

  def _check_data(self, step: int, data_iterator: Any) -> None:
    """Raises IncompatibleCheckpointError when `step`'s data state is a position in other data
    (`data_iterator.other_data`): another run's, not damage, and never to be resumed by seeking."""
    other = getattr(data_iterator, "other_data", None)
    saved = next(iter(sorted((self.directory / str(step) / "data").glob("process_*.json"))), None)
    if other is None or saved is None:
      return
    try:
      differ = other(saved.read_bytes())
    except OSError:  # unreadable: the restore reports it
      return
    if differ:
      raise IncompatibleCheckpointError(
          f"the checkpoints under {self.directory} were trained on other data: {differ}. Resume "
          "with the config that trained them (its config.json in the workdir), or use a new "
          "--workdir.")

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpointError when `step`'s saved arrays (read from its metadata) are
    not the arrays of `abstract_state`: a checkpoint of another model, which must not be moved
    aside as damaged and silently restarted. Unreadable metadata is left to the restore."""
    try:
      item = self.directory / str(step) / "state"
      with _no_item_metadata_warning(item):
        meta = ocp.StandardCheckpointer().metadata(item)
      saved = {path_name(p): tuple(m.shape) for p, m in
               jax.tree_util.tree_leaves_with_path(meta.item_metadata)}
    except Exception:  # damaged metadata: the restore reports it
      return
    if not saved:  # a deleted state item or manifest reads as an empty tree: damage, not a model
      return
    wanted = {path_name(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if differ:
      first = differ[0]
      raise IncompatibleCheckpointError(
          f"the checkpoints under {self.directory} are of another model: {len(differ)} "
          f"array(s) differ, first {first!r} (saved {saved.get(first, 'absent')}, this config "
          f"builds {wanted.get(first, 'absent')}). Resume with the config that trained them "
          "(its config.json in the workdir), or use a new --workdir.")

  def _restore_verified(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores `step` (and its data state into `data_iterator` unless None) and checks its
    arrays against the integrity record.

    Raises:
      DamagedCheckpointError: an array differs from the one saved.
      Exception: whatever orbax raises for a file it cannot read.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    verified = has_integrity_record(self.directory / str(step))
    if verified:
      items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
    with _quiet_async_read_errors():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if not verified:
      logging.warning("checkpoint %s was written before integrity records existed; restored "
                      "without verifying it", self.directory / str(step))
      return restored["state"]
    integrity.compare(restored[INTEGRITY_ITEM], restored["state"])
    return restored["state"]

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged step directories out of orbax's sight (kept for inspection)."""
    target = self.directory.parent / f"{self.directory.name}_damaged"
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest = target / str(step)
        if dest.exists():
          dest = target / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(dest)
        logging.warning("moved damaged checkpoint %s to %s", self.directory / str(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("embedspace_move_damaged_checkpoints")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk (CheckpointWriteError if one failed)."""
    with self._writing(self._pending):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight (CheckpointWriteError if one failed) and closes."""
    with self._writing(self._pending):
      self._manager.wait_until_finished()
    self._manager.close()


def restore_state(step_dir: str | epath.Path, *, device: jax.Device | None = None) -> Any:
  """The train state of the checkpoint `step_dir`, as nested dicts of arrays on one device.

  orbax puts a restored array back on the devices that saved it unless it is given others, so a
  checkpoint written by 8 devices or by several processes does not restore as it is where those
  devices are missing ("Topology mismatch"). This takes shapes and dtypes from the checkpoint's
  metadata and places every array on `device` (default: this process's first device), whatever
  devices and processes wrote it. Check the result with `verify_restored(step_dir, state)`.

  Raises:
    Exception: whatever orbax raises for a missing or unreadable checkpoint.
  """
  path = epath.Path(step_dir) / "state"
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  checkpointer = ocp.StandardCheckpointer()
  with _no_item_metadata_warning(path):
    metadata = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata)
  with _quiet_async_read_errors():
    return checkpointer.restore(path, target)


def failure_reason(error: BaseException) -> str:
  """The first line of the root cause of `error` (orbax wraps TensorStore's precise message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def _no_item_metadata_warning(item_dir: epath.Path) -> Iterator[None]:
  """Drops orbax's "Metadata file does not exist: <item_dir>/_CHECKPOINT_METADATA" warning.

  `StandardCheckpointer` looks for that file in the directory it reads, but a `Composite`
  checkpoint (ours) keeps it one level up, beside the items: the warning is about our own
  intact checkpoint and means nothing. Any other message goes through.
  """
  spurious = str(item_dir / "_CHECKPOINT_METADATA")

  def keep(record: py_logging.LogRecord) -> bool:
    return not (record.msg == "Metadata file does not exist: %s" and record.args
                and str(record.args[0]) == spurious)

  logger = py_logging.getLogger("absl")  # orbax logs through absl
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


@contextlib.contextmanager
def _quiet_async_read_errors() -> Iterator[None]:
  """Keeps orbax's abandoned reads of a damaged checkpoint from printing tracebacks.

  When one array read fails, orbax re-raises that error (reported by the caller) but the other
  pending reads end as never-retrieved task exceptions and callbacks on a closed event loop,
  each printed as a full traceback. They say nothing more, so they are counted, not printed.
  """
  count = 0

  def hook(unraisable: Any) -> None:
    nonlocal count
    del unraisable
    count += 1

  previous = sys.unraisablehook
  asyncio_logger = py_logging.getLogger("asyncio")
  was_disabled = asyncio_logger.disabled
  sys.unraisablehook, asyncio_logger.disabled = hook, True
  try:
    yield
  finally:
    gc.collect()  # Finalises the abandoned coroutines while the hook is in place.
    sys.unraisablehook, asyncio_logger.disabled = previous, was_disabled
    if count:
      logging.info("suppressed %d follow-up errors of abandoned checkpoint reads", count)


def saved_tree(state: Any) -> Any:
  """What a checkpoint holds of `state`: a dataclass state as a dict of its fields that are not
  None, so that an optional part a run does not use (`TrainState.frozen`, `.ema`) leaves no
  trace on disk and checkpoints of states without it restore unchanged."""
  if dataclasses.is_dataclass(state) and not isinstance(state, type):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if getattr(state, f.name) is not None}
  return state


def from_saved_tree(like: Any, saved: Any) -> Any:
  """`saved` (see `saved_tree`) back into the type of `like`."""
  if dataclasses.is_dataclass(like) and not isinstance(like, type):
    return like.replace(**saved)
  return saved


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, for a restore that places arrays like `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
