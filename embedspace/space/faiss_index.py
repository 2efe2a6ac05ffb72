"""Embeddings as a faiss index (optional: `pip install 'embedspace[faiss]'`, i.e. faiss-cpu).

An exact (flat) faiss index under each measure of `search.MEASURES`, holding the same prepared
vectors as `search.top_k`, so both return the same neighbours (tested): Euclidean is
`IndexFlatL2` (faiss gives squared distances; their square root is returned), Manhattan
`IndexFlat` with `METRIC_L1`, cosine and negative arc length a normalising transform before
`IndexFlatIP` (the inner product of unit vectors is the cosine; `1 - arccos(c) / pi` is applied to
the results), Mahalanobis a linear transform by `L^-1` before `IndexFlatL2`, and Hamming
`IndexBinaryFlat` on the packed sign bits of the centred vectors. The index file is
self-contained except for what faiss cannot hold (the measure, and Hamming's centre), which goes
into a JSON beside it (`<index>.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from embedspace import geometry
from embedspace.space import search


def _faiss() -> Any:
  try:
    import faiss
  except ImportError as e:
    raise ImportError("a faiss index needs faiss: pip install 'embedspace[faiss]' (or "
                      "pip install faiss-cpu)") from e
  return faiss


def _bits(x: np.ndarray) -> np.ndarray:
  """Packed sign bits `x > 0`, padded with zeros to whole bytes: uint8 `[n, ceil(d / 8)]`."""
  return np.packbits(np.asarray(x) > 0, axis=1)


@dataclasses.dataclass(frozen=True)
class FaissIndex:
  """A faiss index of prepared keys and the measure that prepares queries for it.

  Attributes:
    index: the faiss index (`IndexBinaryFlat` for Hamming).
    measure: the fitted measure (its `center` prepares Hamming queries; the other preparations
      are inside `index`).
  """

  index: Any
  measure: search.Measure

  def top_k(self, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As `search.top_k`: `(values [n, k] float32, indices [n, k] int64)`, closest first.

    Raises:
      ValueError: on queries of another width or `k` outside `[1, N]`.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    dim = self.index.d if self.measure.name != "hamming" else len(self.measure.center)
    if queries.ndim != 2 or queries.shape[1] != dim:
      raise ValueError(f"queries must be [n, {dim}]; got shape {queries.shape}.")
    if not 1 <= k <= self.index.ntotal:
      raise ValueError(f"k must be in [1, number of keys = {self.index.ntotal}]; got k={k}.")
    name = self.measure.name
    if name == "hamming":
      values, indices = self.index.search(_bits(self.measure.apply(queries)), k)
    else:
      values, indices = self.index.search(queries, k)
    values = values.astype(np.float32)
    if name in ("euclidean", "mahalanobis"):
      values = np.sqrt(np.maximum(values, 0.0))
    elif name == "negative_arc_length":
      values = 1.0 - np.arccos(np.clip(values, -1.0, 1.0)) / np.pi
    return values.astype(np.float32), indices.astype(np.int64)

  def save(self, path: str) -> str:
    """Writes the index to `path` and the measure to `<path>.json`; returns `path`."""
    faiss = _faiss()
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if self.measure.name == "hamming":
      faiss.write_index_binary(self.index, path)
    else:
      faiss.write_index(self.index, path)
    record = {"measure": self.measure.name, "count": int(self.index.ntotal),
              "center": None if self.measure.center is None else self.measure.center.tolist()}
    with open(path + ".json", "w", encoding="utf-8") as f:
      json.dump(record, f)
    return path


def build(keys: np.ndarray, *, measure: str | search.Measure) -> FaissIndex:
  """An exact faiss index of `keys` `[N, d]` under `measure` (a name or a fitted `Measure`).

  Raises:
    ImportError: faiss is not installed (the message says how to install it).
    ValueError: on an unknown measure, or "sqeuclidean"/"geodesic" (use euclidean/cosine).
    geometry.NonFiniteError: on keys that are not finite (NaN or inf).
  """
  faiss = _faiss()
  keys = np.ascontiguousarray(keys, np.float32)
  # faiss would index a NaN row like any other and rank it: refuse (row numbers must stay).
  geometry.require_finite(keys, "the keys", fix="a faiss index would rank them; drop them "
                          "before building it (and keep the map to the original rows)")
  if not isinstance(measure, search.Measure):
    measure = search.fit_measure(keys, measure=measure)
  if measure.name not in search.MEASURES:
    raise ValueError(f"a faiss index takes the measures {', '.join(search.MEASURES)}; got "
                     f"{measure.name!r}.")
  d = keys.shape[1]
  if measure.name == "hamming":
    index = faiss.IndexBinaryFlat(8 * -(-d // 8))
    index.add(_bits(measure.apply(keys)))
    return FaissIndex(index, measure)
  if measure.name == "manhattan":
    index = faiss.IndexFlat(d, faiss.METRIC_L1)
  elif measure.name == "euclidean":
    index = faiss.IndexFlatL2(d)
  elif measure.name == "mahalanobis":
    whitening = faiss.LinearTransform(d, d, False)
    matrix = measure.apply(np.eye(d, dtype=np.float32)).T  # L^-1, so that A x = L^-1 x
    faiss.copy_array_to_vector(np.ascontiguousarray(matrix, np.float32).ravel(), whitening.A)
    whitening.is_trained = True
    index = faiss.IndexPreTransform(whitening, faiss.IndexFlatL2(d))
  else:  # cosine, negative_arc_length
    index = faiss.IndexPreTransform(faiss.NormalizationTransform(d, 2.0), faiss.IndexFlatIP(d))
  index.add(keys)
  return FaissIndex(index, measure)


def read(path: str) -> FaissIndex:
  """An index written by `FaissIndex.save`.

  Raises:
    FileNotFoundError: no index or no `<path>.json` beside it.
    ImportError: faiss is not installed.
  """
  faiss = _faiss()
  if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
    raise FileNotFoundError(f"{path} and {path}.json: no faiss index written by embedspace.")
  with open(path + ".json", encoding="utf-8") as f:
    record = json.load(f)
  name = record["measure"]
  if name == "hamming":
    center = np.asarray(record["center"], np.float32)
    return FaissIndex(faiss.read_index_binary(path), search.Measure(name, "hamming", center=center))
  metric = "euclidean" if name == "mahalanobis" else name
  return FaissIndex(faiss.read_index(path), search.Measure(name, metric))
