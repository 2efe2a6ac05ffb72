"""kNN and retrieval under every measure: brute-force references and known answers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from embedspace import geometry
from embedspace.measure import retrieval


def _numpy_retrieval(q, ql, k, kl, metric, cutoffs):
  """Dense float64 reference: full [M, N] matrix, stable sort, AP by its definition."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  if metric == "cosine":
    un = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    close = un(q) @ un(k).T
  elif metric == "euclidean":
    close = -np.sqrt(((q[:, None] - k[None]) ** 2).sum(-1))
  elif metric == "manhattan":
    close = -np.abs(q[:, None] - k[None]).sum(-1)
  elif metric == "hamming":
    close = -((q[:, None] > 0) != (k[None] > 0)).sum(-1).astype(np.float64)
  aps, recalls = [], {c: [] for c in cutoffs}
  for i in range(len(q)):
    order = np.argsort(-close[i], kind="stable")
    rel = (kl[order] == ql[i]).astype(np.float64)
    if rel.sum() == 0:
      continue
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    aps.append(np.sum(precision * rel) / rel.sum())
    for c in cutoffs:
      recalls[c].append(rel[:c].any())
  return float(np.mean(aps)), {c: float(np.mean(r)) for c, r in recalls.items()}


def _blobs(n, *, num_classes, dim, spread, seed):
  rng = np.random.default_rng(seed)
  means = np.random.default_rng(99).normal(size=(num_classes, dim))
  y = rng.integers(0, num_classes, n)
  return (spread * means[y] + rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "manhattan", "hamming"])
def test_blocked_retrieval_matches_dense_numpy(metric):
  keys, key_labels = _blobs(300, num_classes=4, dim=6, spread=0.8, seed=0)
  queries, query_labels = _blobs(70, num_classes=4, dim=6, spread=0.8, seed=1)
  query_labels[0] = 7  # a query with no relevant key is left out of every mean
  got = retrieval.retrieval(queries, query_labels, keys, key_labels, metric=metric,
                            ks=(1, 5, 10), query_block=16, key_block=64)
  ref_map, ref_recall = _numpy_retrieval(queries, query_labels, keys, key_labels, metric,
                                         (1, 5, 10))
  # Hamming on 6 bits has many exact ties; both sides break them by key index.
  assert got["map"] == pytest.approx(ref_map, abs=1e-5)
  for c in (1, 5, 10):
    assert got[f"recall@{c}"] == pytest.approx(ref_recall[c], abs=1e-9)
  assert got["num_queries"] == 69
  assert 0.3 < got["map"] < 0.99  # non-trivial


def test_perfectly_separable_set_is_solved_by_every_measure():
  rng = np.random.default_rng(0)
  c, d = 5, 16
  means = 10.0 * np.eye(c, d) + 3.0  # far apart, all in the positive orthant
  ytr, yte = np.repeat(np.arange(c), 60), np.repeat(np.arange(c), 20)
  xtr = (means[ytr] + 0.1 * rng.normal(size=(len(ytr), d))).astype(np.float32)
  xte = (means[yte] + 0.1 * rng.normal(size=(len(yte), d))).astype(np.float32)
  table = retrieval.measure_table(xtr, ytr, xte, yte, num_classes=c, k=5, code_lengths=(32, 128))
  assert set(table) == set(retrieval.measure_names((32, 128)))
  for name, row in table.items():
    assert row["knn_accuracy"] == 1.0, name
    assert row["map"] == pytest.approx(1.0), name
    assert row["recall@1"] == 1.0, name


def test_mahalanobis_knn_beats_euclidean_on_anisotropic_clusters():
  """Class means differ along a low-variance direction, hidden under high-variance ones."""
  rng = np.random.default_rng(1)
  d = 10
  scales = np.full(d, 0.2)
  scales[:6] = 5.0  # nuisance directions dominate every Euclidean distance
  means = np.zeros((3, d))
  means[:, 6] = [-0.8, 0.0, 0.8]  # 4 within-class standard deviations apart

  def draw(n):
    y = rng.integers(0, 3, n)
    return (means[y] + rng.normal(size=(n, d)) * scales).astype(np.float32), y

  (xtr, ytr), (xte, yte) = draw(1500), draw(500)
  table = retrieval.measure_table(xtr, ytr, xte, yte, num_classes=3, k=15, code_lengths=(16,),
                                  with_retrieval=False, shrinkage=0.0)
  assert table["mahalanobis"]["knn_accuracy"] > 0.95
  assert table["euclidean"]["knn_accuracy"] < 0.5  # chance is 1/3
  assert "map" not in table["euclidean"]


def test_prepare_mahalanobis_is_whitened_euclidean_and_hamming_has_code_length():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(80, 4)).astype(np.float32) @ rng.normal(size=(4, 4)).astype(np.float32)
  y = rng.integers(0, 3, 80)
  tr, te, metric = retrieval.prepare("mahalanobis", x, y, x[:5], num_classes=3, shrinkage=0.0)
  assert metric == "euclidean"
  gauss = geometry.fit_gaussian(geometry.gaussian_stats(jnp.asarray(x), jnp.asarray(y),
                                                        num_classes=3))
  ref = geometry.mahalanobis_pairwise(jnp.asarray(x[:5]), jnp.asarray(x), gauss)
  np.testing.assert_allclose(geometry.euclidean_distance(te, tr), ref, rtol=1e-4, atol=1e-4)
  tr, te, metric = retrieval.prepare("hamming_24", x, y, x[:5], num_classes=3)
  assert metric == "hamming" and tr.shape == (80, 24) and set(np.unique(tr)) <= {0.0, 1.0}
  np.testing.assert_array_equal(te, tr[:5])
  with pytest.raises(ValueError, match="unknown measure"):
    retrieval.prepare("chebyshev", x, y, x, num_classes=3)
  with pytest.raises(ValueError, match="cut-offs"):
    retrieval.retrieval(x, y, x, y, metric="cosine", ks=(100,))


@pytest.mark.parametrize("metric", ["euclidean", "hamming"])
def test_knn_vote_from_the_ranking_equals_probes_knn(metric):
  from embedspace.measure import probes

  keys, key_labels = _blobs(400, num_classes=5, dim=12, spread=0.5, seed=3)
  queries, query_labels = _blobs(90, num_classes=5, dim=12, spread=0.5, seed=4)
  got = retrieval.retrieval(queries, query_labels, keys, key_labels, metric=metric, knn_k=9,
                            query_block=32, key_block=100)
  ref = probes.knn_classify(keys, key_labels, queries, query_labels, num_classes=5, k=9,
                            metric=metric, weighted=False)
  assert got["knn_accuracy"] == pytest.approx(ref, abs=1e-12)
  assert 0.3 < ref < 0.95
