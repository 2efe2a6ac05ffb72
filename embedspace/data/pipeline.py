"""grain input pipelines: augmented views for training, padded batches for evaluation.

Training batches hold two augmented views of every image (`ssl_loader`: VICReg, SimCLR, Barlow
Twins, BYOL) or DINO's multi-crop (`multicrop_loader`: global crops at the training size and
smaller local crops, Caron et al. 2021).

The global batches do not depend on the number of processes. One sampler, the same on every
process, orders the records of the whole dataset (shuffled with the seed, epoch after epoch) and
hands each position of that order an `np.random.Generator` keyed by (seed, position), which the
`RandomMap` augmentation consumes; global batch `i` is positions `[i*B, (i+1)*B)`. Process `p` of
`P` reads only its slice of every global batch, positions `[i*B + p*B/P, i*B + (p+1)*B/P)`
(`_ProcessSlice`), and `parallel.shard_batch` assembles the slices, process by process, into the
global array. So 1 process with 8 devices and 2 processes with 4 devices each train on the same
rows in the same order with the same augmentations (tested), and the iterator's `get_state()`
(JSON bytes, a few integers, one per process) restores a run bit-exactly; on another number of
processes the position is set from the step instead (`ResumableBatches.seek`). (With grain
workers, `worker_count > 0`, each worker batches its own share of the records, so the batches
depend on the worker count and the process count.)

Evaluation must see every example exactly once, on every process count, without a short last
batch that would make jitted code recompile: the split is padded to a whole number of full global
batches, sliced over the processes the same way, and each batch carries a boolean `mask` (False
on padding) and the example's `index` in the source (-1 on padding). Gathered in process order,
the global evaluation batches hold the examples in source order on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
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


class MultiCrop(grain.transforms.RandomMap):
  """`{"image", "label"}` -> `{"globals": float32 [G, S, S, C], "locals": float32 [L, s, s, C],
  "label": int32}` (no "locals" when L = 0)."""

  def __init__(self, global_config: AugmentConfig, local_config: AugmentConfig, *,
               num_global: int, num_local: int, size: int, local_size: int, mean: Any,
               std: Any):
    self.global_config, self.local_config = global_config, local_config
    self.num_global, self.num_local = num_global, num_local
    self.size, self.local_size = size, local_size
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = {"globals": random_views(element["image"], rng, self.global_config, size=self.size,
                                   mean=self.mean, std=self.std, num_views=self.num_global),
           "label": np.int32(element["label"])}
    if self.num_local:
      out["locals"] = random_views(element["image"], rng, self.local_config,
                                   size=self.local_size, mean=self.mean, std=self.std,
                                   num_views=self.num_local)
    return out


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
  mean, std = _normalization(source)
  views = TwoViews(AugmentConfig.create(augment), size=image_size, mean=mean, std=std)
  return _train_loader(source, views, global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count,
                       num_epochs=num_epochs, worker_count=worker_count, shuffle=shuffle,
                       read_threads=read_threads)


def multicrop_loader(source: Any, *, global_batch_size: int, seed: int, image_size: int,
                     local_image_size: int, num_local: int, num_global: int = 2,
                     augment: AugmentConfig | Mapping[str, Any] | None = None,
                     local_crop_scale: tuple[float, float] = (0.05, 0.4),
                     process_index: int | None = None, process_count: int | None = None,
                     num_epochs: int | None = None, worker_count: int = 0, shuffle: bool = True,
                     read_threads: int = 0) -> grain.DataLoader:
  """This process's batches of DINO's multi-crop: global and local crops of every image.

  Caron et al. 2021 (after SwAV's multi-crop, Caron et al. 2020): `num_global` crops at the
  training resolution, which the teacher and the student see, and `num_local` smaller crops of
  smaller regions (`local_crop_scale` of the area, resized to `local_image_size`), which only
  the student sees. Both follow `augment` (the global crops its `crop_scale`, the local ones
  `local_crop_scale`); every draw comes from the record's generator, so batches, their order,
  resumption and process slicing behave exactly as in `ssl_loader`.

  Iterating yields `{"globals": float32 [B, num_global, S, S, C], "locals": float32
  [B, num_local, s, s, C], "label": int32 [B]}` with `B = global_batch_size / process_count`,
  `S = image_size`, `s = local_image_size` ("locals" only when `num_local > 0`); crops are
  normalised with `source.info.mean/std`.

  Args:
    num_global, num_local: crops of each kind per image (DINO: 2 and 6-10).
    local_image_size: side of the local crops (DINO: 96 for 224 global crops).
    local_crop_scale: the local crops' area range (DINO: (0.05, 0.4)).
    The others as in `ssl_loader`.

  Raises:
    ValueError: as `ssl_loader`, or if `num_global < 1`, `num_local < 0` or a size is < 1.
  """
  if num_global < 1 or num_local < 0 or min(image_size, local_image_size) < 1:
    raise ValueError(f"multicrop_loader needs num_global >= 1, num_local >= 0 and positive "
                     f"sizes; got {num_global}, {num_local}, {image_size}, {local_image_size}")
  mean, std = _normalization(source)
  global_config = AugmentConfig.create(augment)
  crops = MultiCrop(global_config,
                    dataclasses.replace(global_config, crop_scale=tuple(local_crop_scale)),
                    num_global=num_global, num_local=num_local, size=image_size,
                    local_size=local_image_size, mean=mean, std=std)
  return _train_loader(source, crops, global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count,
                       num_epochs=num_epochs, worker_count=worker_count, shuffle=shuffle,
                       read_threads=read_threads)


def _train_loader(source: Any, transform: grain.transforms.RandomMap, *,
                  global_batch_size: int, seed: int, process_index: int | None,
                  process_count: int | None, num_epochs: int | None, worker_count: int,
                  shuffle: bool, read_threads: int) -> grain.DataLoader:
  """The shuffled, process-sliced, batched training loader of `transform` (see `ssl_loader`)."""
  index, count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, count)
  if len(source) < global_batch_size:
    raise ValueError(f"{len(source)} records are fewer than one global batch of "
                     f"{global_batch_size}")
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        num_epochs=num_epochs, seed=sampler_seed(seed))
  return grain.DataLoader(
      data_source=source,
      sampler=_ProcessSlice(sampler, global_batch_size=global_batch_size, process_index=index,
                            process_count=count),
      shard_options=grain.sharding.NoSharding(), worker_count=worker_count,
      read_options=_read_options(read_threads),
      operations=[transform, grain.transforms.Batch(local, drop_remainder=True)])


class ResumableBatches:
  """An `ssl_loader`'s batches, resumable at any step on any topology (elastic resume).

  It iterates, saves and restores exactly as the grain iterator it wraps (`get_state` is that
  iterator's JSON, so checkpoints are unchanged). Because the global batches do not depend on
  the process count (module docstring), the data position after `step` training steps is a
  function of `step` alone; `seek(step)` sets it, which is how a checkpoint written by another
  number of processes (each saved its own state) or another worker count resumes
  (`core.checkpointing.Checkpointer.restore_latest`). With `worker_count = 0` (the default) the
  batches after the seek are exactly those an uninterrupted run on this topology gets; with
  workers they are those of this loader after `step` batches, whose composition depends on the
  worker and process counts (each worker batches its own round-robin share of the records).
  """

  def __init__(self, loader: grain.DataLoader, *, local_batch_size: int):
    self.local_batch_size = int(local_batch_size)
    self._iterator = iter(loader)

  def __iter__(self) -> ResumableBatches:
    return self

  def __next__(self) -> Any:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(state)

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def _compare(self, saved: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(saved, this run's) state dicts, None when `saved` is not a readable state (damage,
    which the restore reports)."""
    try:
      theirs, mine = json.loads(saved), json.loads(self.get_state())
    except ValueError:
      return None
    return (theirs, mine) if isinstance(theirs, dict) else None

  def fits(self, saved: bytes) -> bool:
    """Whether `saved` (a `get_state()`) restores here as it is: the same sampler (with the same
    process slice), source and worker count."""
    pair = self._compare(saved)
    return pair is None or all(pair[0].get(k) == pair[1].get(k)
                               for k in ("sampler", "data_source", "worker_count"))

  def other_data(self, saved: bytes) -> str:
    """What differs when `saved` is a position in other data (another source, split, size,
    seed or global batch; not merely another process slice or worker count), else ''."""
    pair = self._compare(saved)
    if pair is None:
      return ""
    unsliced = lambda r: re.sub(r", process_index=\d+, process_count=\d+", "", str(r))  # noqa
    for key, norm in (("data_source", str), ("sampler", unsliced)):
      if norm(pair[0].get(key)) != norm(pair[1].get(key)):
        return f"{key} {pair[0].get(key)} (this run: {pair[1].get(key)})"
    return ""

  def seek(self, step: int) -> None:
    """Positions the iterator after `step` batches, as if it had produced them itself.

    grain's loader state counts records: with no workers, `last_seen_indices["0"]` is the last
    record read, `step * B - 1` (`B` local rows per batch). With `W` workers, batch `i` comes
    from worker `i % W`, which reads every `W`-th record: worker `j` has made `n_j` batches,
    `n_j * B` of its records, the last of them the record `j + (n_j * B - 1) * W`.
    """
    state = json.loads(self.get_state())
    workers, b = int(state["worker_count"]), self.local_batch_size
    if workers == 0:
      state["last_seen_indices"] = {"0": step * b - 1}
      state["last_worker_index"] = -1
    else:
      made = [step // workers + (j < step % workers) for j in range(workers)]
      state["last_seen_indices"] = {str(j): j + (n * b - 1) * workers
                                    for j, n in enumerate(made)}
      state["last_worker_index"] = step % workers - 1
    self._iterator.set_state(json.dumps(state).encode())


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
