"""Probes of a frozen embedding space: the weighted kNN classifier and the linear probe.

These are the two monitors of self-supervised papers. The weighted kNN classifier of Wu et al.
(2018), "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", as used by
DINO (Caron et al. 2021), needs no training and is cheap enough to run every few epochs; its
neighbours come from `geometry.top_k`, which scans the training set in blocks, and the queries
are processed in blocks too, so memory stays `O(query_block * key_block)` and no `[N, N]` matrix
is ever formed. The linear probe (multinomial logistic regression on frozen, standardised
features, e.g. SimCLR Sec. B.6) is fitted full-batch with L-BFGS, its L2 strength chosen on a
held-out slice of the training set, as in the linear evaluation of the SimCLR and VICReg papers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from embedspace import geometry


# ----------------------------------------------------------------------------------------------
# Weighted k-nearest-neighbour classification.


def _check_split(x: np.ndarray, y: np.ndarray, name: str, num_classes: int) -> None:
  if x.ndim != 2 or y.shape != x.shape[:1]:
    raise ValueError(
        f"{name}_x must be [n, dim] and {name}_y [n]; got shapes {x.shape} and {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name}_y must hold integer class ids; got dtype {y.dtype}.")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"{name}_y must lie in [0, num_classes={num_classes}); got range [{y.min()}, {y.max()}].")


@functools.partial(jax.jit, static_argnames=("metric", "k", "weighted", "num_classes", "key_block"))
def _knn_block(queries: jax.Array, keys: jax.Array, key_labels: jax.Array,
               temperature: jax.Array, *, metric: str, k: int, weighted: bool, num_classes: int,
               key_block: int) -> jax.Array:
  """Class votes of one block of queries: [q, d] -> [q, num_classes].

  A slot `top_k` could not fill (index -1: a non-finite query, or fewer finite keys than `k`)
  votes for no class, so a non-finite query gets no vote at all.
  """
  values, indices = geometry.top_k(queries, keys, metric=metric, k=k, block_size=key_block)
  found = indices >= 0
  closeness = values if geometry.is_similarity(metric) else -values
  if weighted:
    # Shifting by the closest neighbour's value scales a query's weights by one constant (same
    # vote) and keeps exp() finite for distances of any scale.
    weights = jnp.where(found, jnp.exp((closeness - closeness[:, :1]) / temperature), 0.0)
  else:
    weights = found.astype(closeness.dtype)
  labels = jnp.where(found, key_labels[jnp.maximum(indices, 0)], -1)  # one_hot(-1) is all 0
  onehot = jax.nn.one_hot(labels, num_classes, dtype=weights.dtype)
  return jnp.einsum("qk,qkc->qc", weights, onehot)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, num_classes: int,
                k: int = 20, metric: str = "cosine", temperature: float = 0.07,
                weighted: bool = True, query_block: int = 1024,
                key_block: int = 4096) -> np.ndarray:
  """Weighted kNN votes: the predicted class of every test point (see `knn_classify`).

  Args and Raises: as `knn_classify` (without the test labels).

  Returns:
    int32 `[M]` predicted classes; -1 for a test point that is not finite (NaN or inf), which
    has no neighbours. Training points that are not finite are never neighbours. Both counts
    are logged as a warning.
  """
  train_x, train_y, test_x = np.asarray(train_x), np.asarray(train_y), np.asarray(test_x)
  _check_split(train_x, train_y, "train", num_classes)
  if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f"test_x must be [m, {train_x.shape[1]}] like train_x; got shape {test_x.shape}.")
  if not 1 <= k <= len(train_x):
    raise ValueError(f"k must be in [1, number of training points = {len(train_x)}]; got {k}.")
  if weighted and not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  if query_block < 1 or key_block < 1:
    raise ValueError(f"query_block and key_block must be >= 1; got {query_block}, {key_block}.")
  geometry.is_similarity(metric)  # raises on an unknown metric

  keys = jnp.asarray(train_x, jnp.float32)
  key_labels = jnp.asarray(train_y, jnp.int32)
  block = min(query_block, len(test_x))
  preds = []
  for start in range(0, len(test_x), block):
    q = test_x[start:start + block]
    n = len(q)
    if n < block:  # pad the last block so that every block reuses one compiled program
      q = np.concatenate([q, np.zeros((block - n, q.shape[1]), q.dtype)])
    votes = _knn_block(
        jnp.asarray(q, jnp.float32), keys, key_labels, jnp.float32(temperature), metric=metric,
        k=k, weighted=weighted, num_classes=num_classes, key_block=key_block)[:n]
    preds.append(jnp.where(jnp.sum(votes, axis=-1) > 0, jnp.argmax(votes, axis=-1), -1))
  if not preds:
    return np.zeros((0,), np.int32)
  _report_nonfinite(train_x, test_x)
  return np.concatenate([np.asarray(p) for p in preds]).astype(np.int32)


def _report_nonfinite(train_x: np.ndarray, test_x: np.ndarray) -> None:
  """Warns with the counts of the rows the kNN vote masked (see `knn_predict`)."""
  bad_keys, bad_queries = (int(np.sum(~np.all(np.isfinite(x), axis=-1)))
                           for x in (np.asarray(train_x), np.asarray(test_x)))
  if bad_keys or bad_queries:
    logging.warning("kNN: %d of %d training points are not finite (NaN or inf) and are never "
                    "neighbours; %d of %d test points are not finite and get no class (-1, "
                    "counted wrong)", bad_keys, len(train_x), bad_queries, len(test_x))


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int, k: int = 20, metric: str = "cosine",
                 temperature: float = 0.07, weighted: bool = True, query_block: int = 1024,
                 key_block: int = 4096) -> float:
  """Accuracy of the weighted kNN classifier (Wu et al. 2018; DINO's `eval_knn.py`).

  Each test point takes its `k` nearest training points under `metric` (`geometry.top_k`) and
  predicts `argmax_c sum_{j in kNN} w_j [y_j = c]`, where
    w_j = exp(s_j / T)   for similarities s (cosine, negative_arc_length), and
    w_j = exp(-d_j / T)  for distances d (euclidean, sqeuclidean, ...),
  or w_j = 1 with `weighted=False` (majority vote). The defaults k=20, T=0.07 with cosine are
  DINO's. For a distance, T is in the distance's units: on unit-norm features,
  sqeuclidean = 2 - 2 cos, so sqeuclidean with T = 0.14 is exactly cosine with T = 0.07;
  scale T with the typical distance otherwise. Ties of class scores go to the lower class id,
  ties of distances to the lower training index.

  Memory: queries in blocks of `query_block`, keys in blocks of `key_block`; the largest
  intermediate is `[query_block, key_block + k]`.

  Args:
    train_x: `[N, d]` features of the labelled set searched.
    train_y: `[N]` int class ids in `[0, num_classes)`.
    test_x: `[M, d]` query features.
    test_y: `[M]` int class ids.
    num_classes: number of classes C.
    k: neighbours per query, `1 <= k <= N`.
    metric: a name from `geometry.METRICS` other than "mahalanobis".
    temperature: T > 0 (unused when `weighted=False`).
    weighted: weight the votes (True) or count them.
    query_block: test points per step.
    key_block: training points per step of `geometry.top_k`.

  Returns:
    Fraction of test points whose predicted class is `test_y` (a test point that is not finite
    counts as wrong; see `knn_predict`).

  Raises:
    ValueError: on mismatched shapes, an empty test set, labels outside `[0, num_classes)`,
      k outside [1, N], T <= 0, non-positive block sizes or an unknown metric.
  """
  test_y = np.asarray(test_y)
  _check_split(np.asarray(test_x), test_y, "test", num_classes)
  if not len(test_y):
    raise ValueError("knn_classify got an empty test set.")
  preds = knn_predict(train_x, train_y, test_x, num_classes=num_classes, k=k, metric=metric,
                      temperature=temperature, weighted=weighted, query_block=query_block,
                      key_block=key_block)
  return float(np.mean(preds == test_y)) if len(test_y) else 0.0


# ----------------------------------------------------------------------------------------------
# Linear probe.


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_logistic(x: jax.Array, y: jax.Array, weight: jax.Array, l2: jax.Array, *,
                  num_classes: int, max_steps: int, tol: jax.Array) -> tuple[Any, jax.Array]:
  """L-BFGS fit of weighted, L2-regularised softmax regression on standardised features.

  The mean and standard deviation of the features are those of the rows with weight 1, so the
  held-out rows (weight 0) leak nothing into the fit. Returns ((mean, std, W, b), iterations).
  """
  total = jnp.sum(weight)
  mean = jnp.sum(weight[:, None] * x, axis=0) / total
  var = jnp.sum(weight[:, None] * (x - mean) ** 2, axis=0) / total
  std = jnp.sqrt(var + 1e-8)
  z = (x - mean) / std
  onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)

  def loss(params):
    w, b = params
    logits = z @ w + b
    nll = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weight * nll) / total + 0.5 * l2 * jnp.sum(w * w)

  params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  return (mean, std, *params), optax.tree.get(state, "count")


@jax.jit
def _accuracy(probe: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  mean, std, w, b = probe
  return jnp.mean(jnp.argmax(((x - mean) / std) @ w + b, axis=-1) == y)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, num_classes: int,
                 l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                 val_fraction: float = 0.2, steps: int = 500, tol: float = 1e-5,
                 seed: int = 0) -> dict[str, Any]:
  """Test accuracy of an L2-regularised multinomial logistic regression on frozen features.

  Features are standardised with the training statistics, `z = (x - mean) / std`, and the probe
  minimises, full batch,
    L(W, b) = 1/n sum_i -log softmax(W^T z_i + b)_{y_i} + l2/2 ||W||_F^2
  with L-BFGS (`optax.lbfgs`, zoom line search) until the gradient norm falls below `tol` or
  after `steps` iterations. `l2` is chosen from `l2_grid` by accuracy on a random `val_fraction`
  of the training set (the probe being fitted on the rest; ties go to the stronger
  regularisation); the probe is then refitted on the whole training set and scored on the test
  set. One compiled program serves every fit (held-out rows get weight 0 instead of being cut),
  so the cost is `(len(l2_grid) + 1)` L-BFGS runs of `O(steps * n * d * C)`; 8k x 512 features
  with 10 classes take a few seconds on 2 CPU cores.

  Args:
    train_x: `[N, d]` features (any float dtype; fitted in float32).
    train_y: `[N]` int class ids in `[0, num_classes)`.
    test_x: `[M, d]` features.
    test_y: `[M]` int class ids.
    num_classes: C.
    l2_grid: candidate regularisation strengths (> 0 keeps the problem strongly convex).
    val_fraction: share of the training set held out to choose `l2`, in (0, 1).
    steps: maximum L-BFGS iterations per fit.
    tol: gradient-norm tolerance that ends a fit early.
    seed: of the random validation split.

  Returns:
    dict with 'accuracy' (test, float), 'best_l2', 'val_accuracy' (at best_l2),
    'val_accuracies' ({l2: accuracy}), 'train_accuracy' (of the refitted probe) and
    'iterations' (L-BFGS iterations of the refit; `steps` means it hit the cap).

  Raises:
    ValueError: on mismatched shapes, an empty test set, labels outside `[0, num_classes)`, an
      empty grid, negative l2 or a split that leaves no row on either side.
    geometry.NonFiniteError: rows of `train_x` or `test_x` that are not finite (NaN or inf).
  """
  train_x, train_y = np.asarray(train_x, np.float32), np.asarray(train_y)
  test_x, test_y = np.asarray(test_x, np.float32), np.asarray(test_y)
  _check_split(train_x, train_y, "train", num_classes)
  _check_split(test_x, test_y, "test", num_classes)
  geometry.require_finite(train_x, "train_x")
  geometry.require_finite(test_x, "test_x")
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(f"train_x and test_x differ in dim: {train_x.shape} vs {test_x.shape}.")
  if not len(test_x):
    raise ValueError("linear_probe got an empty test set.")
  if not l2_grid or min(l2_grid) < 0:
    raise ValueError(f"l2_grid must be a non-empty sequence of values >= 0; got {l2_grid}.")
  n = len(train_x)
  n_val = int(round(val_fraction * n))
  if not 0 < n_val < n:
    raise ValueError(
        f"val_fraction={val_fraction} of {n} training rows leaves no row for validation or for "
        f"fitting.")

  x, y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
  val_rows = np.random.default_rng(seed).permutation(n)[:n_val]
  fit_weight = np.ones((n,), np.float32)
  fit_weight[val_rows] = 0.0
  x_val, y_val = x[val_rows], y[val_rows]
  fit = functools.partial(_fit_logistic, num_classes=num_classes, max_steps=steps,
                          tol=jnp.float32(tol))

  val_accuracies = {}
  for l2 in sorted(l2_grid, reverse=True):
    probe, _ = fit(x, y, jnp.asarray(fit_weight), jnp.float32(l2))
    val_accuracies[float(l2)] = float(_accuracy(probe, x_val, y_val))
  best_l2 = max(val_accuracies, key=val_accuracies.get)  # first maximum: the largest l2

  probe, iterations = fit(x, y, jnp.ones((n,), jnp.float32), jnp.float32(best_l2))
  return {
      "accuracy": float(_accuracy(probe, jnp.asarray(test_x), jnp.asarray(test_y, jnp.int32))),
      "best_l2": best_l2,
      "val_accuracy": val_accuracies[best_l2],
      "val_accuracies": val_accuracies,
      "train_accuracy": float(_accuracy(probe, x, y)),
      "iterations": int(iterations),
  }
