"""The embeddings file: one `.npz` (embeddings, ids, labels) and a small JSON sidecar beside it.

```python
import numpy as np, pandas as pd
f = np.load("fmnist_test.npz")  # f["embeddings"] float32 [n, d], f["ids"], f["labels"]
df = pd.DataFrame({"id": f["ids"], "label": f["labels"], "embedding": list(f["embeddings"])})
```

The `.npz` is written while the embeddings are computed: `EmbeddingsWriter` opens the zip member
`embeddings.npy` with its final `[n, d]` header and appends each batch's rows to it, so neither
the embeddings nor a second copy of them is ever held in memory (the zip is uncompressed, zip64
for files over 4 GiB). It is written under a temporary name and renamed when complete, so an
interrupted run leaves no half file; it never replaces a directory, a device, an input or a JSON
that is not its own sidecar, and an existing embeddings file only when asked (`check_output`).
The sidecar (`<name>.json`) records what made the file: the model (workdir, step, method), the
output (encoder or projector), the shape, the source of the images (so the search can show
them) and the class names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMAT = "embedspace.embeddings/1"
"""The sidecar's `format`; a reader of another format says so instead of guessing."""


def sidecar_path(path: str) -> str:
  """`DIR/name.json` for `DIR/name.npz`."""
  return os.path.splitext(path)[0] + ".json"


