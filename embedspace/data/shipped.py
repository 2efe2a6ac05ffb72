"""The datasets embedspace ships, read from their idx files straight into memory.

Two datasets, both 28x28x1 uint8 images with 10 classes, in `embedspace/data/assets/`:

- `embedded_fashion_mnist`: the full Fashion-MNIST in its original split, `train` 60,000 images
  (6,000 per class) and `test` 10,000 (1,000 per class). The package's default run trains on
  `train` and reports on `test` with no network.
- `embedded_mnist`: the MNIST **test** split (10,000 images), re-split into a fixed 8,000 `train` /
  2,000 `test`, stratified by class (`stratified_split`). It is the out-of-distribution set of
  the Fashion-MNIST runs and the image side of the multimodal datasets.

Split strings use TFDS's syntax, parsed by `tfds.core.ReadInstruction`, so `"train[:320]"`,
`"test[10%:]"` and `"train+test"` mean what they mean for a catalog dataset. Records keep file
order (the input pipeline shuffles).

Why not a TFDS builder: these datasets used to be built as TFDS array_record files in the data
dir on first use. With the 60,000 training images that build took 11 s, and every process then
spent 14 s (3.8 s with `__getitems__`) decoding the records back into memory (2-core Xeon).
Decompressing the idx files takes 0.4 s and gives the arrays directly, with nothing written to
the data dir and no built copy to keep in step with the assets. Each process keeps the arrays of
the last few files it read (`_read`), read-only, so the several `get_source` calls of one run
decompress a file once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from embedspace.data import idx

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""The vendored idx files: `assets/fashion_mnist/`, `assets/mnist/`."""
SPLIT_SALT = "embedspace-split-v1"
"""Salt of the hash that orders examples for `embedded_mnist`'s fixed train/test split."""

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class ShippedDataset:
  """A dataset in `ASSETS_DIR/folder`: `{prefix}-images-idx3-ubyte.gz` and `-labels-idx1-...`.

  Attributes:
    name: the name `get_source` takes.
    folder: folder under `ASSETS_DIR`.
    class_names: label `i` is `class_names[i]`.
    mean, std: per-channel mean and standard deviation of pixel/255 over the `train` split (the
      normalisation the pipeline uses).
    resplit_train: None: `train` and `test` are the original `train-*` and `t10k-*` files. An
      int: only the `t10k-*` files ship, re-split `resplit_train` train / the rest test by
      `stratified_split`.
  """

  name: str
  folder: str
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  resplit_train: int | None = None


DATASETS = {
    "embedded_fashion_mnist": ShippedDataset(
        name="embedded_fashion_mnist", folder="fashion_mnist", class_names=FASHION_MNIST_CLASSES,
        mean=(0.2860,), std=(0.3530,)),  # train split, 60,000 images: 0.28604, 0.35302
    "embedded_mnist": ShippedDataset(
        name="embedded_mnist", folder="mnist", class_names=MNIST_CLASSES, mean=(0.1325,),
        std=(0.3105,), resplit_train=8000),  # its train split, 8,000 images: 0.13250, 0.31049
}
SHIPPED_NAMES = tuple(DATASETS)


@dataclasses.dataclass(frozen=True)
class Split:
  """The records of one split string, in order; read-only arrays.

  Attributes:
    images: uint8 `[n, 28, 28, 1]`.
    labels: int64 `[n]`.
    index: int64 `[n]`, each record's position in its idx file.
  """

  images: np.ndarray
  labels: np.ndarray
  index: np.ndarray


def dataset(name: str) -> ShippedDataset:
  """The shipped dataset `name`; reads nothing.

  Raises:
    ValueError: if `name` is not a shipped dataset.
  """
  if name not in DATASETS:
    raise ValueError(f"{name!r} is not a shipped dataset; shipped datasets are {SHIPPED_NAMES}")
  return DATASETS[name]


