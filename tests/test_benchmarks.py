"""The side-by-side benchmarks: `--quick` of the losses benchmark runs and the values agree.

Skipped unless the `bench` extra (torch, lightly) is installed: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

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
