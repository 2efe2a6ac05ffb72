"""Bit-for-bit parity of every method's `:smoke` run between two versions of embedspace.

  python -m benchmarks.parity --record=/tmp/parity_before     # on the old commit
  python -m benchmarks.parity --compare=/tmp/parity_before    # on the new one: exit 1 if differ

Each `:smoke` config (and the variants that change the step) is trained from scratch through the
command line, `python -m embedspace.main`, on one CPU device; the PaLM-E and FIND runs read the
ImageBind run's encoders. What is compared is the integrity record of the final checkpoint: the
sha256 of every array of the train state (params, batch norm statistics, optimizer state, RNG),
so "equal" means equal bytes, not a tolerance. Arrays are matched by their path, so a redesign
that adds a state field (e.g. a frozen part) is compared on the arrays both versions have; a
path that exists in the old record only is a failure.

Used to prove that the training-core redesign (issue 19) changed no method's behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = (
    # (name, config spec, needs the ImageBind encoders)
    ("vicreg", "configs/vicreg.py:smoke", False),
    ("simclr", "configs/simclr.py:smoke", False),
    ("barlow", "configs/barlow.py:smoke", False),
    ("clip", "configs/clip.py:smoke", False),
    ("imagebind", "configs/imagebind.py:smoke", False),
    ("decur", "configs/decur.py:smoke", False),
    ("decur_barlow", "configs/decur.py:barlow,smoke", False),
    ("palme", "configs/palme.py:smoke", True),
    ("palme_text_only", "configs/palme.py:text_only,smoke", True),
    ("find", "configs/find.py:smoke", True),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_digest(workdir: str) -> dict[str, str]:
  """The sha256 record of the newest checkpoint in `workdir` (read as plain JSON files)."""
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  item = os.path.join(ckpts, str(step), "integrity")
  for name in sorted(os.listdir(item)):
    path = os.path.join(item, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        try:
          record = json.load(f)
        except ValueError:
          continue
      if "sha256" in record:
        return {"checkpoint_step": step, **record["sha256"]}
  raise FileNotFoundError(f"no integrity record under {item}")


def run_all(root: str) -> dict[str, dict[str, str]]:
  """Trains every run of RUNS under `root`; returns `{name: digest}`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
  out = {}
  encoders = os.path.join(root, "imagebind")
  for name, spec, needs_encoders in RUNS:
    workdir = os.path.join(root, name)
    cmd = [sys.executable, "-m", "embedspace.main", f"--config={os.path.join(ROOT, spec)}",
           f"--workdir={workdir}"]
    if needs_encoders:
      cmd.append(f"--config.encoders_workdir={encoders}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out[name] = final_digest(workdir)
    print(f"[parity] {name}: {len(out[name]) - 1} arrays, step {out[name]['checkpoint_step']}, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return out


def compare(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> list[str]:
  """Every difference, as lines; empty when every array of `before` is equal in `after`."""
  problems = []
  for name, old in before.items():
    new = after.get(name)
    if new is None:
      problems.append(f"{name}: not run")
      continue
    differ = sorted(k for k in old if old[k] != new.get(k))
    if differ:
      problems.append(f"{name}: {len(differ)} of {len(old)} arrays differ, first {differ[0]}")
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--record", help="directory to write digests.json to")
  group.add_argument("--compare", help="directory holding the digests.json to compare with")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="embedspace_parity_") as root:
    digests = run_all(root)
  if args.record:
    os.makedirs(args.record, exist_ok=True)
    with open(os.path.join(args.record, "digests.json"), "w", encoding="utf-8") as f:
      json.dump(digests, f, indent=1)
    print(f"recorded {len(digests)} runs in {args.record}/digests.json")
    return 0
  with open(os.path.join(args.compare, "digests.json"), encoding="utf-8") as f:
    before = json.load(f)
  problems = compare(before, digests)
  for line in problems:
    print(f"DIFFERS {line}")
  if not problems:
    print(f"all {len(before)} runs equal bit for bit "
          f"({sum(len(d) - 1 for d in before.values())} arrays)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
