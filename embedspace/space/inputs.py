"""What `python -m embedspace.embed --data=...` reads: a dataset split, a folder of images, a .npy.

Every kind is opened into one `Items`: `len`, row-range reads of uint8 images with their labels,
the ids that name each row in the embeddings file, the class names, and a JSON-ready `source`
record from which `reopen` finds the same images again (the search draws a query's neighbours
from it). Nothing is read ahead: a split or an array of a million images is read range by range.

- `NAME[:SPLIT]`: a dataset `data.get_source` opens (the shipped `embedded_fashion_mnist`,
  `embedded_mnist`, or a TFDS catalog name prepared as array_record); the split defaults to
  "test". Ids are positions in the split.
- a folder: its image files (`IMAGE_SUFFIXES`, read with Pillow, which matplotlib installs),
  sorted by relative path, which is the id. When every file sits in a first-level subfolder, the
  subfolder is the class (the ImageFolder layout); otherwise labels are -1. Files are converted
  to the model's channels (grayscale "L" or "RGB").
- a `.npy` file: uint8 `[n, H, W]` or `[n, H, W, C]`, memory-mapped; ids are row numbers, labels
  come from an optional second `.npy` of `n` integers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from embedspace import data as data_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File endings a folder is searched for."""

Reader = Callable[[int, int], tuple[Any, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Items:
  """A sequence of images to embed.

  Attributes:
    ids: `[n]` the name of each row (int positions, or relative paths for a folder).
    class_names: label `i` is `class_names[i]` (empty when there are no labels).
    source: JSON-ready record of where the images are (`reopen` takes it).
    reader: `reader(start, stop)` -> `(images, labels)`: uint8 `[m, H, W(, C)]` or a list of
      `m` uint8 images, and int64 `[m]` labels (-1: unknown).
  """

  ids: np.ndarray
  class_names: tuple[str, ...]
  source: dict[str, Any]
  reader: Reader

  def __len__(self) -> int:
    return len(self.ids)

  def read(self, start: int, stop: int) -> tuple[Any, np.ndarray]:
    """Images and labels of rows `[start, stop)`."""
    return self.reader(start, min(stop, len(self)))


def open_items(spec: str, *, channels: int, data_dir: str | None = None,
               labels: str | None = None) -> Items:
  """The items named by a `--data` value (see the module docstring).

  Args:
    spec: an existing folder, an existing `.npy` file, or `NAME[:SPLIT]`.
    channels: the model's input channels (image files are converted to them).
    data_dir: TFDS data dir for dataset names (default `$TFDS_DATA_DIR`).
    labels: a `.npy` of int labels for a `.npy` of images.

  Raises:
    FileNotFoundError: a missing path or `.npy`, or a dataset that is not prepared (the message
      says how to get it).
    ValueError: an empty folder, a `.npy` of the wrong dtype or rank, labels of the wrong length
      or given for another kind of data, or an unknown dataset name.
  """
  spec = os.path.expanduser(spec)
  if labels and not spec.endswith(".npy"):
    raise ValueError("--labels goes with a .npy of images (--data=IMAGES.npy).")
  if spec.startswith((os.sep, "." + os.sep, ".." + os.sep)) and not os.path.exists(spec):
    raise FileNotFoundError(f"{spec}: no such folder or .npy file.")
  if os.path.isdir(spec):
    return _folder(spec, channels=channels)
  if spec.endswith(".npy"):
    return _array(spec, labels=labels)
  name, _, split = spec.partition(":")
  return _dataset(name, split or "test", data_dir=data_dir)


def reopen(source: dict[str, Any], *, channels: int) -> Items:
  """The items an embeddings file was made from, from its sidecar's `source` record.

  Raises:
    As `open_items` (e.g. FileNotFoundError when the folder or file has moved), or ValueError
    on a record of an unknown kind.
  """
  kind = source.get("kind")
  if kind == "folder":
    return _folder(source["path"], channels=channels)
  if kind == "npy":
    return _array(source["path"], labels=source.get("labels"))
  if kind == "dataset":
    return _dataset(source["name"], source["split"], data_dir=source.get("data_dir"))
  raise ValueError(f"unknown source record {source!r}: expected kind folder, npy or dataset.")


def read_image(path: str, *, channels: int) -> np.ndarray:
  """An image file as uint8 `[H, W, channels]` (converted to grayscale or RGB).

  Raises:
    ImportError: Pillow is missing (`pip install pillow`; matplotlib depends on it).
    ValueError: the file is not an image Pillow can read.
  """
  try:
    from PIL import Image, UnidentifiedImageError
  except ImportError as e:  # matplotlib requires Pillow, so this is a broken install.
    raise ImportError("reading image files needs Pillow: pip install pillow") from e
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{path} is not a readable image ({e}).") from None
  return pixels.reshape(*pixels.shape[:2], channels)


def _folder(path: str, *, channels: int) -> Items:
  root = os.path.abspath(path)
  files = sorted(
      os.path.relpath(os.path.join(d, f), root)
      for d, _, names in os.walk(root) for f in names if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
  parts = [f.split(os.sep) for f in files]
  class_names: tuple[str, ...] = ()
  labels = np.full(len(files), -1, np.int64)
  if all(len(p) == 2 for p in parts):
    class_names = tuple(sorted({p[0] for p in parts}))
    labels = np.asarray([class_names.index(p[0]) for p in parts], np.int64)

  def reader(start: int, stop: int) -> tuple[list[np.ndarray], np.ndarray]:
    images = [read_image(os.path.join(root, f), channels=channels) for f in files[start:stop]]
    return images, labels[start:stop]

  return Items(ids=np.asarray(files), class_names=class_names,
               source={"kind": "folder", "path": root}, reader=reader)


def uint8_hint(dtype: np.dtype) -> str:
  """How to turn pixels of `dtype` into the uint8 pixels in [0, 255] a model takes."""
  if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
    return "if the values are pixels in [0, 255], convert them with x.astype(np.uint8)"
  if np.issubdtype(dtype, np.floating):
    return "for values in [0, 1] pass (x * 255).round().astype(np.uint8)"
  return "pass uint8 pixels in [0, 255]"


def _load_npy(path: str, what: str) -> np.ndarray:
  """The array of the `.npy` file `path` (memory-mapped), or a ValueError naming the problem."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist.")
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    reason = "it does not start with numpy's .npy header" if "pickle" in str(e) else str(e)
    raise ValueError(f"{path} is not a .npy array file ({reason}); save the {what} with "
                     f"np.save(path, {what}).") from None


def _labels(path: str, n: int, images: str) -> np.ndarray:
  """int64 `[n]` class ids from the `.npy` `path` (whole-number floats accepted)."""
  y = np.asarray(_load_npy(path, "labels"))
  if y.shape != (n,):
    raise ValueError(f"{path} holds {y.shape} labels for {n} images in {images}.")
  if not np.issubdtype(y.dtype, np.integer):
    floats = np.issubdtype(y.dtype, np.floating)
    bad = y[~(np.isfinite(y) & (y == np.round(y)))] if floats else y
    if len(bad):
      raise ValueError(f"{path} holds {y.dtype} labels that are not whole numbers (e.g. "
                       f"{bad.tolist()[0]}); labels must be integer class ids (-1: unknown), e.g. "
                       "np.save(path, labels.astype(np.int64)).")
  return y.astype(np.int64)


def _array(path: str, *, labels: str | None) -> Items:
  path = os.path.abspath(path)
  images = _load_npy(path, "images")
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    hint = uint8_hint(images.dtype) if images.dtype != np.uint8 else "pass [n, H, W(, C)]"
    raise ValueError(f"{path} holds {images.dtype} {images.shape}; need uint8 images [n, H, W] "
                     f"or [n, H, W, C] (pixels in [0, 255]): {hint}.")
  if labels:
    labels = os.path.abspath(labels)
    y = _labels(labels, len(images), path)
  else:
    y = np.full(len(images), -1, np.int64)
  class_names = tuple(str(c) for c in range(int(y.max()) + 1)) if len(y) and y.max() >= 0 else ()
  return Items(ids=np.arange(len(images)), class_names=class_names,
               source={"kind": "npy", "path": path, "labels": labels or None},
               reader=lambda start, stop: (np.asarray(images[start:stop]), y[start:stop]))


def _dataset(name: str, split: str, *, data_dir: str | None) -> Items:
  data_dir = os.path.abspath(os.path.expanduser(data_dir or data_lib.default_data_dir()))
  source, info = data_lib.get_source(name, split=split, data_dir=data_dir)

  def reader(start: int, stop: int) -> tuple[list[np.ndarray], np.ndarray]:
    records = [source[i] for i in range(start, stop)]
    return ([r["image"] for r in records],
            np.asarray([r["label"] for r in records], np.int64).reshape(-1))

  return Items(ids=np.arange(len(source)), class_names=tuple(info.class_names),
               source={"kind": "dataset", "name": name, "split": split, "data_dir": data_dir},
               reader=reader)
