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
from benchmarks import race_reference  # noqa: E402
from benchmarks import race_scores  # noqa: E402


def test_time_to_accuracy_interpolates_between_curve_points():
  curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)]
  assert race_scores.time_to_accuracy(curve, 0.6) == (15.0, "")
  assert race_scores.time_to_accuracy(curve, 0.4) == (10.0, "<=")  # before the first point: a bound
  assert race_scores.time_to_accuracy(curve, 0.9) == (None, ">")


def test_reference_transform_draws_views_like_embedspace():
  # Same strengths, two implementations: the views' pixel statistics must agree.
  import torch

  from embedspace.data import augment

  data = race.Data.load()
  config = race.race_config("vicreg", steps=8, batch_size=32, seed=0, quick=False)
  images = data.train_images[:256]
  transform = race_reference.reference_transform(config.data.augment, size=28, mean=data.mean,
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
  run = race_reference.ReferenceRun(config, race.RECIPES["simclr"].reference_objective, data,
                                    race_reference.ReferenceSetup())
  schedule = optim.learning_rate_schedule(config)
  np.testing.assert_allclose(run.lrs, [float(schedule(i)) for i in range(40)], rtol=1e-6)
  decayed = sum(p.numel() for p in run.opt.param_groups[0]["params"])
  import jax
  params = race_reference.flax_params(config)
  mask = optim.decay_mask(params)
  want = sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
             if m)
  assert decayed == want
  run.close()


def test_reference_byol_loss_and_momentum_match_embedspace():
  import torch

  from embedspace import losses

  config = race.race_config("byol", steps=7, batch_size=16, seed=0, quick=True)
  objective = race_reference.byol_objective(config, torch.nn.Linear(3, 3))
  rng = np.random.default_rng(0)
  p1, z2, p2, z1 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(4))
  v1, v2 = torch.from_numpy(p1), torch.from_numpy(p2)
  # The objective's own forward with an identity online network and predictor (predictions =
  # views) and a target that maps each view to its given projection.
  objective.predictor = torch.nn.Identity()
  targets = {id(v1): torch.from_numpy(z1), id(v2): torch.from_numpy(z2)}
  object.__setattr__(objective, "target", lambda v: targets[id(v)])
  ref = objective(lambda v: v, v1, v2)
  np.testing.assert_allclose(float(ref), float(losses.byol_loss(p1, z2, p2, z1)), rtol=1e-6)
  for total in (1, 2, 7, 300):
    config.num_steps = total
    for step in sorted({0, 1, 2, total // 2, total - 1, total, total + 3}):
      want = losses.ema_momentum(step, base=config.loss.momentum_base, total_steps=total)
      assert np.float32(race_reference.byol_momentum(config, step)) == want, (total, step)


def test_reference_byol_target_is_an_ema_outside_the_optimizer():
  import torch

  data = race.Data.load()
  config = race.race_config("byol", steps=4, batch_size=16, seed=0, quick=True)
  run = race_reference.ReferenceRun(config, race.RECIPES["byol"].reference_objective, data,
                                    race_reference.ReferenceSetup())
  target = run.objective.target
  online = list(run.model.parameters())
  trained = {id(p) for g in run.opt.param_groups for p in g["params"]}
  assert not trained & {id(p) for p in target.parameters()}
  assert not any(p.requires_grad for p in target.parameters())
  predictor = {id(p) for p in run.objective.predictor.parameters()}
  assert predictor and predictor <= trained and {id(p) for p in online} <= trained
  assert trained == {id(p) for p in online} | predictor
  initial = [p.detach().clone() for p in online]
  run.step()  # Step 0: tau(0) of a copy of the initial parameters is those parameters.
  for p, q in zip(target.parameters(), initial):
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
  before_t = [p.detach().clone() for p in target.parameters()]
  before_o = [p.detach().clone() for p in online]
  run.step()  # Step 1: target <- tau(1) target + (1 - tau(1)) online, before its forward pass.
  m = race_reference.byol_momentum(config, 1)
  assert config.loss.momentum_base < m < 1
  for p, t0, o0 in zip(target.parameters(), before_t, before_o):
    torch.testing.assert_close(p, m * t0 + (1 - m) * o0, rtol=1e-6, atol=1e-7)
  assert any(not torch.equal(p, o) for p, o in zip(target.parameters(), online))
  run.close()


def test_race_quick_byol_trains_and_scores_both_sides():
  rows = race.race(["byol"], seeds=(0,), steps=2, batch_size=16, points=1, quick=True,
                   eval_train=256, eval_test=128, tune=False, profile=False)
  table = [r for r in rows if not r.get("summary")]
  assert {r["impl"] for r in table} == {race.EMBEDSPACE, race.REFERENCE}
  for r in table:
    if r["seed"] == "0":
      assert 0.0 <= r["final kNN"] <= 1.0 and 0.0 <= r["final probe"] <= 1.0
      assert -1.0 <= r["loss"] <= 1.0  # Both sides in lightly's scale.
      assert r["kNN curve"].startswith("2:")
  assert any("final kNN embedspace" in r.get("note", "") for r in rows)


def test_reference_byol_flax_init_covers_the_predictor_and_the_target_copies_it():
  import torch

  data = race.Data.load()
  config = race.race_config("byol", steps=4, batch_size=16, seed=0, quick=True)
  run = race_reference.ReferenceRun(config, race.RECIPES["byol"].reference_objective, data,
                                    race_reference.ReferenceSetup(init="flax"))
  weight = run.objective.predictor[0].weight.detach()  # [64, 64]
  assert abs(float(weight.std()) * 8 - 1) < 0.06  # LeCun-normal: std 1/8 (torch's: 1/8/sqrt(3))
  for p, q in zip(run.objective.target.parameters(), run.model.parameters()):
    assert torch.equal(p, q)
  run.close()
