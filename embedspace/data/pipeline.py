"""grain input pipelines: pairs of augmented views for training, padded batches for evaluation.

The global batches do not depend on the number of processes. One sampler, the same on every
process, orders the records of the whole dataset (shuffled with the seed, epoch after epoch) and
hands each position of that order an `np.random.Generator` keyed by (seed, position), which the
`RandomMap` augmentation consumes; global batch `i` is positions `[i*B, (i+1)*B)`. Process `p` of
`P` reads only its slice of every global batch, positions `[i*B + p*B/P, i*B + (p+1)*B/P)`
(`_ProcessSlice`), and `parallel.shard_batch` assembles the slices, process by process, into the
global array. So 1 process with 8 devices and 2 processes with 4 devices each train on the same
rows in the same order with the same augmentations (tested), and the iterator's `get_state()`
(JSON bytes, a few integers, one per process) restores a run bit-exactly.

Evaluation must see every example exactly once, on every process count, without a short last
batch that would make jitted code recompile: the split is padded to a whole number of full global
batches, sliced over the processes the same way, and each batch carries a boolean `mask` (False
on padding) and the example's `index` in the source (-1 on padding). Gathered in process order,
the global evaluation batches hold the examples in source order on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import grain
import jax
import numpy as np

from embedspace.data.augment import AugmentConfig, center_view, random_views


class TwoViews(grain.transforms.RandomMap):
  """`{"image", "label"}` -> `{"view1", "view2": float32 [S, S, C], "label": int32}`."""

  def __init__(self, config: AugmentConfig, *, size: int, mean: Any, std: Any):
    self.config = config
    self.size = size
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    views = random_views(element["image"], rng, self.config, size=self.size, mean=self.mean,
                         std=self.std, num_views=2)
    return {"view1": views[0], "view2": views[1], "label": np.int32(element["label"])}


class CenterView(grain.transforms.Map):
  """`{"image", "label", "mask", "index"}` -> the same with a normalised float32 `[S, S, C]`."""

  def __init__(self, *, size: int, mean: Any, std: Any):
    self.size = size
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {"image": center_view(element["image"], size=self.size, mean=self.mean, std=self.std),
            "label": np.int32(element["label"]), "mask": np.bool_(element["mask"]),
            "index": np.int32(element["index"])}


class _Padded:
  """The records of `source`, then `total - len(source)` padding records (mask False)."""

  def __init__(self, source: Any, total: int):
    self.source = source
    self.total = total

  def __len__(self) -> int:
    return self.total

  def __getitem__(self, i: int) -> dict[str, Any]:
    if i < len(self.source):
      return {**self.source[i], "mask": True, "index": i}
    return {"image": self.source[0]["image"], "label": 0, "mask": False, "index": -1}


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is out of range for process_count={count}")
  return index, count


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  return batch_size // process_count


class _Sampler(Protocol):
  """What grain's `DataLoader` asks of a sampler (`grain.samplers.IndexSampler` is one)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


class _ProcessSlice:
  """This process's slice of every global batch of `sampler`, as a sampler of its own.

  Global batch `i` is positions `[i*B, (i+1)*B)` of `sampler`; process `p` of `P` reads positions
  `[i*B + p*b, i*B + (p+1)*b)`, `b = B/P`, in order. The records keep the metadata (record key
  and random generator) of their global position, so the rows, their order and their
  augmentations do not depend on `P`. A last partial global batch is never read.
  """

  def __init__(self, sampler: _Sampler, *, global_batch_size: int, process_index: int,
               process_count: int):
    self._sampler = sampler
    self._global = global_batch_size
    self._local = _local_batch(global_batch_size, process_count)
    self._index = process_index
    self._count = process_count
    self._len = len(sampler) // global_batch_size * self._local

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (f"_ProcessSlice({self._sampler!r}, global_batch_size={self._global}, "
            f"process_index={self._index}, process_count={self._count})")

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} is out of range [0, {self._len})")
    batch, row = divmod(index, self._local)
    return self._sampler[batch * self._global + self._index * self._local + row]


def _normalization(source: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
  info = getattr(source, "info", None)
  if info is None:
    raise TypeError(f"{type(source).__name__} has no .info with mean/std; pass the source that "
                    "get_source returns, or an ImageSource")
  return info.mean, info.std


def _read_options(read_threads: int) -> grain.ReadOptions:
  # grain's default (16 threads, 500 prefetched records) costs more in GIL contention and buffer
  # polling than it saves when a record takes microseconds (measured: 1.2k vs 3.3k pairs/s).
  return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=16 * read_threads)


