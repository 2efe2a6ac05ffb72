"""A missing integrity record when loading (issue 23, item 4).

Every checkpoint this version writes has its sha256 record and lists it in orbax's
`_CHECKPOINT_METADATA`. So a record that is missing from a checkpoint that lists it (or whose list
is gone too) is damage: the loaders (`core.workdirs.restore_newest`, hence `embedspace.load` and
`python -m embedspace.embed`) skip that checkpoint with a warning like any damaged one, and load
the newest intact one or fail in one line. Only a checkpoint written before records existed (no
item, none listed) is loaded unverified, with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embedspace.core import checkpointing
from embedspace.core import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _garble_arrays(step_dir: str) -> None:
  """16 garbage bytes in the middle of the step's largest array file (orbax restores them)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names if os.path.basename(d) == "d"]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(range(7, 7 + 16 * 13, 13)))


def _delete_record(step_dir: str, *, from_metadata: bool = False,
                   metadata_too: bool = False) -> None:
  shutil.rmtree(os.path.join(step_dir, checkpointing.INTEGRITY_ITEM))
  meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  if metadata_too:
    os.remove(meta_path)
  elif from_metadata:  # What a version before the record wrote.
    meta = json.loads(open(meta_path).read())
    del meta["item_handlers"][checkpointing.INTEGRITY_ITEM]
    with open(meta_path, "w") as f:
      json.dump(meta, f)


@pytest.fixture
def workdir(smoke_workdir, tmp_path):
  path = str(tmp_path / "wd")
  shutil.copytree(smoke_workdir, path)  # Checkpoints at steps 3 and 6.
  return path


def test_flipped_bytes_and_a_deleted_record_are_skipped_not_loaded(workdir, caplog):
  _, clean, _ = workdirs.restore_newest(workdir)
  newest = os.path.join(workdir, "checkpoints", "6")
  _garble_arrays(newest)
  _delete_record(newest)
  _, variables, step = workdirs.restore_newest(workdir)
  assert step == 3  # Was: step 6, with parameters 4e34 off.
  assert "checkpoint" in caplog.text and "integrity record (integrity/) is missing" in caplog.text
  _delete_record(os.path.join(workdir, "checkpoints", "3"), metadata_too=True)
  with pytest.raises(checkpointing.NoIntactCheckpointError, match="step 6: .*step 3: .*"
                     "_CHECKPOINT_METADATA.*missing"):
    workdirs.restore_newest(workdir)
  del clean, variables


def test_a_checkpoint_from_before_records_loads_with_a_warning(workdir, caplog):
  _, clean, _ = workdirs.restore_newest(workdir)
  _delete_record(os.path.join(workdir, "checkpoints", "6"), from_metadata=True)
  _, variables, step = workdirs.restore_newest(workdir)
  assert step == 6 and "written before integrity records existed" in caplog.text
  np.testing.assert_array_equal(variables["params"]["encoder"]["conv_stem"]["kernel"],
                                clean["params"]["encoder"]["conv_stem"]["kernel"])


def test_embed_does_not_exit_0_with_garbage(workdir, tmp_path):
  for step in ("3", "6"):
    _garble_arrays(os.path.join(workdir, "checkpoints", step))
    _delete_record(os.path.join(workdir, "checkpoints", step))
  np.save(tmp_path / "x.npy", np.zeros((4, 28, 28), np.uint8))
  proc = subprocess.run(
      [sys.executable, "-m", "embedspace.embed", f"--workdir={workdir}",
       f"--data={tmp_path / 'x.npy'}", f"--out={tmp_path / 'e.npz'}", "--noprogress"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert "no checkpoint under" in line and "integrity record (integrity/) is missing" in line
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert not os.path.exists(tmp_path / "e.npz")
