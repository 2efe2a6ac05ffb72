"""Reading a training workdir: its config and the newest intact checkpoint, for any trainer.

`restore_newest` is the one checkpoint reader of every loader (each task's `load`, and
`multimodal.space.load_workdir`, which the interfaces read their frozen encoders with);
`restore_run` adds the check of the run's kind and
`check_params_fit` that of its parameter shapes, so a workdir of another kind, version or model
is one clear error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from embedspace.core import checkpointing


class IncompatibleWorkdirError(ValueError):
  """The workdir's config or checkpoint does not fit the model this version of embedspace builds."""


def absolute(workdir: str | os.PathLike[str]) -> epath.Path:
  """`workdir` as an absolute `epath.Path` (orbax refuses relative paths); a URI such as
  `gs://bucket/run` is taken as it is."""
  path = epath.Path(workdir)
  return path if path.is_absolute() else path.resolve()


def read_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The config a training run wrote to `workdir/config.json`.

  Raises:
    FileNotFoundError: no `config.json` (not a training workdir).
    IncompatibleWorkdirError: `config.json` is not a config.
  """
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{workdir} has no config.json: not a training workdir (train with "
                            "python -m embedspace.main --config=... --workdir=DIR first).")
  try:
    return ml_collections.ConfigDict(json.loads(config_path.read_text(encoding="utf-8")))
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise IncompatibleWorkdirError(f"{config_path} is not a config ({e}).") from None


def restore_newest(workdir: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], int]:
  """The config and variables of the newest intact checkpoint of any embedspace training run.

  Only the train state is read (not the data iterator), onto one device whatever the device
  count of the run that saved it. It is checked against the checkpoint's integrity record
  (`checkpointing.verify_restored`); a missing record is damage unless the checkpoint predates
  records (then a warning). Damaged checkpoints are skipped with a warning and left where they
  are (training moves them aside when it resumes).

  Args:
    workdir: a directory written by `train.train_and_evaluate` (`config.json`, `checkpoints/`).

  Returns:
    `(config, {"params", "batch_stats"}, step)`.

  Raises:
    FileNotFoundError: no `config.json` or no checkpoint in `workdir`.
    checkpointing.NoIntactCheckpointError: checkpoints exist but none restores.
    IncompatibleWorkdirError: `config.json` is not a config, or the state is not a train state.
  """
  root = absolute(workdir)  # orbax refuses relative paths.
  workdir = os.fspath(root)
  config = read_config(root)
  ckpt_dir = root / "checkpoints"
  steps = sorted(int(d.name) for d in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                 if d.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint under {ckpt_dir}: the run saved "
                            "nothing yet (checkpoints are written every config.checkpoint_every "
                            "steps and at the end).")
  failures = []
  for step in reversed(steps):
    step_dir = ckpt_dir / str(step)
    try:
      state = checkpointing.restore_state(step_dir)
      # Garbage bytes in an array file can restore silently wrong values: check the sha256
      # record training wrote. Only a checkpoint from before records existed has none: it is
      # taken as it is, with a warning; a record missing from a newer one is damage.
      if not checkpointing.verify_restored(step_dir, state):
        logging.warning("checkpoint %s was written before integrity records existed; loaded "
                        "without verifying it", step_dir)
    except Exception as e:  # orbax raises many types for damaged files; each one is reported.
      reason = checkpointing.failure_reason(e)
      logging.warning("checkpoint %s is damaged and is skipped (%s)", step_dir, reason)
      failures.append(f"step {step}: {reason}")
      continue
    if not isinstance(state, Mapping) or not {"params", "batch_stats"} <= set(state):
      raise IncompatibleWorkdirError(
          f"checkpoint {step_dir} holds no params/batch_stats: not an embedspace train state.")
    return config, {"params": state["params"], "batch_stats": state["batch_stats"]}, step
  raise checkpointing.NoIntactCheckpointError(
      f"no checkpoint under {ckpt_dir} could be restored ({'; '.join(failures)}).")


def restore_run(workdir: str, accepts: Callable[[Any], bool], *, kind: str,
                config_file: str) -> tuple[Any, dict[str, Any], int]:
  """`restore_newest(workdir)` for a run whose config `accepts(config)` (a run of `kind`).

  Raises:
    IncompatibleWorkdirError: a run of another method, naming `kind` and how to train one
      (`python -m embedspace.main --config=<config_file>`).
    And what `restore_newest` raises.
  """
  config, variables, step = restore_newest(workdir)
  if not accepts(config):
    raise IncompatibleWorkdirError(
        f"{workdir} is a {config.get('method', 'self-supervised')!r} run, not a {kind} one "
        f"(train one with python -m embedspace.main --config={config_file} --workdir=DIR)")
  return config, variables, step


def check_params_fit(workdir: str, expected: Any, params: Any) -> None:
  """Raises IncompatibleWorkdirError unless `params` has the tree and shapes of `expected` (the
  parameters, or their `jax.eval_shape`, of the model the workdir's config builds)."""
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
  if shapes(expected) != shapes(params):
    raise IncompatibleWorkdirError(
        f"the parameters in {workdir} do not fit the model its config.json builds with this "
        "version of embedspace (retrain, or use the version that trained it)")
