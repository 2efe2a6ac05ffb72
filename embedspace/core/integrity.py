"""The integrity record of a checkpoint: the sha256 of every array of the train state.

orbax restores garbage bytes inside an array file as silently wrong values (measured with orbax
0.12.8, OCDBT + zstd, no checksums), so every checkpoint holds an item `integrity` with the
digest of each array (`state_digest`), and every reader compares what it restored with it
(`compare`, `verify_restored`). A checkpoint written before records existed has none (orbax's
step metadata lists no such item); one that lists it but lacks it is damaged
(`has_integrity_record`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

INTEGRITY_ITEM = "integrity"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's record of a step's items (item_handlers)


class DamagedCheckpointError(RuntimeError):
  """A checkpoint restored arrays that differ from the ones that were saved."""


def has_integrity_record(step_dir: str | epath.Path) -> bool:
  """Whether the checkpoint `step_dir` has its integrity record; False only for a checkpoint
  written before records existed.

  Every checkpoint this version writes has the record, and orbax lists its items in the step's
  `_CHECKPOINT_METADATA`. A record that is missing although that list names it, or whose list is
  missing or unreadable too, is damage, not age: flipped bytes in an array file and a deleted
  record must not restore silently wrong values.

  Raises:
    DamagedCheckpointError: the record is missing and the checkpoint was written with one (or
      cannot say that it was not).
  """
  step_dir = epath.Path(step_dir)
  if (step_dir / INTEGRITY_ITEM).exists():
    return True
  try:
    items = json.loads((step_dir / _STEP_METADATA).read_text())["item_handlers"]
  except (OSError, ValueError, KeyError, TypeError):
    items = None
  if isinstance(items, dict) and "state" in items and INTEGRITY_ITEM not in items:
    return False  # Written before integrity records: nothing to check against.
  raise DamagedCheckpointError(
      f"its integrity record ({INTEGRITY_ITEM}/) is missing, and "
      + ("its metadata lists it" if isinstance(items, dict) else
         f"{_STEP_METADATA}, which would say whether it was written before records existed, "
         "is missing or unreadable")
      + ": its arrays cannot be checked")


def verify_restored(step_dir: str | epath.Path, state: Any) -> bool:
  """Checks `state`, restored by other means from the checkpoint `step_dir`, against its record.

  For readers that restore only the train state (e.g. `ocp.StandardCheckpointer().restore(
  step_dir / "state")`): returns True when verified, False when the checkpoint was written
  before integrity records existed (`has_integrity_record`; the caller should warn).

  Raises:
    DamagedCheckpointError: an array differs from the one saved, or the record is missing from a
      checkpoint written with one.
  """
  path = epath.Path(step_dir) / INTEGRITY_ITEM
  if not has_integrity_record(step_dir):
    return False
  compare(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path), state)
  return True


def compare(record: dict[str, Any], state: Any) -> None:
  """Raises DamagedCheckpointError unless `state` has the digest `record` holds."""
  saved, actual = record["sha256"], state_digest(state)
  differ = sorted(k for k in saved.keys() | actual.keys() if saved.get(k) != actual.get(k))
  if differ:
    raise DamagedCheckpointError(
        f"{len(differ)} array(s) differ from what was saved (sha256), first {differ[0]}")


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
    digest[path_name(path)] = h.hexdigest()
  return digest


def path_name(path: Sequence[Any]) -> str:
  """A tree path as 'params/a/b' (see `_key_name`)."""
  return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
  """A tree path element by name, the same for a dataclass field and a dict key."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)
