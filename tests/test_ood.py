"""OOD metrics against brute force, and OOD scores on Gaussian clusters with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from embedspace.measure import ood


def _brute_auroc(s_in, s_out):
  """P(s_in < s_out) + P(=)/2 over all n_in * n_out pairs."""
  diff = np.asarray(s_out)[None, :] - np.asarray(s_in)[:, None]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _brute_fpr(s_in, s_out, tpr):
  """Lowest FPR over every threshold (accept <= t) whose TPR reaches `tpr`."""
  best = 1.0
  for t in np.unique(np.concatenate([s_in, s_out])):
    if np.mean(s_in <= t) >= tpr:
      best = min(best, float(np.mean(s_out <= t)))
  return best


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auroc_and_fpr_match_brute_force(seed, ties):
  rng = np.random.default_rng(seed)
  s_in = rng.normal(size=300)
  s_out = rng.normal(loc=0.8, size=211)
  if ties:  # heavy ties, within and across the two sets
    s_in, s_out = np.round(s_in * 2) / 2, np.round(s_out * 2) / 2
  assert ood.auroc(s_in, s_out) == pytest.approx(_brute_auroc(s_in, s_out), abs=1e-12)
  for tpr in (0.95, 0.9, 0.5, 1.0):
    assert ood.fpr_at_tpr(s_in, s_out, tpr=tpr) == pytest.approx(
        _brute_fpr(s_in, s_out, tpr), abs=1e-12)
  fpr, tpr_curve = ood.roc_curve(s_in, s_out)
  assert fpr[0] == tpr_curve[0] == 0 and fpr[-1] == tpr_curve[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr_curve) >= 0)
  # The trapezoidal area under the curve is the AUROC (ties are diagonal segments).
  assert np.trapezoid(tpr_curve, fpr) == pytest.approx(ood.auroc(s_in, s_out), abs=1e-12)


def test_metric_extremes_and_errors():
  assert ood.auroc([0, 1, 2], [5, 6]) == 1.0
  assert ood.auroc([5, 6], [0, 1, 2]) == 0.0
  assert ood.auroc([1, 1], [1, 1, 1]) == 0.5
  assert ood.fpr_at_tpr(np.arange(100), np.arange(200, 300)) == 0.0
  assert ood.fpr_at_tpr(np.arange(100), np.arange(100)) == 0.95
  with pytest.raises(ValueError, match="at least one"):
    ood.auroc([], [1.0])
  with pytest.raises(ValueError, match="finite"):
    ood.auroc([np.nan], [1.0])
  with pytest.raises(ValueError, match="tpr"):
    ood.fpr_at_tpr([1.0], [2.0], tpr=0.0)


def _clusters(rng, n, means, cov_chol):
  y = rng.integers(0, len(means), n)
  return (means[y] + rng.normal(size=(n, means.shape[1])) @ cov_chol.T).astype(np.float32), y


def test_mahalanobis_beats_euclidean_on_correlated_clusters():
  """The founding note's picture: OOD points off the correlation axis but Euclidean-close.

  In-distribution classes are long thin ellipses along one diagonal; OOD points sit at a small
  Euclidean distance across it. Euclidean to the nearest mean cannot tell them apart from the
  far ends of the ellipses; Mahalanobis can.
  """
  rng = np.random.default_rng(0)
  d = 8
  means = np.zeros((3, d))
  means[:, 0] = [-6, 0, 6]
  direction = np.ones(d) / np.sqrt(d)
  chol = 0.15 * np.eye(d) + 2.5 * np.outer(direction, direction)  # long along `direction`
  train_x, train_y = _clusters(rng, 3000, means, chol)
  in_x, _ = _clusters(rng, 600, means, chol)
  ortho = np.zeros(d)
  ortho[1], ortho[2] = 1 / np.sqrt(2), -1 / np.sqrt(2)
  out_x = (means[rng.integers(0, 3, 600)] + 1.5 * ortho
           + 0.1 * rng.normal(size=(600, d))).astype(np.float32)
  metrics, scores = ood.evaluate_ood(train_x, train_y, in_x, out_x, num_classes=3, k=10,
                                     shrinkage=0.0)
  assert metrics["mahalanobis"]["auroc"] > 0.99
  assert metrics["mahalanobis"]["fpr95"] < 0.02
  assert metrics["euclidean_to_mean"]["auroc"] < 0.8
  assert metrics["mahalanobis"]["auroc"] > metrics["euclidean_to_mean"]["auroc"] + 0.2
  assert scores["knn"]["in"].shape == (600,) and scores["knn"]["out"].shape == (600,)


def test_scores_match_numpy_reference():
  rng = np.random.default_rng(3)
  train_x = rng.normal(size=(200, 5)).astype(np.float32) + 2.0
  train_y = rng.integers(0, 4, 200)
  x = rng.normal(size=(37, 5)).astype(np.float32)
  det = ood.fit_detectors(train_x, train_y, num_classes=4, k=7, shrinkage=0.0)
  got = ood.ood_scores(det, x, query_block=16, key_block=50)  # several blocks of each
  means = np.stack([train_x[train_y == c].mean(0) for c in range(4)]).astype(np.float64)
  centred = train_x - means[train_y]
  cov = centred.T.astype(np.float64) @ centred / len(train_x) + 1e-6 * np.eye(5)
  diff = x[:, None, :] - means[None]
  maha = np.sqrt(np.einsum("ncd,de,nce->nc", diff, np.linalg.inv(cov), diff)).min(1)
  np.testing.assert_allclose(got["mahalanobis"], maha, rtol=1e-4)
  np.testing.assert_allclose(got["euclidean_to_mean"], np.linalg.norm(diff, axis=-1).min(1),
                             rtol=1e-5)
  u = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  protos = u(np.stack([u(train_x)[train_y == c].mean(0) for c in range(4)]))
  np.testing.assert_allclose(got["cosine_to_mean"], 1 - (u(x) @ protos.T).max(1), atol=1e-5)
  dist = np.linalg.norm(u(x)[:, None] - u(train_x)[None], axis=-1)
  np.testing.assert_allclose(got["knn"], np.sort(dist, axis=1)[:, 6], atol=1e-4)


def test_scores_reject_bad_input():
  x = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="train_y"):
    ood.fit_detectors(x, np.full(10, 5), num_classes=2)
  det = ood.fit_detectors(x + np.eye(10, 3, dtype=np.float32), np.arange(10) % 2, num_classes=2)
  with pytest.raises(ValueError, match="x must be"):
    ood.ood_scores(det, np.zeros((4, 2), np.float32))
