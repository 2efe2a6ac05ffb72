"""Workdirs and evaluation outputs go through `etils.epath`, so a `gs://` workdir can work.

What this verifies: every file operation of the core on a workdir (create, probe, config.json
and its history, the checkpoint listing, metrics.jsonl, eval.json's reader) and of the report
writers (PNGs, report.md) is an `epath` call that takes a `gs://bucket/...` path as it is. A
stand-in file system (`epath.testing.mock_epath`) maps `gs://bucket/` to a temporary folder;
an `os.*` or `open` call left on the workdir would instead create a local `gs:` folder under the
working directory, which the test forbids. What it does not verify: real Google Cloud Storage
(etils needs `gcsfs` for it, tensorboardX `google-cloud-storage`, orbax TensorStore's GCS
driver), none of which was tried.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from configs import vicreg
from embedspace.core import checkpointing
from embedspace.core import config_checks
from embedspace.core import metrics as metrics_lib
from embedspace.core import workdirs
from embedspace.measure import plots
from embedspace.measure import report as report_lib

BUCKET = "gs://bucket"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://bucket/...` served from `tmp_path/bucket/...`; the working directory is empty."""
  root = tmp_path / "bucket"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def local(path):
    path = os.fspath(path)
    assert path.startswith(BUCKET + "/") or not path.startswith("gs:"), path
    return path.replace(BUCKET, str(root), 1)

  def one_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two_paths(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  with epath_testing.mock_epath(
      open=one_path, exists=one_path, isdir=one_path, listdir=one_path, makedirs=one_path,
      mkdir=one_path, remove=one_path, rmtree=one_path, stat=one_path, rename=two_paths,
      replace=two_paths, copy=two_paths):
    yield root
  assert not os.listdir(cwd), "a local path was written instead of gs://"


def test_workdir_on_gs_goes_through_epath(fake_gcs, monkeypatch):
  workdir = f"{BUCKET}/runs/vicreg"
  assert os.fspath(workdirs.absolute(workdir)) == workdir  # a URI is not made local
  config = vicreg.get_config("smoke")
  assert config_checks.check_workdir_config(config, workdir) == {}
  local = fake_gcs / "runs" / "vicreg"
  assert json.loads((local / "config.json").read_text())["method"] == "vicreg"
  assert workdirs.read_config(workdir).method == "vicreg"

  # With a checkpoint, the saved config is compared and a safe change recorded.
  (local / "checkpoints" / "3").mkdir(parents=True)
  longer = vicreg.get_config("smoke")
  longer.num_steps += 2
  changes = config_checks.check_workdir_config(longer, workdir)
  assert changes == {"num_steps": (6, 8)}
  config_checks.record_changes(longer, workdir, changes)
  assert json.loads((local / "config.json").read_text())["num_steps"] == 8
  assert "num_steps" in (local / "config_history.jsonl").read_text()
  # The checkpoint reader lists gs://.../checkpoints and hands orbax the gs:// step (an empty
  # folder here, so: damaged).
  with pytest.raises(checkpointing.NoIntactCheckpointError, match="gs://bucket/runs/vicreg"):
    workdirs.restore_newest(workdir)

  # metrics.jsonl through epath; the TensorBoard folder handed to tensorboardX as the URI.
  logdirs = []

  class FakeSummaryWriter:
    def __init__(self, logdir, **kwargs):
      logdirs.append((logdir, kwargs["purge_step"]))

    def add_scalar(self, *args):
      pass

    def close(self):
      pass

  import tensorboardX
  monkeypatch.setattr(tensorboardX, "SummaryWriter", FakeSummaryWriter)
  writer = metrics_lib.MetricWriter(workdir, enabled=True, purge_step=4)
  writer.write_scalars(5, {"loss": 1.0, "eval/a->b/recall@1": 0.5})
  writer.close()
  assert logdirs == [(f"{workdir}/tb", 4)]
  assert metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl") == [
      {"step": 5, "loss": 1.0, "eval/a->b/recall@1": 0.5}]


def test_report_files_on_gs_go_through_epath(fake_gcs):
  out_dir = f"{BUCKET}/runs/vicreg/eval"
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  usage = {"std_sorted": np.linspace(1, 0.1, 8), "pca_variance_ratio": np.linspace(0.5, 0.01, 8),
           "effective_rank": 4.0}
  png = plots.plot_dimensions({"encoder": usage}, f"{out_dir}/dimensions.png")
  assert png == f"{out_dir}/dimensions.png"
  assert (fake_gcs / "runs/vicreg/eval/dimensions.png").read_bytes()[:4] == b"\x89PNG"
  report_lib.write_markdown({"trained": {}}, {"dimensions": png}, f"{out_dir}/report.md",
                            command="test")
  assert "dimensions.png" in (fake_gcs / "runs/vicreg/eval/report.md").read_text()
