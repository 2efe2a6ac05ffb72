"""kill -9 at seeded random points, then the same command: the end is bit-identical (issue 23,
item 8).

Three of `benchmarks.fault_injection`'s points (seeded, so the same three each run: a mid-save
kill and two mid-step kills at random delays); the benchmark runs all ten and its result is in
docs/training.md. The final checkpoint's integrity record (the sha256 of every array of the train
state, verified against the restored arrays) and its data position must equal those of an
uninterrupted run of the same command.
"""

from __future__ import annotations

from benchmarks import fault_injection

SEED = 5  # the save of step 4, step 6 (+239 ms), step 9 (+9 ms)


def test_points_are_seeded_and_ordered():
  points = fault_injection.kill_points(10, seed=0)
  assert points == fault_injection.kill_points(10, seed=0)
  assert [p["step"] for p in points] == sorted(p["step"] for p in points)
  assert {p["kind"] for p in points} == {"step", "save"}
  assert all(p["step"] % fault_injection.CHECKPOINT_EVERY == 0 for p in points
             if p["kind"] == "save")


def test_kill9_at_three_seeded_points_ends_bit_identical(tmp_path):
  cache_dir = str(tmp_path / "jax_cache")
  points = fault_injection.kill_points(3, seed=SEED)
  assert {p["kind"] for p in points} == {"step", "save"}, points  # The seed covers both kinds.
  reference = fault_injection.uninterrupted(str(tmp_path / "reference"), cache_dir)
  log = fault_injection.inject(str(tmp_path / "run"), points, cache_dir)
  print(log)
  assert all(entry["killed"] != "missed (the run ended first)" for entry in log[:-1]), log
  got = fault_injection.final_record(str(tmp_path / "run"))
  assert got["data"] == reference["data"]
  assert got["sha256"] == reference["sha256"]
