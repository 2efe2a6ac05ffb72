"""Every measure of the founding note on one embedding space: kNN accuracy and retrieval.

The note's claim is that the choice of distance measure matters; this module measures it on the
same features. A measure is a `geometry` metric applied to features prepared for it: Hamming
compares sign bits of a random projection of the centred features (SimHash, Charikar 2002,
"Similarity Estimation Techniques from Rounding Algorithms": the probability that a bit differs
is the angle over pi), at several code lengths; Mahalanobis whitens the features with the tied
within-class covariance of the training set (Lee et al. 2018) and then takes the Euclidean
distance, `|L^-1 (x - y)|`; the others use the features as they are.

Retrieval treats the eval split as queries and the training split as the database, with class
labels as relevance. Average precision needs every key's rank, so queries are processed in
blocks of `query_block` against all keys, scored key block by key block: memory is
`O(query_block * N)` (and `O(query_block * key_block * d)` for Manhattan), never `[N, N]`. Ties in
a measure (frequent for short Hamming codes) are broken by a seeded random order of the keys, so
both kNN and AP are unbiased over tie orders instead of favouring the data's storage order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embedspace import geometry
from embedspace.measure import probes

PLAIN_MEASURES = ("manhattan", "euclidean", "cosine", "negative_arc_length")
"""Measures applied to the features as they are."""

DEFAULT_CODE_LENGTHS = (16, 64, 256, 1024)
"""Bits of the SimHash codes compared with the Hamming distance."""


def measure_names(code_lengths: Sequence[int] = DEFAULT_CODE_LENGTHS) -> tuple[str, ...]:
  """Names of the measures `prepare` accepts: `hamming_<bits>`, the plain ones, "mahalanobis"."""
  return (*(f"hamming_{b}" for b in code_lengths), *PLAIN_MEASURES, "mahalanobis")


def whiten(x: np.ndarray, gaussian: geometry.Gaussian) -> np.ndarray:
  """`L^-1 x` row-wise (`L L^T = Sigma`), so that `|whiten(x) - whiten(y)|` is Mahalanobis.

  Args:
    x: `[n, d]`.
    gaussian: from `geometry.fit_gaussian`.

  Returns:
    float32 `[n, d]`.
  """
  z = jax.scipy.linalg.solve_triangular(gaussian.cholesky, jnp.asarray(x, jnp.float32).T,
                                        lower=True).T
  return np.asarray(z, np.float32)


def prepare(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *,
            num_classes: int, seed: int = 0,
            shrinkage: float = 0.01) -> tuple[np.ndarray, np.ndarray, str]:
  """Features and `geometry` metric that realise the measure `name` (see `measure_names`).

  - `hamming_<b>`: codes `[x - mean_train] R > 0` with `R ~ N(0, 1)^{d x b}` (seeded), compared
    by the Hamming distance; returned as float32 0/1 arrays.
  - "mahalanobis": `L^-1 x` with `L L^T` the tied within-class covariance of the training set
    (shrunk by `shrinkage`, see `geometry.fit_gaussian`), compared by the Euclidean distance.
  - otherwise the features and the metric of that name.

  Args:
    name: a measure name.
    train_x: `[N, d]`; train_y: `[N]` int labels (used by "mahalanobis").
    test_x: `[M, d]`.
    num_classes: C.
    seed: of the random projection.
    shrinkage: of the Mahalanobis covariance.

  Returns:
    `(train [N, d'], test [M, d'], metric)`.

  Raises:
    ValueError: on an unknown measure name or a non-positive code length.
    geometry.NonFiniteError: on rows that are not finite (a fit or a code of them means nothing).
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  geometry.require_finite(train_x, "train_x")
  geometry.require_finite(test_x, "test_x")
  if name.startswith("hamming_"):
    bits = int(name.split("_", 1)[1])
    if bits < 1:
      raise ValueError(f"code length must be >= 1; got {name!r}.")
    rng = np.random.default_rng([seed, bits])
    projection = rng.standard_normal((train_x.shape[1], bits)).astype(np.float32)
    mean = train_x.mean(axis=0)
    code = lambda x: ((x - mean) @ projection > 0).astype(np.float32)
    return code(train_x), code(test_x), "hamming"
  if name == "mahalanobis":
    stats = geometry.gaussian_stats(jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32),
                                    num_classes=num_classes)
    gaussian = geometry.fit_gaussian(stats, shrinkage=shrinkage)
    return whiten(train_x, gaussian), whiten(test_x, gaussian), "euclidean"
  if name in PLAIN_MEASURES:
    return train_x, test_x, name
  raise ValueError(f"unknown measure {name!r}; valid: hamming_<bits>, {', '.join(PLAIN_MEASURES)}, "
                   "mahalanobis.")


