"""The command line: bad input is one clear line and exit code 2; the smoke config runs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from configs import simclr, vicreg
from embedspace import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=ROOT, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=("--xla_force_host_platform_device_count=2"
                        " --xla_backend_optimization_level=0"))
  return subprocess.run([sys.executable, "-m", "embedspace.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


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
    config_checks.validate_config(config)


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
    config_checks.validate_config(config)


def test_workdir_from_another_config_and_unwritable_workdir(tmp_path):
  config = vicreg.get_config("smoke")
  config_checks.check_workdir_config(config, str(tmp_path / "run"))
  config.model.width = 16
  config_checks.check_workdir_config(config, str(tmp_path / "run"))  # No checkpoint yet: fine.
  (tmp_path / "run" / "checkpoints" / "2").mkdir(parents=True)
  config.model.width = 32
  with pytest.raises(config_checks.ConfigError, match=r"model\.width"):
    config_checks.check_workdir_config(config, str(tmp_path / "run"))
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
  r = _main(f"--config={config_path}:smoke", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "using workdirs/vicreg_smoke" in r.stdout
  with open(tmp_path / "workdirs" / "vicreg_smoke" / "eval.json") as f:
    report = json.load(f)
  assert set(report) >= {"trained", "random_init", "raw_pixels"}
