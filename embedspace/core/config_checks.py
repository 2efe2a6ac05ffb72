"""Start-up checks of a config and its workdir: bad input fails before any work.

ml_collections refuses command-line overrides of keys that do not exist
(`--config.optimizer.lrr=...`) or of the wrong type (`--config.batch_size=abc`) while the flags
are parsed; `describe_flag_error` turns those errors into one line that names the flag and the
fix. The helpers here (`get`, `require*`, one dotted-key walker) are what every method's
`validate` is written with; `check_workdir_config` is the one check that a workdir can be
written and that a resumed run has the config it was trained with. Every check raises
`ConfigError` before anything is written, so a failed start leaves no workdir behind.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

SAFE_TO_CHANGE = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every",
                  "eval", "skip_nonfinite", "data.worker_count", "data.data_dir",
                  "data.tfds_data_dir", "encoders_workdir", "model.kernel_init")
"""Keys (and subtrees) a resumed run may change: how long and how it is run and measured, not
what it learns (the initialiser acts before the first step only, so a resumed run never uses it). Any other change to the config of a workdir with checkpoints is refused."""

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what it should be."""


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """`config.a.b.c` for `dotted` = "a.b.c" (KeyError/AttributeError if a part is missing)."""
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def require(config: ml_collections.ConfigDict, ok: bool, key: str, should: str) -> None:
  """Raises `ConfigError("config.<key>=<value>: <should>")` unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{key}={get(config, key)!r}: {should}")


def require_positive_ints(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises ConfigError naming the first of `keys` that is not a positive integer."""
  for key in keys:
    value = get(config, key)
    require(config, isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
            "must be a positive integer")


def require_one_of(config: ml_collections.ConfigDict, key: str, allowed: Sequence[Any]) -> None:
  """Raises ConfigError unless `config.<key>` is one of `allowed`."""
  require(config, get(config, key) in tuple(allowed), key, f"must be one of {tuple(allowed)}")


def require_common(config: ml_collections.ConfigDict) -> None:
  """The keys every method's config has: the run's length, logging, checkpoints, optimizer."""
  require_positive_ints(config, ("batch_size", "num_steps", "log_every", "checkpoint_every",
                                 "keep_checkpoints"))
  base_lr = config.optimizer.base_lr
  require(config, isinstance(base_lr, (int, float)) and base_lr > 0, "optimizer.base_lr",
          "must be a positive number")
  require(config, config.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  require_one_of(config, "optimizer.name", ("lars", "adamw"))


def check_batch_divisible(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ConfigError unless `config.batch_size` splits evenly over devices and processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if config.batch_size % n_dev or config.batch_size % n_proc:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the {n_dev} devices; pass "
        f"--config.batch_size={max(n_dev, config.batch_size // n_dev * n_dev)}")


def _has_checkpoints(workdir: str | os.PathLike[str]) -> bool:
  directory = epath.Path(workdir) / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """The leaves of a nested dict keyed "a.b.c"; sequences compared as lists."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
  return out


def _is_safe(key: str) -> bool:
  return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """`{key: (saved value, new value)}` for every leaf that differs (missing: `None`)."""
  old, new = _flat(saved), _flat(json.loads(config.to_json()))
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def _write_config(path: epath.Path, config: ml_collections.ConfigDict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(config.to_json(indent=2), encoding="utf-8")
  tmp.replace(path)


def make_workdir(workdir: str | os.PathLike[str]) -> None:
  """Creates `workdir` (any `etils.epath` path) and checks that files can be written in it.

  Raises:
    ConfigError: it cannot be created or written (the message says why).
  """
  root = epath.Path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write_probe_{jax.process_index()}"
    probe.write_text("", encoding="utf-8")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e}); pass a "
                      "directory you can write to") from None


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                         ) -> dict[str, tuple[Any, Any]]:
  """Creates `workdir` (with `config.json`), or checks the config of the run it resumes.

  A workdir without checkpoints (a run that stopped before its first save) takes the new config.
  One with checkpoints resumes only with the config it was trained with, except for the keys of
  `SAFE_TO_CHANGE`. (Whether the checkpoints' arrays fit the state this config builds is checked
  again when they are restored.)

  Returns:
    The safe changes `{key: (saved, new)}`; once the run has resumed, `record_changes` writes
    them to `config.json` and `config_history.jsonl`.

  Raises:
    ConfigError: the workdir cannot be written, or the config differs from the saved one in a
      key that changes what the run learns (every such key is named, with the flags to resume).
  """
  root = epath.Path(workdir)
  path = root / CONFIG_FILE
  make_workdir(root)
  if not _has_checkpoints(root):
    if jax.process_index() == 0:
      _write_config(path, config)
    return {}
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:  # The checkpoints' restore still checks every shape.
    logging.warning("%s is unreadable (%s); the config is not compared", path, e)
    return {}
  changes = config_changes(saved, config)
  refused = {k: v for k, v in changes.items() if not _is_safe(k)}
  if refused:
    listed = ", ".join(f"config.{k}={old!r} (now {new!r})" for k, (old, new) in refused.items())
    flags = " ".join(f"--config.{k}={_as_flag(old)}" for k, (old, _) in refused.items()
                     if old is not None)
    raise ConfigError(
        f"--workdir={workdir} holds checkpoints of a run with {listed}; resuming it with another "
        f"value would mix two runs. Use a new --workdir, or resume that run"
        f"{' with ' + flags if flags else ''}.")
  return changes


def record_changes(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                   changes: dict[str, tuple[Any, Any]]) -> None:
  """Writes the resumed run's safe `changes` to `config.json`, appends them to
  `config_history.jsonl` and says so in one line (process 0; nothing when there are none)."""
  if not changes or jax.process_index() != 0:
    return
  record = {k: {"old": old, "new": new} for k, (old, new) in changes.items()}
  with (epath.Path(workdir) / HISTORY_FILE).open("a", encoding="utf-8") as f:
    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": record}) + "\n")
  _write_config(epath.Path(workdir) / CONFIG_FILE, config)
  print(f"resuming {workdir} with changed settings: "
        + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        + f" (recorded in {HISTORY_FILE})", flush=True)


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
      holder = get(config, parent) if parent and _has_key(config, parent) else config
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
    holder = get(config, parent) if parent else config
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
    get(config, dotted)
  except (KeyError, AttributeError, TypeError):
    return False
  return True
