"""Argument checks and global-batch statistics shared by the losses.

Every statistic here is over the GLOBAL batch: per-device sums are added with `psum` and divided
by the global count, so a loss computed on 8 devices with 16 rows each equals the same loss on
one device with 128 rows (not the average of 8 per-device statistics, which differs for any
statistic that is not a plain mean). With `axis_name=None` the collectives are the identity.
Products are at `Precision.HIGHEST`, like `embedspace.geometry`, so results do not depend on
the accelerator's default float32 matmul precision.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from embedspace import parallel


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` at full float32 precision (GPU/TPU default to TF32/bfloat16 passes otherwise)."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def check_embeddings(name: str, x: jax.Array) -> None:
  """Raises ValueError unless `x` is a floating `[batch, dim]` array with batch, dim >= 1."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"`{name}` must have shape [batch, dim], got shape {shape}.")
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"`{name}` must have a non-empty batch and dim, got shape {shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a floating array, got dtype {x.dtype}.")


def check_pair(name1: str, x1: jax.Array, name2: str, x2: jax.Array) -> None:
  """Checks both arrays are embeddings and have the same shape (paired rows)."""
  check_embeddings(name1, x1)
  check_embeddings(name2, x2)
  if x1.shape != x2.shape:
    raise ValueError(
        f"`{name1}` and `{name2}` must have the same shape (row i of one is paired with row i "
        f"of the other), got {x1.shape} and {x2.shape}.")


def is_number(value: object) -> bool:
  """True for a concrete real scalar (Python or NumPy), False for arrays and tracers."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value: object) -> None:
  """Raises ValueError if `value` is a concrete number that is not > 0 (arrays are not checked).

  Hyperparameters passed as arrays (traced under jit, e.g. a scheduled temperature) cannot be
  checked at trace time without a host round-trip; their validity is the caller's.
  """
  if is_number(value) and not value > 0:
    raise ValueError(f"`{name}` must be > 0, got {value}.")


def global_batch_size(x: jax.Array, axis_name: str | None) -> int:
  """Rows over all devices of `axis_name` (every device holds the same number of rows)."""
  return x.shape[0] * parallel.axis_size(axis_name)


def check_global_batch(name: str, x: jax.Array, axis_name: str | None, minimum: int) -> int:
  """Returns the global batch size; raises ValueError if it is below `minimum`."""
  n = global_batch_size(x, axis_name)
  if n < minimum:
    raise ValueError(
        f"`{name}` has a global batch of {n} rows ({x.shape[0]} per device); this statistic "
        f"needs at least {minimum}.")
  return n


def to_float(x: jax.Array) -> jax.Array:
  """Casts to at least float32 (bfloat16/float16 -> float32; float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_row_offset(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Global index of this device's first row (`axis_index * local_batch`)."""
  return parallel.axis_index(axis_name) * x.shape[0]


def global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Sum over axis 0 of the global batch: `psum(sum_i x_i)`."""
  return parallel.psum(jnp.sum(x, axis=0), axis_name)


def global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean over the global batch, `[dim]`."""
  return global_sum(x, axis_name) / global_batch_size(x, axis_name)


def global_max(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Largest entry of `x` over all devices, typed device-invariant (`pmax`; not differentiable).

  `max(all_gather(x))` has the same value but shard_map types it as varying per device, so it
  could not be returned with `out_specs=P()`. `parallel` has no `pmax`, hence the direct call.
  """
  local = jax.lax.stop_gradient(jnp.max(x))
  return local if axis_name is None else jax.lax.pmax(local, axis_name)


def global_covariance(x: jax.Array, axis_name: str | None, *, ddof: int) -> jax.Array:
  """`[dim, dim]` covariance over the global batch: psum((x - mean)^T (x - mean)) / (N - ddof)."""
  xc = x - global_mean(x, axis_name)
  scatter = parallel.psum(matmul(xc.T, xc), axis_name)
  return scatter / (global_batch_size(x, axis_name) - ddof)


def global_standardize(x: jax.Array, axis_name: str | None, *, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) per dimension, mean and biased var over the global batch.

  This is what `BatchNorm1d(affine=False)` does in training mode with synchronised statistics,
  the normalisation Barlow Twins and DeCUR apply before the cross-correlation.
  """
  xc = x - global_mean(x, axis_name)
  var = global_sum(xc * xc, axis_name) / global_batch_size(x, axis_name)
  return xc * jax.lax.rsqrt(var + eps)


def cross_correlation(x: jax.Array, y: jax.Array, axis_name: str | None, *,
                      eps: float) -> jax.Array:
  """`[dim, dim]` C_ij = sum_b xhat_bi yhat_bj / N of globally standardised x and y."""
  xs = global_standardize(x, axis_name, eps=eps)
  ys = global_standardize(y, axis_name, eps=eps)
  return parallel.psum(matmul(xs.T, ys), axis_name) / global_batch_size(x, axis_name)


def off_diagonal_square_sum(m: jax.Array) -> jax.Array:
  """Sum of squares of the off-diagonal entries of a square matrix."""
  off = jnp.where(jnp.eye(m.shape[0], dtype=bool), 0.0, m)
  return jnp.sum(off * off)
