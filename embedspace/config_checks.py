"""Start-up checks of a config and its workdir: a bad value fails before any work, by name.

ml_collections already refuses command-line overrides of keys that do not exist
(`--config.optimizer.lrr=...`); these checks catch the rest: values of the wrong type or range,
loss keys that do not belong to the method, and a workdir written by a config whose model shapes
differ (its checkpoints could not be restored).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

METHODS = ("vicreg", "simclr", "barlow")
LOSS_KEYS = {
    "vicreg": {"invariance_weight", "variance_weight", "covariance_weight"},
    "simclr": {"temperature", "similarity"},
    "barlow": {"off_diagonal_weight"},
}
# Keys whose change makes the checkpoints of a workdir unusable.
SHAPE_KEYS = ("method", "model.stage_sizes", "model.width", "model.projector_dims",
              "data.image_size", "optimizer.name")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what it should be."""


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def _require(ok: bool, key: str, value: Any, should: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {should}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot work."""
  c = config
  _require(c.method in METHODS, "method", c.method, f"must be one of {METHODS}")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "data.image_size", "model.width", "eval.batch_size", "eval.knn_k"):
    v = _get(c, key)
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, v,
             "must be a positive integer")
  _require(isinstance(c.eval_every, int) and c.eval_every >= 0, "eval_every", c.eval_every,
           "must be an integer >= 0 (0: evaluate only at the end)")
  for key in ("optimizer.base_lr",):
    v = _get(c, key)
    _require(isinstance(v, (int, float)) and v > 0, key, v, "must be a positive number")
  _require(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", c.optimizer.weight_decay,
           "must be >= 0")
  _require(c.optimizer.name in ("lars", "adamw"), "optimizer.name", c.optimizer.name,
           "must be 'lars' or 'adamw'")
  _require(c.model.dtype in ("float32", "bfloat16"), "model.dtype", c.model.dtype,
           "must be 'float32' or 'bfloat16'")
  for key in ("model.stage_sizes", "model.projector_dims"):
    v = tuple(_get(c, key))
    _require(len(v) > 0 and all(isinstance(n, int) and n > 0 for n in v), key, v,
             "must be a non-empty tuple of positive integers")
  lo, hi = c.data.augment.crop_scale
  _require(0 < lo <= hi <= 1, "data.augment.crop_scale", (lo, hi), "must satisfy 0 < lo <= hi <= 1")
  keys = set(c.loss.keys())
  _require(keys == LOSS_KEYS[c.method], "loss", sorted(keys),
           f"method {c.method!r} takes exactly the loss keys {sorted(LOSS_KEYS[c.method])}")
  if c.method == "simclr":
    _require(c.loss.temperature > 0, "loss.temperature", c.loss.temperature, "must be > 0")
    _require(c.loss.similarity in ("cosine", "arc_length"), "loss.similarity", c.loss.similarity,
             "must be 'cosine' or 'arc_length'")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` (with `config.json`) or checks that its config has the same shapes.

  Raises:
    ConfigError: the workdir cannot be written, or was made by a config with other shapes.
  """
  path = os.path.join(workdir, "config.json")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror}); pass a directory "
                      "you can write to") from None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = ml_collections.ConfigDict(json.load(f))
    for key in SHAPE_KEYS:
      old, new = _get(saved, key), _get(config, key)
      if (list(old) if isinstance(old, (list, tuple)) else old) != (
          list(new) if isinstance(new, (list, tuple)) else new):
        raise ConfigError(
            f"--workdir={workdir} holds a run with config.{key}={old!r}, not {new!r}; its "
            "checkpoints cannot be resumed with this config. Use a new --workdir.")
  elif jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
    os.replace(tmp, path)
