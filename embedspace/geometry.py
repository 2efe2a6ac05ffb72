"""Distance and similarity measures of an embedding space, and exact nearest neighbours.

Every measure is pairwise (`x: [n, d]`, `y: [m, d]` -> `[n, m]`) and written as one matrix product
plus cheap per-row terms (`|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`, Hamming as a product of 0/1 codes),
accumulated in float32 at `Precision.HIGHEST`, so a block of neighbours costs one matmul. The
places where the textbook formula has an infinite derivative get a finite one: the square root of
the Euclidean distance at `x == y`, and `arccos` at identical and antipodal vectors for the geodesic
distance and negative arc length of Koishekenov et al. (2023), "Geometric Contrastive Learning".

The Mahalanobis distance (point to distribution) follows Lee et al. (2018), "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks": class means with one
shared (tied) covariance. Its sufficient statistics (per-class count and mean, and the pooled
within-class scatter about those means, as in Chan et al.'s parallel variance algorithm) merge
exactly across batches (`merge_stats`) and devices (`psum_stats`), and never subtract two large
raw moments, so a Gaussian is fitted over a whole dataset in one streaming pass. Scores use
triangular solves with the Cholesky factor, never an explicit inverse.

`top_k` finds exact nearest neighbours by scanning key blocks and merging a running top-k, so
memory is `O(n * (block_size + k))`, never the full `[n, N]` matrix.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from embedspace import parallel

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

_PRECISION = jax.lax.Precision.HIGHEST

_ARCCOS_GRAD_FLOOR = 1e-6
"""Lower bound on `1 - c^2` in the derivative of `arccos(c)`: |d arccos / dc| <= 1e3."""


# ----------------------------------------------------------------------------------------------
# Helpers.


def _as_float(x: jax.Array) -> jax.Array:
  """Upcasts to at least float32 (bfloat16, float16, integers and bools become float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_rank2(x: jax.Array, name: str) -> None:
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name} must have shape [num_points, dim]; got shape {jnp.shape(x)}.")


def _check_pair(x: jax.Array, y: jax.Array, names: tuple[str, str] = ("x", "y")) -> None:
  """Raises ValueError unless `x: [n, d]` and `y: [m, d]` share their feature dimension."""
  _check_rank2(x, names[0])
  _check_rank2(y, names[1])
  if jnp.shape(x)[1] != jnp.shape(y)[1]:
    raise ValueError(
        f"{names[0]} and {names[1]} must have the same feature dimension; got "
        f"{names[0]}.shape={jnp.shape(x)} and {names[1]}.shape={jnp.shape(y)}.")