def sampler_seed(seed: int) -> int:
  """The 32-bit seed grain gets for the user's `seed`.

  grain keys record `i`'s generator as `Philox(key=seed + i)`, so seeds 0 and 1 would give the
  same augmentations shifted by one record; hashing the seed (`np.random.SeedSequence`) makes
  nearby seeds unrelated.

  Raises:
    ValueError: if `seed` is negative.
  """
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def ssl_loader(source: Any, *, global_batch_size: int, seed: int, image_size: int,
               augment: AugmentConfig | Mapping[str, Any] | None = None,
               process_index: int | None = None, process_count: int | None = None,
               num_epochs: int | None = None, worker_count: int = 0, shuffle: bool = True,
               read_threads: int = 0) -> grain.DataLoader:
  """This process's batches of two augmented views per image, for self-supervised training.

  Iterating yields dicts `{"view1": float32 [B, S, S, C], "view2": float32 [B, S, S, C],
  "label": int32 [B]}` with `B = global_batch_size / process_count` and `S = image_size`;
  views are normalised with `source.info.mean/std`. The same seed and `worker_count` give the
  same batches (workers split records round-robin, so batch composition depends on the count);
  `iter(loader).get_state()` / `.set_state(state)` resume exactly with the same settings and
  process count. With `num_epochs=None` the data repeats forever (batches run across epoch
  boundaries, each epoch reshuffled); otherwise the last partial global batch is dropped. Each
  process reads only its `1/process_count` slice of every global batch; the global batches (rows,
  order and augmentations) are the same for every `process_count` (see the module docstring).

  Args:
    source: what `get_source` returns (records `{"image": uint8 [H, W, C], "label"}` and `.info`).
    global_batch_size: rows per step over all processes.
    seed: >= 0; drives the shuffle and every augmentation.
    image_size: output height and width; images of any size are cropped and resized to it.
    augment: `AugmentConfig`, a dict of its fields, or None for the defaults.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    num_epochs: passes over the data; None repeats forever.
    worker_count: grain worker processes (0: load in this process).
    shuffle: shuffle the records (each epoch differently).
    read_threads: threads reading records in each process (`grain.ReadOptions.num_threads`);
      0 reads inline, the fastest on a few cores and for in-memory sources. Raise it for
      sources on remote storage.

  Raises:
    ValueError: if the global batch is not divisible by `process_count`, the source holds fewer
      records than one global batch, or the augmentation config is invalid.
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, count)
  if len(source) < global_batch_size:
    raise ValueError(f"{len(source)} records are fewer than one global batch of "
                     f"{global_batch_size}")
  mean, std = _normalization(source)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        num_epochs=num_epochs, seed=sampler_seed(seed))
  views = TwoViews(AugmentConfig.create(augment), size=image_size, mean=mean, std=std)
  return grain.DataLoader(
      data_source=source,
      sampler=_ProcessSlice(sampler, global_batch_size=global_batch_size, process_index=index,
                            process_count=count),
      shard_options=grain.sharding.NoSharding(), worker_count=worker_count,
      read_options=_read_options(read_threads),
      operations=[views, grain.transforms.Batch(local, drop_remainder=True)])


def eval_batches(num_examples: int, *, batch_size: int, process_count: int) -> int:
  """Batches each process gets from `eval_loader`: `ceil(n / batch_size)`, on any process count.

  Raises:
    ValueError: if `batch_size` is not a positive multiple of `process_count`.
  """
  _local_batch(batch_size, process_count)
  return math.ceil(num_examples / batch_size)


def eval_loader(source: Any, *, batch_size: int, image_size: int,
                process_index: int | None = None, process_count: int | None = None,
                worker_count: int = 0, read_threads: int = 0) -> grain.DataLoader:
  """Deterministic, unaugmented batches covering every example exactly once over all processes.

  Every process gets the same number of full batches (`eval_batches(...)`), of
  `B = batch_size / process_count` rows: `{"image": float32 [B, S, S, C], "label": int32 [B],
  "mask": bool [B], "index": int32 [B]}`. Global batch `i` is examples `[i*batch_size,
  (i+1)*batch_size)` of the split padded at its end, and process `p` gets the `p`-th slice of it,
  so the global batches, gathered in process order, list the examples in source order whatever
  the process count. Padding rows have `mask` False, `index` -1, `label` 0 and a copy of example
  0 as image, so reductions must weight by `mask`. Real rows have `index` = their position in
  `source`. The image is the central square resized to `image_size`, normalised with
  `source.info.mean/std`. The loader can be iterated again for each evaluation.

  Args:
    source: what `get_source` returns.
    batch_size: global rows per batch over all processes (divisible by `process_count`).
    image_size: output height and width.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    worker_count, read_threads: as in `ssl_loader`.

  Raises:
    ValueError: if `batch_size` is not divisible by `process_count` or the source is empty.
  """
  index, count = _processes(process_index, process_count)
  if len(source) == 0:
    raise ValueError("eval_loader: the source is empty")
  local = _local_batch(batch_size, count)
  total = eval_batches(len(source), batch_size=batch_size, process_count=count) * batch_size
  mean, std = _normalization(source)
  sampler = grain.samplers.IndexSampler(num_records=total, shuffle=False, num_epochs=1)
  return grain.DataLoader(
      data_source=_Padded(source, total),
      sampler=_ProcessSlice(sampler, global_batch_size=batch_size, process_index=index,
                            process_count=count),
      shard_options=grain.sharding.NoSharding(),
      worker_count=worker_count, read_options=_read_options(read_threads),
      operations=[CenterView(size=image_size, mean=mean, std=std),
                  grain.transforms.Batch(local, drop_remainder=False)])
