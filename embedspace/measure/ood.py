"""Out-of-distribution detection on an embedding space: scores, AUROC and FPR at 95% TPR.

The founding note's use case for the Mahalanobis distance. A score is fitted on the labelled
in-distribution training set and says how far a point lies from it (larger = further out):
class-conditional Mahalanobis with a tied covariance (Lee et al. 2018, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"), the Euclidean
distance to the nearest class mean, one minus the cosine to the nearest class prototype, and
the distance to the k-th nearest training point after L2 normalisation (Sun et al. 2022,
"Out-of-Distribution Detection with Deep Nearest Neighbors"). The kNN score scans the training
set in blocks (`geometry.top_k`), so memory stays `O(query_block * key_block)`.

The metrics follow the OOD literature (Hendrycks & Gimpel 2017; Liang et al. 2018): the
in-distribution test points are the positives, AUROC is the probability that an
in-distribution point is scored as closer than an OOD one (ties count one half), and FPR95 is
the fraction of OOD points accepted at the threshold that accepts 95% of the in-distribution
points. Both are plain numpy (sort + rank), with no scikit-learn dependency.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from embedspace import geometry

SCORES = ("mahalanobis", "euclidean_to_mean", "cosine_to_mean", "knn")
"""Names of the OOD scores `fit_scores` / `ood_scores` compute, in report order."""


# ----------------------------------------------------------------------------------------------
# Metrics.


def _check_scores(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(in_scores, np.float64).ravel()
  b = np.asarray(out_scores, np.float64).ravel()
  if not len(a) or not len(b):
    raise ValueError(f"need at least one in- and one out-of-distribution score; got {len(a)} "
                     f"and {len(b)}.")
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("OOD scores must be finite (got NaN or inf).")
  return a, b


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
  """Area under the ROC curve of separating in- from out-of-distribution by an OOD score.

  `AUROC = P(s_in < s_out) + 1/2 P(s_in = s_out)` for independent draws (the Mann-Whitney U
  statistic over `n_in * n_out`), where larger scores mean "further out". Computed from midranks
  of the pooled scores in `O((n_in + n_out) log(n_in + n_out))`. 1 is perfect, 0.5 is chance.

  Args:
    in_scores: `[n_in]` OOD scores of in-distribution points.
    out_scores: `[n_out]` OOD scores of out-of-distribution points.

  Returns:
    AUROC in [0, 1].

  Raises:
    ValueError: on an empty side or non-finite scores.
  """
  a, b = _check_scores(in_scores, out_scores)
  pooled = np.concatenate([a, b])
  order = np.argsort(pooled, kind="stable")
  sorted_scores = pooled[order]
  # Midranks (1-based) of tied groups.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(pooled)]
  ranks = np.empty(len(pooled))
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  u_out = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0  # pairs with s_out > s_in (+ ties/2)
  return float(u_out / (len(a) * len(b)))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, *, tpr: float = 0.95) -> float:
  """False positive rate at a true positive rate of `tpr` (FPR95 for the default).

  Points with score `<= t` are accepted as in-distribution. `t` is the smallest threshold that
  accepts at least `tpr` of the in-distribution points, i.e. the `ceil(tpr * n_in)`-th smallest
  in-distribution score, and the result is the fraction of OOD points with score `<= t`. Lower
  is better; 0 means every OOD point is rejected while 95% of the in-distribution is kept.

  Args:
    in_scores: `[n_in]` OOD scores of in-distribution points (the positives).
    out_scores: `[n_out]` OOD scores of out-of-distribution points.
    tpr: the true positive rate, in (0, 1].

  Returns:
    FPR in [0, 1].

  Raises:
    ValueError: on an empty side, non-finite scores or `tpr` outside (0, 1].
  """
  if not 0.0 < tpr <= 1.0:
    raise ValueError(f"tpr must be in (0, 1]; got {tpr}.")
  a, b = _check_scores(in_scores, out_scores)
  k = int(np.ceil(tpr * len(a) - 1e-9))
  threshold = np.sort(a)[max(k, 1) - 1]
  return float(np.mean(b <= threshold))


def roc_curve(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The ROC curve, in-distribution as positives: `(fpr [T], tpr [T])`, from (0, 0) to (1, 1).

  One point per distinct threshold `t` (accept score `<= t`), in increasing order.

  Raises:
    ValueError: on an empty side or non-finite scores.
  """
  a, b = _check_scores(in_scores, out_scores)
  thresholds = np.unique(np.concatenate([a, b]))
  tpr = np.searchsorted(np.sort(a), thresholds, side="right") / len(a)
  fpr = np.searchsorted(np.sort(b), thresholds, side="right") / len(b)
  return np.r_[0.0, fpr], np.r_[0.0, tpr]


