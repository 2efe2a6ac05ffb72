"""Nothing lost: kill -9, SIGTERM, damaged checkpoints, non-finite loss and bad input (issue 6).

The end-to-end tests run `python -m embedspace.main` on the smoke config in subprocesses with 2
CPU devices, exactly as a user would, and interrupt them from outside: SIGKILL while the first
checkpoint is being written (seen as orbax's temporary directory) and at a random moment during a
step, SIGTERM during a step, garbage written into the newest checkpoint between two starts. The
same command is rerun after each; the finished run's parameters must equal those of an
uninterrupted run bit for bit. The checkpoint-damage cases are also checked one by one in process
against `Checkpointer`, including what orbax alone does with each.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from benchmarks import fault_injection
from configs import vicreg
from embedspace import data as data_lib
from embedspace.core import checkpointing
from embedspace.core import lock
from embedspace.core import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
# The smoke run, saving every 2 steps, logging every step, with a cheap final evaluation.
RUN = ("--config=configs/vicreg.py:smoke", f"--config.num_steps={NUM_STEPS}",
       "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=0",
       "--config.eval.baselines=False", "--config.data.train_split=train[:320]",
       "--config.data.eval_split=test[:256]")
TMP = ".orbax-checkpoint-tmp"


class Run:
  """One `python -m embedspace.main` process; its output goes to files next to the workdir."""

  def __init__(self, workdir, *flags: str, cache_dir: str, name: str = "run", log_dir=None):
    self.workdir = str(workdir)
    self.log = os.path.join(str(log_dir or os.path.dirname(self.workdir)),
                            f"{name}.{time.monotonic_ns()}")
    self._metrics_start = _size(os.path.join(self.workdir, "metrics.jsonl"))
    with open(self.log + ".out", "w") as out, open(self.log + ".err", "w") as err:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "embedspace.main", *flags, f"--workdir={self.workdir}"],
          cwd=ROOT, env=fault_injection.env(cache_dir), stdout=out, stderr=err)

  def logged_step(self) -> int:
    """The newest training step this process wrote to metrics.jsonl (0: none yet)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if _size(path) <= self._metrics_start:
      return 0
    with open(path, encoding="utf-8") as f:
      f.seek(self._metrics_start)
      lines = f.read().split("\n")[:-1]  # The last piece may be a line still being written.
    return max([json.loads(line)["step"] for line in lines if '"loss"' in line] or [0])

  def wait_until(self, condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
      if self.proc.poll() is not None:
        pytest.fail(f"the run exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
      if time.monotonic() > deadline:
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
      time.sleep(0.002)

  def finish(self, timeout: float = 300) -> int:
    return self.proc.wait(timeout)

  def stderr(self) -> str:
    with open(self.log + ".err", encoding="utf-8", errors="replace") as f:
      return f.read()

  def tail(self) -> str:
    """The end of stderr, for failure messages."""
    return self.stderr()[-4000:]


def _size(path: str) -> int:
  return os.path.getsize(path) if os.path.exists(path) else 0


def _ls(path) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _steps(checkpoints) -> list[int]:
  return sorted(int(n) for n in _ls(checkpoints) if n.isdigit())


def _params(checkpoints, step: int):
  return ocp.StandardCheckpointer().restore(os.path.join(str(checkpoints), str(step), "state"))[
      "params"]


def _array_file(step_dir) -> str:
  """The largest file of the step's array data (OCDBT data files; not metadata)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(str(step_dir), "state"))
           for f in names if os.path.basename(d) == "d"]
  return max(files, key=os.path.getsize)


def _garble(path: str, offset_fraction: float = 0.5) -> None:
  """Overwrites 16 bytes in the middle of `path` with fixed garbage."""
  offset = int(os.path.getsize(path) * offset_fraction)
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(bytes(range(7, 7 + 16 * 13, 13)))


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  # Build the dataset once, before concurrent runs would each build it.
  data_lib.get_source("embedded_fashion_mnist", split="train")
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted run of the same command, started now; call it for its final parameters.

  Its final checkpoint is written before the end-of-run evaluation, which is stopped to save
  CPU time: the parameters are final by then.
  """
  workdir = tmp_path_factory.mktemp("reference") / "run"
  final = workdir / "checkpoints" / str(NUM_STEPS)
  run = Run(workdir, *RUN, cache_dir=cache_dir, name="reference")

  def stop_at_evaluation():
    while run.proc.poll() is None and not final.exists():
      time.sleep(0.05)
    run.proc.kill()
  watcher = threading.Thread(target=stop_at_evaluation, daemon=True)
  watcher.start()

  def final_params():
    watcher.join(timeout=300)
    assert final.exists(), run.tail()
    return _params(workdir / "checkpoints", NUM_STEPS)
  return final_params


def test_kill9_sigterm_and_damage_then_the_same_command_matches_an_uninterrupted_run(
    reference, cache_dir, tmp_path):
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"
  rng = random.Random()

  # 1. kill -9 while the first checkpoint is being written: only orbax's temporary dir is left.
  run = Run(workdir, *RUN, cache_dir=cache_dir)
  run.wait_until(lambda: any(TMP in n for n in _ls(ckpts)), "the first checkpoint write")
  run.proc.kill()
  run.finish()
  assert any(TMP in n for n in _ls(ckpts)) and not _steps(ckpts), _ls(ckpts)

  # 2. Same command (starts over: nothing was saved), SIGTERM during a step: exit 75 after saving
  # the step in progress; the temporary directory is gone.
  run = Run(workdir, *RUN, cache_dir=cache_dir)
  run.wait_until(lambda: run.logged_step() >= 5, "step 5")
  logged = run.logged_step()
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 75, run.tail()
  assert "holds metrics of an earlier start but no checkpoint" in run.stderr()
  preempted = _steps(ckpts)[-1]
  assert logged <= preempted <= logged + 2, (logged, _steps(ckpts))
  assert not any(TMP in n for n in _ls(ckpts))

  # 3. Same command: resumes from the SIGTERM checkpoint; kill -9 at a random moment in a step.
  run = Run(workdir, *RUN, cache_dir=cache_dir)
  run.wait_until(lambda: run.logged_step() >= preempted + 2, f"step {preempted + 2}")
  delay = rng.uniform(0.0, 0.3)
  time.sleep(delay)
  run.proc.kill()
  run.finish()
  assert f"resumed from step {preempted} in" in run.stderr(), run.tail()

  # 4. Garbage in the array data of the newest checkpoint (orbax alone would restore wrong
  # values), then the same command to the end: it falls back to the one before, saves the
  # damaged step anew and finishes.
  *_, previous, newest = _steps(ckpts)
  _garble(_array_file(ckpts / str(newest)))
  run = Run(workdir, *RUN, cache_dir=cache_dir)
  assert run.finish() == 0, run.tail()
  err = run.stderr()
  assert f"checkpoint {ckpts / str(newest)} is damaged" in err, run.tail()
  assert f"resuming from the newest intact checkpoint, step {previous}" in err, run.tail()
  assert "Traceback" not in err, run.tail()
  assert os.path.isdir(workdir / "checkpoints_damaged" / str(newest))
  assert os.path.exists(workdir / "eval.json") and _steps(ckpts)[-1] == NUM_STEPS
  same = functools.partial(np.testing.assert_array_equal,
                           err_msg=f"(killed {delay:.2f} s after step {preempted + 2})")
  jax.tree.map(same, _params(ckpts, NUM_STEPS), reference())


def test_nonfinite_loss_stops_at_its_step_and_skip_mode_counts_skipped_steps(cache_dir, tmp_path):
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"
  flags = (*RUN, "--config.optimizer.base_lr=1e30", "--config.checkpoint_every=1")
  run = Run(workdir, *flags, cache_dir=cache_dir)
  assert run.finish() == 3, run.tail()
  [line] = _error_lines(run.stderr())
  first = int(re.search(r"non-finite loss or gradient at step (\d+)", line).group(1))
  good = int(re.search(r"Last good checkpoint: step (\d+)", line).group(1))
  assert good == first - 1 == _steps(ckpts)[-1], (line, _steps(ckpts))
  assert "skip_nonfinite" in line and "Traceback" not in run.stderr()

  # The last good checkpoint is intact: skip mode resumes from it, trains on, counts the skipped
  # updates in metrics.jsonl and leaves the state as it was (every update here is non-finite).
  good_params = _params(ckpts, good)
  run = Run(workdir, *flags, "--config.skip_nonfinite=True", cache_dir=cache_dir)
  run.wait_until(lambda: run.logged_step() >= first + 1, f"step {first + 1}")
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 75, run.tail()
  assert f"resumed from step {good}" in run.stderr()
  records = [r for r in metrics_lib.read_jsonl(str(workdir / "metrics.jsonl")) if "loss" in r]
  last = records[-1]
  assert last["step"] > first and last["skipped"] == last["step"] - good, last
  jax.tree.map(np.testing.assert_array_equal, _params(ckpts, _steps(ckpts)[-1]), good_params)


def test_bad_input_is_one_line_and_exit_2_and_leaves_no_workdir(cache_dir, tmp_path):
  (tmp_path / "a_file").write_text("x")
  empty = tmp_path / "empty_data_dir"
  empty.mkdir()
  # A workdir with a checkpoint of the smoke config (model.width=8).
  other = tmp_path / "other"
  (other / "checkpoints" / "2").mkdir(parents=True)
  (other / "config.json").write_text(vicreg.get_config("smoke").to_json())
  def contents(top):  # The lock file is the lock itself (emptied on release), not the user's.
    return sorted((d, sub, sorted(f for f in files if f != lock.LOCK_FILE))
                  for d, sub, files in os.walk(top))

  before = contents(other)
  smoke = "--config=configs/vicreg.py:smoke"
  cases = {  # flags, workdir, what the line must say
      "unknown key": ((smoke, "--config.optimizer.lrr=0.1"), "a", "optimizer.base_lr"),
      "wrong type": ((smoke, "--config.batch_size=abc"), "b", "takes an int"),
      "bad variant": (("--config=configs/vicreg.py:tiny",), "c", "unknown config variant 'tiny'"),
      "indivisible batch": ((smoke, "--config.batch_size=33"), "d",
                            "--config.batch_size=32"),
      "missing dataset": ((smoke, "--config.data.name=cifar10", f"--config.data.data_dir={empty}"),
                          "e", "is not prepared in"),
      "unwritable workdir": ((smoke,), "a_file/run", "not writable"),
      "workdir of another config": ((smoke, "--config.model.width=16"), "other",
                                    "resume that run with --config.model.width=8"),
  }
  runs = {name: Run(tmp_path / workdir, *flags, cache_dir=cache_dir, name=name.replace(" ", "_"),
                    log_dir=tmp_path)
          for name, (flags, workdir, _) in cases.items()}
  for name, run in runs.items():
    code, err = run.finish(), run.stderr()
    assert code == 2, (name, err)
    assert "Traceback" not in err, (name, err)
    [line] = _error_lines(err)
    assert cases[name][2] in line, (name, line)
    if cases[name][1] != "other":
      assert not os.path.exists(run.workdir), (name, _ls(run.workdir))
  assert contents(other) == before


# In process: each kind of damage against `Checkpointer`, and what orbax alone does with it.


def _state(step: int):
  rng = np.random.default_rng(step)
  return {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32), "step": jnp.int32(step)}


def _iterator():
  import grain
  return iter(grain.MapDataset.range(1000).shuffle(seed=0).to_iter_dataset())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Checkpoints of steps 1 and 2, each after consuming `step` elements of the iterator."""
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  it = _iterator()
  for step in (1, 2):
    next(it)
    ckpt.save(step, _state(step), it)
  ckpt.close()
  return directory


def _delete(path):
  (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


DAMAGE = {
    "truncated array file": lambda d: os.truncate(_array_file(d), os.path.getsize(
        _array_file(d)) // 2),
    "deleted array file": lambda d: os.remove(_array_file(d)),
    "garbage in array data": lambda d: _garble(_array_file(d)),
    "garbage in grain state": lambda d: _garble(
        os.path.join(d, "data", "process_0-of-1.json"), 0.3),
    "deleted OCDBT manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "deleted state item": lambda d: _delete(os.path.join(d, "state")),
    "garbage in integrity record": lambda d: _garble(
        os.path.join(d, checkpointing.INTEGRITY_ITEM, "metadata"), 0.5),
    # Was restored silently wrong: a missing record read as "written before records existed".
    "garbage in array data, deleted integrity record": lambda d: (
        _garble(_array_file(d)), _delete(os.path.join(d, checkpointing.INTEGRITY_ITEM))),
}


def _as_before_integrity_records(step_dir) -> None:
  """Makes `step_dir` what a version before the record wrote: no item, none in the metadata."""
  shutil.rmtree(os.path.join(step_dir, checkpointing.INTEGRITY_ITEM))
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  meta = json.loads(open(path).read())
  del meta["item_handlers"][checkpointing.INTEGRITY_ITEM]
  with open(path, "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_a_warning(kind, saved, tmp_path, capfd,
                                                              caplog):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  DAMAGE[kind](str(directory / "2"))
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  it = _iterator()
  state, step = ckpt.restore_latest(checkpointing.abstract_like(_state(0)), it)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(1)))
  expected = _iterator()
  next(expected)
  assert next(it) == next(expected)  # The data order continues from step 1.
  assert f"checkpoint {directory / '2'} is damaged" in caplog.text, caplog.text
  assert "Traceback" not in capfd.readouterr().err  # orbax's abandoned reads stay quiet.
  # Moved aside, so the resumed run can save step 2 again.
  assert os.path.isdir(tmp_path / "checkpoints_damaged" / "2")
  assert ckpt.save(2, _state(2), it)
  ckpt.close()


def test_orbax_alone_restores_garbage_in_array_data_silently(saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  _garble(_array_file(directory / "2"))
  restored = ocp.StandardCheckpointer().restore(directory / "2" / "state")
  assert not np.array_equal(restored["w"], np.asarray(_state(2)["w"]))  # No error raised.


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  for step in ("1", "2"):
    _garble(_array_file(directory / step))
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  with pytest.raises(checkpointing.NoIntactCheckpointError, match=r"step 2: .*step 1: "):
    ckpt.restore_latest(checkpointing.abstract_like(_state(0)), _iterator())
  assert _steps(directory) == [1, 2]  # Nothing moved when nothing could be restored.
  ckpt.close()


def test_checkpoint_without_integrity_record_restores_with_a_warning(saved, tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  _as_before_integrity_records(directory / "2")
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  state, step = ckpt.restore_latest(checkpointing.abstract_like(_state(0)), _iterator())
  ckpt.close()
  assert step == 2 and "written before integrity records existed" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(2)))


def test_a_state_only_restore_can_be_verified_too(saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  state = ocp.StandardCheckpointer().restore(directory / "2" / "state")
  assert checkpointing.verify_restored(directory / "2", state)
  _garble(_array_file(directory / "2"))
  with pytest.raises(checkpointing.DamagedCheckpointError, match=r"first w$"):
    checkpointing.verify_restored(directory / "2",
                                  ocp.StandardCheckpointer().restore(directory / "2" / "state"))


@pytest.mark.parametrize("change", ["other shape", "missing array", "extra array"])
def test_checkpoints_of_another_model_are_refused_not_moved_aside(change, saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  target = _state(0)
  if change == "other shape":
    target["b"] = jnp.zeros((32,), jnp.float32)
  elif change == "missing array":
    del target["b"]
  else:
    target["c"] = jnp.zeros((3,), jnp.float32)
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=5)
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"another model.*first "
                     r"'(b|c)'.*config\.json"):
    ckpt.restore_latest(checkpointing.abstract_like(target), _iterator())
  ckpt.close()
  assert _steps(directory) == [1, 2]  # Not damage: nothing moved, nothing restarted.
  assert not os.path.exists(tmp_path / "checkpoints_damaged")
