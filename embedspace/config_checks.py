"""Start-up checks of a config, its dataset and its workdir: bad input fails before any work.

ml_collections refuses command-line overrides of keys that do not exist
(`--config.optimizer.lrr=...`) or of the wrong type (`--config.batch_size=abc`) while the flags
are parsed; `describe_flag_error` turns those errors into one line that names the flag and the
fix. The checks here catch the rest: values of the wrong range, loss keys that do not belong to
the method, a dataset that cannot be read, and a workdir that cannot be written or whose
checkpoints were written by a config with other model shapes. Every check raises `ConfigError`
before anything is written, so a failed start leaves no workdir behind.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

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


def check_data(config: ml_collections.ConfigDict) -> None:
  """Opens the train and eval splits of `config.data`, so a missing dataset fails at the start.

  Raises:
    ConfigError: the dataset is unknown, not prepared in `config.data.data_dir`, or unreadable.
  """
  from embedspace import data as data_lib  # Heavy (TFDS); only needed here.
  for key in ("train_split", "eval_split"):
    try:
      data_lib.get_source(config.data.name, split=config.data[key], data_dir=config.data.data_dir)
    except (ValueError, FileNotFoundError) as e:  # get_source's documented bad-input errors.
      raise ConfigError(f"config.data.name={config.data.name!r} "
                        f"(config.data.{key}={config.data[key]!r}): {e}") from None


def _has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` (with `config.json`) or checks that its checkpoints have the same shapes.

  A workdir without checkpoints (a run that stopped before its first save) takes the new config.

  Raises:
    ConfigError: the workdir cannot be written, or holds checkpoints of a config with other shapes.
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
  has_checkpoints = _has_checkpoints(workdir)
  saved = None
  if has_checkpoints and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        saved = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:  # The checkpoints' restore still checks every shape.
      logging.warning("%s is unreadable (%s); its shapes are not compared", path, e)
  if saved is not None:
    for key in (k for k in SHAPE_KEYS if _has_key(saved, k)):
      old, new = _get(saved, key), _get(config, key)
      if (list(old) if isinstance(old, (list, tuple)) else old) != (
          list(new) if isinstance(new, (list, tuple)) else new):
        raise ConfigError(
            f"--workdir={workdir} holds checkpoints of a run with config.{key}={old!r}, not "
            f"{new!r}; they cannot be resumed with this config. Use a new --workdir, or pass "
            f"--config.{key}={_as_flag(old)} to resume that run.")
  elif not has_checkpoints and jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
    os.replace(tmp, path)


def _as_flag(value: Any) -> str:
  """`value` as typed after `--config.key=`."""
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def describe_flag_error(error: Exception, argv: Sequence[str]) -> str:
  """One line naming the flag behind `error` (raised while parsing `argv`) and the fix.

  Covers a missing or unloadable `--config` file or variant, an override of a key the config
  does not have (with the closest key), and an override value of the wrong type.
  """
  text = str(error).strip()
  spec = None
  for i, arg in enumerate(argv):
    if re.match(r"--?config=", arg):
      spec = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None:
    return "--config is required: pass a config file, e.g. --config=configs/vicreg.py"
  config = _load_config(spec)
  if config is None or text.startswith("flag --config=") or isinstance(error, OSError):
    reason = [line.strip() for line in text.splitlines() if line.strip()][-1:] or [repr(error)]
    return (f"--config={spec} cannot be loaded ({reason[0]}); pass an existing config file and "
            "variant, e.g. --config=configs/vicreg.py or --config=configs/vicreg.py:smoke")
  for arg in argv:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if match and not _has_key(config, match.group(1)):
      key = match.group(1)
      parent, _, leaf = key.rpartition(".")
      holder = _get(config, parent) if parent and _has_key(config, parent) else config
      names = sorted(holder.keys()) if isinstance(holder, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.4)
      where = f"config.{parent}" if holder is not config else "the config"
      hint = f"did you mean --config.{parent + '.' if parent else ''}{close[0]}? " if close else ""
      return (f"--config.{key}: the config has no key {key!r}; {hint}{where} has: "
              f"{', '.join(names)}")
  match = re.match(r"flag --config\.([^=]+)=(.*?): (.*)", text, re.S)
  if match:
    key, value, detail = match.groups()
    parent, _, leaf = key.rpartition(".")
    holder = _get(config, parent) if parent else config
    kind = holder.get_type(leaf).__name__
    a = "an" if kind[0] in "aeiou" else "a"
    return (f"--config.{key}={value}: config.{key} takes {a} {kind} ("
            f"{' '.join(detail.split())}); pass {a} {kind}, e.g. "
            f"--config.{key}={_as_flag(holder[leaf])}")
  return f"{' '.join(text.split())} (see --helpfull)"


def _load_config(spec: str) -> ml_collections.ConfigDict | None:
  """`get_config(variant)` of the config file in `spec` ('path[:variant]'), None if it fails."""
  path, _, variant = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_embedspace_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
  except Exception:  # Reported by the caller from the original error.
    return None


def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  try:
    _get(config, dotted)
  except (KeyError, AttributeError, TypeError):
    return False
  return True
