"""Spaces shipped inside the package: `embedspace.load("pretrained:vicreg-fashion-mnist")`.

A pretrained space is a minimal training workdir: the run's `config.json`, one orbax checkpoint
holding only what embedding needs (parameters and batch-norm statistics, not the optimizer
state or the data position) with its sha256 integrity record, and `pretrained.json` naming the
command that trained it and the results it was measured at. So it loads exactly as the run it
came from (`embedspace.load` restores and verifies it like any workdir), and a test checks that
the shipped weights still give those results on the shipped test split. Made by

  python -m embedspace.space.pretrained --workdir=workdirs/vicreg --name=vicreg-fashion-mnist

(see `export`); `list_pretrained()` names what ships, as open_clip's `list_pretrained()` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import orbax.checkpoint as ocp

from embedspace.core import checkpointing
from embedspace.core import workdirs

PREFIX = "pretrained:"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pretrained")
INFO_FILE = "pretrained.json"


def list_pretrained() -> dict[str, str]:
  """`{name: one-line description}` of every space shipped in this package."""
  out = {}
  if os.path.isdir(ROOT):
    for name in sorted(os.listdir(ROOT)):
      info = os.path.join(ROOT, name, INFO_FILE)
      if os.path.isfile(info):
        with open(info, encoding="utf-8") as f:
          out[name] = json.load(f).get("description", "")
  return out


def resolve(spec: str) -> str:
  """The workdir of `spec`: "pretrained:NAME" -> the shipped space's directory; else `spec`.

  Raises:
    FileNotFoundError: an unknown pretrained name (the message lists the shipped ones).
  """
  if not spec.startswith(PREFIX):
    return spec
  name = spec[len(PREFIX):]
  path = os.path.join(ROOT, name)
  if not os.path.isfile(os.path.join(path, INFO_FILE)):
    raise FileNotFoundError(f"no pretrained space {name!r}; shipped: "
                            f"{', '.join(PREFIX + n for n in list_pretrained()) or 'none'}")
  return path


def info(spec: str) -> dict[str, Any]:
  """`pretrained.json` of a shipped space: description, command, step and measured results."""
  with open(os.path.join(resolve(spec), INFO_FILE), encoding="utf-8") as f:
    return json.load(f)


def export(workdir: str, dest: str, *, description: str, command: str) -> dict[str, Any]:
  """Writes the newest intact checkpoint of `workdir` to `dest` as a pretrained space.

  Only `{"params", "batch_stats"}` are kept, with a fresh integrity record; `results` in
  `pretrained.json` are the scores of the trained space and the baselines from the run's
  `eval.json` or, when newer, `eval/report.json` of `python -m embedspace.evaluate`.

  Returns:
    The `pretrained.json` record.

  Raises:
    FileExistsError: `dest` exists (nothing is overwritten).
    And what `workdirs.restore_newest` raises.
  """
  if os.path.exists(dest):
    raise FileExistsError(f"{dest} exists; remove it first")
  config, variables, step = workdirs.restore_newest(workdir)
  results = {}
  # The run's own report, or that of `python -m embedspace.evaluate` on it (the newer one).
  reports = [p for p in (os.path.join(workdir, "eval.json"),
                         os.path.join(workdir, "eval", "report.json")) if os.path.isfile(p)]
  if reports:
    with open(max(reports, key=os.path.getmtime), encoding="utf-8") as f:
      report = json.load(f)
    results = {k: report[k] for k in ("trained", "random_init", "raw_pixels", "num_train",
                                      "num_eval", "zero_shot", "retrieval") if k in report}
  tmp = dest + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(tmp, "checkpoints")))
  manager.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(variables),
      **{checkpointing.INTEGRITY_ITEM: ocp.args.JsonSave(
          {"sha256": checkpointing.state_digest(variables)})}))
  manager.wait_until_finished()
  manager.close()
  record = {"description": description, "command": command, "step": int(step),
            "method": config.get("method"), "results": results}
  with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, dest)
  return record


def main(argv: list[str] | None = None) -> int:
  """`python -m embedspace.space.pretrained --workdir=DIR --name=NAME --description=...`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished training workdir")
  parser.add_argument("--name", required=True, help="the pretrained name, e.g. vicreg-fashion-mnist")
  parser.add_argument("--description", required=True, help="one line: what the space is")
  parser.add_argument("--command", default="", help="the command that trained the workdir")
  args = parser.parse_args(argv)
  try:
    record = export(args.workdir, os.path.join(ROOT, args.name), description=args.description,
                    command=args.command)
  except (FileExistsError, FileNotFoundError, checkpointing.NoIntactCheckpointError,
          workdirs.IncompatibleWorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {PREFIX}{args.name} (step {record['step']}) to {os.path.join(ROOT, args.name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
