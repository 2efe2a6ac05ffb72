"""The one table of methods: `config.method` -> the task that trains, evaluates and loads it.

Adding a method is its task file plus one line here (see `core.task.Task`); nothing else in
embedspace lists method names. `task(name)` is what `main`, `evaluate` and `load` dispatch on.
"""

from __future__ import annotations

from typing import Any

from embedspace.core import train as core_train
from embedspace.core import workdirs
from embedspace.core.config_checks import ConfigError
from embedspace.core.task import Task
from embedspace.core.workdirs import IncompatibleWorkdirError
from embedspace.interface import find_task
from embedspace.interface import palme_task
from embedspace.multimodal import task as multimodal_task
from embedspace.space import pretrained
from embedspace.ssl import byol
from embedspace.ssl import dino
from embedspace.ssl import task as ssl_task

TASKS: dict[str, Task] = {
    "vicreg": ssl_task.VICREG,
    "simclr": ssl_task.SIMCLR,
    "barlow": ssl_task.BARLOW,
    "byol": byol.BYOL,
    "dino": dino.DINO,
    "clip": multimodal_task.TASK,
    "imagebind": multimodal_task.TASK,
    "decur": multimodal_task.TASK,
    "palme": palme_task.TASK,
    "find": find_task.TASK,
}


def task(method: str) -> Task:
  """The task of `method`.

  Raises:
    ConfigError: an unknown method (the message lists the known ones).
  """
  if method not in TASKS:
    raise ConfigError(f"config.method={method!r}: must be one of {tuple(TASKS)}")
  return TASKS[method]


def method_of(workdir: str) -> str:
  """`config.method` of a training workdir (read from its `config.json`).

  Raises:
    FileNotFoundError: no `config.json` (not a training workdir).
    IncompatibleWorkdirError: `config.json` is unreadable or names no known method.
  """
  method = workdirs.read_config(workdir).get("method")
  if method is None:
    raise IncompatibleWorkdirError(f"{workdir}/config.json names no method: not a config "
                                   "written by embedspace.")
  if method not in TASKS:
    raise IncompatibleWorkdirError(
        f"{workdir} is a run of method {method!r}, which this version of embedspace does not "
        f"know ({', '.join(TASKS)}); load it with the version that trained it.")
  return method


def load(workdir: str, **kwargs: Any) -> Any:
  """The space of any finished run: `task(method_of(workdir)).load(workdir, **kwargs)`.

  `workdir` may name a space shipped in the package, "pretrained:NAME"
  (`space.pretrained.list_pretrained()`).

  An image method gives a `space.image.TrainedModel` (`embed(images)`), CLIP/ImageBind/DeCUR a
  `multimodal.space.MultimodalSpace` (`embed(modality, items)`), the interfaces their loaded
  `(config, model or environment, params, step)`.
  """
  workdir = pretrained.resolve(workdir)
  return task(method_of(workdir)).load(workdir, **kwargs)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """`core.train.train_and_evaluate` with the task of `config.method` (what `main` runs)."""
  return core_train.train_and_evaluate(task(config.get("method")), config, workdir)
