"""Metric output: TensorBoard event files and a JSON-lines log, written by process 0 only.

TensorBoard's own writers in flax/clu import TensorFlow; tensorboardX writes the same event files
without it (`tensorboard --logdir WORKDIR` reads them). Every other process gets a writer that
does nothing, so training code calls it unconditionally.

Metric names stay readable in `metrics.jsonl` ("eval/measures/encoder/cosine/recall@5",
"image->audio"); TensorBoard tags may hold only letters, digits and `_ - / .`, so `tag` spells
the rest out ("recall_at_5", "image_to_audio") instead of letting tensorboardX rename them with
a log line per tag. A resumed run passes `purge_step`: TensorBoard then drops the events an
earlier start wrote at or after that step, so the steps trained again do not show twice
(`metrics.jsonl` keeps every record; the last one of a step is the one that counts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

_SPELLED_OUT = (("->", "_to_"), ("<=", "_le_"), (">=", "_ge_"), ("@", "_at_"), (">", "_gt_"),
                ("<", "_lt_"), ("=", "_eq_"), ("%", "_pct_"), ("+", "_plus_"))
_ILLEGAL = re.compile(r"[^-/\w.]+")


def tag(name: str) -> str:
  """`name` as a legal TensorBoard tag: "a/recall@5" -> "a/recall_at_5", "x->y" -> "x_to_y"."""
  for old, new in _SPELLED_OUT:
    name = name.replace(old, new)
  name = _ILLEGAL.sub("_", name)
  name = re.sub(r"_+", "_", name)
  return "/".join(part.strip("_") or "_" for part in name.strip("/").split("/"))


class MetricWriter:
  """Scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl`; a no-op off process 0.

  Args:
    workdir: the run's directory (a local path or any `etils.epath` path).
    enabled: write (default: on process 0 only).
    purge_step: a resumed run's first new step: TensorBoard hides what an earlier start logged
      from this step on (None: a new run).
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool | None = None,
               purge_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      # Imported here: only process 0 needs it (and it imports torch when that is installed).
      from tensorboardX import SummaryWriter
      root = epath.Path(workdir)
      self._tb = SummaryWriter(os.fspath(root / "tb"), flush_secs=10, purge_step=purge_step)
      self._jsonl = (root / "metrics.jsonl").open("a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(tag(name), value, step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, float]]:
  """The records `MetricWriter` wrote to `path`, in order."""
  with epath.Path(path).open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