# ----------------------------------------------------------------------------------------------
# Retrieval.


@functools.partial(jax.jit, static_argnames=("metric", "key_block"))
def _closeness_block(queries: jax.Array, keys: jax.Array, *, metric: str,
                     key_block: int) -> jax.Array:
  """Larger-is-closer scores of one block of queries against every key: [q, N]."""
  n_keys = keys.shape[0]
  num_blocks = -(-n_keys // key_block)
  padded = jnp.pad(keys, ((0, num_blocks * key_block - n_keys), (0, 0)))
  sign = 1.0 if geometry.is_similarity(metric) else -1.0
  scores = jax.lax.map(
      lambda kb: sign * geometry.pairwise(queries, kb, metric=metric),
      padded.reshape(num_blocks, key_block, keys.shape[1]))  # [blocks, q, key_block]
  return jnp.moveaxis(scores, 0, 1).reshape(queries.shape[0], -1)[:, :n_keys]


def _rank_block(closeness: np.ndarray, query_labels: np.ndarray, key_labels: np.ndarray, *,
                ks: tuple[int, ...], knn_k: int, num_classes: int) -> dict[str, np.ndarray]:
  """AP, hits@k and the kNN vote of one block of queries from its scores: [q] each.

  The ranking is a numpy stable argsort (XLA's CPU sort was 2.5x slower on `[256, 8000]`).
  """
  order = np.argsort(-closeness, axis=1, kind="stable")
  ranked = key_labels[order]  # [q, N] labels, closest first
  relevant = ranked == query_labels[:, None]
  hits = np.cumsum(relevant, axis=1, dtype=np.int64)
  num_relevant = hits[:, -1]
  ranks = np.arange(1, closeness.shape[1] + 1)
  ap = np.sum(np.where(relevant, hits / ranks, 0.0), axis=1) / np.maximum(num_relevant, 1)
  votes = np.stack([np.sum(ranked[:, :knn_k] == c, axis=1) for c in range(num_classes)], axis=1)
  out = {"ap": ap, "num_relevant": num_relevant,
         "knn_correct": np.argmax(votes, axis=1) == query_labels}
  for k in ks:
    out[f"recall@{k}"] = hits[:, k - 1] > 0
    out[f"precision@{k}"] = hits[:, k - 1] / k
  return out


def retrieval(queries: np.ndarray, query_labels: np.ndarray, keys: np.ndarray,
              key_labels: np.ndarray, *, metric: str, ks: Sequence[int] = (1, 5, 10),
              knn_k: int | None = None, query_block: int = 256,
              key_block: int = 4096) -> dict[str, float]:
  """Mean average precision and recall@k of retrieving same-class keys for every query.

  Keys are ranked by `metric` (closest first; ties by key index). With `rel_i` = [key at rank i
  has the query's class], `R = sum_i rel_i` and `P@i = (1/i) sum_{j<=i} rel_j`:
    AP = (1/R) sum_i rel_i P@i,   mAP = mean over queries with R > 0,
    recall@k = mean over queries of [some relevant key in the top k] (the metric-learning
    "Recall@K" of Song et al. 2016), precision@k = mean of P@k.
  The same ranking gives the unweighted kNN vote for free: with `knn_k`, "knn_accuracy" is the
  accuracy of `argmax_c #{c among the labels of the knn_k first keys}` (ties to the lower class
  id), which equals `probes.knn_classify(..., weighted=False)`.

  Args:
    queries: `[M, d]`; query_labels: `[M]` ints.
    keys: `[N, d]`; key_labels: `[N]` ints in `[0, C)`.
    metric: a `geometry.METRICS` name other than "mahalanobis" (whiten first; see `prepare`).
    ks: cut-offs, each in [1, N].
    knn_k: also report the kNN accuracy with this many neighbours (in [1, N]).
    query_block: queries per step; the largest intermediate is `[query_block, N]`.
    key_block: keys scored at a time (bounds Manhattan's `[query_block, key_block, d]`).

  Returns:
    dict with "map", "recall@k" and "precision@k" for each k, "num_queries" (with R > 0) and,
    with `knn_k`, "knn_accuracy" (over all queries).

  Raises:
    ValueError: on mismatched shapes, an unknown metric, or a cut-off outside [1, N].
    geometry.NonFiniteError: on query or key rows that are not finite (NaN or inf).
  """
  queries, keys = np.asarray(queries, np.float32), np.asarray(keys, np.float32)
  query_labels, key_labels = np.asarray(query_labels), np.asarray(key_labels)
  if (queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]
      or query_labels.shape != queries.shape[:1] or key_labels.shape != keys.shape[:1]
      or not len(queries) or not len(keys)):
    raise ValueError(f"need queries [M, d], query_labels [M], keys [N, d], key_labels [N], "
                     f"M, N >= 1; got {queries.shape}, {query_labels.shape}, {keys.shape}, "
                     f"{key_labels.shape}.")
  if metric == "mahalanobis":
    raise ValueError("retrieval takes whitened features for Mahalanobis: see retrieval.prepare.")
  geometry.require_finite(queries, "queries")  # A NaN query would rank keys in storage order.
  geometry.require_finite(keys, "keys")
  geometry.is_similarity(metric)  # raises on an unknown metric
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1 or max(ks) > len(keys):
    raise ValueError(f"cut-offs must lie in [1, number of keys = {len(keys)}]; got {ks}.")
  if knn_k is not None and not 1 <= knn_k <= len(keys):
    raise ValueError(f"knn_k must lie in [1, number of keys = {len(keys)}]; got {knn_k}.")
  num_classes = int(max(key_labels.max(), query_labels.max(), 0)) + 1
  block = max(1, min(query_block, len(queries)))
  key_block = max(1, min(key_block, len(keys)))
  kj = jnp.asarray(keys)
  parts: list[dict[str, np.ndarray]] = []
  for start in range(0, len(queries), block):
    q, ql = queries[start:start + block], query_labels[start:start + block]
    n = len(q)
    if n < block:  # pad the last block so that every block reuses one compiled program
      q = np.concatenate([q, np.zeros((block - n, q.shape[1]), np.float32)])
    closeness = np.asarray(_closeness_block(jnp.asarray(q), kj, metric=metric,
                                            key_block=key_block))[:n]
    parts.append(_rank_block(closeness, ql, key_labels, ks=ks, knn_k=knn_k or 1,
                             num_classes=num_classes))
  cat = {name: np.concatenate([p[name] for p in parts]).astype(np.float64) for name in parts[0]}
  valid = cat["num_relevant"] > 0
  mean = lambda v: float(np.mean(v[valid])) if valid.any() else 0.0
  result: dict[str, float] = {"map": mean(cat["ap"])}
  for k in ks:
    result[f"recall@{k}"] = mean(cat[f"recall@{k}"])
    result[f"precision@{k}"] = mean(cat[f"precision@{k}"])
  result["num_queries"] = int(valid.sum())
  if knn_k is not None:
    result["knn_accuracy"] = float(np.mean(cat["knn_correct"]))
  return result