# ----------------------------------------------------------------------------------------------
# Scores.


class Detectors(NamedTuple):
  """What the OOD scores need from the in-distribution training set (see `fit_detectors`).

  Attributes:
    gaussian: class means and tied covariance (`geometry.fit_gaussian`).
    means: `[C, d]` class means of the features (for the Euclidean score).
    prototypes: `[C, d]` L2-normalised class means of the L2-normalised features.
    keys: `[N, d]` L2-normalised training features (for the kNN score).
    k: the neighbour whose distance is the kNN score.
  """

  gaussian: geometry.Gaussian
  means: jax.Array
  prototypes: jax.Array
  keys: jax.Array
  k: int


def fit_detectors(train_x: np.ndarray, train_y: np.ndarray, *, num_classes: int, k: int = 50,
                  shrinkage: float = 0.01) -> Detectors:
  """Fits every score of `SCORES` on the labelled in-distribution training set.

  Args:
    train_x: `[N, d]` features.
    train_y: `[N]` int class ids in `[0, num_classes)`.
    num_classes: C.
    k: the neighbour of the kNN score; Sun et al. (2022) use k = 50 on CIFAR-10. Clipped to N.
    shrinkage: Ledoit-Wolf style shrinkage of the tied covariance towards the scaled identity
      (`geometry.fit_gaussian`); keeps the Mahalanobis score defined when some dimensions are
      constant (dead units, blank border pixels).

  Returns:
    `Detectors`.

  Raises:
    ValueError: on mismatched shapes, labels outside `[0, num_classes)` or `k < 1`.
    geometry.NonFiniteError: on training rows that are not finite (NaN or inf).
  """
  train_x = np.asarray(train_x, np.float32)
  train_y = np.asarray(train_y)
  if train_x.ndim != 2 or train_y.shape != train_x.shape[:1] or not len(train_x):
    raise ValueError(f"train_x must be [N, d] and train_y [N] with N >= 1; got {train_x.shape} "
                     f"and {train_y.shape}.")
  if train_y.min() < 0 or train_y.max() >= num_classes:
    raise ValueError(f"train_y must lie in [0, {num_classes}); got [{train_y.min()}, "
                     f"{train_y.max()}].")
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}.")
  geometry.require_finite(train_x, "train_x")
  x, y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
  stats = geometry.gaussian_stats(x, y, num_classes=num_classes)
  gaussian = geometry.fit_gaussian(stats, shrinkage=shrinkage)
  unit = geometry.l2_normalize(x)
  prototypes = geometry.l2_normalize(
      geometry.gaussian_stats(unit, y, num_classes=num_classes).mean)
  return Detectors(gaussian=gaussian, means=stats.mean, prototypes=prototypes, keys=unit,
                   k=min(k, len(train_x)))


@functools.partial(jax.jit, static_argnames=("k", "key_block"))
def _score_block(x: jax.Array, gaussian: geometry.Gaussian, means: jax.Array,
                 prototypes: jax.Array, keys: jax.Array, *, k: int,
                 key_block: int) -> dict[str, jax.Array]:
  live = gaussian.count > 0
  euclid = jnp.where(live[None], geometry.euclidean_distance(x, means), jnp.inf)
  cos = jnp.where(live[None], geometry.cosine_similarity(x, prototypes), -jnp.inf)
  values, _ = geometry.top_k(geometry.l2_normalize(x), keys, metric="euclidean", k=k,
                             block_size=key_block)
  return {
      "mahalanobis": geometry.mahalanobis_distance(x, gaussian),
      "euclidean_to_mean": jnp.min(euclid, axis=-1),
      "cosine_to_mean": 1.0 - jnp.max(cos, axis=-1),
      "knn": values[:, -1],
  }


