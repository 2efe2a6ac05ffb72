"""Pretrained spaces: exported from a run, loaded by name, scoring what the run recorded."""

from __future__ import annotations

import os

import numpy as np
import pytest

import embedspace
from embedspace import methods
from embedspace.core import train as core_train
from embedspace.core import workdirs
from embedspace.space import pretrained


@pytest.fixture
def shipped(smoke_workdir, tmp_path, monkeypatch):
  """The VICReg `:smoke` run exported as `pretrained:smoke` into a stand-in package folder."""
  monkeypatch.setattr(pretrained, "ROOT", str(tmp_path / "pretrained"))
  return pretrained.export(smoke_workdir, os.path.join(pretrained.ROOT, "smoke"),
                           description="VICReg :smoke, 6 steps", command="test")


def test_export_keeps_only_what_embedding_needs(shipped):
  record = shipped
  assert record["step"] == 6 and record["method"] == "vicreg"
  assert embedspace.list_pretrained() == {"smoke": "VICReg :smoke, 6 steps"}
  _, variables, step = workdirs.restore_newest(pretrained.resolve("pretrained:smoke"))
  assert set(variables) == {"params", "batch_stats"} and step == 6
  with pytest.raises(FileExistsError):
    pretrained.export(pretrained.resolve("pretrained:smoke"), pretrained.resolve(
        "pretrained:smoke"), description="again", command="")


def test_pretrained_space_embeds_like_its_run(shipped, smoke_workdir):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  np.testing.assert_array_equal(embedspace.load("pretrained:smoke").embed(images),
                                embedspace.load(smoke_workdir).embed(images))


def test_unknown_pretrained_name_is_one_clear_error(shipped):
  with pytest.raises(FileNotFoundError, match="no pretrained space 'nosuch'.*pretrained:smoke"):
    embedspace.load("pretrained:nosuch")


@pytest.mark.parametrize("name", sorted(pretrained.list_pretrained()))
def test_shipped_space_reproduces_its_recorded_scores(name):
  # The run's own evaluation, on the whole shipped train (database / probe fit) and test split.
  path = pretrained.resolve(f"pretrained:{name}")
  want = pretrained.info(f"pretrained:{name}")["results"]["trained"]["encoder"]
  config = workdirs.read_config(path)
  config.eval.full, config.eval.baselines = False, False
  report = core_train.evaluate_workdir(methods.task(config.method), path, config=config)
  got = report["trained"]["encoder"]
  assert report["num_train"] == 60_000 and report["num_eval"] == 10_000
  assert abs(got["knn_accuracy"] - want["knn_accuracy"]) <= 0.005, (got, want)
  assert abs(got["linear_probe_accuracy"] - want["linear_probe_accuracy"]) <= 0.01, (got, want)
