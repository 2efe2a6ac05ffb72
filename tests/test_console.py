"""The console of the commands: quiet libraries, fast --help, the training bar, legal tags."""

from __future__ import annotations

import glob
import logging
import os
import re
import struct
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from embedspace.core import console
from embedspace.core import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("embedspace.main", "embedspace.embed", "embedspace.search", "embedspace.evaluate")
HEAVY = ("jax", "jaxlib", "orbax", "tensorflow_datasets", "grain", "flax", "torch")


def _python(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)


@pytest.mark.parametrize("module", COMMANDS)
def test_help_imports_no_heavy_library(module):
  # What makes --help slow is importing JAX & co before the flags are parsed (4-5 s); the
  # import log says whether that happens, without timing anything on a shared machine.
  r = _python("-X", "importtime", "-m", module, "--help")
  assert "flags:" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
  imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
  assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("module, args, flag", [
    ("embedspace.evaluate", [], "--workdir"),
    ("embedspace.search", ["--embeddings=x.npz", "--k=many"], "--k"),
    ("embedspace.embed", ["--workdir=x", "--data=y", "--bogus=1"], "bogus"),
])
def test_flag_errors_are_one_line_and_exit_2(module, args, flag):
  r = _python("-m", module, *args)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], r.stderr


_LOGS = """
from absl import app, logging
from embedspace.core import cli
def main(argv):
  logging.info("library info line")
  logging.warning("library warning line")
app.run(main, flags_parser=cli.parse_flags)
"""


def test_library_info_is_off_unless_verbosity_asks():
  quiet = _python("-c", _LOGS)
  assert "library warning line" in quiet.stderr and "library info line" not in quiet.stderr
  for level in ("0", "1"):
    loud = _python("-c", _LOGS, f"--verbosity={level}")
    assert "library info line" in loud.stderr, loud.stderr


def test_metric_names_become_legal_tensorboard_tags():
  assert metrics_lib.tag("eval/measures/encoder/cosine/recall@5") == (
      "eval/measures/encoder/cosine/recall_at_5")
  assert metrics_lib.tag("eval/retrieval/image->audio (common dims)/recall@1") == (
      "eval/retrieval/image_to_audio_common_dims/recall_at_1")
  assert metrics_lib.tag("a/p(x>0.5)/b") == "a/p_x_gt_0.5/b"
  assert metrics_lib.tag("accuracy@iou0.5") == "accuracy_at_iou0.5"
  for name in ("loss", "loss/variance", "eval/trained/encoder/knn_accuracy", "images_per_sec"):
    assert metrics_lib.tag(name) == name


