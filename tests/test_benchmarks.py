"""The side-by-side benchmarks: `--quick` of the losses benchmark runs and the values agree.

Skipped unless the `bench` extra (torch, lightly) is installed: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import common  # Sets OMP_WAIT_POLICY before torch is imported.

pytest.importorskip("torch")
pytest.importorskip("lightly")

from benchmarks import losses as losses_bench  # noqa: E402


def test_losses_quick_values_agree_and_times_reported():
  # One quick size per loss keeps the test within a few seconds.
  device = common.torch_device()
  rows = []
  for name in losses_bench.NAMES:
    rows += losses_bench.bench_case(name, 64, 32, device, quick=True, repeats=2)
  assert len(rows) == 2 * len(losses_bench.NAMES)
  for r in rows:
    assert r["values_agree"], r["check"]
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
  assert all("speedup" in r for r in rows if r["impl"] == "embedspace (jax)")


def test_write_results_keeps_text_outside_markers(tmp_path):
  stats = common.summarize([(0.1, 0.0), (0.2, 0.0), (0.3, 0.0)])
  rows = [common.row("losses", "c", "ref", stats),
          common.row("losses", "c", "mine", stats, reference=stats, check="ok")]
  info = {"cpu": "test cpu", "cores": 2, "loadavg_1_5_15": (0.0, 0.0, 0.0), "jax": "x",
          "jax_backend": "cpu"}
  common.write_results(str(tmp_path), rows, info, "cmd", 1.0)
  md = tmp_path / "RESULTS.md"
  md.write_text(md.read_text() + "\nHand-written analysis.\n")
  common.write_results(str(tmp_path), rows, info, "cmd", 2.0)
  text = md.read_text()
  assert "Hand-written analysis." in text
  assert text.count(common.BEGIN_MARK) == 1
  assert "| c | mine | 200.0 ms" in text
  assert (tmp_path / "results.json").exists()


def test_big_batch_peak_rss_is_the_subprocess_own_not_its_parents():
  import subprocess
  import sys

  import numpy as np

  from benchmarks import big_batch

  ballast = np.ones(1 << 27)  # 1 GiB resident in this process
  parent = big_batch.peak_rss_bytes()
  assert parent > ballast.nbytes
  child = subprocess.run(
      [sys.executable, "-c", "import resource, sys; sys.path.insert(0, '.');"
       "from benchmarks.big_batch import peak_rss_bytes;"
       "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
      capture_output=True, text=True, check=True, cwd=big_batch.__file__.rsplit("/", 2)[0])
  own, inherited = map(int, child.stdout.split())
  assert own < parent - ballast.nbytes // 2 < inherited  # ru_maxrss carries the parent's peak
  del ballast


def test_kept_rows_carry_their_source_into_the_report(tmp_path):
  stats = common.summarize([(0.1, 0.0), (0.2, 0.0), (0.3, 0.0)])
  old_info = {"cpu": "old cpu", "cores": 2, "loadavg_1_5_15": (1.5, 1.6, 1.7), "jax": "x",
              "jax_backend": "cpu"}
  common.write_results(str(tmp_path), [common.row("knn", "c", "ref", stats)], old_info,
                       "old command", 1.0)
  kept = common.kept_rows(str(tmp_path), exclude=["race"])
  assert [r["benchmark"] for r in kept] == ["knn"]
  assert kept[0]["source"]["command"] == "old command"
  assert common.kept_rows(str(tmp_path), exclude=["knn"]) == []
  new = [{"benchmark": "race", "case": "vicreg", "impl": "mine", "final kNN": 0.5}]
  common.write_results(str(tmp_path), kept + new, {**old_info, "cpu": "new cpu"}, "new", 1.0)
  text = (tmp_path / "RESULTS.md").read_text()
  assert "_From `old command` (old cpu, 2 cores, load average at the end 1.50 / 1.60)._" in text
  assert "### race" in text and "| vicreg | mine | 0.5 |" in text


from benchmarks import race  # noqa: E402


def test_time_to_accuracy_interpolates_between_curve_points():
  curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)]
  assert race.time_to_accuracy(curve, 0.6) == (15.0, "")
  assert race.time_to_accuracy(curve, 0.4) == (10.0, "<=")  # before the first point: a bound
  assert race.time_to_accuracy(curve, 0.9) == (None, ">")


def test_reference_transform_draws_views_like_embedspace():
  # Same strengths, two implementations: the views' pixel statistics must agree.
  import torch

  from embedspace.data import augment

  data = race.Data.load()
  config = race.race_config("vicreg", steps=8, batch_size=32, seed=0, quick=False)
  images = data.train_images[:256]
  transform = race.reference_transform(config.data.augment, size=28, mean=data.mean,
                                       std=data.std)
  torch.manual_seed(0)
  ref = np.stack([transform(torch.from_numpy(im.transpose(2, 0, 1).copy())).numpy()
                  for im in images for _ in range(4)])
  rng = np.random.default_rng(0)
  cfg = augment.AugmentConfig.create(config.data.augment)
  mine = np.stack([augment.random_views(im, rng, cfg, size=28, mean=np.float32(data.mean),
                                        std=np.float32(data.std), num_views=4)
                   for im in images]).reshape(-1, 28, 28)
  assert ref.shape[0] == mine.shape[0]
  assert abs(ref.mean() - mine.mean()) < 0.03
  assert abs(ref.std() - mine.std()) < 0.03
  # Per-view brightness spread comes from the same jitter strength and probability.
  assert abs(ref.reshape(len(ref), -1).mean(1).std() - mine.reshape(len(mine), -1).mean(1).std()
             ) < 0.03


def test_race_quick_trains_and_scores_both_sides():
  rows = race.race(["vicreg"], seeds=(0,), steps=2, batch_size=16, points=1, quick=True,
                   eval_train=256, eval_test=128, tune=False, profile=False)
  table = [r for r in rows if not r.get("summary")]
  impls = {r["impl"] for r in table}
  assert impls == {race.EMBEDSPACE, race.REFERENCE}
  for r in table:
    if r["seed"] == "0":
      assert 0.0 <= r["final kNN"] <= 1.0 and 0.0 <= r["final probe"] <= 1.0
      assert r["train s"] > 0 and r["img/s"] > 0
      assert r["kNN curve"].startswith("2:")
  mean_es = [r for r in table if r["impl"] == race.EMBEDSPACE and r["seed"].startswith("mean")]
  assert mean_es[0]["time-to-acc"].endswith(("x", "(not reached)"))
  assert any("final kNN embedspace" in r.get("note", "") for r in rows)


def test_reference_run_follows_embedspace_schedule_and_decay_groups():
  from embedspace.core import optim

  data = race.Data.load()
  config = race.race_config("simclr", steps=40, batch_size=16, seed=0, quick=True)
  run = race.ReferenceRun(config, race.RECIPES["simclr"], data, race.ReferenceSetup())
  schedule = optim.learning_rate_schedule(config)
  np.testing.assert_allclose(run.lrs, [float(schedule(i)) for i in range(40)], rtol=1e-6)
  decayed = sum(p.numel() for p in run.opt.param_groups[0]["params"])
  import jax
  params = race.flax_params(config)
  mask = optim.decay_mask(params)
  want = sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
             if m)
  assert decayed == want
  run.close()
