"""Metric output: TensorBoard event files and a JSON-lines log, written by process 0 only.

TensorBoard's own writers in flax/clu import TensorFlow; tensorboardX writes the same event files
without it (`tensorboard --logdir WORKDIR` reads them). Every other process gets a writer that
does nothing, so training code calls it unconditionally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class MetricWriter:
  """Scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl`; a no-op off process 0."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported here: only process 0 needs it.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
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


def read_jsonl(path: str) -> list[dict[str, float]]:
  """The records `MetricWriter` wrote to `path`, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
