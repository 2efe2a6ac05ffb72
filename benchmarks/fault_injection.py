"""Fault injection: kill -9 a `:smoke` run at seeded random points; the end must not differ.

  python -m benchmarks.fault_injection                 # 10 points, seed 0
  python -m benchmarks.fault_injection --points=3 --seed=7

One `python -m embedspace.main` run of the VICReg smoke config (12 steps, a checkpoint every 2,
metrics every step) is killed with SIGKILL at `--points` moments drawn from `--seed`: each is
either "step" (once the process has logged a given step up to 9, after a random 0-300 ms:
somewhere in the next steps or a checkpoint) or "save" (while orbax's temporary directory of a given
checkpoint step exists: mid-save). After each kill the same command is started again; it resumes
from its newest complete checkpoint and runs on to the next point, and after the last one to the
end. The final checkpoint must be bit-identical to that of an uninterrupted run of the same
command: the same sha256 of every array of the train state (parameters, batch-norm statistics,
optimizer state, RNG, step; the integrity record, which is also verified against the restored
arrays) and the same saved data position. `tests/test_fault_injection.py` runs 3 points; the
result of the full 10 is in docs/training.md ("Faults").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

from embedspace.core import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
CHECKPOINT_EVERY = 2
RUN = ("--config=configs/vicreg.py:smoke", f"--config.num_steps={NUM_STEPS}",
       f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.keep_checkpoints=2",
       "--config.log_every=1", "--config.eval_every=0", "--config.eval.at_end=False",
       "--config.data.train_split=train[:320]")
TMP = ".orbax-checkpoint-tmp"
TIMEOUT_S = 300


def kill_points(count: int, seed: int) -> list[dict[str, Any]]:
  """`count` kill points in the order they are met: {"kind": "step"|"save", "step", "delay"}."""
  rng = random.Random(seed)
  points = []
  for _ in range(count):
    if rng.random() < 0.5:
      points.append({"kind": "save",
                     "step": rng.randrange(CHECKPOINT_EVERY, NUM_STEPS, CHECKPOINT_EVERY)})
    else:
      # Up to step 9: 300 ms after step 11 the run has sometimes ended (12 short steps).
      points.append({"kind": "step", "step": rng.randrange(1, NUM_STEPS - 2),
                     "delay": round(rng.uniform(0.0, 0.3), 3)})
  return sorted(points, key=lambda p: (p["step"], p["kind"] == "step"))


def env(cache_dir: str) -> dict[str, str]:
  """The environment of a smoke run in a subprocess: this checkout on the path, 2 CPU devices,
  XLA's quick compile, and compiled programs shared through `cache_dir` (later starts skip most
  of the compile time)."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=("--xla_force_host_platform_device_count=2"
                        " --xla_backend_optimization_level=0"),
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


class _Run:
  """One `python -m embedspace.main` process on `workdir`; stderr goes to a file beside it."""

  def __init__(self, workdir: str, cache_dir: str, name: str):
    self.workdir = workdir
    self.err_path = f"{workdir}.{name}.err"
    metrics = os.path.join(workdir, "metrics.jsonl")
    self._start = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    with open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "embedspace.main", *RUN, f"--workdir={workdir}"], cwd=ROOT,
          env=env(cache_dir), stdout=subprocess.DEVNULL, stderr=err)

  def logged_step(self) -> int:
    """The newest step this process wrote to metrics.jsonl (0: none yet)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.exists(path) or os.path.getsize(path) <= self._start:
      return 0
    with open(path, encoding="utf-8") as f:
      f.seek(self._start)
      lines = f.read().split("\n")[:-1]  # The last piece may be a line still being written.
    return max([json.loads(line)["step"] for line in lines if '"loss"' in line] or [0])

  def wait_for(self, condition, what: str) -> bool:
    """Polls `condition` every 2 ms; False if the process ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
      if self.proc.poll() is not None:
        return False
      if time.monotonic() > deadline:
        self.proc.kill()
        raise TimeoutError(f"timed out waiting for {what}: {self.tail()}")
      time.sleep(0.002)
    return True

  def stderr(self) -> str:
    with open(self.err_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def tail(self) -> str:
    return self.stderr()[-3000:]


def _checkpoints(workdir: str) -> list[str]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def final_record(workdir: str) -> dict[str, Any]:
  """The final checkpoint's integrity record (verified against its restored arrays) and data
  position: what two runs must share bit for bit."""
  step_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS))
  state = checkpointing.restore_state(step_dir)
  assert checkpointing.verify_restored(step_dir, state), f"{step_dir} has no integrity record"
  with open(os.path.join(step_dir, checkpointing.INTEGRITY_ITEM, "metadata")) as f:
    record = json.load(f)["sha256"]
  with open(os.path.join(step_dir, "data", "process_0-of-1.json")) as f:
    return {"sha256": record, "data": json.load(f)}


