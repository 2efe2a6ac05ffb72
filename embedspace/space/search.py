"""Exact search in an embedding space under every measure, and the class similarity map.

`top_k` is exact and runs the evaluation's kernel, `geometry.top_k` (keys scanned in blocks with a
running top-k, queries in blocks of one compiled shape), so memory is `O(query_block *
(key_block + k))` beside the keys. A measure is fitted to the keys first (`fit_measure`):
Mahalanobis whitens with the covariance of the keys (shrinkage 0.01, as the evaluation) and then
takes the Euclidean distance, exactly `geometry.mahalanobis_pairwise`; Hamming compares the
sign bits of the embeddings centred on the key mean (uncentred ReLU features would be all ones).
`class_similarity` averages a measure over every pair of members of two classes, on a seeded
subset of points, blockwise. `python -m embedspace.search` is the command line over it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from embedspace import geometry
from embedspace.measure import retrieval
from embedspace.space.measures import EXTRA_MEASURES, MEASURES

__all__ = ["EXTRA_MEASURES", "MEASURES", "Measure", "class_similarity", "fit_measure",
           "nearest_classes", "top_k"]


@dataclasses.dataclass(frozen=True)
class Measure:
  """A measure fitted to a set of keys: `apply` maps vectors to what `geometry.top_k` compares.

  Attributes:
    name: one of `MEASURES` (or "sqeuclidean", "geodesic").
    metric: the `geometry` metric compared on `apply(x)`.
    center: `[d]` subtracted before the sign bits ("hamming"), else None.
    gaussian: the covariance whitened away ("mahalanobis"), else None.
  """

  name: str
  metric: str
  center: np.ndarray | None = None
  gaussian: geometry.Gaussian | None = None

  @property
  def is_similarity(self) -> bool:
    """True when larger values are closer (cosine, negative arc length)."""
    return geometry.is_similarity(self.metric)

  def apply(self, x: np.ndarray) -> np.ndarray:
    """float32 `[n, d]` ready for `metric`: whitened, centred or as they are."""
    x = np.asarray(x, np.float32)
    if self.gaussian is not None:
      return retrieval.whiten(x, self.gaussian)
    return x if self.center is None else x - self.center


def fit_measure(keys: np.ndarray, *, measure: str, gaussian: geometry.Gaussian | None = None,
                shrinkage: float = 0.01) -> Measure:
  """`measure` made ready for `keys` `[N, d]`.

  Args:
    keys: the embeddings searched.
    measure: one of `MEASURES`, "sqeuclidean" or "geodesic".
    gaussian: the covariance for "mahalanobis" (default: `geometry.fit_gaussian` of the keys'
      mean and covariance, shrunk by `shrinkage`).
    shrinkage: see `geometry.fit_gaussian`.

  Non-finite keys (NaN or inf) never move the Hamming centre, which is the mean of the finite
  ones; a Mahalanobis fit refuses them.

  Raises:
    ValueError: on an unknown measure (listing the valid ones) or keys that are not `[N, d]`.
    geometry.NonFiniteError: "mahalanobis" without `gaussian` and keys that are not finite.
  """
  if measure not in MEASURES + EXTRA_MEASURES:
    raise ValueError(f"unknown measure {measure!r}; valid measures are {', '.join(MEASURES)} "
                     f"(and {', '.join(EXTRA_MEASURES)}).")
  keys = np.asarray(keys, np.float32)
  if keys.ndim != 2 or not len(keys):
    raise ValueError(f"keys must be [N, d] with N >= 1; got shape {keys.shape}.")
  if measure == "hamming":  # The centre of the finite keys: a NaN row would make it all NaN.
    finite = np.all(np.isfinite(keys), axis=1)
    center = keys[finite].mean(axis=0) if finite.any() else np.zeros(keys.shape[1], np.float32)
    return Measure(measure, "hamming", center=center)
  if measure == "mahalanobis":
    if gaussian is None:
      geometry.require_finite(keys, "the keys", fix=(
          "a covariance cannot be fitted through them; drop them first, or fit the Gaussian on "
          "the finite keys and pass it as gaussian="))
      gaussian = geometry.fit_gaussian(geometry.gaussian_stats(jnp.asarray(keys)),
                                       shrinkage=shrinkage)
    return Measure(measure, "euclidean", gaussian=gaussian)
  return Measure(measure, measure)


@functools.partial(jax.jit, static_argnames=("metric", "k", "block_size"))
def _top_k_block(queries: jax.Array, keys: jax.Array, *, metric: str, k: int,
                 block_size: int) -> tuple[jax.Array, jax.Array]:
  return geometry.top_k(queries, keys, metric=metric, k=k, block_size=block_size)


def top_k(queries: np.ndarray, keys: np.ndarray, *, measure: str | Measure, k: int,
          query_block: int = 256, key_block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """The exact `k` nearest keys of every query, closest first.

  Ties go to the lower key index (`geometry.top_k`), so results are deterministic.

  Args:
    queries: `[n, d]`.
    keys: `[N, d]`.
    measure: a name (fitted to `keys` with `fit_measure`) or a fitted `Measure`.
    k: neighbours, `1 <= k <= N`.
    query_block: queries per compiled call (the last block is padded).
    key_block: keys scored at a time.

  Returns:
    `(values [n, k] float32, indices [n, k] int64)`: the measure's values (largest similarity
    or smallest distance first) and row numbers into `keys`. As `geometry.top_k`, a key that is
    not finite is never returned: slots left without a key hold index -1 (at the worst value),
    and a query that is not finite gets -1 (value NaN) in every slot. Mask `indices >= 0`
    before using them as rows.

  Raises:
    ValueError: on an unknown measure, mismatched shapes, `k` outside `[1, N]` or blocks < 1.
  """
  if not isinstance(measure, Measure):
    measure = fit_measure(keys, measure=measure)
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != np.shape(keys)[1]:
    raise ValueError(f"queries must be [n, {np.shape(keys)[1]}] like the keys; got shape "
                     f"{queries.shape}.")
  if not 1 <= k <= len(keys):
    raise ValueError(f"k must be in [1, number of keys = {len(keys)}]; got k={k}.")
  if query_block < 1 or key_block < 1:
    raise ValueError(f"query_block and key_block must be >= 1; got {query_block}, {key_block}.")
  kv = jnp.asarray(measure.apply(keys))
  q = measure.apply(queries)
  block = max(1, min(query_block, len(q)))
  values, indices = [], []
  for start in range(0, len(q), block):
    part = q[start:start + block]
    padded = np.concatenate([part, np.zeros((block - len(part), q.shape[1]), np.float32)])
    v, i = _top_k_block(jnp.asarray(padded), kv, metric=measure.metric, k=k,
                        block_size=min(key_block, len(kv)))
    values.append(np.asarray(v)[:len(part)])
    indices.append(np.asarray(i)[:len(part)])
  if not values:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  return np.concatenate(values).astype(np.float32), np.concatenate(indices).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Which classes sit close.

_pairwise = jax.jit(geometry.pairwise, static_argnames=("metric",))


def class_similarity(x: np.ndarray, labels: np.ndarray, *, measure: str,
                     num_classes: int | None = None, max_points: int = 4000, seed: int = 0,
                     block: int = 512) -> tuple[np.ndarray, int]:
  """The mean of `measure` over every pair of members of two classes: `[C, C]`.

  `M_ab = mean_{i in a, j in b, i != j} m(x_i, x_j)` over a seeded random subset of at most
  `max_points` labelled rows (rows with label < 0 are left out), computed in row blocks of
  `block` against the subset (memory `block * max_points`). Rows that are not finite (NaN or
  inf) are left out like unlabelled ones (`used` counts the rest). The measure is fitted on the
  subset (`fit_measure`). A class with fewer than 2 members in the subset has NaN on its diagonal (none:
  NaN row and column).

  Args:
    x: `[n, d]` embeddings.
    labels: `[n]` ints (`-1`: unlabelled).
    measure: as `fit_measure`.
    num_classes: C (default: the largest label + 1).
    max_points: points used.
    seed: of the subset.
    block: rows per step.

  Returns:
    `(M float64 [C, C], points used)`.

  Raises:
    ValueError: on an unknown measure, no labelled rows, or mismatched shapes.
  """
  x, labels = np.asarray(x, np.float32), np.asarray(labels)
  if x.ndim != 2 or labels.shape != x.shape[:1]:
    raise ValueError(f"need x [n, d] and labels [n]; got {x.shape} and {labels.shape}.")
  rows = np.flatnonzero((labels >= 0) & np.all(np.isfinite(x), axis=1))
  if not len(rows):
    raise ValueError("the embeddings have no labels (all -1) on rows with finite values; a "
                     "class map needs labelled rows.")
  rows = np.sort(np.random.default_rng(seed).permutation(rows)[:max_points])
  c = int(labels[rows].max()) + 1 if num_classes is None else int(num_classes)
  fitted = fit_measure(x[rows], measure=measure)
  z = jnp.asarray(fitted.apply(x[rows]))
  onehot = np.eye(c)[labels[rows]]  # [M, C]
  sums = np.zeros((c, c))
  for start in range(0, len(rows), block):
    values = np.asarray(_pairwise(z[start:start + block], z, metric=fitted.metric), np.float64)
    values[np.arange(len(values)), start + np.arange(len(values))] = 0.0  # no self-pairs
    sums += onehot[start:start + block].T @ values @ onehot
  counts = onehot.sum(0)
  pairs = np.outer(counts, counts) - np.diag(counts)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, sums / np.maximum(pairs, 1), np.nan), len(rows)


def nearest_classes(matrix: np.ndarray, *, measure: str, top: int = 3) -> list[list[int]]:
  """For each class, the `top` other classes closest to it under `measure` (NaN last).

  Raises:
    ValueError: on an unknown measure.
  """
  closeness = np.asarray(matrix, np.float64) * (1 if geometry.is_similarity(measure) else -1)
  closeness = np.where(np.isfinite(closeness), closeness, -np.inf)
  np.fill_diagonal(closeness, -np.inf)
  order = np.argsort(-closeness, axis=1, kind="stable")
  return [[int(j) for j in row if j != i][:top] for i, row in enumerate(order)]
