"""The command line: bad input is one clear line and exit code 2; the smoke config runs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from configs import simclr, vicreg
from embedspace import data, methods
from embedspace.core import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=ROOT, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=("--xla_force_host_platform_device_count=2"
                        " --xla_backend_optimization_level=0"))
  r = subprocess.run([sys.executable, "-m", "embedspace.main", *args], cwd=cwd, env=env,
                     capture_output=True, timeout=timeout)
  # Decoded without text=True's newline translation: a progress bar redraws with "\r".
  return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.mark.parametrize("override, key", [
    ("--config.batch_size=-4", "batch_size"),
    ("--config.optimizer.name=sgdd", "optimizer.name"),
    ("--config.loss.similarity=dot", "loss.similarity"),
    ("--config.data.augment.crop_scale=(0.5,0.2)", "crop_scale"),
])
def test_bad_values_name_the_key(override, key):
  config = simclr.get_config("smoke")
  with pytest.raises(config_checks.ConfigError, match=key.replace(".", r"\.")):
    _apply(config, override)
    methods.task(config.method).validate(config)


def _apply(config, override):
  dotted, value = override[len("--config."):].split("=", 1)
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  try:
    config[leaf] = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    config[leaf] = value  # A bare string, as config_flags parses it.


def test_loss_keys_must_belong_to_the_method():
  config = vicreg.get_config("smoke")
  config.loss.temperature = 0.1
  with pytest.raises(config_checks.ConfigError, match="loss keys"):
    methods.task(config.method).validate(config)


def test_workdir_resumes_only_with_its_config_and_unwritable_workdir(tmp_path, capsys):
  config = vicreg.get_config("smoke")
  run = tmp_path / "run"

  def saved():
    with open(run / "config.json") as f:
      return json.load(f)

  config_checks.check_workdir_config(config, str(run))
  config.model.width = 16
  config_checks.check_workdir_config(config, str(run))  # No checkpoint yet: takes the new config.
  assert saved()["model"]["width"] == 16
  (run / "checkpoints" / "2").mkdir(parents=True)
  # The same config resumes with nothing to record.
  assert config_checks.check_workdir_config(config, str(run)) == {}

  # A change to what the run learns is refused, every such key named with the flag to resume.
  lr = config.optimizer.base_lr
  config.model.width = 32
  config.optimizer.base_lr = 2 * lr
  with pytest.raises(config_checks.ConfigError) as exc:
    config_checks.check_workdir_config(config, str(run))
  message = str(exc.value)
  for key, old in (("model.width", 16), ("optimizer.base_lr", lr)):
    assert f"config.{key}={old!r}" in message and f"--config.{key}={old}" in message, message
  config.model.width = 16  # The learning rate alone is refused too.
  with pytest.raises(config_checks.ConfigError, match=r"optimizer\.base_lr") as exc:
    config_checks.check_workdir_config(config, str(run))
  assert "model.width" not in str(exc.value)
  assert saved()["model"]["width"] == 16 and saved()["optimizer"]["base_lr"] == lr
  assert not (run / config_checks.HISTORY_FILE).exists()

  # A change to how long it runs is accepted and, once the run has resumed, written to
  # config.json, recorded in the history and reported.
  config.optimizer.base_lr = lr
  steps = config.num_steps
  config.num_steps = steps + 4
  changes = config_checks.check_workdir_config(config, str(run))
  assert changes == {"num_steps": (steps, steps + 4)}
  assert saved()["num_steps"] == steps and not (run / config_checks.HISTORY_FILE).exists()
  capsys.readouterr()
  config_checks.record_changes(config, str(run), changes)
  out = capsys.readouterr().out
  assert f"num_steps {steps!r} -> {steps + 4!r}" in out and config_checks.HISTORY_FILE in out
  assert saved()["num_steps"] == steps + 4
  with open(run / config_checks.HISTORY_FILE) as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 1 and history[0]["changes"] == {"num_steps": {"old": steps,
                                                                       "new": steps + 4}}

  (tmp_path / "a_file").write_text("x")
  with pytest.raises(config_checks.ConfigError, match="not writable"):
    config_checks.check_workdir_config(config, str(tmp_path / "a_file" / "run"))


def test_cli_rejects_unknown_key_and_bad_value_and_variant(tmp_path):
  r = _main("--config=configs/vicreg.py:smoke", "--config.optimizer.lrr=0.1",
            f"--workdir={tmp_path}/a")
  assert r.returncode != 0 and "lrr" in r.stderr
  r = _main("--config=configs/vicreg.py:smoke", "--config.num_steps=0", f"--workdir={tmp_path}/b")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: config.num_steps=0: must be a positive integer" in r.stderr
  r = _main("--config=configs/vicreg.py:tiny", f"--workdir={tmp_path}/c")
  assert r.returncode != 0 and "unknown config variant 'tiny'" in r.stderr


def test_cli_smoke_run_with_default_workdir(tmp_path):
  # VICReg: its smoke programs are in the run's compilation cache from the other smoke runs.
  config_path = os.path.join(ROOT, "configs", "vicreg.py")
  # The dataset is built (once per TFDS dir) here, so the console below is the run's alone.
  data.get_source("embedded_fashion_mnist", split="train")
  r = _main(f"--config={config_path}:smoke", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "using workdirs/vicreg_smoke" in r.stdout
  with open(tmp_path / "workdirs" / "vicreg_smoke" / "eval.json") as f:
    report = json.load(f)
  assert set(report) >= {"trained", "random_init", "raw_pixels"}
  check_console(r.stdout, r.stderr)


def check_console(stdout: str, stderr: str) -> None:
  """A `:smoke` run's console: what runs where, metric and monitor lines, the evaluation's
  phases and result, and no library INFO or TensorBoard tag complaints (issue 22)."""
  text = stdout + "\n" + stderr
  lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
  info = [line for line in lines
          if re.match(r"I\d{4} \d\d:\d\d:\d\d", line)  # absl's INFO prefix
          or re.search(r"\b(orbax|tensorflow_datasets|dataset_info|grain|checkpoint_manager)"
                       r"[\w./]*\.py:\d+\]", line)  # any absl line of those libraries
          or "Unable to initialize backend" in line]
  assert not info, "library INFO on the console:\n" + "\n".join(info[:10])
  assert "illegal" not in text, text[-3000:]
  assert "Metadata file does not exist" not in text
  out = stdout.splitlines()  # metric and monitor lines, the result; status lines on stderr
  assert re.search(r"^vicreg: steps 0 -> 6 on 1 process, \d+ cpu devices?; workdir ", stderr,
                   re.M), stderr
  assert [line.split(":")[0] for line in out if re.match(r"step \d+/6: loss ", line)] == [
      "step 1/6", "step 3/6", "step 5/6", "step 6/6"]
  assert "step 4/6: kNN " in stdout and out[-1].startswith("evaluation (")
  assert "evaluate: 3/3 phases" in stderr and "train: 100%" in stderr
  # Lines as a terminal keeps them (a bar redraws its line with "\r"): 124 before issue 22.
  assert stdout.count("\n") + stderr.count("\n") < 20, text