def _is_sidecar(path: str) -> bool:
  """Whether `path` is a JSON object naming this file format (what `EmbeddingsWriter` writes)."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and str(record.get("format", "")).startswith(
      FORMAT.split("/")[0])


def check_output(path: str, *, overwrite: bool = False, inputs: Sequence[str] = ()) -> str:
  """The absolute path of `path` if an embeddings file (and its sidecar) may be written there.

  An embeddings file never replaces one of `inputs`, a directory, a device or another special
  file, nor a `.json` beside it that is not an embeddings sidecar (`WORKDIR/config.npz` would
  replace the workdir's `config.json`), whatever `overwrite` says; an existing embeddings file
  and its sidecar are replaced only with `overwrite`.

  Raises:
    ValueError: the reason and the fix, naming the path.
  """
  path = os.path.abspath(os.path.expanduser(path))
  side = sidecar_path(path)
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; pass a file path ending in .npz, e.g. "
                     f"{os.path.join(path, 'embeddings.npz')}.")
  for p in (path, side):
    if os.path.isdir(p):
      raise ValueError(f"{path} would replace the directory {p}; pass another output path.")
    if os.path.exists(p) and not os.path.isfile(p):
      raise ValueError(f"{p} exists and is not a regular file (a device, pipe or socket); pass "
                       "the path of an .npz file.")
  if not path.endswith(".npz"):
    raise ValueError(f"{path} is not an .npz path: an embeddings file is an .npz (numpy reads "
                     f"it as one); pass a path ending in .npz, e.g. "
                     f"{os.path.splitext(path)[0]}.npz.")
  for given in inputs:
    if given and os.path.exists(given) and any(
        os.path.exists(p) and os.path.samefile(p, given) for p in (path, side)):
      raise ValueError(f"{path} would replace the input {given}; pass another output path.")
  if os.path.exists(side) and not _is_sidecar(side):
    raise ValueError(f"{path} would replace {side}, which is not an embeddings sidecar (a "
                     "workdir's config.json?); pass another output path.")
  if not overwrite:
    for p in (path, side):
      if os.path.exists(p):
        raise ValueError(f"{p} exists; pass --overwrite to replace it, or another output path.")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write {path}: {parent} is not a writable directory.")
  return path


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """An embeddings file, read.

  Attributes:
    embeddings: float32 `[n, d]`.
    ids: `[n]` the name of each row (ints or strings).
    labels: int64 `[n]` class ids (-1: unknown).
    meta: the sidecar (empty when there is none).
    path: the `.npz`.
  """

  embeddings: np.ndarray
  ids: np.ndarray
  labels: np.ndarray
  meta: dict[str, Any]
  path: str

  @property
  def class_names(self) -> tuple[str, ...]:
    """The sidecar's class names, else `"0", "1", ...` up to the largest label."""
    names = self.meta.get("class_names")
    if names:
      return tuple(names)
    return tuple(str(c) for c in range(int(self.labels.max(initial=-1)) + 1))


class EmbeddingsWriter:
  """Streams `n` rows of `d` float32 values into an `.npz`, then ids, labels and the sidecar.

  ```python
  with EmbeddingsWriter(path, num=n, dim=d, ids=ids, meta=meta) as w:
    for rows, labels in batches:
      w.write(rows, labels)
  ```

  The file is written under a temporary name beside `path` and renamed when complete; what
  `path` may replace is `check_output`'s rule (`overwrite=False`: nothing).

  Raises:
    ValueError: on a `path` that `check_output` refuses (on entry); if fewer or more than `num`
      rows were written (on close; the partial file is removed).
  """

  def __init__(self, path: str, *, num: int, dim: int, ids: np.ndarray,
               meta: dict[str, Any] | None = None, overwrite: bool = True):
    if len(ids) != num:
      raise ValueError(f"{len(ids)} ids for {num} rows.")
    self.path, self.num, self.dim = check_output(path, overwrite=overwrite), int(num), int(dim)
    self.ids, self.meta = np.asarray(ids), dict(meta or {})
    self.labels = np.full(self.num, -1, np.int64)
    self.written = 0
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                                     dir=os.path.dirname(self.path))
    os.close(fd)
    self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._member = self._zip.open("embeddings.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_1_0(
        self._member, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                       "fortran_order": False, "shape": (self.num, self.dim)})

  def write(self, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Appends `rows` float `[m, dim]` and their int `labels` `[m]` (default -1).

    Raises:
      ValueError: on rows of another width or more rows than `num` in all.
    """
    rows = np.ascontiguousarray(rows, "<f4")
    if rows.ndim != 2 or rows.shape[1] != self.dim or self.written + len(rows) > self.num:
      raise ValueError(f"rows {rows.shape} do not fit [{self.num}, {self.dim}] after "
                       f"{self.written} rows.")
    if labels is not None:
      self.labels[self.written:self.written + len(rows)] = labels
    self._member.write(memoryview(rows).cast("B"))
    self.written += len(rows)

  def close(self) -> str:
    """Completes the file and writes the sidecar; returns the `.npz` path."""
    self._member.close()
    try:
      if self.written != self.num:
        raise ValueError(f"{self.written} of {self.num} rows were written; {self.path} is not "
                         "complete.")
      for name, array in (("ids", self.ids), ("labels", self.labels)):
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, array, allow_pickle=False)
      self._zip.close()
    except BaseException:
      self._zip.close()
      os.remove(self._tmp)
      raise
    os.replace(self._tmp, self.path)
    meta = {"format": FORMAT, "shape": [self.num, self.dim], **self.meta}
    _write_json(sidecar_path(self.path), meta)
    return self.path

  def __enter__(self) -> EmbeddingsWriter:
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    if exc_type is None:
      self.close()
    else:  # Leave nothing behind but the error.
      self._member.close()
      self._zip.close()
      os.remove(self._tmp)


def _write_json(path: str, record: dict[str, Any]) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def save_embeddings(path: str, embeddings: np.ndarray, *, ids: np.ndarray | None = None,
                    labels: np.ndarray | None = None, meta: dict[str, Any] | None = None,
                    overwrite: bool = True) -> str:
  """Writes in-memory embeddings `[n, d]` as an embeddings file; returns its absolute path.

  Ids default to `0..n-1`, labels to -1; `meta` goes into the sidecar.

  Raises:
    ValueError: on embeddings that are not `[n, d]`, ids or labels of another length, or a path
      `check_output` refuses.
  """
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [n, d]; got shape {embeddings.shape}.")
  n = len(embeddings)
  ids = np.arange(n) if ids is None else np.asarray(ids)
  if labels is not None and np.shape(labels) != (n,):
    raise ValueError(f"labels must be [{n}]; got shape {np.shape(labels)}.")
  with EmbeddingsWriter(path, num=n, dim=embeddings.shape[1], ids=ids, meta=meta,
                        overwrite=overwrite) as w:
    w.write(embeddings, labels)
  return os.path.abspath(path)


def load_embeddings(path: str) -> Embeddings:
  """An embeddings file (`.npz` with `embeddings` `[n, d]`, optional `ids` and `labels`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an `.npz` with an `embeddings` array `[n, d]`, ids or labels of another
      length, or a sidecar of another format.
  """
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (write one with python -m embedspace.embed).")
  try:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile) or "embeddings" not in f.files:
      raise ValueError("not an .npz with an 'embeddings' array")
    with f:
      x = np.asarray(f["embeddings"], np.float32)
      n = len(x)
      ids = f["ids"] if "ids" in f.files else np.arange(n)
      labels = f["labels"].astype(np.int64) if "labels" in f.files else np.full(n, -1, np.int64)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not an embeddings file ({e}).") from None
  if x.ndim != 2 or ids.shape != (n,) or labels.shape != (n,):
    raise ValueError(f"{path}: embeddings {x.shape}, ids {ids.shape} and labels {labels.shape} "
                     "must be [n, d], [n] and [n].")
  meta: dict[str, Any] = {}
  if os.path.isfile(sidecar_path(path)):
    with open(sidecar_path(path), encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format", FORMAT) != FORMAT:
      raise ValueError(f"{sidecar_path(path)} has format {meta['format']!r}; this version "
                       f"reads {FORMAT!r}.")
  return Embeddings(embeddings=x, ids=ids, labels=labels, meta=meta, path=path)