def stratified_split(labels: np.ndarray, *, num_train: int,
                     salt: str = SPLIT_SALT) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, class-stratified train/test split of `len(labels)` examples.

  Examples are ranked by `sha256(f"{salt}:{i}")` (a permutation that does not depend on any RNG
  implementation or library version). Class `c` with `n_c` members gets
  `q_c ~= num_train * n_c / n` train examples (floor, then the leftover to the largest
  remainders, ties to the smaller class id), taken as its first `q_c` members in rank order.

  Args:
    labels: int `[n]`.
    num_train: train examples in all, `0 <= num_train <= n`.
    salt: changes the permutation.

  Returns:
    `(train, test)`: sorted int64 indices into `labels`, disjoint, together `arange(n)`.

  Raises:
    ValueError: if `num_train` is out of range.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if not 0 <= num_train <= n:
    raise ValueError(f"num_train={num_train} is out of range for {n} examples")
  keys = np.array([int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8], "big")
                   for i in range(n)], dtype=np.uint64)
  order = np.argsort(keys, kind="stable")
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_train / n
  quota = np.floor(exact).astype(np.int64)
  leftover = num_train - int(quota.sum())
  quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
  ranked = labels[order]
  train = np.concatenate([order[ranked == c][:q] for c, q in zip(classes, quota)])
  train = np.sort(train).astype(np.int64)
  test = np.setdiff1d(np.arange(n, dtype=np.int64), train)
  return train, test


@functools.lru_cache(maxsize=4)
def _read(folder: str, prefix: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Read-only uint8 images `[n, 28, 28]` and labels `[n]` of `folder/{prefix}-*-ubyte.gz`."""
  paths = [os.path.join(folder, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3",
                                                                           "labels-idx1")]
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing. The shipped datasets' files come with the "
                              "package (setup.py package_data 'assets/*/*'); reinstall it.")
  images, labels = idx.read_idx_pair(*paths, num_classes=num_classes)
  if images.shape[1:] != (28, 28):
    raise idx.IdxFormatError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}, "
                             "expected 28x28")
  return images, labels


def _splits(ds: ShippedDataset, folder: str) -> dict[str, tuple[np.ndarray, ...]]:
  """`{"train": (images, labels, index), "test": ...}`, `index` the records' places in the file."""
  n = len(ds.class_names)
  if ds.resplit_train is None:
    train, test = _read(folder, "train", n), _read(folder, "t10k", n)
    return {"train": (*train, np.arange(len(train[1]))), "test": (*test, np.arange(len(test[1])))}
  images, labels = _read(folder, "t10k", n)
  train, test = stratified_split(labels, num_train=ds.resplit_train)
  return {"train": (images[train], labels[train], train),
          "test": (images[test], labels[test], test)}


def load(name: str, *, split: str, source_dir: str | None = None) -> Split:
  """The records of `split` of shipped dataset `name`.

  Args:
    name: one of `SHIPPED_NAMES`.
    split: TFDS split string over `train` and `test`, e.g. `"train"`, `"test[:256]"`,
      `"train[:10%]+test"`.
    source_dir: folder of the idx `.gz` files (default `ASSETS_DIR/<folder>`; tests pass a copy).

  Raises:
    ValueError: if `name` is not shipped or `split` is malformed, names another split or slices
      past its end.
    FileNotFoundError: if a file is missing.
    idx.IdxFormatError: if a file is corrupted.
  """
  ds = dataset(name)
  folder = os.path.abspath(os.fspath(source_dir or os.path.join(ASSETS_DIR, ds.folder)))
  splits = _splits(ds, folder)
  infos = {k: tfds.core.SplitInfo(name=k, shard_lengths=[len(v[1])], num_bytes=0)
           for k, v in splits.items()}
  try:
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  except (ValueError, NotImplementedError) as e:
    sizes = ", ".join(f"{k} ({len(v[1])})" for k, v in splits.items())
    raise ValueError(f"{name}: split {split!r}: {e} (splits: {sizes})") from e
  arrays = [tuple(a[p.from_:p.to] for a in splits[p.splitname]) for p in parts]
  images, labels, index = (np.concatenate(a) if len(a) > 1 else a[0] for a in zip(*arrays))
  result = Split(images=images[..., None], labels=labels.astype(np.int64),
                 index=index.astype(np.int64))
  for a in (result.images, result.labels, result.index):
    a.flags.writeable = False
  return result
