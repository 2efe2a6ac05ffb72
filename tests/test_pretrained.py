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


def _headline(results: dict) -> dict[str, tuple[float, float]]:
  """`{score: (value, tolerance)}` that a shipped space's README row states: an image encoder's
  kNN (k=20, cosine, weighted) and linear probe; a multimodal space's zero-shot accuracies and
  retrieval recall@1 in every direction. The tolerances are those of re-running the evaluation
  on another CPU (float32 sums in another order; the probe's L-BFGS stops within its
  tolerance)."""
  if "zero_shot" in results:
    out = {f"zero_shot/{m}": (v, 0.005) for m, v in results["zero_shot"].items() if m != "chance"}
    out.update({f"retrieval/{d}/recall@1": (row["recall@1"], 0.005)
                for d, row in results["retrieval"].items()})
    return out
  encoder = results["trained"]["encoder"]
  return {"knn_accuracy": (encoder["knn_accuracy"], 0.005),
          "linear_probe_accuracy": (encoder["linear_probe_accuracy"], 0.01)}


@pytest.mark.parametrize("name", sorted(pretrained.list_pretrained()))
def test_shipped_space_reproduces_its_recorded_scores(name, tmp_path):
  # The run's own evaluation, on the whole shipped train (database / probe fit) and test split;
  # the report goes to tmp_path, never into the package.
  path = pretrained.resolve(f"pretrained:{name}")
  want = _headline(pretrained.info(f"pretrained:{name}")["results"])
  config = workdirs.read_config(path)
  for key in ("full", "baselines", "plots"):  # Only the headline scores: no report, no plots.
    if key in config.eval:
      config.eval[key] = False
  report = core_train.evaluate_workdir(methods.task(config.method), path, config=config,
                                       out_dir=tmp_path / "eval")
  if "trained" in report:
    assert report["num_train"] == 60_000 and report["num_eval"] == 10_000
  got = {k: v for k, (v, _) in _headline(report).items()}
  assert set(got) == set(want)
  for key, (value, tolerance) in want.items():
    assert abs(got[key] - value) <= tolerance, (key, got[key], value)


def test_the_default_spaces_ship():
  """The README's pretrained spaces are in the package (a missing one would skip the test above
  silently)."""
  assert {"vicreg-fashion-mnist", "imagebind-mnist-fsdd"} <= set(pretrained.list_pretrained())


def test_embeddings_of_a_shipped_space_go_to_the_working_directory(tmp_path, monkeypatch):
  # Never into the installed package, nor into a folder named "pretrained:...".
  from embedspace import embed
  monkeypatch.chdir(tmp_path)
  assert embed.PRETRAINED_PREFIX == pretrained.PREFIX
  assert embed.default_out("pretrained:vicreg-fashion-mnist", "embedded_fashion_mnist:test",
                           "encoder") == str(
      tmp_path / "embeddings" / "vicreg-fashion-mnist_embedded_fashion_mnist_test_encoder.npz")
  assert embed.default_out("runs/a", "x.npy", "encoder") == str(
      tmp_path / "runs" / "a" / "embeddings" / "x_encoder.npz")


def test_the_shipped_imagebind_space_loads_by_name_for_the_commands():
  # `embed --modality=...` and `search --query_text` load multimodal spaces through
  # `multimodal.space.load`, not `embedspace.load`.
  from embedspace.multimodal import space as space_lib
  space = space_lib.load("pretrained:imagebind-mnist-fsdd")
  assert space.step == 600 and set(space.model.modalities) == {"image", "audio", "text"}
  assert space.workdir == pretrained.resolve("pretrained:imagebind-mnist-fsdd")
