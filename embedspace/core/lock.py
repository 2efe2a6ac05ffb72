"""An exclusive lock on a workdir: one run (or one evaluation writing into it) at a time.

Two runs on one workdir would interleave their checkpoints, `metrics.jsonl` and TensorBoard
events, and the first would report an evaluation that no longer matches what is on disk. The
lock is the file `WORKDIR/run.lock`, held with `fcntl.flock` for as long as the run lasts and
naming its holder (pid, host, start time, command) in JSON. The kernel releases a flock when its
process dies, however it dies (kill -9 included), so a lock is never stale while it is held; what
a dead process leaves is its record in the file, which the next run reports ("took over the lock
of pid ... which is no longer running") before it writes its own. Where the file system has no
flock (some network mounts), the record alone decides: a holder on this host whose pid is gone
(or now belongs to a process started later) is stale and taken over with the same warning; a
holder on another host is trusted, and the error says how to remove the file if that run is
known to be dead. A run of several processes takes the lock in process 0 only
(`core.train.train_and_evaluate`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"


class LockError(RuntimeError):
  """The workdir's lock cannot be taken; the message says why and the way out."""


class WorkdirLockedError(LockError):
  """Another live process holds the workdir's lock; the message names it and the way out."""


def _boot_ticks(pid: int) -> int | None:
  """The start time of process `pid` in clock ticks since boot (/proc), None if unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _alive(record: dict[str, Any]) -> bool:
  """Whether the process `record` names still runs (on this host: it must be checked here)."""
  pid = int(record.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  ticks = record.get("boot_ticks")
  return ticks is None or _boot_ticks(pid) in (None, ticks)  # A reused pid started later.


def describe(record: dict[str, Any]) -> str:
  """'pid 123 on host h, started 2026-12-02 17:20:36 (python -m embedspace.main ...)'."""
  command = record.get("command", "")
  return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started "
          f"{record.get('started', '?')}" + (f" ({command[:160]})" if command else ""))


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds `workdir/run.lock` (see the module docstring).

  Raises (on entry):
    WorkdirLockedError: another live process holds it (one line naming the holder: pid, host,
      start time, command, and what to do).
    LockError: the lock file cannot be created (a missing or unwritable workdir).
  """

  def __init__(self, workdir: str, *, purpose: str = "training"):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.purpose = purpose
    self._fd: int | None = None

  def _read(self) -> dict[str, Any]:
    os.lseek(self._fd, 0, os.SEEK_SET)
    text = os.read(self._fd, 1 << 16).decode("utf-8", "replace").strip()
    try:
      record = json.loads(text) if text else {}
    except ValueError:
      return {"pid": -1, "command": f"unreadable lock record {text[:60]!r}"}
    return record if isinstance(record, dict) else {}

  def _refuse(self, holder: dict[str, Any], how: str) -> None:
    os.close(self._fd)
    self._fd = None
    raise WorkdirLockedError(
        f"{os.path.dirname(self.path)} is in use by another run ({describe(holder)}); "
        f"{how}. Wait for it to finish, stop it, or use another --workdir.")

  def __enter__(self) -> WorkdirLock:
    try:
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise LockError(f"cannot create the lock file {self.path} ({e.strerror}): the "
                      f"{self.purpose} writes into {os.path.dirname(self.path)}, which must be "
                      "a writable directory") from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      kernel_lock = True
    except BlockingIOError:
      self._refuse(self._read(), f"its lock is {self.path}")
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(self._fd)
        raise
      kernel_lock = False  # This file system has no flock: the record alone decides.
    holder = self._read()
    if holder and holder.get("pid") != os.getpid():
      same_host = holder.get("host") == socket.gethostname()
      if not kernel_lock and not same_host:
        self._refuse(holder, f"if that run is known to be dead, delete {self.path}")
      if not kernel_lock and _alive(holder):
        self._refuse(holder, f"its lock is {self.path}")
      logging.warning("took over the lock of %s (%s), which is no longer running: that run "
                      "ended without releasing it (killed or crashed); its last checkpoint is "
                      "resumed as usual", self.path, describe(holder))
    pid = os.getpid()
    record = {"pid": pid, "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "boot_ticks": _boot_ticks(pid),
              "purpose": self.purpose, "command": " ".join(sys.argv)}
    os.ftruncate(self._fd, 0)
    os.lseek(self._fd, 0, os.SEEK_SET)
    os.write(self._fd, json.dumps(record).encode())
    os.fsync(self._fd)
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()

  def release(self) -> None:
    """Empties the record (a clean end leaves nothing to take over) and drops the lock."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:  # A full or read-only disk: the kernel lock still goes with the process.
      pass
    os.close(self._fd)  # Closing the descriptor releases the flock.
    self._fd = None


@contextlib.contextmanager
def hold(workdir: str, *, purpose: str = "training") -> Iterator[None]:
  """The workdir's lock for a run of any number of processes: process 0 takes it, and every
  process learns whether it did, so all of them stop together when another run holds it.

  Raises:
    LockError: as `WorkdirLock` (on every process of the run).
  """
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, purpose=purpose).__enter__()
    except LockError as e:
      error = e
  if jax.process_count() > 1:
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = WorkdirLockedError(
          f"{workdir} is in use by another run (process 0 could not take its lock "
          f"{os.path.join(workdir, LOCK_FILE)}; its error names the holder)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
