"""One run per workdir (issue 23, item 2): `core.lock`, the training command and the evaluation.

A live holder is simulated by a subprocess that takes the lock and sleeps; a dead one by the
record a killed process leaves (its pid gone). Without flock (some network file systems) the
record alone decides, which is checked by making flock fail as it fails there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from embedspace.core import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def holder(tmp_path):
  """A live process holding `tmp_path/wd`'s lock; yields (workdir, pid)."""
  workdir = tmp_path / "wd"
  workdir.mkdir()
  proc = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom embedspace.core import lock\n"
       "with lock.WorkdirLock(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)\n",
       str(workdir)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
      text=True)
  assert proc.stdout.readline().strip() == "held"
  yield str(workdir), proc.pid
  proc.kill()
  proc.wait()


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_live_holder_is_named_and_refused(holder):
  workdir, pid = holder
  with pytest.raises(lock.WorkdirLockedError,
                     match=rf"in use by another run \(pid {pid} on host {socket.gethostname()}, "
                           r"started 20.*\); its lock is .*run.lock\. Wait for it"):
    with lock.WorkdirLock(workdir):
      pass
  record = json.loads(open(os.path.join(workdir, lock.LOCK_FILE)).read())
  assert record["pid"] == pid  # The holder's record is left alone.


def test_a_dead_holder_is_taken_over_with_a_warning_and_a_clean_end_leaves_no_record(
    tmp_path, caplog):
  path = tmp_path / lock.LOCK_FILE
  path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                              "started": "2026-01-01 00:00:00"}))
  with lock.WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert "took over the lock" in caplog.text and "no longer running" in caplog.text
  assert path.read_text() == ""
  caplog.clear()
  with lock.WorkdirLock(str(tmp_path)):  # Released cleanly: nothing to take over.
    pass
  assert "took over" not in caplog.text


def test_without_flock_the_record_decides(holder, tmp_path, monkeypatch, caplog):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_flock)
  workdir, pid = holder
  with pytest.raises(lock.WorkdirLockedError, match=f"pid {pid}"):  # Alive on this host.
    with lock.WorkdirLock(workdir):
      pass
  other = tmp_path / "other"
  other.mkdir()
  (other / lock.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(lock.WorkdirLockedError, match="host elsewhere.*if that run is known to "
                     "be dead, delete"):  # Another host: cannot be checked from here.
    with lock.WorkdirLock(str(other)):
      pass
  (other / lock.LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(),
                                                  "host": socket.gethostname()}))
  with lock.WorkdirLock(str(other)):
    pass
  assert "took over the lock" in caplog.text


def test_an_unwritable_place_is_a_lock_error_not_a_traceback(tmp_path):
  with pytest.raises(lock.LockError, match="cannot create the lock file"):
    with lock.WorkdirLock(str(tmp_path / "missing")):
      pass


def test_a_second_training_run_exits_2_naming_the_first_and_writes_nothing(holder):
  workdir, pid = holder
  started = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "embedspace.main", "--config=configs/vicreg.py:smoke",
       f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert f"in use by another run (pid {pid} on host" in line, line
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(workdir)) == [lock.LOCK_FILE], os.listdir(workdir)
  print(f"refused in {time.monotonic() - started:.1f} s")


def test_evaluating_into_a_locked_workdir_is_refused(smoke_workdir, tmp_path):
  from configs import vicreg
  from embedspace import methods
  from embedspace.core import train

  workdir = str(tmp_path / "wd")
  shutil.copytree(smoke_workdir, workdir)  # The shared workdir is only read.
  task = methods.task("vicreg")
  config = vicreg.get_config("smoke")
  with lock.WorkdirLock(workdir):
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train.evaluate_workdir(task, workdir, config=config)
  assert not os.path.exists(os.path.join(workdir, "eval"))
