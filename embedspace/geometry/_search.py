"""`pairwise` over every measure by name, and exact blockwise `top_k` (see `embedspace.geometry`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from embedspace.geometry._measures import _arccos
from embedspace.geometry._measures import _as_float
from embedspace.geometry._measures import _check_pair
from embedspace.geometry._measures import _dot_t
from embedspace.geometry._measures import _nan_unless_finite
from embedspace.geometry._measures import _safe_sqrt
from embedspace.geometry._measures import binarize
from embedspace.geometry._measures import cosine_similarity
from embedspace.geometry._measures import euclidean_distance
from embedspace.geometry._measures import finite_rows
from embedspace.geometry._measures import geodesic_distance
from embedspace.geometry._measures import hamming_distance
from embedspace.geometry._measures import l2_normalize
from embedspace.geometry._measures import manhattan_distance
from embedspace.geometry._measures import negative_arc_length
from embedspace.geometry._measures import squared_euclidean_distance
from embedspace.geometry._mahalanobis import Gaussian
from embedspace.geometry._mahalanobis import _check_gaussian
from embedspace.geometry._mahalanobis import _whiten
from embedspace.geometry._mahalanobis import mahalanobis_pairwise

METRICS = (
    "hamming",
    "manhattan",
    "euclidean",
    "sqeuclidean",
    "cosine",
    "geodesic",
    "negative_arc_length",
    "mahalanobis",
)
"""Names `pairwise` and `top_k` accept."""

_SIMILARITIES = frozenset({"cosine", "negative_arc_length"})

# ----------------------------------------------------------------------------------------------
# Dispatch and nearest neighbours.


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; valid metrics are {', '.join(METRICS)}.")


def is_similarity(metric: str) -> bool:
  """True for similarities (larger is closer: cosine, negative_arc_length), False for distances.

  Raises:
    ValueError: on an unknown metric.
  """
  _check_metric(metric)
  return metric in _SIMILARITIES


def _codes(x: jax.Array) -> jax.Array:
  """Binary codes of `x`: real inputs are binarized, bool/integer inputs taken as codes."""
  x = jnp.asarray(x)
  return binarize(x) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _check_metric_args(metric: str, gaussian: Gaussian | None) -> None:
  _check_metric(metric)
  if metric == "mahalanobis" and gaussian is None:
    raise ValueError("metric='mahalanobis' needs gaussian= (see fit_gaussian / make_gaussian).")
  if metric != "mahalanobis" and gaussian is not None:
    raise ValueError(f"gaussian is only used by metric='mahalanobis'; got metric={metric!r}.")


def pairwise(x: jax.Array, y: jax.Array, *, metric: str,
             gaussian: Gaussian | None = None) -> jax.Array:
  """The named measure between every row of `x` and every row of `y`.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.
    metric: one of `METRICS`. "hamming" binarizes real inputs (`binarize`) and takes bool/integer
      inputs as codes.
    gaussian: the covariance for "mahalanobis" (required there, rejected elsewhere).

  Returns:
    `[n, m]` float32 values; see `is_similarity` for which way is closer. NaN for every pair with
    a non-finite row (`finite_rows`), under every metric ("hamming" checks before binarizing).

  Raises:
    ValueError: on an unknown metric (listing the valid ones), a missing or unexpected
      `gaussian`, wrong ranks or mismatched dims.
  """
  _check_metric_args(metric, gaussian)
  _check_pair(x, y)
  if metric == "hamming":
    return _nan_unless_finite(hamming_distance(_codes(x), _codes(y)), x, y)
  if metric == "manhattan":
    return manhattan_distance(x, y)
  if metric == "euclidean":
    return euclidean_distance(x, y)
  if metric == "sqeuclidean":
    return squared_euclidean_distance(x, y)
  if metric == "cosine":
    return cosine_similarity(x, y)
  if metric == "geodesic":
    return geodesic_distance(x, y)
  if metric == "negative_arc_length":
    return negative_arc_length(x, y)
  return mahalanobis_pairwise(x, y, gaussian)


def _ranking(metric: str, queries: jax.Array, keys: jax.Array, gaussian: Gaussian | None):
  """Prepared queries/keys, a larger-is-closer block score, and its map back to metric values.

  Monotone transforms are applied only to the k selected scores: Euclidean-type metrics rank by
  the squared distance, geodesic and negative arc length by the cosine.
  """
  identity = lambda s: s
  negate = lambda s: -s
  if metric == "hamming":
    return _codes(queries), _codes(keys), lambda q, k: -hamming_distance(q, k), negate
  if metric == "manhattan":
    return queries, keys, lambda q, k: -manhattan_distance(q, k), negate
  if metric == "mahalanobis":
    queries = _whiten(_as_float(queries), gaussian.cholesky)
    keys = _whiten(_as_float(keys), gaussian.cholesky)
  if metric in ("euclidean", "sqeuclidean", "mahalanobis"):
    score = lambda q, k: -squared_euclidean_distance(q, k)
    return queries, keys, score, negate if metric == "sqeuclidean" else (lambda s: _safe_sqrt(-s))
  queries, keys = l2_normalize(_as_float(queries)), l2_normalize(_as_float(keys))
  score = lambda q, k: jnp.clip(_dot_t(q, k), -1.0, 1.0)
  finish = {"cosine": identity, "geodesic": _arccos,
            "negative_arc_length": lambda s: 1.0 - _arccos(s) / jnp.pi}[metric]
  return queries, keys, score, finish


def top_k(queries: jax.Array, keys: jax.Array, *, metric: str, k: int, block_size: int = 4096,
          gaussian: Gaussian | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact k nearest keys of every query, closest first, scanning the keys in blocks.

  For each block of `block_size` keys the `[n, block_size]` scores are concatenated with the
  running `[n, k]` best and reduced with `jax.lax.top_k`; the last block is padded with masked
  keys. Memory is `O(n * (block_size + k))` (times `d` for "manhattan", whose block is
  `[n, block_size, d]` before fusion). Ties go to the lower key index. Process queries in blocks
  to bound `n`.

  Non-finite values are never ranked: a key is skipped, like padding, when its row is not finite
  (`finite_rows`), when its score is NaN, or when it is infinitely far (distance inf, similarity
  -inf). A query with fewer than `k` keys left gets index -1 at the worst value (inf for a
  distance, -inf for a similarity) in its last slots; a non-finite query gets index -1 and value
  NaN in every slot. Index -1 is "no neighbour": mask it (`indices >= 0`) before indexing with
  it, where it would wrap to the last row.

  Args:
    queries: `[n, d]`.
    keys: `[N, d]`.
    metric: one of `METRICS`.
    k: neighbours per query, `1 <= k <= N`.
    block_size: keys scored at a time.
    gaussian: the covariance for "mahalanobis".

  Returns:
    `(values [n, k], indices [n, k])`: the metric's values (largest similarity / smallest distance
    first) and int32 row indices into `keys`, -1 where there is no neighbour (see above).

  Raises:
    ValueError: on an unknown metric, bad `gaussian`, wrong ranks, mismatched dims,
      `k` outside [1, N] or `block_size < 1`.
  """
  _check_metric_args(metric, gaussian)
  _check_pair(queries, keys, ("queries", "keys"))
  if metric == "mahalanobis":
    _check_gaussian(keys, gaussian, "keys")
  n, num_keys = queries.shape[0], keys.shape[0]
  if not 1 <= k <= num_keys:
    raise ValueError(f"k must be in [1, number of keys = {num_keys}]; got k={k}.")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1; got {block_size}.")

  query_ok, key_ok = finite_rows(queries), finite_rows(keys)
  q, kv, score, finish = _ranking(metric, queries, keys, gaussian)
  block = min(block_size, num_keys)
  num_blocks = -(-num_keys // block)
  pad = num_blocks * block - num_keys
  kv = jnp.pad(kv, ((0, pad), (0, 0))).reshape(num_blocks, block, kv.shape[1])
  key_ok = jnp.pad(key_ok, (0, pad)).reshape(num_blocks, block)  # padding is not a key
  offsets = jnp.arange(num_blocks, dtype=jnp.int32) * block

  def step(carry, xs):
    best, best_idx = carry
    key_block, ok, offset = xs
    idx = offset + jnp.arange(block, dtype=jnp.int32)
    s = score(q, key_block)
    # Masked scores tie with the initial (-inf, -1) entries, which come first and so win.
    s = jnp.where(ok[None, :] & ~jnp.isnan(s), s, -jnp.inf)
    merged = jnp.concatenate([best, s.astype(best.dtype)], axis=1)
    merged_idx = jnp.concatenate([best_idx, jnp.broadcast_to(idx, (n, block))], axis=1)
    best, pos = jax.lax.top_k(merged, k)
    return (best, jnp.take_along_axis(merged_idx, pos, axis=1)), None

  dtype = jax.eval_shape(score, q, kv[0]).dtype
  init = (jnp.full((n, k), -jnp.inf, dtype), jnp.full((n, k), -1, jnp.int32))
  (best, best_idx), _ = jax.lax.scan(step, init, (kv, key_ok, offsets))
  worst = -jnp.inf if metric in _SIMILARITIES else jnp.inf
  values = jnp.where(best_idx >= 0, finish(best), worst)
  values = jnp.where(query_ok[:, None], values, jnp.nan)
  return values, jnp.where(query_ok[:, None], best_idx, -1)