def _events(logdir: str) -> list:
  """Every event of the tensorboardX event files in `logdir` (TFRecord framing, read by hand:
  TensorBoard itself is not installed)."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_writer_tags_are_legal_and_a_resume_purges_replayed_steps(tmp_path, caplog):
  caplog.set_level(logging.DEBUG)
  writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"loss": step, "eval/x->y/recall@5": 0.5})
  writer.close()
  # Resumed from the checkpoint of step 2: steps 3 and 4 are trained (and logged) again.
  writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, purge_step=3)
  for step in (3, 4, 5):
    writer.write_scalars(step, {"loss": 10 * step, "eval/x->y/recall@5": 0.5})
  writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  events = _events(str(tmp_path / "tb"))
  tags = {v.tag for e in events for v in e.summary.value}
  assert tags == {"loss", "eval/x_to_y/recall_at_5"}
  assert all(re.fullmatch(r"[-/\w.]+", t) for t in tags)
  # TensorBoard drops the earlier events at steps >= 3 when it reads this START marker.
  starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert starts == [3]
  # metrics.jsonl keeps every record, with the readable names; the last of a step counts.
  records = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5]
  assert "eval/x->y/recall@5" in records[0]


class _Pending:
  """A step output that becomes ready when the test says so (a stand-in for a jax.Array)."""

  def __init__(self):
    self.ready = False

  def is_ready(self):
    return self.ready

  def block_until_ready(self):
    self.ready = True
    return self


def test_train_progress_counts_finished_steps_and_leaves_compilation_out():
  progress = console.TrainProgress(0, 10, items_per_step=64)
  outputs = [_Pending() for _ in range(6)]
  progress.dispatched(1, {"loss": outputs[0]})  # The first step (compiling) is waited for.
  assert outputs[0].ready and progress._bar.n == 1
  assert progress.rate(1) is None  # Nothing measured yet: step 1 was compilation.
  for step in (2, 3, 4):
    progress.dispatched(step, {"loss": outputs[step - 1]})
  assert progress._bar.n == 1  # Three steps dispatched, none finished.
  outputs[1].ready = True
  progress.dispatched(5, {"loss": outputs[4]})
  assert progress._bar.n == 2  # Step 2 finished; 3, 4, 5 still running.
  progress.finished(4)  # e.g. step 4's metrics were copied to the host
  assert progress._bar.n == 4
  with progress.paused():
    pass
  rate = progress.rate(4)
  assert rate is not None and rate > 0
  progress.close()


def test_metrics_line_and_phases(capsys):
  m = {"loss": jnp.float32(1.5), "loss/variance": 0.25, "grad_norm": 3.0, "skipped": 0,
       "images_per_sec": 1234.5, "learning_rate": 1e-3}
  line = console.metrics_line(50, 800, m, ("images_per_sec",))
  assert line == ("step 50/800: loss 1.5  loss/variance 0.25  images_per_sec 1234  "
                  "learning_rate 0.001")
  with console.Phases("evaluate", ["embedding", "kNN/probe"]) as phase:
    phase("embedding")
    phase("kNN/probe")
  assert set(phase.seconds) == {"embedding", "kNN/probe"}
  err = capsys.readouterr().err
  assert "evaluate: 2/2 phases" in err and "embedding 0 s, kNN/probe 0 s" in err


def _console_scripts() -> list[tuple[str, str]]:
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    return re.findall(r'"(embedspace-\w+)=(embedspace\.\w+):run"', f.read())


def test_console_scripts_are_the_commands_with_their_help():
  scripts = dict(_console_scripts())
  assert scripts == {"embedspace-train": "embedspace.main", "embedspace-evaluate":
                     "embedspace.evaluate", "embedspace-embed": "embedspace.embed",
                     "embedspace-search": "embedspace.search"}
  for script, module in scripts.items():
    # What pip's generated wrapper does: a __main__ without a docstring calls `run()`.
    r = _python("-c", f"import sys; sys.argv = [{script!r}, '--help']; "
                f"from {module} import run; sys.exit(run())")
    first = __import__("importlib").import_module(module).__doc__.splitlines()[0]
    assert r.stdout.startswith(first) and "flags:" in r.stdout, (script, r.stdout[:500])
    assert "  --workdir" in r.stdout or "  --embeddings" in r.stdout, r.stdout[-1000:]


class _QueuedStep:
  """A step's output still computing on the device: `block_until_ready` takes `seconds`."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def is_ready(self) -> bool:
    return False

  def block_until_ready(self):
    time.sleep(self.seconds)
    return self


def test_the_rate_keeps_the_time_of_steps_a_monitor_waits_for():
  # Four steps are queued when a monitor (paused time) first waits for them (`sync`): their
  # 0.4 s are training time. Before the fix, the wait fell inside the pause and the rate after
  # every kNN monitor read 2.5x the real one (2,800 against 1,100 images/s).
  progress = console.TrainProgress(0, 10, items_per_step=100)
  progress.dispatched(1, {"loss": jnp.zeros(())})  # the first step: compiled and waited for
  assert progress.rate(1) is None
  for done in range(2, 6):
    progress.dispatched(done, {"loss": _QueuedStep(0.1 if done < 5 else 0.4)})
  with progress.paused():
    progress.sync()  # waits 0.4 s for the queued steps
    time.sleep(0.2)  # the monitor's own work
  rate = progress.rate(5)
  assert 100 * 4 / 3 < rate < 100 * 4 / 0.39, rate  # 4 steps in ~0.4 s, not in ~0 s
  progress.close()
