"""Faults and mistakes that printed tracebacks end in one line (issue 23, item 6).

Ctrl-C during training saves the step like SIGTERM and exits 130; a checkpoint that cannot be
written (a full disk, simulated by a file size limit as `ulimit -f` sets it) is one line and exit
2 with the complete checkpoints intact; the evaluation's flags are checked before its minutes of
work. Each runs the command line in a subprocess, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ("--config=configs/vicreg.py:smoke", "--config.eval.at_end=False", "--config.eval_every=0",
         "--config.log_every=1")


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _main(workdir, *flags: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "embedspace.main", *SMOKE, *flags,
                           f"--workdir={workdir}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def _one_error_line(err: str) -> str:
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-4000:]
  [line] = [l for l in err.splitlines() if l.startswith("error:")]
  return line


def _steps(workdir) -> list[int]:
  path = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _logged(workdir) -> int:
  path = os.path.join(str(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(l)["step"] for l in f.read().split("\n")[:-1] if '"loss"' in l] or [0])


def test_ctrl_c_saves_the_step_like_sigterm_and_exits_130(tmp_path):
  workdir = tmp_path / "run"
  proc = _main(workdir, "--config.num_steps=40", "--config.checkpoint_every=100")
  deadline = time.monotonic() + 300
  while _logged(workdir) < 2:
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  saved = _steps(workdir)
  assert len(saved) == 1 and f"Ctrl-C: saved step {saved[0]} to" in err, (saved, err[-3000:])
  assert open(workdir / "run.lock").read() == ""  # The lock was released.


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_complete_ones(tmp_path):
  workdir = tmp_path / "run"
  proc = _main(workdir, "--config.num_steps=3")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and _steps(workdir) == [3], err[-3000:]
  step3 = workdir / "checkpoints" / "3"
  digest = {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, names in os.walk(step3) for f in names}

  def limit_file_size():  # As `ulimit -f 16`: writing past 16 KiB fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
  proc = _main(workdir, "--config.num_steps=6", preexec_fn=limit_file_size)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  line = _one_error_line(err)
  assert ("writing the checkpoint of step 6 under" in line and "(File too large)" in line
          and "resume from step 3" in line), line
  assert _steps(workdir) == [3]
  assert digest == {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
                    for d, _, names in os.walk(step3) for f in names}


def test_evaluate_checks_its_flags_before_any_work(smoke_workdir, tmp_path):
  (tmp_path / "a_file").write_text("x")
  cases = {  # flag: what the one line must say
      "--ood_dataset=nosuch": "--ood_dataset=nosuch: unknown dataset 'nosuch'",
      "--code_lengths=abc": "--code_lengths=abc: pass positive integers",
      "--code_lengths=16,0": "--code_lengths=16,0: pass positive integers",
      "--max_pair_points=0": "--max_pair_points=0: must be >= 2",
      f"--out_dir={tmp_path / 'a_file'}": "is a file; pass a directory",
  }
  procs = {flag: subprocess.Popen(
      [sys.executable, "-m", "embedspace.evaluate", f"--workdir={smoke_workdir}", flag,
       f"--out_dir={tmp_path / 'out'}" if "out_dir" not in flag else "--notsne"], cwd=ROOT,
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in cases}
  for flag, proc in procs.items():
    started = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (flag, err[-3000:])
    assert cases[flag] in _one_error_line(err), (flag, err[-2000:])
    print(f"{flag}: refused (waited {time.monotonic() - started:.1f} s)")
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("batch_size", [1])
def test_a_batch_too_small_for_the_loss_fails_at_validation(tmp_path, batch_size):
  proc = _main(tmp_path / "run", f"--config.batch_size={batch_size}")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  assert "config.batch_size=1: must be >= 2" in _one_error_line(err)
  assert not os.path.exists(tmp_path / "run")  # No config.json, metrics or tb/ left behind.
