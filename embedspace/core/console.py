"""What a run shows on the console: where it runs, the training bar, metric lines, phases.

Process 0 speaks; the others say only where they run (their libraries' warnings still show).
Library INFO logging is off in the command lines (`core.cli.parse_flags`), so the console is:

  vicreg: steps 0 -> 800 on 1 process, 2 cpu devices; workdir /tmp/vicreg     (stderr)
  step 50/800: loss 21.34  loss/covariance 3.1  ...  images_per_sec 523  learning_rate 0.001
  step 400/800: kNN accuracy 0.7410
  train: 100%|████| 800/800 [13:02<00:00, 1.02step/s, loss=18.2, images_per_sec=523]  (stderr)
  evaluate: 6/6 phases [01:54], embedding 9 s, kNN/probe 31 s, measures 40 s, ...     (stderr)

Training steps run asynchronously: the step function returns as soon as the step is queued,
so counting calls would count dispatches, not work done. `TrainProgress` advances its bar when
a step's output is ready (`is_ready()`, polled without waiting after each dispatch; a log point,
which copies the metrics to the host, catches it up), and leaves the first step of each start out
of the rate and the ETA: that step compiles the program (seconds to minutes), so it runs under a
"compiling" bar and the rate counts from the moment it finished.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import tqdm

from embedspace import parallel


def is_main_process() -> bool:
  return jax.process_index() == 0


def say(line: str, *, everywhere: bool = False) -> None:
  """Prints the status `line` to stderr on process 0 (`everywhere`: on every process), through
  tqdm, so an open bar is redrawn below it. (Metric lines and results go to stdout.)"""
  if everywhere or is_main_process():
    tqdm.tqdm.write(line, file=sys.stderr)


def where(mesh: jax.sharding.Mesh | None = None) -> str:
  """What runs where: "1 process, 8 cpu devices" (of `mesh`, default every device); with
  several processes, this process's index and local devices and the global mesh
  (`parallel.describe`)."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  if jax.process_count() > 1:
    return parallel.describe(mesh)
  first, n = mesh.devices.flat[0], mesh.devices.size
  kind = first.platform if first.device_kind.lower() == first.platform else (
      f"{first.platform} ({first.device_kind})")
  return f"1 process, {n} {kind} device{'s' if n > 1 else ''}"


def _bar(*, hidden: bool = False, **kwargs: Any) -> tqdm.tqdm:
  # `disable` only where it must be, so TQDM_DISABLE=1 still silences process 0's bar.
  off = {"disable": True} if hidden or not is_main_process() else {}
  return tqdm.tqdm(dynamic_ncols=True, **kwargs, **off)


def metrics_line(step: int, total: int, metrics: Mapping[str, Any],
                 shown: Sequence[str] = ()) -> str:
  """"step 50/800: loss 21.34  loss/variance 0.98  images_per_sec 523  learning_rate 0.001".

  The loss, its terms (`loss/...`), the `shown` metrics and the learning rate; the rest (norms,
  health) goes to TensorBoard and `metrics.jsonl` only.
  """
  names = ["loss"] + sorted(k for k in metrics if k.startswith("loss/")) + list(shown)
  names += ["learning_rate"] + (["skipped"] if float(metrics.get("skipped", 0)) else [])
  seen = dict.fromkeys(n for n in names if n in metrics)
  return f"step {step}/{total}: " + "  ".join(f"{n} {float(metrics[n]):.4g}" for n in seen)