def _check_nonnegative(value: float | jax.Array, name: str, upper: float | None = None) -> None:
  """Checks a hyperparameter given as a Python/numpy number (arrays, maybe traced, are not)."""
  if not isinstance(value, numbers.Real):
    return
  v = float(value)
  if v < 0 or (upper is not None and v > upper):
    bound = f"in [0, {upper}]" if upper is not None else ">= 0"
    raise ValueError(f"{name} must be {bound}; got {v}.")


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b.T` at full float32 precision: [n, d] x [m, d] -> [n, m]."""
  return jnp.dot(a, b.T, precision=_PRECISION)


def _safe_sqrt(s: jax.Array) -> jax.Array:
  """sqrt with gradient 0 (not inf or NaN) at s <= 0."""
  positive = s > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


@jax.custom_jvp
def _arccos(c: jax.Array) -> jax.Array:
  """arccos on [-1, 1] whose derivative is bounded: -1 / sqrt(max(1 - c^2, floor))."""
  return jnp.arccos(c)


@_arccos.defjvp
def _arccos_jvp(primals, tangents):
  (c,), (t,) = primals, tangents
  slope = -jax.lax.rsqrt(jnp.maximum(1.0 - c * c, _ARCCOS_GRAD_FLOOR))
  return jnp.arccos(c), slope * t


# ----------------------------------------------------------------------------------------------
# Point-to-point measures, pairwise.


def binarize(x: jax.Array) -> jax.Array:
  """Binary codes of real embeddings: `code = 1 if x > 0 else 0`.

  Args:
    x: `[..., d]` real values.

  Returns:
    uint8 array of the same shape with values in {0, 1}.
  """
  return (jnp.asarray(x) > 0).astype(jnp.uint8)


def hamming_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Number of positions at which two binary codes differ.

  `H(a, b) = sum_i [a_i != b_i] = |a| + |b| - 2 a.b` for a, b in {0, 1}^d, computed as one matrix
  product; counts are exact in float32 for d < 2^24.

  Args:
    x: `[n, d]` bool or integer codes with values in {0, 1} (see `binarize`).
    y: `[m, d]` codes of the same kind.

  Returns:
    `[n, m]` float32 counts.

  Raises:
    ValueError: on wrong ranks, mismatched dims, or floating-point inputs (binarize them first, or
      use `pairwise(..., metric="hamming")`, which does).
  """
  _check_pair(x, y)
  for name, v in (("x", x), ("y", y)):
    if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating):
      raise ValueError(
          f"hamming_distance expects binary codes (bool or integer 0/1) for {name}; got dtype "
          f"{jnp.asarray(v).dtype}. Call binarize() first or use pairwise(metric='hamming').")
  a, b = _as_float(x), _as_float(y)
  return jnp.maximum(jnp.sum(a, -1)[:, None] + jnp.sum(b, -1)[None, :] - 2.0 * _dot_t(a, b), 0.0)


def manhattan_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """L1 (taxicab) distance `sum_i |x_i - y_i|`.

  There is no matrix-product form; the `[n, m, d]` difference is fused into the reduction by XLA
  in the forward pass, but its gradient materialises it, so keep `n * m * d` moderate (`top_k`
  bounds `m` by its `block_size`).

  Args:
    x: `[n, d]`.
    y: `[m, d]`.

  Returns:
    `[n, m]` float32 (or float64) distances.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  return jnp.sum(jnp.abs(x[:, None, :] - y[None, :, :]), axis=-1)


def squared_euclidean_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared L2 distance `|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`, clamped at 0.

  The expansion costs one matrix product; its rounding error is about `1e-7 * (|x|^2 + |y|^2)`
  in float32, so the distance of a point to itself is ~0, not exactly 0.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.

  Returns:
    `[n, m]` float32 (or float64) distances.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  return jnp.maximum(xx + yy - 2.0 * _dot_t(x, y), 0.0)


def euclidean_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """L2 distance `sqrt(|x - y|^2)` (see `squared_euclidean_distance`).

  The square root has gradient 0 where the squared distance is 0 (e.g. `x == y`), instead of
  NaN; elsewhere it is the exact gradient.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.

  Returns:
    `[n, m]` float32 (or float64) distances.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  return _safe_sqrt(squared_euclidean_distance(x, y))


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """Projects onto the unit sphere: `x / max(|x|, eps)`.

  A zero vector maps to the zero vector; near it the map is `x / eps`, so the Jacobian there is
  the finite `I / eps` (not NaN). The norm is computed in
  float32; the result keeps the dtype of a floating `x` (integers become float32).

  Args:
    x: any shape; normalised along `axis`.
    axis: the feature axis.
    eps: smallest norm divided by.

  Returns:
    Array of `x`'s shape.

  Raises:
    ValueError: if `eps` is negative.
  """
  _check_nonnegative(eps, "eps")
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  xf = _as_float(x)
  sq = jnp.sum(xf * xf, axis=axis, keepdims=True)
  return (xf * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(out_dtype)


def cosine_similarity(x: jax.Array, y: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Cosine of the angle between embeddings: `x.y / (max(|x|, eps) max(|y|, eps))`.

  A similarity in [-1, 1] (clipped, so rounding never leaves the range); 0 against a zero vector.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.
    eps: smallest norm divided by (see `l2_normalize`).

  Returns:
    `[n, m]` float32 (or float64) similarities.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  cos = _dot_t(l2_normalize(x, eps=eps), l2_normalize(y, eps=eps))
  return jnp.clip(cos, -1.0, 1.0)


def geodesic_distance(x: jax.Array, y: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Great-circle distance between the projections onto the unit hypersphere: `arccos(cos(x, y))`.

  In [0, pi]. `arccos` has an infinite derivative at cos = +-1; here its derivative is
  `-1 / sqrt(max(1 - cos^2, 1e-6))`, so the gradient is exact for angles above ~1e-3 rad, shrinks
  linearly to 0 below that (like a Huber loss), and is 0, not NaN, at identical and antipodal
  vectors. In float32, `cos` resolves angles near 0 and pi only to ~5e-4 rad, so `d(x, x)` is
  ~0 rather than exactly 0. A zero vector is at pi/2 from everything.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.
    eps: smallest norm divided by (see `l2_normalize`).

  Returns:
    `[n, m]` float32 (or float64) distances.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  return _arccos(cosine_similarity(x, y, eps=eps))


def negative_arc_length(x: jax.Array, y: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Similarity on the unit hypersphere: `1 - arccos(cos(x, y)) / pi`, in [0, 1].

  Koishekenov et al. (2023), "Geometric Contrastive Learning". 1 for identical directions, 0 for
  antipodal ones; same safe `arccos` gradient as `geodesic_distance`.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.
    eps: smallest norm divided by (see `l2_normalize`).

  Returns:
    `[n, m]` float32 (or float64) similarities.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  return 1.0 - geodesic_distance(x, y, eps=eps) / jnp.pi


# ----------------------------------------------------------------------------------------------
# Mahalanobis: point to distribution, with mergeable statistics.


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
  (e.g. -1) are ignored, which is how to pad a batch to a fixed size. Without labels every row
  is in one class (`C = 1`).

  Args:
    x: `[n, d]` embeddings (accumulated in float32).
    labels: optional `[n]` integer class ids.
    num_classes: `C`; required with `labels`, must be omitted (or 1) without them.

  Returns:
    `GaussianStats` with `count [C]`, `mean [C, d]`, `scatter [d, d]`.

  Raises:
    ValueError: on `x` not of rank 2, `labels` not `[n]` integers, or a missing/invalid
      `num_classes`.
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
    ValueError: if `shrinkage` is outside [0, 1] or `ridge` is negative.
  """
  _check_nonnegative(shrinkage, "shrinkage", upper=1.0)
  _check_nonnegative(ridge, "ridge")
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
    `[n, C]` float32 distances; `inf` for classes with no samples.

  Raises:
    ValueError: on `x` not `[n, d]` with the gaussian's `d`.
  """
  _check_gaussian(x, gaussian)
  z = _whiten(_as_float(x), gaussian.cholesky)
  zm = _whiten(gaussian.mean, gaussian.cholesky)
  sq = squared_euclidean_distance(z, zm)
  dist = sq if squared else _safe_sqrt(sq)
  return jnp.where(gaussian.count[None, :] > 0, dist, jnp.inf)


def mahalanobis_distance(x: jax.Array, gaussian: Gaussian, *, squared: bool = False) -> jax.Array:
  """Distance of each point to the distribution: `min_c` of `mahalanobis_to_classes`.

  With one class this is the ordinary Mahalanobis distance; with class means it is the
  out-of-distribution score of Lee et al. (2018) (larger = further out).

  Args:
    x: `[n, d]`.
    gaussian: from `fit_gaussian` or `make_gaussian`.
    squared: return the squared distance.

  Returns:
    `[n]` float32 distances.

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
    `[n, m]` float32 distances.

  Raises:
    ValueError: on wrong ranks or dims that do not match each other or the gaussian.
  """
  _check_pair(x, y)
  _check_gaussian(x, gaussian)
  zx = _whiten(_as_float(x), gaussian.cholesky)
  zy = _whiten(_as_float(y), gaussian.cholesky)
  return squared_euclidean_distance(zx, zy) if squared else euclidean_distance(zx, zy)


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
    `[n, m]` float32 values; see `is_similarity` for which way is closer.

  Raises:
    ValueError: on an unknown metric (listing the valid ones), a missing or unexpected
      `gaussian`, wrong ranks or mismatched dims.
  """
  _check_metric_args(metric, gaussian)
  _check_pair(x, y)
  if metric == "hamming":
    return hamming_distance(_codes(x), _codes(y))
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

  Args:
    queries: `[n, d]`.
    keys: `[N, d]`.
    metric: one of `METRICS`.
    k: neighbours per query, `1 <= k <= N`.
    block_size: keys scored at a time.
    gaussian: the covariance for "mahalanobis".

  Returns:
    `(values [n, k], indices [n, k])`: the metric's values (largest similarity / smallest distance
    first) and int32 row indices into `keys`.

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

  q, kv, score, finish = _ranking(metric, queries, keys, gaussian)
  block = min(block_size, num_keys)
  num_blocks = -(-num_keys // block)
  pad = num_blocks * block - num_keys
  kv = jnp.pad(kv, ((0, pad), (0, 0))).reshape(num_blocks, block, kv.shape[1])
  offsets = jnp.arange(num_blocks, dtype=jnp.int32) * block

  def step(carry, xs):
    best, best_idx = carry
    key_block, offset = xs
    idx = offset + jnp.arange(block, dtype=jnp.int32)
    s = jnp.where((idx < num_keys)[None, :], score(q, key_block), -jnp.inf)
    merged = jnp.concatenate([best, s.astype(best.dtype)], axis=1)
    merged_idx = jnp.concatenate([best_idx, jnp.broadcast_to(idx, (n, block))], axis=1)
    best, pos = jax.lax.top_k(merged, k)
    return (best, jnp.take_along_axis(merged_idx, pos, axis=1)), None

  dtype = jax.eval_shape(score, q, kv[0]).dtype
  init = (jnp.full((n, k), -jnp.inf, dtype), jnp.full((n, k), -1, jnp.int32))
  (best, best_idx), _ = jax.lax.scan(step, init, (kv, offsets))
  return finish(best), best_idx
