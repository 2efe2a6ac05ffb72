"""Streaming Gaussian fits and Mahalanobis scores, Lee et al. 2018 (see `embedspace.geometry`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from embedspace import parallel
from embedspace.geometry._measures import NonFiniteError
from embedspace.geometry._measures import _PRECISION
from embedspace.geometry._measures import _as_float
from embedspace.geometry._measures import _check_nonnegative
from embedspace.geometry._measures import _check_pair
from embedspace.geometry._measures import _check_rank2
from embedspace.geometry._measures import _safe_sqrt
from embedspace.geometry._measures import euclidean_distance
from embedspace.geometry._measures import finite_rows
from embedspace.geometry._measures import squared_euclidean_distance


# ----------------------------------------------------------------------------------------------
# Mahalanobis: point to distribution, with mergeable statistics.


def _is_traced(*arrays: jax.Array) -> bool:
  """True inside a transformation (jit, vmap, grad), where values cannot be read to raise."""
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


class GaussianStats(NamedTuple):
  """Mergeable sufficient statistics of per-class Gaussians with a tied covariance.

  Attributes:
    count: `[C]` int32 number of samples per class.
    mean: `[C, d]` per-class means (0 for an empty class).
    scatter: `[d, d]` pooled within-class scatter `sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T`.
  """

  count: jax.Array
  mean: jax.Array
  scatter: jax.Array


class Gaussian(NamedTuple):
  """Class-conditional Gaussians sharing one covariance (one class for an unconditional fit).

  Attributes:
    mean: `[C, d]` class means.
    covariance: `[d, d]` shared covariance.
    cholesky: `[d, d]` lower-triangular `L` with `L L^T = covariance`.
    count: `[C]` int32 samples per class; classes with count 0 are ignored when scoring.
  """

  mean: jax.Array
  covariance: jax.Array
  cholesky: jax.Array
  count: jax.Array


def gaussian_stats(x: jax.Array, labels: jax.Array | None = None, *,
                   num_classes: int | None = None) -> GaussianStats:
  """Sufficient statistics of a batch, per class when `labels` are given.

  `count_c = |{i : y_i = c}|`, `mean_c = sum_{y_i = c} x_i / count_c`,
  `scatter = sum_i (x_i - mean_{y_i})(x_i - mean_{y_i})^T`. Labels outside `[0, num_classes)`
  (e.g. -1) are ignored, whatever their row holds, which is how to pad a batch to a fixed size.
  Without labels every row is in one class (`C = 1`).

  A Gaussian cannot be fitted through a non-finite row, so one is an error when it can be: called
  eagerly, a non-finite row (NaN or +-inf, `finite_rows`) with a used label raises. Under `jit`
  nothing can be raised; such a row then makes the statistics non-finite, and `fit_gaussian`
  raises on them (eagerly) or, under `jit`, gives a Gaussian whose every distance is NaN.

  Args:
    x: `[n, d]` embeddings (accumulated in float32).
    labels: optional `[n]` integer class ids.
    num_classes: `C`; required with `labels`, must be omitted (or 1) without them.

  Returns:
    `GaussianStats` with `count [C]`, `mean [C, d]`, `scatter [d, d]`.

  Raises:
    ValueError: on `x` not of rank 2, `labels` not `[n]` integers, a missing/invalid
      `num_classes`, or (outside `jit`) rows of `x` that are not finite, with their count.
  """
  _check_rank2(x, "x")
  x = _as_float(x)
  n = x.shape[0]
  if labels is None:
    if num_classes not in (None, 1):
      raise ValueError(f"num_classes={num_classes} needs labels; without labels there is 1 class.")
    labels = jnp.zeros((n,), jnp.int32)
    num_classes = 1
  else:
    labels = jnp.asarray(labels)
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          f"labels must be integers of shape [{n}] (one per row of x); got shape {labels.shape} "
          f"and dtype {labels.dtype}.")
    if num_classes is None or int(num_classes) < 1:
      raise ValueError(
          f"num_classes must be a positive int when labels are given; got {num_classes}.")
  valid = (labels >= 0) & (labels < num_classes)
  bad = valid & ~finite_rows(x)
  if not _is_traced(bad) and (num_bad := int(jnp.sum(bad))):
    raise NonFiniteError(
        f"{num_bad} of {n} rows of x are not finite (NaN or inf); a Gaussian cannot be fitted "
        f"through them. Drop them first: x[geometry.finite_rows(x)].")
  x = jnp.where(valid[:, None], x, 0.0)  # ignored rows may hold anything, even NaN
  onehot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)  # all-zero rows where invalid
  count = jnp.sum(onehot, axis=0).astype(jnp.int32)
  sums = jnp.dot(onehot.T, x, precision=_PRECISION)
  mean = sums / jnp.maximum(count, 1)[:, None].astype(x.dtype)
  centred = jnp.where(valid[:, None], x - mean[jnp.clip(labels, 0, num_classes - 1)], 0.0)
  scatter = jnp.dot(centred.T, centred, precision=_PRECISION)
  return GaussianStats(count=count, mean=mean, scatter=scatter)


def _class_sums(stats: GaussianStats) -> jax.Array:
  """`count_c * mean_c`: [C, d]."""
  return stats.mean * stats.count[:, None].astype(stats.mean.dtype)


def _scatter_about(stats: GaussianStats, mean: jax.Array) -> jax.Array:
  """Pooled scatter of `stats` about other class means (parallel-axis theorem): [d, d]."""
  shift = stats.mean - mean
  weighted = shift * stats.count[:, None].astype(shift.dtype)
  return stats.scatter + jnp.dot(weighted.T, shift, precision=_PRECISION)


def _check_stats_compatible(a: GaussianStats, b: GaussianStats) -> None:
  if a.mean.shape != b.mean.shape:
    raise ValueError(
        f"stats a and b must have the same [num_classes, dim]; got a.mean.shape={a.mean.shape} and "
        f"b.mean.shape={b.mean.shape}.")


def merge_stats(a: GaussianStats, b: GaussianStats) -> GaussianStats:
  """Statistics of the union of two disjoint sets of samples (exact; associative, commutative).

  `n = n_a + n_b`, `mean = (n_a mean_a + n_b mean_b) / n`,
  `scatter = scatter_a + scatter_b + sum_c n_a,c da_c da_c^T + n_b,c db_c db_c^T` with
  `da = mean_a - mean`, `db = mean_b - mean` (Chan et al. 1979).

  Raises:
    ValueError: if `a` and `b` have different numbers of classes or dims.
  """
  _check_stats_compatible(a, b)
  count = a.count + b.count
  mean = (_class_sums(a) + _class_sums(b)) / jnp.maximum(count, 1)[:, None].astype(a.mean.dtype)
  scatter = _scatter_about(a, mean) + _scatter_about(b, mean)
  return GaussianStats(count=count, mean=mean, scatter=scatter)


def psum_stats(stats: GaussianStats, axis_name: str | None) -> GaussianStats:
  """`merge_stats` over the devices of `axis_name` (identity without an axis).

  Two collectives: counts and class sums first give the global means; then every device's scatter
  is re-centred on them and summed. The result is the same on every device.
  """
  count = parallel.psum(stats.count, axis_name)
  total = parallel.psum(_class_sums(stats), axis_name)
  mean = total / jnp.maximum(count, 1)[:, None].astype(total.dtype)
  scatter = parallel.psum(_scatter_about(stats, mean), axis_name)
  return GaussianStats(count=count, mean=mean, scatter=scatter)


def make_gaussian(mean: jax.Array, covariance: jax.Array, *,
                  count: jax.Array | None = None) -> Gaussian:
  """A `Gaussian` from given class means and a shared covariance (factorised here).

  Args:
    mean: `[d]` or `[C, d]`.
    covariance: `[d, d]` symmetric positive definite.
    count: optional `[C]` samples per class (classes with 0 are ignored); default all 1.

  Raises:
    ValueError: on shapes that do not fit together.
  """
  mean = _as_float(mean)
  if mean.ndim == 1:
    mean = mean[None]
  if mean.ndim != 2:
    raise ValueError(f"mean must have shape [dim] or [num_classes, dim]; got {mean.shape}.")
  covariance = _as_float(covariance)
  d = mean.shape[1]
  if covariance.shape != (d, d):
    raise ValueError(
        f"covariance must have shape [{d}, {d}] to match mean; got {covariance.shape}.")
  count = jnp.ones(mean.shape[:1], jnp.int32) if count is None else jnp.asarray(count, jnp.int32)
  if count.shape != mean.shape[:1]:
    raise ValueError(f"count must have shape [{mean.shape[0]}]; got {count.shape}.")
  return Gaussian(mean=mean, covariance=covariance, cholesky=jnp.linalg.cholesky(covariance),
                  count=count)


def fit_gaussian(stats: GaussianStats, *, shrinkage: float = 0.0, ridge: float = 1e-6) -> Gaussian:
  """Class means and the tied covariance of Lee et al. (2018), regularised.

  `S = scatter / N` (maximum likelihood, `N = sum_c count_c`), shrunk towards the scaled identity
  as in Ledoit & Wolf (2004) with a fixed intensity, plus a ridge:
  `Sigma = (1 - shrinkage) S + shrinkage * (tr(S) / d) I + ridge * I`.

  Args:
    stats: from `gaussian_stats` / `merge_stats` / `psum_stats`.
    shrinkage: weight of the scaled identity, in [0, 1].
    ridge: added to the diagonal (keeps the Cholesky factor defined when `N <= d`).

  Returns:
    `Gaussian` with `mean [C, d]`, `covariance [d, d]`, its Cholesky factor, and `count [C]`.

  Raises:
    ValueError: if `shrinkage` is outside [0, 1] or `ridge` is negative, or (outside `jit`) if
      the statistics are not finite, as when non-finite rows were accumulated under `jit`.
  """
  _check_nonnegative(shrinkage, "shrinkage", upper=1.0)
  _check_nonnegative(ridge, "ridge")
  finite = jnp.all(jnp.isfinite(stats.mean)) & jnp.all(jnp.isfinite(stats.scatter))
  if not _is_traced(finite) and not bool(finite):
    raise ValueError(
        "the statistics are not finite: non-finite rows were accumulated (gaussian_stats checks "
        "its rows only outside jit). Drop them first: x[geometry.finite_rows(x)].")
  d = stats.scatter.shape[-1]
  total = jnp.maximum(jnp.sum(stats.count), 1).astype(stats.scatter.dtype)
  cov = stats.scatter / total
  cov = 0.5 * (cov + cov.T)
  eye = jnp.eye(d, dtype=cov.dtype)
  cov = (1.0 - shrinkage) * cov + (shrinkage * jnp.trace(cov) / d + ridge) * eye
  return make_gaussian(stats.mean, cov, count=stats.count)


def _whiten(x: jax.Array, cholesky: jax.Array) -> jax.Array:
  """`L^{-1} x` row-wise, by a triangular solve: [n, d] -> [n, d]."""
  return jax.scipy.linalg.solve_triangular(cholesky, x.T, lower=True).T


def _check_gaussian(x: jax.Array, gaussian: Gaussian, name: str = "x") -> None:
  if not isinstance(gaussian, Gaussian):
    raise ValueError(
        f"gaussian must be a Gaussian (see fit_gaussian); got {type(gaussian).__name__}.")
  _check_rank2(x, name)
  if jnp.shape(x)[1] != gaussian.mean.shape[-1]:
    raise ValueError(
        f"{name} has dimension {jnp.shape(x)[1]} but the gaussian has dimension "
        f"{gaussian.mean.shape[-1]}.")


def mahalanobis_to_classes(x: jax.Array, gaussian: Gaussian, *, squared: bool = False) -> jax.Array:
  """Mahalanobis distance of each point to each class: `sqrt((x - mu_c)^T Sigma^-1 (x - mu_c))`.

  Computed as the Euclidean distance between `L^-1 x` and `L^-1 mu_c` (`L L^T = Sigma`).

  Args:
    x: `[n, d]`.
    gaussian: from `fit_gaussian` or `make_gaussian`.
    squared: return the squared distance (the score of Lee et al. 2018, negated).

  Returns:
    `[n, C]` float32 distances; `inf` for classes with no samples; NaN for a non-finite row.

  Raises:
    ValueError: on `x` not `[n, d]` with the gaussian's `d`.
  """
  _check_gaussian(x, gaussian)
  z = _whiten(_as_float(x), gaussian.cholesky)
  zm = _whiten(gaussian.mean, gaussian.cholesky)
  sq = squared_euclidean_distance(z, zm)
  dist = jnp.where(gaussian.count[None, :] > 0, sq if squared else _safe_sqrt(sq), jnp.inf)
  return jnp.where(finite_rows(x)[:, None], dist, jnp.nan)


def mahalanobis_distance(x: jax.Array, gaussian: Gaussian, *, squared: bool = False) -> jax.Array:
  """Distance of each point to the distribution: `min_c` of `mahalanobis_to_classes`.

  With one class this is the ordinary Mahalanobis distance; with class means it is the
  out-of-distribution score of Lee et al. (2018) (larger = further out).

  Args:
    x: `[n, d]`.
    gaussian: from `fit_gaussian` or `make_gaussian`.
    squared: return the squared distance.

  Returns:
    `[n]` float32 distances; NaN for a non-finite row.

  Raises:
    ValueError: on `x` not `[n, d]` with the gaussian's `d`.
  """
  return jnp.min(mahalanobis_to_classes(x, gaussian, squared=squared), axis=-1)


def mahalanobis_pairwise(x: jax.Array, y: jax.Array, gaussian: Gaussian, *,
                         squared: bool = False) -> jax.Array:
  """Mahalanobis distance between points under the gaussian's covariance.

  `sqrt((x - y)^T Sigma^-1 (x - y)) = |L^-1 x - L^-1 y|`: both sets are whitened with the
  Cholesky factor, then compared with `euclidean_distance` (the means are not used).

  Args:
    x: `[n, d]`.
    y: `[m, d]`.
    gaussian: supplies the covariance.
    squared: return the squared distance.

  Returns:
    `[n, m]` float32 distances; NaN where a row of `x` or `y` is not finite.

  Raises:
    ValueError: on wrong ranks or dims that do not match each other or the gaussian.
  """
  _check_pair(x, y)
  _check_gaussian(x, gaussian)
  zx = _whiten(_as_float(x), gaussian.cholesky)
  zy = _whiten(_as_float(y), gaussian.cholesky)
  return squared_euclidean_distance(zx, zy) if squared else euclidean_distance(zx, zy)