class TrainProgress:
  """The training bar over finished steps, with the rate of items per second of the steps only.

  Args:
    start: the step the run starts from (0, or the restored one).
    total: the last step.
    items_per_step: items one step consumes over every device (for `rate`).
  """

  def __init__(self, start: int, total: int, *, items_per_step: int):
    self.total = total
    self._items_per_step = items_per_step
    self._bar = _bar(initial=start, total=total, desc="train (compiling the step)", unit="step",
                     leave=False, hidden=start >= total)
    self._compiled = False
    self._pending: collections.deque[tuple[int, Any]] = collections.deque()
    self._mark = (time.perf_counter(), start)  # where the current rate interval began
    self._paused = 0.0
    self._pausing = 0  # depth of `paused` blocks

  def dispatched(self, done: int, metrics: Any) -> None:
    """Step `done` was queued, `metrics` its outputs; the first one waits for its result."""
    leaf = jax.tree.leaves(metrics)[0]
    if not self._compiled:
      jax.block_until_ready(metrics)
      self._compiled = True
      self._bar.close()
      self._bar = _bar(initial=done, total=self.total, desc="train", unit="step")
      self._mark = (time.perf_counter(), done)
      return
    self._pending.append((done, leaf))
    while self._pending and self._pending[0][1].is_ready():
      self._advance(self._pending.popleft()[0])

  def finished(self, done: int) -> None:
    """Step `done` is known to be finished (e.g. its metrics were copied to the host)."""
    while self._pending and self._pending[0][0] <= done:
      self._pending.popleft()
    self._advance(done)

  def _advance(self, done: int) -> None:
    if done > self._bar.n:
      self._bar.update(done - self._bar.n)

  def rate(self, done: int) -> float | None:
    """Items per second over the steps finished since the previous call (up to `done`, which
    must be finished), without compilation and `paused` time; None when none was measured."""
    now = time.perf_counter()
    (then, before), self._mark = self._mark, (now, done)
    seconds, self._paused = now - then - self._paused, 0.0
    if done <= before:
      return None
    return self._items_per_step * (done - before) / max(seconds, 1e-9)

  def sync(self) -> None:
    """Waits for the steps queued so far, so that their time stays in the rate: call it before
    `paused` work that waits for the device itself (a monitor, a checkpoint), which would
    otherwise take the queued steps' time out of the rate (the rate after a kNN monitor read
    2,800 images/s where the steps ran at 1,100)."""
    if self._pending:
      done, leaf = self._pending[-1]
      started = time.perf_counter()
      jax.block_until_ready(leaf)
      if self._pausing:  # Called inside `paused`: the wait is training time all the same.
        self._paused -= time.perf_counter() - started
      self.finished(done)

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent inside (a monitor, a checkpoint) is not counted in the rate (see `sync`)."""
    started = time.perf_counter()
    self._pausing += 1
    try:
      yield
    finally:
      self._pausing -= 1
      self._paused += time.perf_counter() - started

  def log(self, done: int, metrics: Mapping[str, Any], shown: Sequence[str] = ()) -> None:
    """The logged metrics of step `done`: beside the bar (loss, `shown`) and as a line."""
    self._bar.set_postfix({k: f"{float(metrics[k]):.4g}" for k in ("loss", *shown)
                           if k in metrics})
    self.write(metrics_line(done, self.total, metrics, shown))

  def write(self, line: str) -> None:
    """A line above the bar (process 0 only)."""
    if is_main_process():
      self._bar.write(line)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> TrainProgress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class Phases:
  """One line of progress over the named phases of a long computation, and their times.

    with Phases("evaluate", ["embedding", "kNN/probe", "plots"]) as phase:
      phase("embedding"); ...; phase("kNN/probe"); ...

  ends as "evaluate: 3/3 phases [00:41] embedding 9 s, kNN/probe 31 s, plots 1 s" (process 0).
  """

  def __init__(self, desc: str, names: Iterable[str]):
    self.names = list(names)
    self.seconds: dict[str, float] = {}
    self._current: tuple[str, float] | None = None
    self._bar = _bar(total=len(self.names), desc=desc, unit="phase",
                     bar_format="{desc}: {n}/{total} phases [{elapsed}]{postfix}",
                     hidden=not self.names)  # No phases named: nothing to show.

  def __call__(self, name: str) -> None:
    """Phase `name` starts (and the one before it ends)."""
    self._end()
    self._current = (name, time.perf_counter())
    self._bar.set_postfix_str(f"{name} ...")

  def _end(self) -> None:
    if self._current is not None:
      name, started = self._current
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
      self._current = None
      self._bar.update(1)

  def close(self) -> None:
    self._end()
    self._bar.set_postfix_str(", ".join(f"{n} {s:.0f} s" for n, s in self.seconds.items()),
                              refresh=False)
    self._bar.close()

  def __enter__(self) -> Phases:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