# ----------------------------------------------------------------------------------------------
# The table.


def measure_table(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, *, num_classes: int, k: int = 20,
                  code_lengths: Sequence[int] = DEFAULT_CODE_LENGTHS,
                  ks: Sequence[int] = (1, 5, 10), seed: int = 0, shrinkage: float = 0.01,
                  with_retrieval: bool = True) -> dict[str, dict[str, Any]]:
  """kNN accuracy and retrieval under every measure of `measure_names(code_lengths)`.

  kNN is the unweighted majority vote of the `k` nearest training points
  (`probes.knn_classify(..., weighted=False)`, or the same vote from `retrieval`'s ranking): a
  vote that needs no temperature, so measures with different units are compared on equal terms.
  The training set is put in a seeded random order first, so ties between equally distant keys
  are broken at random.

  Args:
    train_x, train_y: `[N, d]`, `[N]` the labelled database.
    test_x, test_y: `[M, d]`, `[M]` the queries.
    num_classes: C.
    k: neighbours of the kNN vote.
    code_lengths: bits of the Hamming codes.
    ks: retrieval cut-offs.
    seed: of the tie-breaking order and the random projections.
    shrinkage: of the Mahalanobis covariance.
    with_retrieval: also compute `retrieval` for each measure.

  Returns:
    `{measure: {"knn_accuracy", "metric", "dim", and retrieval's keys}}`.
  """
  order = np.random.default_rng(seed).permutation(len(train_y))
  train_x, train_y = np.asarray(train_x)[order], np.asarray(train_y)[order]
  table: dict[str, dict[str, Any]] = {}
  for name in measure_names(code_lengths):
    tr, te, metric = prepare(name, train_x, train_y, test_x, num_classes=num_classes, seed=seed,
                             shrinkage=shrinkage)
    row: dict[str, Any] = {"metric": metric, "dim": int(tr.shape[1])}
    if with_retrieval:  # one ranking of every key gives both
      row.update(retrieval(te, test_y, tr, train_y, metric=metric, knn_k=min(k, len(tr)),
                           ks=[c for c in ks if c <= len(tr)]))
    else:
      row["knn_accuracy"] = probes.knn_classify(tr, train_y, te, test_y, num_classes=num_classes,
                                                k=min(k, len(tr)), metric=metric, weighted=False)
    table[name] = row
  return table