def uninterrupted(workdir: str, cache_dir: str) -> dict[str, Any]:
  run = _Run(workdir, cache_dir, "reference")
  if run.proc.wait(TIMEOUT_S) != 0:
    raise RuntimeError(f"the uninterrupted run failed: {run.tail()}")
  return final_record(workdir)


def inject(workdir: str, points: list[dict[str, Any]], cache_dir: str) -> list[dict[str, Any]]:
  """Kills the run at each of `points` in turn, then runs it to the end; returns what happened
  at each point ("killed" during the step or save named, or "missed" when the process had
  already passed it, e.g. a save finished within the 2 ms poll)."""
  log = []
  for i, point in enumerate(points):
    run = _Run(workdir, cache_dir, f"kill{i}")
    step, what = point["step"], None
    reached = run.wait_for(lambda: run.logged_step() >= step, f"step {step}")
    if reached and point["kind"] == "save":
      tmp = f"{step}{TMP}"
      seen = run.wait_for(lambda: tmp in _checkpoints(workdir)
                          or str(step) in _checkpoints(workdir), f"the save of step {step}")
      what = "mid-save" if seen and tmp in _checkpoints(workdir) else "after the save"
    elif reached:
      time.sleep(point["delay"])
      what = f"{point['delay'] * 1000:.0f} ms after step {step}"
    if run.proc.poll() is not None:
      what = None  # It ended before the kill: nothing to kill.
    run.proc.kill()
    run.proc.wait()
    complete = [int(n) for n in _checkpoints(workdir) if n.isdigit()]
    log.append({**point, "killed": what or "missed (the run ended first)",
                "resumable_from": max(complete, default=0),
                "resumed_from": _resumed_from(run.stderr())})
  run = _Run(workdir, cache_dir, "finish")
  if run.proc.wait(TIMEOUT_S) != 0:
    raise RuntimeError(f"the run after the kills failed: {run.tail()}")
  log.append({"kind": "end", "resumed_from": _resumed_from(run.stderr())})
  return log


def _resumed_from(stderr: str) -> int:
  marker = "resumed from step "
  return int(stderr.split(marker, 1)[1].split()[0]) if marker in stderr else 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  started = time.perf_counter()
  root = tempfile.mkdtemp(prefix="fault_injection_")
  cache_dir = os.path.join(root, "jax_cache")
  reference = uninterrupted(os.path.join(root, "reference"), cache_dir)
  points = kill_points(args.points, args.seed)
  log = inject(os.path.join(root, "run"), points, cache_dir)
  got = final_record(os.path.join(root, "run"))
  print("| # | kill point | killed | complete checkpoint | next start resumed from |")
  print("|---|---|---|---|---|")
  for i, (entry, after) in enumerate(zip(log, log[1:]), start=1):
    print(f"| {i} | {entry['kind']} {entry['step']} | {entry['killed']} | "
          f"{entry['resumable_from']} | {after['resumed_from']} |")
  same = got == reference
  print(f"final checkpoint (step {NUM_STEPS}): {len(got['sha256'])} arrays, "
        f"{'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run's; data position "
        f"{'equal' if got['data'] == reference['data'] else 'DIFFERENT'} "
        f"({time.perf_counter() - started:.0f} s, seed {args.seed}, workdirs in {root})")
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()
