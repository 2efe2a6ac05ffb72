"""InfoNCE at large global batches: dense `losses.info_nce` against `losses.info_nce_blockwise`.

  python -m benchmarks.big_batch --quick      # N = 1024, 2048: ~30 s on 2 CPU cores
  python -m benchmarks.big_batch              # N = 4096 ... 65536 x 256: ~10-15 min on 2 cores
  python -m benchmarks.big_batch --sizes=32768 --dim=128

Each case is one program, value and gradient w.r.t. both views (`jax.value_and_grad`), on one
device, run in its own subprocess so that its memory is its own. Two memory figures:

- XLA: `jax.jit(...).lower(...).compile().memory_analysis()`, the temporary buffers of the
  compiled program (`temp`) and those plus its arguments and outputs (`total`). Known before
  anything runs, so a dense case whose program would not fit in `--max_gib` (default: 60% of
  the machine's available memory) is compiled and reported, but not run.
- RSS: the subprocess's peak resident set (`VmHWM` of `/proc/self/status`, read in the
  subprocess after the timed calls), which includes JAX's own ~0.3-0.5 GiB. Not `ru_maxrss`:
  Linux carries that across fork and exec, so a subprocess of a large parent (run_all, with
  torch loaded) would report the parent's peak.

Time is the wall-clock of one call of the compiled program (the best of `repeats`; 1 repeat for
N > 8192, where a blockwise call takes minutes on a laptop-class CPU), and its process CPU time,
which is the figure to compare across runs on a shared machine. Blockwise does ~8 A C d FLOPs
for value and gradient against the dense ~6 A C d, but never writes a `[2N, 2N]` matrix.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

QUICK_SIZES = (1024, 2048)
FULL_SIZES = (4096, 8192, 16384, 65536)
METHODS = ("dense", "blockwise")
_GIB = 2 ** 30


def _available_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), or 8 GiB where it cannot be read."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 * _GIB


def measure(method: str, n: int, dim: int, *, block_size: int, repeats: int,
            max_bytes: int) -> dict[str, Any]:
  """Compiles and times value-and-gradient of one loss at `[n, dim]` (run in a subprocess)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from embedspace import losses  # pylint: disable=import-outside-toplevel

  loss = (losses.info_nce if method == "dense"
          else functools.partial(losses.info_nce_blockwise, block_size=block_size))
  spec = jax.ShapeDtypeStruct((n, dim), jnp.float32)
  started = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
  memory = compiled.memory_analysis()
  row: dict[str, Any] = {
      "method": method, "n": n, "dim": dim,
      "block_size": block_size if method == "blockwise" else None,
      "compile_s": time.perf_counter() - started,
      "xla_temp_bytes": memory.temp_size_in_bytes,
      "xla_total_bytes": (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                          + memory.output_size_in_bytes - memory.alias_size_in_bytes),
  }
  if row["xla_total_bytes"] > max_bytes:
    row["status"] = f"not run: needs {row['xla_total_bytes'] / _GIB:.1f} GiB"
    return row
  z1, z2 = jax.random.normal(jax.random.key(0), (2, n, dim), jnp.float32)
  z2 = z1 + 0.5 * z2  # correlated views, so the loss is not log(2N - 1)
  jax.block_until_ready((z1, z2))
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    value, _ = jax.block_until_ready(compiled(z1, z2))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  best = min(range(repeats), key=wall.__getitem__)
  row.update(status="ok", loss=float(value), time_s=wall[best], cpu_s=cpu[best], repeats=repeats,
             peak_rss_bytes=peak_rss_bytes())
  return row


