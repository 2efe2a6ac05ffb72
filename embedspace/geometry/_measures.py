"""The seed's pairwise measures and their shared checks (see `embedspace.geometry`)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

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
  """sqrt that is 0 with gradient 0 (not inf or NaN) at s <= 0, and keeps NaN as NaN."""
  keep = (s > 0) | jnp.isnan(s)
  return jnp.where(keep, jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0)


def finite_rows(x: jax.Array) -> jax.Array:
  """Which rows hold only finite values (no NaN, no +-inf): `all_i isfinite(x[..., i])`.

  The rows every measure here is defined on (see "Non-finite values" in `embedspace.geometry`).

  Args:
    x: `[..., d]`; bool and integer arrays are finite throughout.

  Returns:
    bool `[...]`.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.ones(x.shape[:-1], bool)
  return jnp.all(jnp.isfinite(x), axis=-1)


class NonFiniteError(ValueError):
  """Embeddings with NaN or +-inf rows reached a measure that refuses them (`require_finite`)."""


def require_finite(x: np.ndarray, what: str, *, fix: str = "") -> None:
  """Raises `NonFiniteError` counting the rows of `x` `[n, d]` that are not finite.

  For the measures that cannot mask such rows (fits, probes, rankings over a whole set): the
  message names `what`, the count, the first bad row and `fix` (default: drop the rows with
  `x[geometry.finite_rows(x)]`). Runs on the host (numpy); not for use under `jit`.
  """
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.inexact) or not x.size:
    return
  bad = np.flatnonzero(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=-1))
  if len(bad):
    raise NonFiniteError(
        f"{len(bad)} of {len(x)} rows of {what} are not finite (NaN or inf; first: row "
        f"{bad[0]}); {fix or 'drop them first: x[geometry.finite_rows(x)]'}.")


def _nan_unless_finite(values: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """`values [n, m]`, NaN wherever row i of `x` or row j of `y` is not finite."""
  both = finite_rows(x)[:, None] & finite_rows(y)[None, :]
  return jnp.where(both, values, jnp.nan)


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

  A code cannot say NaN: NaN maps to 0 (and +-inf to their sign). `pairwise(metric="hamming")`
  and `top_k` look at the real values first, so a non-finite row is NaN or unranked there.

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
    `[n, m]` float32 counts (codes are always finite; see `binarize` for NaN).

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
    `[n, m]` float32 (or float64) distances; NaN where a row of `x` or `y` is not finite.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  return _nan_unless_finite(jnp.sum(jnp.abs(x[:, None, :] - y[None, :, :]), axis=-1), x, y)


def squared_euclidean_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared L2 distance `|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`, clamped at 0.

  The expansion costs one matrix product; its rounding error is about `1e-7 * (|x|^2 + |y|^2)`
  in float32, so the distance of a point to itself is ~0, not exactly 0.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.

  Returns:
    `[n, m]` float32 (or float64) distances; NaN where a row of `x` or `y` is not finite.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  return _nan_unless_finite(jnp.maximum(xx + yy - 2.0 * _dot_t(x, y), 0.0), x, y)


def euclidean_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """L2 distance `sqrt(|x - y|^2)` (see `squared_euclidean_distance`).

  The square root has gradient 0 where the squared distance is 0 (e.g. `x == y`), instead of
  NaN; elsewhere it is the exact gradient. It keeps a NaN squared distance NaN.

  Args:
    x: `[n, d]`.
    y: `[m, d]`.

  Returns:
    `[n, m]` float32 (or float64) distances; NaN where a row of `x` or `y` is not finite.

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
    `[n, m]` float32 (or float64) similarities; NaN where a row of `x` or `y` is not finite.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  _check_pair(x, y)
  x, y = _as_float(x), _as_float(y)
  cos = _dot_t(l2_normalize(x, eps=eps), l2_normalize(y, eps=eps))
  return _nan_unless_finite(jnp.clip(cos, -1.0, 1.0), x, y)


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
    `[n, m]` float32 (or float64) distances; NaN where a row of `x` or `y` is not finite.

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
    `[n, m]` float32 (or float64) similarities; NaN where a row of `x` or `y` is not finite.

  Raises:
    ValueError: on wrong ranks or mismatched dims.
  """
  return 1.0 - geodesic_distance(x, y, eps=eps) / jnp.pi
