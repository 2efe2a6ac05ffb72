"""Timing, machine description and result writing shared by the side-by-side benchmarks.

  python -m benchmarks.run_all [--quick]     # runs every benchmark through these helpers

Every benchmark times its candidates *interleaved* (one call of each in turn, repeated), after
warm-up calls, so that a burst of load from another process hits embedspace and the reference
alike and the ratio measured in the same run stays meaningful. Around every timed call the CPU
time that *other* processes used is read from `/proc/stat` (all busy jiffies minus this
process's own CPU time); a call during which others kept more than `BUSY_CORES` cores busy is
marked busy, and when at least `MIN_QUIET` quiet samples exist the statistics use only those.
Each result row reports the median, the interquartile range and min/max of the kept samples.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# libgomp (torch's and faiss's OpenMP) spin-waits at its barriers by default; when the cores are
# shared with other processes that made a 128 x 256 NT-Xent loss 107 ms instead of 3.8 ms on 2
# threads here. Passive waiting is the fair setting for the references on a shared machine; it
# must be set before torch or faiss is imported, and an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BUSY_CORES = 0.25
"""Other processes' CPU use (in cores, averaged over a timed call) above which it is busy."""

MIN_QUIET = 3
"""Quiet samples needed before busy ones are dropped from the statistics."""

BEGIN_MARK = "<!-- BEGIN GENERATED (benchmarks/run_all.py) -->"
END_MARK = "<!-- END GENERATED -->"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _busy_jiffies() -> int:
  """Busy CPU jiffies of the whole machine (all CPUs) so far, from the first line of /proc/stat."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return 0
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal


def _own_cpu_seconds() -> float:
  """CPU seconds used by this process and its threads (children excluded)."""
  t = os.times()
  return t.user + t.system


def time_call(fn: Callable[[], Any]) -> tuple[float, float]:
  """Runs `fn` once; returns (wall seconds, cores other processes kept busy meanwhile).

  `fn` must block until its result is ready (e.g. `jax.block_until_ready`, or a torch call on
  the CPU / followed by `torch.cuda.synchronize()`).
  """
  busy0, own0 = _busy_jiffies(), _own_cpu_seconds()
  t0 = time.perf_counter()
  fn()
  wall = time.perf_counter() - t0
  busy = (_busy_jiffies() - busy0) / _CLK_TCK
  own = _own_cpu_seconds() - own0
  return wall, max(busy - own, 0.0) / max(wall, 1e-9)


def summarize(samples: Sequence[tuple[float, float]]) -> dict[str, Any]:
  """Median, quartiles, min and max (seconds) of the quiet samples (all, if too few are quiet)."""
  quiet = [w for w, other in samples if other <= BUSY_CORES]
  kept = quiet if len(quiet) >= MIN_QUIET else [w for w, _ in samples]
  kept = sorted(kept)
  if len(kept) >= 2:
    q1, _, q3 = statistics.quantiles(kept, n=4, method="inclusive")
  else:
    q1 = q3 = kept[0]
  return {
      "median_s": statistics.median(kept), "q1_s": q1, "q3_s": q3,
      "min_s": kept[0], "max_s": kept[-1], "samples": len(samples), "kept": len(kept),
      "quiet": len(quiet),
      "other_cores": round(statistics.median(other for _, other in samples), 3),
  }


def compare(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
            budget_s: float | None = None) -> dict[str, dict[str, Any]]:
  """Times every function in `fns` interleaved: warm-up calls, then rounds of one call each.

  Args:
    fns: name -> blocking zero-argument callable.
    repeats: timed rounds (at least 3 are run even under `budget_s`).
    warmup: untimed calls of each function first (compilation, caches, thread pools).
    budget_s: stop adding rounds once this many seconds of timed calls have passed.

  Returns:
    name -> `summarize` of its samples.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
  start = time.perf_counter()
  for r in range(repeats):
    for name, fn in fns.items():
      samples[name].append(time_call(fn))
    if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
      break
  return {name: summarize(s) for name, s in samples.items()}