def peak_rss_bytes() -> int:
  """This process's own peak resident set: `VmHWM` (Linux), else `ru_maxrss` (which on Linux
  would include the peak of the process this one was forked from)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _measure_in_subprocess(method: str, n: int, dim: int, *, block_size: int,
                           max_bytes: int) -> dict[str, Any]:
  """Runs `measure` in a fresh interpreter (its own peak RSS) and returns its row."""
  repeats = 3 if n <= 8192 else 1
  case = json.dumps(dict(method=method, n=n, dim=dim, block_size=block_size, repeats=repeats,
                         max_bytes=max_bytes))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  done = subprocess.run([sys.executable, "-m", "benchmarks.big_batch", f"--case={case}"],
                        cwd=root, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(method=method, n=n, dim=dim, status=f"failed ({done.returncode}): {tail[0]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds blockwise/dense ratios (time, CPU, XLA memory, RSS) to blockwise rows where both ran."""
  dense = {(r["n"], r["dim"]): r for r in rows if r["method"] == "dense"}
  for row in rows:
    other = dense.get((row["n"], row["dim"]))
    if row["method"] != "blockwise" or other is None:
      continue
    if "xla_total_bytes" in other and "xla_total_bytes" in row:
      row["xla_total_ratio"] = row["xla_total_bytes"] / other["xla_total_bytes"]
    if row.get("status") == "ok" and other.get("status") == "ok":
      for key in ("time_s", "cpu_s", "peak_rss_bytes"):
        row[key.rsplit("_", 1)[0] + "_ratio"] = row[key] / other[key]
      row["loss_abs_diff"] = abs(row["loss"] - other["loss"])


def run(quick: bool, *, sizes: tuple[int, ...] | None = None, dim: int = 256,
        block_size: int = 1024, max_bytes: int | None = None,
        progress: bool = False) -> list[dict[str, Any]]:
  """Measures dense and blockwise InfoNCE (value and gradient) at each global batch size.

  Args:
    quick: N in `QUICK_SIZES` (seconds) instead of `FULL_SIZES` (minutes).
    sizes: global batch sizes N (each program scores 2N views), overriding `quick`.
    dim: embedding dimension d.
    block_size: the blockwise loss's tile size.
    max_bytes: a program whose XLA memory exceeds this is compiled but not run (default 60% of
      the available memory).
    progress: print each row to stderr as JSON when it is measured.

  Returns:
    One row per (method, N): XLA temp/total bytes, wall and CPU seconds, peak RSS, the loss, and
    on blockwise rows the blockwise/dense ratios where both ran.
  """
  sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
  max_bytes = max_bytes or int(0.6 * _available_bytes())
  rows = []
  for n in sizes:
    for method in METHODS:
      rows.append(_measure_in_subprocess(method, n, dim, block_size=block_size,
                                         max_bytes=max_bytes))
      if progress:
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  _add_ratios(rows)
  return rows


def _cell(row: dict[str, Any], key: str, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
  return fmt.format(row[key] / scale) if key in row else "-"


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table (memory in MiB, ratios blockwise/dense)."""
  mib = 2.0 ** 20
  lines = ["| N | d | method | block | wall s | CPU s | XLA temp MiB | XLA total MiB | "
           "peak RSS MiB | wall ratio | CPU ratio | XLA total ratio | RSS ratio | status |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(" | ".join([
        f"| {r['n']:,}", str(r["dim"]), r["method"], str(r.get("block_size") or "-"),
        _cell(r, "time_s"), _cell(r, "cpu_s"), _cell(r, "xla_temp_bytes", mib, "{:,.0f}"),
        _cell(r, "xla_total_bytes", mib, "{:,.0f}"), _cell(r, "peak_rss_bytes", mib, "{:,.0f}"),
        _cell(r, "time_ratio"), _cell(r, "cpu_ratio"), _cell(r, "xla_total_ratio", 1, "{:.2g}"),
        _cell(r, "peak_rss_ratio", 1, "{:.2g}"), r.get("status", "?")]) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_SIZES}")
  parser.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")),
                      default=None, help="comma-separated global batch sizes N")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--block_size", type=int, default=1024)
  parser.add_argument("--max_gib", type=float, default=None,
                      help="skip running programs whose XLA memory exceeds this")
  parser.add_argument("--json", default=None, help="also write the rows here")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one subprocess's case
  args = parser.parse_args()
  if args.case:
    print(json.dumps(measure(**json.loads(args.case))))
    return
  started = time.perf_counter()
  max_bytes = int(args.max_gib * _GIB) if args.max_gib else None
  rows = run(args.quick, sizes=args.sizes, dim=args.dim, block_size=args.block_size,
             max_bytes=max_bytes, progress=True)
  print(markdown(rows))
  print(f"\n({time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
