"""What both sides of `benchmarks.race` share: the data in memory, their names, timing under load.

`benchmarks.race` (the race, embedspace's side, the CLI), `benchmarks.race_reference` (the
PyTorch + lightly side) and `benchmarks.race_scores` import this module; it imports none of them
(and not torch).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common  # Sets OMP_WAIT_POLICY before torch is imported.
from embedspace.data import shipped

DATASET = "embedded_fashion_mnist"

EMBEDSPACE = "embedspace (jax)"
REFERENCE = "PyTorch + lightly"


@dataclasses.dataclass(frozen=True)
class Data:
  """The shipped splits in memory and the pipeline's normalisation."""
  train_images: np.ndarray  # uint8 [N, 28, 28, 1]
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int

  @classmethod
  def load(cls) -> Data:
    ds = shipped.dataset(DATASET)
    train, test = shipped.load(DATASET, split="train"), shipped.load(DATASET, split="test")
    return cls(train.images, train.labels, test.images, test.labels, ds.mean, ds.std,
               len(ds.class_names))

  def normalized(self, images: np.ndarray) -> np.ndarray:
    """float32 `[n, H, W, C]`: `(x / 255 - mean) / std`, embedspace's evaluation view of a 28 px
    image (`augment.center_view` at size 28 is this, its resize being the identity)."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


# ----------------------------------------------------------------------------------------------
# Timing with the load beside it.


def _tree_cpu_seconds() -> float:
  """CPU seconds of this process, its reaped children and its live descendants (/proc)."""
  t = os.times()
  total = t.user + t.system + t.children_user + t.children_system
  children: dict[int, list[int]] = {}
  ticks: dict[int, int] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    pid = int(name)
    children.setdefault(int(fields[1]), []).append(pid)
    ticks[pid] = int(fields[11]) + int(fields[12])
  todo, own = list(children.get(os.getpid(), [])), 0
  while todo:
    pid = todo.pop()
    own += ticks.get(pid, 0)
    todo += children.get(pid, [])
  return total + own / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
  """`fn()` and `{"s": wall seconds, "other_cores": CPU others used meanwhile, "load": 1-min}`."""
  load = os.getloadavg()[0]
  busy0, own0 = common._busy_jiffies(), _tree_cpu_seconds()  # pylint: disable=protected-access
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  busy = (common._busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")  # pylint: disable=protected-access
  other = max(busy - (_tree_cpu_seconds() - own0), 0.0) / max(wall, 1e-9)
  return out, {"s": wall, "other_cores": other, "load": load}


def log(message: str) -> None:
  """One progress line on stderr, with the time and the 1-minute load average."""
  print(f"[race] {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}: {message}",
        file=sys.stderr, flush=True)
