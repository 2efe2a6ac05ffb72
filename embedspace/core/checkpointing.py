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
reach the same verdict); the per-process grain state is covered by its JSON parse only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging as py_logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

INTEGRITY_ITEM = "integrity"


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint restored arrays that differ from the ones that were saved."""


class ProcessCountError(NoIntactCheckpointError):
  """The checkpoints were written by another number of processes than this run has."""


class IncompatibleCheckpointError(NoIntactCheckpointError):
  """The checkpoints hold arrays of other shapes than this run's state: another model, not
  damage."""


class Checkpointer:
  """Saves every `every` steps (or forced), keeps the newest `keep`, restores the newest intact."""

  def __init__(self, directory: str | epath.Path, *, every: int, keep: int):
    self.directory = epath.Path(directory)
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
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(saved_tree(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            **{INTEGRITY_ITEM: ocp.args.JsonSave({"sha256": state_digest(state)})}),
        force=force)

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest intact checkpoint into `data_iterator`; returns (state, step).

    Damaged checkpoints newer than the one restored are logged and moved to
    `<directory>_damaged/<step>`.

    Returns:
      None when the directory holds no checkpoint at all.

    Raises:
      ProcessCountError: the newest checkpoint holds the data iterator states of another number
        of processes (nothing is moved).
      NoIntactCheckpointError: checkpoints exist but none can be restored (nothing is moved).
    """
    steps = self.all_steps()
    if not steps:
      return None
    self._check_process_count(steps[-1])
    self._check_shapes(steps[-1], abstract_state)
    failures = []
    for step in reversed(steps):
      try:
        state = from_saved_tree(abstract_state, self._restore_verified(
            step, saved_tree(abstract_state), data_iterator))
      except Exception as e:  # orbax raises many types for damaged files; we report each one.
        reason = _reason(e)
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

  def _check_process_count(self, step: int) -> None:
    """Raises ProcessCountError when `step` was saved by another number of processes.

    Each process saves its own data iterator state (`data/process_<i>-of-<n>.json`); a run with
    another process count finds no state of its own there, which is not damage.
    """
    data = self.directory / str(step) / "data"
    count = jax.process_count()
    if not data.is_dir() or (data / f"process_{jax.process_index()}-of-{count}.json").exists():
      return
    counts = sorted({int(m.group(1)) for f in data.iterdir()
                     if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))})
    if counts and count not in counts:
      raise ProcessCountError(
          f"the checkpoints under {self.directory} were written by {counts[0]} process(es) and "
          f"this run has {count}: each process's data position is saved separately, so resume "
          f"with --num_processes={counts[0]}, or use a new --workdir.")

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpointError when `step`'s saved arrays (read from its metadata) are
    not the arrays of `abstract_state`: a checkpoint of another model, which must not be moved
    aside as damaged and silently restarted. Unreadable metadata is left to the restore."""
    try:
      meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
      saved = {_path_name(p): tuple(m.shape) for p, m in
               jax.tree_util.tree_leaves_with_path(meta.item_metadata)}
    except Exception:  # damaged metadata: the restore reports it
      return
    if not saved:  # a deleted state item or manifest reads as an empty tree: damage, not a model
      return
    wanted = {_path_name(p): tuple(x.shape)
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
    """Restores `step` and checks its arrays against the integrity record.

    Raises:
      DamagedCheckpointError: an array differs from the one saved.
      Exception: whatever orbax raises for a file it cannot read.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "data": grain.checkpoint.CheckpointRestore(data_iterator)}
    verified = (self.directory / str(step) / INTEGRITY_ITEM).exists()
    if verified:
      items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
    with _quiet_async_read_errors():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if not verified:
      logging.warning("checkpoint %s has no integrity record; restored without verifying it",
                      self.directory / str(step))
      return restored["state"]
    _compare(restored[INTEGRITY_ITEM], restored["state"])
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
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def verify_restored(step_dir: str | epath.Path, state: Any) -> bool:
  """Checks `state`, restored by other means from the checkpoint `step_dir`, against its record.

  For readers that restore only the train state (e.g. `ocp.StandardCheckpointer().restore(
  step_dir / "state")`): returns True when verified, False when the checkpoint has no record.

  Raises:
    DamagedCheckpointError: an array differs from the one saved.
  """
  path = epath.Path(step_dir) / INTEGRITY_ITEM
  if not path.exists():
    return False
  _compare(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path), state)
  return True


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
  metadata = checkpointer.metadata(path).item_metadata
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        metadata)
  return checkpointer.restore(path, target)


def _compare(record: dict[str, Any], state: Any) -> None:
  saved, actual = record["sha256"], state_digest(state)
  differ = sorted(k for k in saved.keys() | actual.keys() if saved.get(k) != actual.get(k))
  if differ:
    raise DamagedCheckpointError(
        f"{len(differ)} array(s) differ from what was saved (sha256), first {differ[0]}")


def _reason(error: BaseException) -> str:
  """The first line of the root cause of `error` (orbax wraps TensorStore's precise message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def state_digest(state: Any) -> dict[str, str]:
  """sha256 of each array of `state` (dtype, shape and bytes), keyed by its path 'params/a/b'.

  A replicated `jax.Array` is hashed from this process's first shard, so every process gets the
  same digest without communication.
  """
  digest = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if leaf.is_fully_replicated:
        leaf = leaf.addressable_shards[0].data
    array = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.view(np.uint8).reshape(-1) if array.size else b"")
    digest[_path_name(path)] = h.hexdigest()
  return digest


def _path_name(path: Sequence[Any]) -> str:
  """A tree path as 'params/a/b' (see `_key_name`)."""
  return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
  """A tree path element by name, the same for a dataclass field and a dict key."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


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
