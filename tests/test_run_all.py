"""`benchmarks.run_all --rows`: a benchmark's own `--out` file replaces its rows in RESULTS.md.

Runs without the `bench` extra: nothing here trains or imports torch.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import common
from benchmarks import run_all


def _race_out(path, knn: float) -> None:
  rows = [{"method": "vicreg", "impl": "mine", "seed": "0", "final kNN": knn},
          {"benchmark": "race", "case": "vicreg", "impl": "", "summary": True,
           "note": f"vicreg: final kNN {knn}"}]
  machine = {"cpu": "race cpu", "cores": 2, "loadavg_1_5_15": [0.5, 0.6, 0.7]}
  path.write_text(json.dumps({"machine": machine, "rows": rows, "argv": [
      "/x/benchmarks/race.py", "--methods=vicreg", "--steps=300"]}))


def test_rows_replace_only_their_benchmark_and_name_their_own_command(tmp_path):
  stats = common.summarize([(0.1, 0.0), (0.2, 0.0), (0.3, 0.0)])
  info = {"cpu": "old cpu", "cores": 2, "loadavg_1_5_15": (1.0, 1.0, 1.0), "jax": "x",
          "jax_backend": "cpu"}
  old = [common.row("knn", "c", "ref", stats),
         {"benchmark": "race", "case": "vicreg", "impl": "mine", "final kNN": 0.1}]
  common.write_results(str(tmp_path), old, info, "old command", 1.0)
  out = tmp_path / "race.json"
  _race_out(out, 0.875)
  assert run_all.main([f"--out={tmp_path}", f"--rows={out}"]) == 0
  text = (tmp_path / "RESULTS.md").read_text()
  assert "| vicreg | mine | 0 | 0.875 |" in text and "0.1 |" not in text  # Replaced, not added.
  assert "Assembled by `python -m benchmarks.run_all" in text  # No machine of its own.
  assert "| - |" not in text  # No column of the `case` run_all fills in for rows without one.
  assert "- vicreg: final kNN 0.875" in text
  assert "_From `python -m benchmarks.race --methods=vicreg --steps=300` (" in text
  assert "race cpu, 2 cores, load average at the end 0.50 / 0.60)._" in text
  assert "### knn" in text and "_From `old command`" in text  # Kept, with its own source.
  kept = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert sorted(r["benchmark"] for r in kept) == ["knn", "race", "race"]


def test_rows_of_an_unknown_writer_are_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "other.json"
  bad.write_text(json.dumps({"argv": ["/x/somewhere/else.py"], "rows": []}))
  with pytest.raises(SystemExit) as e:
    run_all.main([f"--out={tmp_path}", f"--rows={bad}"])
  assert e.value.code == 2
  assert "not one of losses" in capsys.readouterr().err
  assert not (tmp_path / "RESULTS.md").exists()  # Nothing was written.


def test_rows_of_two_runs_of_one_benchmark_each_name_their_command(tmp_path):
  first, second = tmp_path / "vicreg.json", tmp_path / "simclr.json"
  _race_out(first, 0.85)
  _race_out(second, 0.86)
  data = json.loads(second.read_text())
  data["argv"] = ["/x/benchmarks/race.py", "--methods=simclr"]
  second.write_text(json.dumps(data))
  assert run_all.main([f"--out={tmp_path}", f"--rows={first}", f"--rows={second}"]) == 0
  text = (tmp_path / "RESULTS.md").read_text()
  assert text.count("### race") == 1
  one = text.index("_From `python -m benchmarks.race --methods=vicreg --steps=300`")
  two = text.index("_From `python -m benchmarks.race --methods=simclr`")
  assert one < text.index("| 0.85 |") < two < text.index("| 0.86 |")  # Each under its source.