def row(benchmark: str, case: str, impl: str, stats: dict[str, Any], *,
        reference: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
  """One result row; `speedup` is reference median / this median (> 1: this is faster)."""
  out = {"benchmark": benchmark, "case": case, "impl": impl, **stats}
  if reference is not None:
    out["speedup"] = reference["median_s"] / stats["median_s"]
  out.update(extra)
  return out


def _lscpu_model() -> str:
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    text = ""
  m = re.search(r"^Model name:\s*(.+)$", text, re.M)
  return m.group(1).strip() if m else platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
  """CPU model, core count, load average, accelerator and library versions."""
  import jax  # Imported here so that this module loads without JAX initialising a backend.
  info = {
      "cpu": _lscpu_model(), "cores": os.cpu_count(), "loadavg_1_5_15": os.getloadavg(),
      "python": platform.python_version(), "jax": jax.__version__,
      "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
  }
  for name in ("torch", "lightly", "faiss", "sklearn", "numpy"):
    try:
      info[name] = __import__(name).__version__
    except ImportError:
      info[name] = None
  try:
    import torch
    info["torch_device"] = "cuda" if torch.cuda.is_available() else "cpu"
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  return info


def _fmt_time(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def generic_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows of another shape (no `median_s`) as a table of their scalar fields, in order."""
  keys: list[str] = []
  for r in rows:
    for k, v in r.items():
      scalar = v is None or isinstance(v, (str, int, float, bool))
      if scalar and k != "benchmark" and k not in keys:
        keys.append(k)
  keys = [k for k in keys if any(r.get(k) not in (None, "", "-") for r in rows)]  # Not empty.
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows of one benchmark as a Markdown table (cases in order, implementations per case)."""
  if rows and not any("median_s" in r or r.get("skipped") for r in rows):
    return generic_table(rows)
  extra_cols = []
  for r in rows:
    for key in ("throughput", "check"):
      if key in r and key not in extra_cols:
        extra_cols.append(key)
  head = ["case", "implementation", "median", "IQR", "min-max", "n", "speedup vs ref"]
  head += extra_cols
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if "median_s" not in r:
      cells = [r["case"], r["impl"], "skipped", "", "", "", ""] + [
          str(r.get(c, "")) for c in extra_cols]
      lines.append("| " + " | ".join(cells) + " |")
      continue
    speedup = r.get("speedup")
    cells = [
        r["case"], r["impl"], _fmt_time(r["median_s"]),
        f"{_fmt_time(r['q1_s'])} - {_fmt_time(r['q3_s'])}",
        f"{_fmt_time(r['min_s'])} - {_fmt_time(r['max_s'])}",
        f"{r['kept']}/{r['samples']}",
        "ref" if speedup is None else (f"**{speedup:.2f}x**" if speedup >= 1 else
                                       f"{speedup:.2f}x"),
    ] + [str(r.get(c, "")) for c in extra_cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_report(rows: Sequence[dict[str, Any]], info: dict[str, Any], command: str,
                    wall_s: float) -> str:
  """The generated part of RESULTS.md: machine, command, one table per benchmark."""
  if not any((r.get("source") or {}).get("command", command) == command for r in rows):
    out = [f"Assembled by `{command}` from earlier runs (none ran now): each section names the "
           "command, machine and date it was measured with."]
  else:
    out = [
        f"Command: `{command}` ({wall_s / 60:.1f} min). Machine: {info['cpu']}, "
        f"{info['cores']} cores, load average at the end {info['loadavg_1_5_15'][0]:.2f} "
        f"(1 min) / {info['loadavg_1_5_15'][1]:.2f} (5 min); JAX {info['jax']} on "
        f"{info['jax_backend']}; torch {info.get('torch')} on {info.get('torch_device')} "
        f"({info.get('torch_threads')} threads, OMP_WAIT_POLICY="
        f"{info.get('omp_wait_policy')}), lightly {info.get('lightly')}, faiss "
        f"{info.get('faiss')}, scikit-learn {info.get('sklearn')}."]
  out += [
      "",
      "Times are per call; `speedup vs ref` is the reference's median over this one's, both "
      "measured interleaved in the same run (> 1: embedspace is faster). `n` is kept/timed "
      "samples (samples during which other processes kept > "
      f"{BUSY_CORES} cores busy are dropped when {MIN_QUIET} quiet ones remain).",
  ]
  benchmarks = []
  for r in rows:
    if r["benchmark"] not in benchmarks:
      benchmarks.append(r["benchmark"])
  for b in benchmarks:
    out += ["", f"### {b}"]
    groups: list[list[dict[str, Any]]] = []  # Rows of one source (command) each, in order.
    for r in (r for r in rows if r["benchmark"] == b):
      if groups and groups[-1][0].get("source") == r.get("source"):
        groups[-1].append(r)
      else:
        groups.append([r])
    for mine in groups:
      out.append("")
      source = mine[0].get("source")
      if source and source.get("command") != command:
        out += [_source_line(source), ""]
      table = [r for r in mine if not r.get("summary")]
      out += [markdown_table(table)] if table else []
      notes = [r["note"] for r in mine if r.get("note")]
      out += ([""] if table else []) + [f"- {n}" for n in notes] if notes else []
  return "\n".join(out) + "\n"


def provenance(command: str, info: dict[str, Any], *, date: str | None = None) -> dict[str, Any]:
  """Where a row was measured: the command, CPU, cores and load average (kept in results.json)."""
  return {"command": command, "cpu": info.get("cpu"), "cores": info.get("cores"),
          "loadavg_1_5_15": list(info.get("loadavg_1_5_15") or ()),
          "date": time.strftime("%Y-%m-%d") if date is None else date}


def kept_rows(out_dir: str, *, exclude: Sequence[str]) -> list[dict[str, Any]]:
  """Rows of `out_dir/results.json` of benchmarks not in `exclude`, each with its `source`.

  Rows written before rows carried a `source` get the file's own command and machine.
  """
  path = os.path.join(out_dir, "results.json")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  default = provenance(old.get("command", "?"), old.get("machine", {}), date="")
  return [{**r, "source": r.get("source") or default} for r in old.get("rows", [])
          if r.get("benchmark") not in exclude]


def _source_line(source: dict[str, Any]) -> str:
  load = source.get("loadavg_1_5_15") or [float("nan")] * 2
  date = f"{source['date']}; " if source.get("date") else ""
  return (f"_From `{source.get('command')}` ({date}{source.get('cpu')}, "
          f"{source.get('cores')} cores, load average at the end {load[0]:.2f} / {load[1]:.2f})._")


def write_results(out_dir: str, rows: Sequence[dict[str, Any]], info: dict[str, Any],
                  command: str, wall_s: float) -> tuple[str, str]:
  """Writes `results.json` and the generated section of `RESULTS.md` in `out_dir`.

  Text of RESULTS.md outside the generated markers (the analysis written by hand) is kept.

  Returns:
    The paths of the JSON and Markdown files.
  """
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "results.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"machine": info, "command": command, "wall_s": wall_s, "rows": list(rows)}, f,
              indent=1, default=str)
  generated = f"{BEGIN_MARK}\n{markdown_report(rows, info, command, wall_s)}{END_MARK}"
  md_path = os.path.join(out_dir, "RESULTS.md")
  text = ""
  if os.path.exists(md_path):
    with open(md_path, encoding="utf-8") as f:
      text = f.read()
  if BEGIN_MARK in text and END_MARK in text:
    head, rest = text.split(BEGIN_MARK, 1)
    text = head + generated + rest.split(END_MARK, 1)[1]
  else:
    text = "# Benchmark results\n\n" + generated + "\n" + text
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(text)
  return json_path, md_path


def torch_device() -> str:
  """'cuda' when torch sees a GPU, else 'cpu' (torch then uses one thread per core)."""
  import torch
  if torch.cuda.is_available():
    return "cuda"
  torch.set_num_threads(os.cpu_count() or 1)
  return "cpu"


def torch_sync(device: str) -> None:
  """Waits for queued torch work on `device`."""
  if device == "cuda":
    import torch
    torch.cuda.synchronize()


def cost(compiled: Any) -> tuple[float, float]:
  """(`flops`, `bytes accessed`) of XLA's cost analysis of a compiled program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: a list of one dict per program.
    analysis = analysis[0]
  return (float(analysis.get("flops", float("nan"))),
          float(analysis.get("bytes accessed", float("nan"))))


def matmul_peak(n: int, repeats: int, device: str) -> dict[str, dict[str, Any]]:
  """Stats of a float32 `[n, n] @ [n, n]` in JAX (default precision) and in torch, interleaved."""
  import torch  # Deferred: torch is the optional `bench` extra (and needs OMP_WAIT_POLICY first).
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  ta, tb = torch.tensor(np.asarray(a), device=device), torch.tensor(np.asarray(b), device=device)

  def torch_mm():
    out = ta @ tb
    torch_sync(device)
    return out

  return compare({"jax": lambda: mm(a, b).block_until_ready(), "torch": torch_mm},
                        repeats=repeats, warmup=2)


def matmul_peak_rows(benchmark: str, n: int, mm_stats: dict[str, dict[str, Any]]
                     ) -> list[dict[str, Any]]:
  """The rows of `matmul_peak`'s two float32 `[n, n] @ [n, n]` products (torch the reference)."""
  case = f"float32 matmul {n}x{n} @ {n}x{n} (the peak)"
  flops = {k: 2 * n ** 3 / mm_stats[k]["median_s"] for k in ("torch", "jax")}
  return [row(benchmark, case, "torch", mm_stats["torch"], gflops_per_s=flops["torch"] / 1e9,
              check=f"{flops['torch'] / 1e9:.0f} GFLOP/s"),
          row(benchmark, case, "jax", mm_stats["jax"], reference=mm_stats["torch"],
              gflops_per_s=flops["jax"] / 1e9, check=f"{flops['jax'] / 1e9:.0f} GFLOP/s")]


def note_rows(benchmark: str, notes: Sequence[str]) -> list[dict[str, Any]]:
  """Each note as a summary row (printed below the table, kept in results.json)."""
  return [{"benchmark": benchmark, "case": "note", "impl": "", "summary": True, "note": note}
          for note in notes]


def torch_eager_and_compiled(build: Callable[[], Any], make: Callable[[Any, Any], Callable[[], Any]],
                             *, compile_: bool) -> tuple[dict[str, Callable[[], Any]], list[str]]:
  """The PyTorch reference's steps `{'eager': fn, 'compile': fn}` and notes on compilation.

  `build()` makes a fresh module; `make(model, module)` a blocking step of `model` (the module,
  or its `torch.compile` wrapper) whose optimizer holds `module`'s parameters. The compiled step
  runs twice here, so its compilation stays out of the timings (and is reported); where
  `torch.compile` fails on this machine, the note says why and only eager is timed.
  """
  import torch  # Deferred: torch is the optional `bench` extra.
  eager = build()
  steps = {"eager": make(eager, eager)}
  notes = []
  if compile_:
    try:
      module = build()
      step = make(torch.compile(module), module)
      t0 = time.perf_counter()
      step()
      step()
      notes.append(f"torch.compile: first two steps (compilation) took "
                   f"{time.perf_counter() - t0:.0f} s")
      steps["compile"] = step
    except Exception as e:  # Reported in the results: compile support varies by machine.
      notes.append(f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}")
  return steps, notes


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
  """A benchmark's result rows as a markdown table, then its notes, one per line."""
  print(markdown_table([r for r in rows if not r.get("summary")]))
  for r in rows:
    if r.get("note"):
      print("-", r["note"])
