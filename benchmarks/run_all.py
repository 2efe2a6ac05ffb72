"""Runs every side-by-side benchmark and writes `results.json` and the tables of `RESULTS.md`.

  pip install -e '.[bench]'
  python -m benchmarks.run_all                   # ~15 min on 2 idle CPU cores, ~30 when shared
  python -m benchmarks.run_all --quick           # tiny sizes: a smoke check
  python benchmarks/run_all.py --out=/tmp/bench --only=losses,knn
  python -m benchmarks.race --methods=vicreg --out=/tmp/race.json   # a long run on its own,
  python -m benchmarks.run_all --rows=/tmp/race.json                # then into RESULTS.md

Benchmarks: `losses` (embedspace's losses vs lightly's), `train_step` (the VICReg training
step vs a PyTorch + lightly loop, and the step's FLOP/s vs a matmul), `vit_step` (the ViT
training step vs the same ViT in PyTorch, eager and `torch.compile`), `knn` (blocked `top_k`
vs faiss and scikit-learn), `race` (whole VICReg, SimCLR and BYOL training runs vs PyTorch +
lightly: accuracy curves, wall time, time to accuracy; about 12 minutes per method and 2 seeds
on 2 quiet AMD EPYC cores, plus ~5 minutes of tuning the reference per method) and, when present, `big_batch` (another module
with the same `run(quick) -> list[dict]` interface).
Each module is also runnable alone. Nothing here picks a device: JAX runs on its default backend
and torch on CUDA when it sees one, so the same command runs on an accelerator machine. Only the
generated part of RESULTS.md (between its markers) is rewritten; the analysis written around it
is kept. With `--only`, the other benchmarks' rows already in `--out`'s results.json are kept
(their sections name the command and machine they came from), so one benchmark can be rerun
without losing the others, and with `--rows` the rows a benchmark wrote with its own `--out`
replace that benchmark's rows (the section names the benchmark's own command, machine and date).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

BENCHMARKS = ("losses", "train_step", "vit_step", "knn", "race", "big_batch")
"""Modules of `benchmarks/` run in this order; a missing optional one (big_batch) is skipped."""

_REQUIRED = ("losses", "train_step", "vit_step", "knn", "race")


def run_benchmarks(names: list[str], quick: bool, *, compile_torch: bool) -> list[dict[str, Any]]:
  """Runs the named benchmark modules; a failing one becomes an error row (and is printed)."""
  rows: list[dict[str, Any]] = []
  for name in names:
    module_name = f"benchmarks.{name}"
    if name not in _REQUIRED and importlib.util.find_spec(module_name) is None:
      print(f"[run_all] {name}: no benchmarks/{name}.py, skipped", file=sys.stderr)
      continue
    print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
      module = importlib.import_module(module_name)
      if name in ("train_step", "vit_step"):
        out = module.run(quick, compile_=compile_torch)
      else:
        out = module.run(quick)
    except Exception as e:  # One broken benchmark must not lose the others' results.
      traceback.print_exc()
      out = [{"benchmark": name, "case": "error", "impl": "", "summary": True,
              "error": f"{type(e).__name__}: {e}",
              "note": f"**{name} failed**: {type(e).__name__}: {str(e)[:300]}"}]
    print(f"[run_all] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
    rows += [normalize_row(name, r) for r in out]
  return rows


def normalize_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
  """Gives a row of another module's shape the `benchmark`, `case` and `impl` keys."""
  r = dict(r)
  r.setdefault("benchmark", name)
  if "case" not in r:
    r["case"] = ", ".join(f"{k}={r[k]}" for k in ("n", "dim", "batch", "size") if k in r) or "-"
  r.setdefault("impl", str(r.get("method", "")))
  return r


def imported_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a benchmark's own `--out` file (`{"machine", "argv", "rows"}`), each with the
  `source` it was measured with: its command line, machine and the file's date."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  argv = data.get("argv") or ["?"]
  name = os.path.splitext(os.path.basename(argv[0]))[0]
  if name not in BENCHMARKS:
    raise ValueError(f"{path}: written by {argv[0]!r}, not one of {', '.join(BENCHMARKS)}")
  date = time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(path)))
  source = common.provenance(" ".join([f"python -m benchmarks.{name}", *argv[1:]]),
                             data.get("machine", {}), date=date)
  return [{**normalize_row(name, r), "source": source} for r in data["rows"]]


def main(argv: list[str] | None = None) -> int:
  """Parses flags, runs the benchmarks and writes the results; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                      help="folder for results.json and RESULTS.md (default: benchmarks/)")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {', '.join(BENCHMARKS)} (default: all, "
                           "or none with --rows)")
  parser.add_argument("--rows", action="append", default=[],
                      help="a JSON file a benchmark wrote with its own --out (e.g. "
                           "`benchmarks.race --out=F`): its rows replace that benchmark's")
  parser.add_argument("--no_torch_compile", action="store_true",
                      help="skip the torch.compile variant of the training loop")
  args = parser.parse_args(argv)
  only = args.only if args.only is not None else "" if args.rows else ",".join(BENCHMARKS)
  names = [n for n in only.split(",") if n]
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    parser.error(f"unknown benchmarks {unknown}; valid: {', '.join(BENCHMARKS)}")
  try:
    imported = [r for path in args.rows for r in imported_rows(path)]
  except (OSError, ValueError, KeyError) as e:
    parser.error(f"--rows: {e}")
  command = "python -m benchmarks.run_all" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
  print(f"[run_all] load average before: {os.getloadavg()}", file=sys.stderr)
  t0 = time.perf_counter()
  rows = run_benchmarks(names, args.quick, compile_torch=not args.no_torch_compile)
  info = common.machine_info()
  source = common.provenance(command, info)
  rows = [{**r, "source": source} for r in rows]
  rows += imported
  replaced = set(names) | {r["benchmark"] for r in imported}
  if replaced != set(BENCHMARKS):
    rows = common.kept_rows(args.out, exclude=sorted(replaced)) + rows
  json_path, md_path = common.write_results(args.out, rows, info, command,
                                            time.perf_counter() - t0)
  print(f"[run_all] wrote {json_path} and {md_path}", file=sys.stderr)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
