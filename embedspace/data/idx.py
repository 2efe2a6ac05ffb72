"""Reading the idx files that MNIST and Fashion-MNIST ship in.

The idx format (LeCun et al.) is a big-endian header followed by raw uint8 data: images are
`>IIII` (magic 2051, count, rows, cols), labels are `>II` (magic 2049, count). Files are usually
gzipped. Every header field and the payload length are checked, so a truncated or corrupted file
fails here with its path in the message instead of producing silently wrong arrays downstream.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

IMAGES_MAGIC = 2051
"""Magic number of an idx3 uint8 image file (0x00000803)."""
LABELS_MAGIC = 2049
"""Magic number of an idx1 uint8 label file (0x00000801)."""


class IdxFormatError(ValueError):
  """An idx file is missing data, has a wrong header or cannot be decompressed."""


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
  """The decompressed bytes of `path` (gzip if it ends in `.gz`, raw otherwise)."""
  path = os.fspath(path)
  if not path.endswith(".gz"):
    with open(path, "rb") as f:
      return f.read()
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise IdxFormatError(f"{path}: not a readable gzip file ({e}); the file is corrupted or "
                         "truncated, restore it from its source") from e


def _check_payload(path: str, data: bytes, header_size: int, shape: tuple[int, ...]) -> None:
  expected = header_size + int(np.prod(shape))
  if len(data) != expected:
    raise IdxFormatError(
        f"{path}: header promises {shape} uint8 values ({expected} bytes with the header) but "
        f"the file holds {len(data)} bytes; the file is truncated or corrupted")


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an idx3 image file.

  Args:
    path: a `*-images-idx3-ubyte[.gz]` file.

  Returns:
    uint8 `[n, rows, cols]`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    IdxFormatError: on a wrong magic number, an implausible header, or a payload whose length
      does not match the header.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 16:
    raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx3 header (16 bytes)")
  magic, n, rows, cols = struct.unpack(">IIII", data[:16])
  if magic != IMAGES_MAGIC:
    raise IdxFormatError(f"{path}: magic number {magic}, expected {IMAGES_MAGIC} (idx3 uint8 "
                         "images); wrong file or corrupted header")
  if rows == 0 or cols == 0 or rows > 4096 or cols > 4096:
    raise IdxFormatError(f"{path}: implausible image size {rows}x{cols} in the header")
  _check_payload(path, data, 16, (n, rows, cols))
  return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: str | os.PathLike[str], *, num_classes: int | None = None) -> np.ndarray:
  """Reads an idx1 label file.

  Args:
    path: a `*-labels-idx1-ubyte[.gz]` file.
    num_classes: if given, every label must lie in `[0, num_classes)`.

  Returns:
    uint8 `[n]`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    IdxFormatError: on a wrong magic number, a payload whose length does not match the header,
      or a label out of range.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 8:
    raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx1 header (8 bytes)")
  magic, n = struct.unpack(">II", data[:8])
  if magic != LABELS_MAGIC:
    raise IdxFormatError(f"{path}: magic number {magic}, expected {LABELS_MAGIC} (idx1 uint8 "
                         "labels); wrong file or corrupted header")
  _check_payload(path, data, 8, (n,))
  labels = np.frombuffer(data, np.uint8, offset=8)
  if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
    raise IdxFormatError(f"{path}: label {int(labels.max())} is out of range for "
                         f"{num_classes} classes; the file is corrupted")
  return labels


def read_idx_pair(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str], *,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads matching image and label files.

  Returns:
    `(images, labels)`: uint8 `[n, rows, cols]` and uint8 `[n]`.

  Raises:
    FileNotFoundError: if a file does not exist.
    IdxFormatError: if either file is malformed or their counts differ.
  """
  images = read_idx_images(images_path)
  labels = read_idx_labels(labels_path, num_classes=num_classes)
  if len(images) != len(labels):
    raise IdxFormatError(f"{os.fspath(images_path)} holds {len(images)} images but "
                         f"{os.fspath(labels_path)} holds {len(labels)} labels")
  return images, labels


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes uint8 `[n, rows, cols]` images or `[n]` labels as an idx file (gzip if `.gz`).

  The inverse of `read_idx_images` / `read_idx_labels`; used to make small test fixtures.

  Raises:
    ValueError: if `array` is not uint8 of rank 1 or 3.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (1, 3):
    raise ValueError(f"idx needs uint8 [n] or [n, rows, cols], got {array.dtype} {array.shape}")
  if array.ndim == 3:
    header = struct.pack(">IIII", IMAGES_MAGIC, *array.shape)
  else:
    header = struct.pack(">II", LABELS_MAGIC, array.shape[0])
  data = header + np.ascontiguousarray(array).tobytes()
  path = os.fspath(path)
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
