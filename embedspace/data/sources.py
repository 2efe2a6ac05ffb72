"""One entry point from a dataset name to a random-access source of (image, label) records.

`get_source` handles two kinds of names with a plain if/else: the datasets embedspace ships
(`shipped.SHIPPED_NAMES`, read from the package's idx files into memory) and any TFDS catalog
image classification dataset (`cifar10`, `mnist`, `imagenette`, ...) that has been prepared in
`data_dir` as array_record. Nothing is downloaded: the machines that run embedspace may have no
network, so a catalog dataset that is not there is an error that says how to get it.

The source wraps `tfds.data_source` so that every record is `{"image": uint8 [H, W, C],
"label": int}` whatever the dataset's feature names, and carries a `DataInfo` with the class names
and the normalisation constants the pipeline uses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from embedspace.data import shipped

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CATALOG_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""Per-channel mean and std of pixel/255 on the train split of known catalog datasets. Others use
ImageNet's constants (RGB) or mean 0.5, std 0.5 (grayscale)."""

CACHE_BYTES = 512 << 20
"""Splits of fixed-size images up to this many bytes are held in memory after the first read."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model and the pipeline need to know about a split.

  Attributes:
    name: dataset name as given to `get_source`.
    split: split string (TFDS syntax, e.g. `"train"` or `"train[:10%]"`).
    num_examples: records in the split.
    num_classes: number of labels.
    class_names: label `i` is `class_names[i]`.
    image_shape: `(H, W, C)` as stored; `H`, `W` are None for variable-size datasets.
    mean, std: per-channel normalisation of pixel/255, `(x / 255 - mean) / std`.
  """

  name: str
  split: str
  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int | None, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def channels(self) -> int:
    return int(self.image_shape[-1])


class ArrayRecords:
  """Records held as two arrays: record `i` is `{"image": images[i], "label": labels[i]}`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  @classmethod
  def read_all(cls, records: Any, image_key: str, label_key: str) -> ArrayRecords:
    """Reads every record of a random-access source (`[n, ...]` images must share a shape)."""
    items = [records[i] for i in range(len(records))]
    return cls(np.stack([np.asarray(r[image_key]) for r in items]),
               np.asarray([int(r[label_key]) for r in items], np.int64))

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


class ImageSource:
  """Random access to `{"image": uint8 [H, W, C], "label": int}` records, with a `DataInfo`.

  Wraps any random-access source of dict records (a `tfds.data_source`, `ArrayRecords`); grain
  reads it with `len` and `[]`. With `cache=True` the first read loads every record into memory
  (`ArrayRecords`): a record then costs a numpy index instead of a TFDS decode (~50 us), which
  roughly doubles the throughput of a small-image pipeline. Picklable if the wrapped source is
  (tfds data sources are), so it works with grain's worker processes.
  """

  def __init__(self, records: Any, info: DataInfo, *, image_key: str = "image",
               label_key: str = "label", cache: bool = False):
    self.records = records
    self.info = info
    self.image_key = image_key
    self.label_key = label_key
    self.cache = cache
    self._memory: ArrayRecords | None = None

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: np.ndarray, *, name: str = "arrays",
                  class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> ImageSource:
    """An in-memory source (tests, synthetic data).

    Args:
      images: uint8 `[n, H, W, C]`.
      labels: int `[n]`.
      class_names: default `"0", "1", ...` up to `max(labels)`.
      mean, std: default 0.5 per channel.

    Raises:
      ValueError: on mismatched lengths or a non-uint8 `[n, H, W, C]` image array.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"need uint8 images [n, H, W, C] and labels [n], got {images.dtype} "
                       f"{images.shape} and {labels.shape}")
    c = images.shape[-1]
    if class_names is None:
      class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    info = DataInfo(name=name, split="all", num_examples=len(labels),
                    num_classes=len(class_names), class_names=tuple(class_names),
                    image_shape=tuple(images.shape[1:]),
                    mean=tuple(mean) if mean is not None else (0.5,) * c,
                    std=tuple(std) if std is not None else (0.5,) * c)
    return cls(ArrayRecords(images, labels.astype(np.int64)), info)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self.cache and self._memory is None:
      self._memory = ArrayRecords.read_all(self.records, self.image_key, self.label_key)
    if self._memory is not None:
      record, image_key, label_key = self._memory[index], "image", "label"
    else:
      record, image_key, label_key = self.records[index], self.image_key, self.label_key
    return {"image": np.asarray(record[image_key]), "label": int(record[label_key])}

  def __repr__(self) -> str:
    return f"ImageSource({self.info.name!r}, split={self.info.split!r}, n={len(self)})"


