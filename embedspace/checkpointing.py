"""Checkpoints with orbax: train state + grain iterator state, restore the newest intact one.

A checkpoint is an orbax `Composite` of the train state (`StandardSave`) and the data iterator
(`grain.checkpoint.CheckpointSave`, one JSON per process), so a restarted run continues with the
same parameters, optimizer state, RNG step and data order. orbax writes into a temporary
directory and renames it when complete, so a process killed mid-write leaves no half checkpoint
under a step name. A checkpoint damaged afterwards (truncated, deleted or overwritten files) is
skipped with a warning naming it, and the next newer-to-older one is tried.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`, restores the newest intact."""

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
    """Saves when `step` is on the interval (or `force`); returns whether a save started."""
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=force)

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest intact checkpoint into `data_iterator`; returns (state, step).

    Returns None when the directory holds no checkpoint at all.

    Raises:
      NoIntactCheckpointError: checkpoints exist but none can be restored.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # orbax raises many types for damaged files; we report each one.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        logging.warning("checkpoint %s is damaged and is skipped (%s)",
                        self.directory / str(step), reason)
        failures.append(f"step {step}: {reason}")
        continue
      if failures:
        logging.warning("restored the newest intact checkpoint, step %d", step)
      return restored["state"], step
    raise NoIntactCheckpointError(
        f"no checkpoint under {self.directory} could be restored ({'; '.join(failures)}). "
        "Move the directory away to start afresh.")

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, for a restore that places arrays like `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
