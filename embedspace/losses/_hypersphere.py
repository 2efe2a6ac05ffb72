"""Embedding-health metrics on the hypersphere: alignment, uniformity, rank, spread.

Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere", show that contrastive losses optimise two properties of the
L2-normalised embeddings: positives close together (alignment) and the batch spread evenly over
the sphere (uniformity). The other metrics here detect collapse: the effective rank (Roy &
Vetterli 2007) for dimensional collapse, the per-dimension standard deviation (Chen & He 2021,
SimSiam, Fig. 2) for complete collapse, and the mean geodesic distance of positive and negative
pairs for how far apart the two are on the sphere.

All are training metrics over the GLOBAL batch (pairs and statistics span every device through
`all_gather` and `psum`), return the same value on every device, stay finite on collapsed or
antipodal embeddings, and have finite gradients (they can be used as regularisers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from embedspace import geometry
from embedspace import parallel
from embedspace.losses import _common

_EIGENVALUE_NOISE = 1024.0
"""Eigenvalues below (this * float eps)^2 * |Z|_F^2 are rounding noise of the centring."""


def _normalized(name: str, z: jax.Array) -> jax.Array:
  _common.check_embeddings(name, z)
  return geometry.l2_normalize(_common.to_float(z))


def alignment(
    z1: jax.Array,
    z2: jax.Array,
    *,
    alpha: float = 2.0,
    axis_name: str | None = None,
) -> jax.Array:
  """Alignment of positive pairs: E_i ||f(x_i) - f(y_i)||^alpha on the unit sphere.

  Wang & Isola 2020, eq. 4 (`lalign`, alpha = 2 by default): 0 for identical views, 4 (alpha=2)
  for antipodal ones. Mean over the global batch.

  Args:
    z1: `[batch, dim]` embeddings of the first view (normalised here).
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    alpha: exponent > 0.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar, the same on every device.

  Raises:
    ValueError: on inputs that are not `[batch, dim]` floating arrays of one shape, or a
      Python-number `alpha` <= 0.
  """
  _common.check_pair("z1", z1, "z2", z2)
  _common.check_positive("alpha", alpha)
  diff = _normalized("z1", z1) - _normalized("z2", z2)
  sq = jnp.sum(diff * diff, axis=-1)
  if _common.is_number(alpha) and alpha == 2:
    powered = sq
  else:  # sq ** (alpha / 2) with a finite gradient at sq == 0 for alpha < 2.
    positive = sq > 0
    powered = jnp.where(positive, jnp.where(positive, sq, 1.0) ** (alpha / 2), 0.0)
  return parallel.batch_mean(powered, axis_name)


def uniformity(
    z: jax.Array,
    *,
    t: float = 2.0,
    axis_name: str | None = None,
) -> jax.Array:
  """Uniformity of the batch: log E_{i != j} exp(-t ||f(x_i) - f(x_j)||^2) on the unit sphere.

  Wang & Isola 2020, eq. 6 (`luniform`, t = 2): the log of the average Gaussian potential over
  the N(N-1) ordered pairs of distinct rows of the global batch. Lower is more uniform; its
  minimum for N -> inf is the value of the uniform distribution, and 0 means collapse to one
  point. Computed as a shifted log-sum-exp (shift: the largest potential over all devices), so
  it neither underflows for large t nor overflows.

  Under `axis_name` the local rows are paired with the gathered global batch (self excluded at
  offset `axis_index * local_batch`) and the sums are `psum`-ed.

  Args:
    z: `[batch, dim]` embeddings (normalised here).
    t: temperature of the Gaussian potential, > 0.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar in [-4t, 0], the same on every device.

  Raises:
    ValueError: if `z` is not a `[batch, dim]` floating array, if the global batch has fewer
      than 2 rows (no pairs), or if `t` is a Python number <= 0.
  """
  z = _normalized("z", z)
  n = _common.check_global_batch("z", z, axis_name, 2)
  _common.check_positive("t", t)
  z_all = parallel.all_gather(z, axis_name)
  # ||a - b||^2 = 2 - 2 a.b on the unit sphere.
  sq = jnp.maximum(2.0 - 2.0 * _common.matmul(z, z_all.T), 0.0)
  rows = _common.global_row_offset(z, axis_name) + jnp.arange(z.shape[0])
  is_self = jnp.arange(n)[None, :] == rows[:, None]
  potential = jnp.where(is_self, -jnp.inf, -t * sq)  # [b, n]
  shift = _common.global_max(potential, axis_name)
  total = parallel.psum(jnp.sum(jnp.exp(potential - shift)), axis_name)
  return jnp.log(total) + shift - jnp.log(n * (n - 1.0))


def effective_rank(z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Effective rank of the centred global-batch embedding matrix (Roy & Vetterli 2007).

  With sigma_k the singular values of Z - mean(Z) (`[N, dim]`, over the global batch),
  p_k = sigma_k / sum_l sigma_l and H = -sum_k p_k log p_k:

    erank = exp(H)   in [1, min(N, dim)], 0 for a zero (fully collapsed) matrix.

  The singular values are computed as sqrt of the eigenvalues of the global scatter matrix
  psum((Z - mean)^T (Z - mean)) (`[dim, dim]`, psum-able; no gather of Z). Eigenvalues below
  dim * eps * lambda_max (relative) or (1024 eps)^2 |Z|_F^2 (rounding noise of the centring,
  e.g. when every row is the same) count as 0, so collapsed embeddings give 0 or 1, not the rank
  of the noise. Through the eigenvalues of the scatter, singular values below ~sqrt(dim * eps)
  * sigma_max (~3e-3 sigma_max for dim 128 in float32) are not resolved. Embeddings are used as
  they are (not normalised): the rank is scale-invariant.

  Args:
    z: `[batch, dim]` embeddings.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar, the same on every device.

  Raises:
    ValueError: if `z` is not a `[batch, dim]` floating array.
  """
  _common.check_embeddings("z", z)
  z = _common.to_float(z)
  d = z.shape[1]
  eps = jnp.finfo(z.dtype).eps
  scatter = _common.global_covariance(z, axis_name, ddof=0)  # scatter / N: same p_k.
  eigenvalues = jnp.linalg.eigvalsh(scatter)
  norm_sq = jnp.sum(_common.global_sum(z * z, axis_name)) / _common.global_batch_size(
      z, axis_name)
  floor = jnp.maximum(d * eps * jnp.max(eigenvalues), (_EIGENVALUE_NOISE * eps) ** 2 * norm_sq)
  kept = eigenvalues > floor
  sigma = jnp.where(kept, jnp.sqrt(jnp.where(kept, eigenvalues, 1.0)), 0.0)
  total = jnp.sum(sigma)
  p = sigma / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(kept, p * jnp.log(jnp.where(kept, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def embedding_std(z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Mean per-dimension standard deviation of the L2-normalised embeddings.

  (1/dim) sum_j std_i(z_ij / ||z_i||), population std over the global batch. About 1/sqrt(dim)
  for embeddings spread over the sphere, ~0 when they collapse to one point (Chen & He 2021,
  "Exploring Simple Siamese Representation Learning", Fig. 2).

  Args:
    z: `[batch, dim]` embeddings (normalised here).
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar, the same on every device.

  Raises:
    ValueError: if `z` is not a `[batch, dim]` floating array.
  """
  z = _normalized("z", z)
  centred = z - _common.global_mean(z, axis_name)
  var = _common.global_sum(centred * centred, axis_name) / _common.global_batch_size(z, axis_name)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return jnp.mean(std)


def positive_negative_geodesic(
    z1: jax.Array,
    z2: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean geodesic distance arccos(cos(z1_i, z2_j)) of positive and of negative pairs.

  positive = 1/N sum_i d(z1_i, z2_i),  negative = 1/(N(N-1)) sum_{i != j} d(z1_i, z2_j),
  over the global batch, in [0, pi]. Training should pull `positive` towards 0 while `negative`
  stays near pi/2 (spread) rather than collapsing with it.

  Args:
    z1: `[batch, dim]` embeddings of the first view.
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    `(positive, negative)` scalars, the same on every device.

  Raises:
    ValueError: on inputs that are not `[batch, dim]` floating arrays of one shape, or a global
      batch of fewer than 2 rows (no negatives).
  """
  _common.check_pair("z1", z1, "z2", z2)
  n = _common.check_global_batch("z1", z1, axis_name, 2)
  z1, z2 = _common.to_float(z1), _common.to_float(z2)
  distance = geometry.geodesic_distance(z1, parallel.all_gather(z2, axis_name))  # [b, n]
  rows = _common.global_row_offset(z1, axis_name) + jnp.arange(z1.shape[0])
  is_positive = jnp.arange(n)[None, :] == rows[:, None]
  positive_sum = jnp.sum(jnp.where(is_positive, distance, 0.0))
  negative_sum = jnp.sum(jnp.where(is_positive, 0.0, distance))
  positive_sum, negative_sum = parallel.psum((positive_sum, negative_sum), axis_name)
  return positive_sum / n, negative_sum / (n * (n - 1))