def ood_scores(detectors: Detectors, x: np.ndarray, *, query_block: int = 1024,
               key_block: int = 4096) -> dict[str, np.ndarray]:
  """Every OOD score of `SCORES` for the points `x` (larger = further from the training set).

  - "mahalanobis": `min_c sqrt((x - mu_c)^T Sigma^-1 (x - mu_c))`, tied Sigma (Lee et al. 2018).
  - "euclidean_to_mean": `min_c |x - mu_c|`.
  - "cosine_to_mean": `1 - max_c cos(x, p_c)`, p_c the normalised mean of the class's unit
    vectors.
  - "knn": `|x/|x| - z_(k)|`, z_(k) the k-th nearest normalised training feature (Sun et al.
    2022; their score is its negation).

  Args:
    detectors: from `fit_detectors`.
    x: `[n, d]` features.
    query_block: points scored at a time (the last block is padded, so one program compiles).
    key_block: training points per step of the kNN scan.

  Returns:
    dict score name -> float64 `[n]`.

  Raises:
    ValueError: if `x` is not `[n, d]` with the detectors' `d`.
    geometry.NonFiniteError: on rows of `x` that are not finite (NaN or inf).
  """
  x = np.asarray(x, np.float32)
  d = detectors.means.shape[1]
  if x.ndim != 2 or x.shape[1] != d:
    raise ValueError(f"x must be [n, {d}]; got shape {x.shape}.")
  # A NaN point has no distance to anything: no score can say how far out it is.
  geometry.require_finite(x, "x")
  block = max(1, min(query_block, len(x)))
  parts: dict[str, list[np.ndarray]] = {name: [] for name in SCORES}
  for start in range(0, len(x), block):
    q = x[start:start + block]
    n = len(q)
    if n < block:
      q = np.concatenate([q, np.zeros((block - n, d), np.float32)])
    out = _score_block(jnp.asarray(q), detectors.gaussian, detectors.means, detectors.prototypes,
                       detectors.keys, k=detectors.k, key_block=key_block)
    for name in SCORES:
      parts[name].append(np.asarray(out[name])[:n])
  return {name: np.concatenate(p).astype(np.float64) if p else np.zeros((0,))
          for name, p in parts.items()}


def evaluate_ood(train_x: np.ndarray, train_y: np.ndarray, in_x: np.ndarray, out_x: np.ndarray,
                 *, num_classes: int, k: int = 50, shrinkage: float = 0.01,
                 tpr: float = 0.95) -> tuple[dict[str, dict[str, float]],
                                             dict[str, dict[str, np.ndarray]]]:
  """AUROC and FPR at `tpr` of every score, fitted on `train_x` and tested on `in_x` vs `out_x`.

  Args:
    train_x, train_y: `[N, d]`, `[N]` the labelled in-distribution training set.
    in_x: `[n_in, d]` in-distribution test points.
    out_x: `[n_out, d]` out-of-distribution points.
    num_classes, k, shrinkage: as in `fit_detectors`.
    tpr: the true positive rate of the FPR metric.

  Returns:
    `(metrics, scores)`: `metrics[name] = {"auroc", "fpr95"}` ("fpr95" named after `tpr`:
    "fpr90" for 0.9) and `scores[name] = {"in": [n_in], "out": [n_out]}` for plots.

  Raises:
    ValueError: as `fit_detectors` and `ood_scores`.
  """
  detectors = fit_detectors(train_x, train_y, num_classes=num_classes, k=k, shrinkage=shrinkage)
  s_in, s_out = ood_scores(detectors, in_x), ood_scores(detectors, out_x)
  metrics = {name: {"auroc": auroc(s_in[name], s_out[name]),
                    f"fpr{round(100 * tpr)}": fpr_at_tpr(s_in[name], s_out[name], tpr=tpr)}
             for name in SCORES}
  return metrics, {name: {"in": s_in[name], "out": s_out[name]} for name in SCORES}


def summarize(metrics: dict[str, dict[str, float]], names: Sequence[str] = SCORES) -> str:
  """A one-line summary `name AUROC/FPR95, ...` for logs."""
  return ", ".join(f"{n} {metrics[n]['auroc']:.3f}/{metrics[n]['fpr95']:.3f}" for n in names)
