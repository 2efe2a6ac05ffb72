"""The geometry report against numpy references, its pictures, and the evaluation CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedspace import losses
from embedspace.measure import plots
from embedspace.measure import report


def test_class_similarity_matches_pairwise_mean():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 5))
  y = rng.integers(0, 3, 60)
  y[:2] = 2
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = u @ u.T
  got = report.class_similarity(x, y, num_classes=4)  # class 3 is empty
  for a in range(3):
    for b in range(3):
      block = cos[np.ix_(y == a, y == b)]
      ref = (block.sum() - np.trace(block)) / (block.size - len(block)) if a == b else block.mean()
      assert got[a, b] == pytest.approx(ref, abs=1e-12)
  assert np.all(np.isnan(got[3]))


def test_dimension_usage_sees_collapsed_dimensions():
  rng = np.random.default_rng(1)
  x = np.zeros((500, 16))
  x[:, :4] = rng.normal(size=(500, 4)) * [4.0, 3.0, 2.0, 1.0]
  x[:, 4] = 1e-5 * rng.normal(size=500)  # collapsed: far below 1% of the largest spread
  u, curves = report.dimension_usage(x)
  assert u["dim"] == 16 and u["dims_used"] == 4
  assert u["components_99"] <= 4 and u["components_90"] == 3  # 16+9+4 of 30 is 97%
  assert curves["std_sorted"][0] == pytest.approx(x[:, 0].std())
  assert curves["pca_variance_ratio"].sum() == pytest.approx(1.0)
  assert u["effective_rank"] == pytest.approx(
      float(losses.effective_rank(jnp.asarray(x, jnp.float32))), rel=1e-5)
  assert 2.5 < u["effective_rank"] < 4.0


def test_hypersphere_report_on_known_geometry():
  rng = np.random.default_rng(2)
  c, d = 4, 8
  y = np.repeat(np.arange(c), 50)
  x = (5 * np.eye(c, d)[y] + 0.3 * rng.normal(size=(len(y), d))).astype(np.float32)
  views = x + 0.01 * rng.normal(size=x.shape).astype(np.float32)
  numbers, arrays = report.hypersphere_report(x, y, num_classes=c, view1=x, view2=views,
                                              measures=("cosine", "euclidean", "mahalanobis"),
                                              max_points=150, seed=0)
  assert numbers["num_points"] == 200 and numbers["num_pair_points"] == 150
  assert numbers["alignment"] < 1e-3  # the views are nearly identical
  geo = numbers["geodesic"]
  assert geo["positive"]["mean"] < 0.05
  assert geo["same_class"]["mean"] < 0.3 < 1.3 < geo["different_class"]["mean"]  # ~pi/2 apart
  assert numbers["uniformity"] == pytest.approx(
      float(losses.uniformity(jnp.asarray(x[np.sort(
          np.random.default_rng(0).choice(200, 150, replace=False))]))), rel=1e-5)
  sim = np.asarray(numbers["class_similarity"])
  assert np.all(np.diag(sim) > 0.9) and np.all(sim[~np.eye(c, dtype=bool)] < 0.2)
  for m in ("cosine", "euclidean", "mahalanobis"):
    assert numbers["same_vs_different_class_auroc"][m] > 0.99
  n_pairs = 150 * 149 // 2
  p = arrays["pairs"]["cosine"]
  assert len(p["same"]) + len(p["different"]) == n_pairs and p["is_similarity"]
  json.dumps(numbers)  # JSON-ready


def test_plots_write_pngs(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  y = rng.integers(0, 3, 120)
  numbers, arrays = report.hypersphere_report(x, y, num_classes=3, view1=x, view2=x + 0.1,
                                              measures=("cosine", "hamming_64"), seed=0)
  names = ("a", "b", "c")
  paths = [
      plots.plot_class_similarity({"enc": arrays["class_similarity"]}, names,
                                   str(tmp_path / "sim.png")),
      plots.plot_pair_histograms(arrays["pairs"], numbers["same_vs_different_class_auroc"],
                                  "t", str(tmp_path / "pairs.png")),
      plots.plot_geodesic({"enc": arrays["geodesic"]}, str(tmp_path / "geo.png")),
      plots.plot_dimensions({"enc": arrays["dimensions"]}, str(tmp_path / "dims.png")),
      plots.plot_maps({"PCA": report.pca_2d(x)}, y, names, str(tmp_path / "map.png")),
  ]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pca_2d_finds_the_spread_directions():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(300, 5)) * [0.1, 5.0, 0.1, 3.0, 0.1]
  xy = report.pca_2d(x)
  assert xy.shape == (300, 2)
  np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 0], x[:, 1])[0, 1]), 1.0, atol=1e-2)
  np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 1], x[:, 3])[0, 1]), 1.0, atol=1e-2)


# ----------------------------------------------------------------------------------------------
# The CLI on a real (smoke) training run (`smoke_workdir` is in conftest.py).


def test_cli_on_a_smoke_workdir(smoke_workdir, tmp_path):
  # One test for the one (expensive) workdir: under pytest-xdist each worker would train it.
  _check_load_workdir_skips_a_damaged_newest_checkpoint(smoke_workdir, tmp_path)
  out = tmp_path / "eval"
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  # A relative --workdir, as users type it (orbax itself needs absolute paths).
  parent, name = os.path.split(os.fspath(smoke_workdir))
  proc = subprocess.run(
      [sys.executable, "-m", "embedspace.evaluate", f"--workdir={name}",
       f"--out_dir={out}", "--notsne", "--max_pair_points=256", "--code_lengths=16,256"],
      capture_output=True, text=True, env=env, timeout=300, cwd=parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "report in" in proc.stdout
  with open(out / "report.json", encoding="utf-8") as f:
    result = json.load(f)
  assert result["step"] == 6
  assert result["num_train"] == 512 and result["num_eval"] == 1000  # the :smoke eval subsets
  for space in ("encoder", "projector", "raw_pixels"):
    table = result["measures"][space]
    assert set(table) == {"manhattan", "euclidean", "cosine", "negative_arc_length",
                          "mahalanobis", "hamming_16", "hamming_256"}
    assert all(0.0 <= row["knn_accuracy"] <= 1.0 and 0.0 < row["map"] <= 1.0
               for row in table.values())
    assert set(result["ood"]["metrics"][space]) == {"mahalanobis", "euclidean_to_mean",
                                                    "cosine_to_mean", "knn"}
  # MNIST digits vs Fashion-MNIST clothes: even raw pixels separate them well above chance.
  assert result["ood"]["metrics"]["raw_pixels"]["mahalanobis"]["auroc"] > 0.7
  assert result["ood"]["num_out"] == 10000  # all of MNIST's test split (shipped)
  assert "random_init" in result and "alignment" in result["geometry"]["encoder"]
  for png in ("class_similarity.png", "measures_encoder.png", "geodesic.png", "dimensions.png",
              "ood.png", "maps.png"):
    assert (out / png).stat().st_size > 10_000, png
    assert f"]({png})" in (out / "report.md").read_text()


def test_cli_without_checkpoint_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text('{"method": "vicreg"}')  # The CLI reads its method.
  proc = subprocess.run([sys.executable, "-m", "embedspace.evaluate", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def _check_load_workdir_skips_a_damaged_newest_checkpoint(smoke_workdir, tmp_path):
  import shutil

  from embedspace import methods

  loaded = methods.load(smoke_workdir)
  config, variables = loaded.config, loaded.variables
  assert loaded.step == 6 and config.method == "vicreg"
  assert set(variables) == {"params", "batch_stats"}
  copy = tmp_path / "copy"
  shutil.copytree(smoke_workdir, copy)
  for path in (copy / "checkpoints" / "6" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"broken")
  damaged = methods.load(str(copy))
  old, step = damaged.variables, damaged.step
  assert step == 3
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(old["params"]), jax.tree.leaves(variables["params"])))