def default_data_dir() -> str:
  """TFDS's default data dir: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _catalog_builder(name: str, data_dir: str):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown dataset {name!r}: neither a shipped dataset {shipped.SHIPPED_NAMES} nor a TFDS "
        "catalog dataset (https://www.tensorflow.org/datasets/catalog)") from e


def _not_prepared(name: str, data_dir: str, builder: Any) -> str:
  version_dir = os.path.join(data_dir, name, str(builder.version))
  how = (f"On a machine with network run `tfds build {name} --data_dir=DIR "
         f"--file_format=array_record`, then copy DIR/{name}/ to {data_dir}/{name}/ here (or pass "
         "data_dir=DIR).")
  if builder.is_prepared():
    return (f"TFDS dataset {name!r} in {version_dir} is not in the array_record format that "
            f"random access needs (it was probably built as tfrecord). {how}")
  return f"TFDS dataset {name!r} is not prepared in {data_dir} (no {version_dir}). {how}"


def normalization(name: str, *,
                  channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel `(mean, std)` of pixel/255 that the pipeline uses for dataset `name`.

  Reads no data, so a trained model can preprocess new images on a machine without its
  dataset: the shipped datasets' constants, `CATALOG_NORMALIZATION`, else ImageNet's (RGB) or
  0.5/0.5 (grayscale).
  """
  if name in shipped.SHIPPED_NAMES:
    ds = shipped.dataset(name)
    return ds.mean, ds.std
  if name in CATALOG_NORMALIZATION:
    return CATALOG_NORMALIZATION[name]
  return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))


def get_source(name: str, *, split: str,
               data_dir: str | None = None) -> tuple[ImageSource, DataInfo]:
  """A random-access source of a dataset split, and what to know about it.

  Args:
    name: a shipped dataset (`"embedded_fashion_mnist"`: Fashion-MNIST, train 60,000 / test
      10,000; `"embedded_mnist"`: the MNIST test images re-split 8,000 / 2,000; read from the
      package's files, `data_dir` unused) or a TFDS catalog image classification dataset already
      prepared in `data_dir` as array_record.
    split: TFDS split string, e.g. `"train"`, `"test"`, `"train[:90%]"`, `"train+test"`.
    data_dir: TFDS data dir of catalog datasets (default `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).

  Returns:
    `(source, info)`: `source[i]` is `{"image": uint8 [H, W, C], "label": int}`, `len(source)`
    is `info.num_examples`; `source.info is info`. Shipped datasets are in memory; catalog splits
    of fixed-size images up to `CACHE_BYTES` are loaded into memory on the first read
    (`ImageSource.cache`).

  Raises:
    ValueError: if `name` is neither shipped nor in the TFDS catalog, the split string is not
      valid for it, or the dataset has no image and class label features.
    FileNotFoundError: if a catalog dataset is not prepared in `data_dir` (the message says how
      to build and copy it), or a shipped dataset's files are missing from the install.
    idx.IdxFormatError: if a shipped dataset's idx file is corrupted.
  """
  if name in shipped.SHIPPED_NAMES:
    ds, records = shipped.dataset(name), shipped.load(name, split=split)
    info = DataInfo(name=name, split=split, num_examples=len(records.labels),
                    num_classes=len(ds.class_names), class_names=ds.class_names,
                    image_shape=tuple(records.images.shape[1:]), mean=ds.mean, std=ds.std)
    return ImageSource(ArrayRecords(records.images, records.labels), info), info

  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else default_data_dir()
  builder = _catalog_builder(name, data_dir)
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, AssertionError) as e:
    # TFDS reports a missing dataset as an unsupported file format; say what is wrong.
    raise FileNotFoundError(_not_prepared(name, data_dir, builder)) from e

  features = builder.info.features
  keys = builder.info.supervised_keys
  image_key, label_key = keys if keys and all(isinstance(k, str) for k in keys) else (
      "image", "label")
  label = features[label_key] if label_key in features else None
  if image_key not in features or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"{name!r} is not an image classification dataset (features "
                     f"{list(features.keys())}, supervised_keys {keys})")
  image_shape = tuple(features[image_key].shape)
  if len(image_shape) != 3 or image_shape[-1] not in (1, 3):
    raise ValueError(f"{name!r}: images of shape {image_shape}; the pipeline needs [H, W, 1 or 3]")
  mean, std = normalization(name, channels=image_shape[-1])
  info = DataInfo(name=name, split=split, num_examples=len(records),
                  num_classes=label.num_classes, class_names=tuple(label.names),
                  image_shape=image_shape, mean=tuple(mean), std=tuple(std))
  cache = None not in image_shape and len(records) * np.prod(image_shape) <= CACHE_BYTES
  return ImageSource(records, info, image_key=image_key, label_key=label_key,
                     cache=bool(cache)), info
