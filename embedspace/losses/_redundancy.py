"""Redundancy-reduction losses: VICReg, Barlow Twins and DeCUR.

These losses regularise batch statistics (variances, covariances, cross-correlations), which are
not means of per-example terms: the average over devices of per-device covariances is not the
covariance of the global batch. So every statistic is built from `psum`-ed sums over the global
batch (mean first, then centred scatter / N or N-1), exactly as if one device held all N rows,
the way the reference implementations gather (VICReg's `FullGatherLayer`) or all-reduce
(Barlow Twins' and DeCUR's cross-correlation with synchronised BatchNorm) before the statistic.

Each returns `(total, terms)`: `terms` holds the unweighted components for logging, `total`
their weighted sum. Non-finite embeddings are not checked: they make the loss NaN everywhere.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from embedspace.losses import _common


def vicreg_loss(
    z1: jax.Array,
    z2: jax.Array,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Variance-Invariance-Covariance Regularisation (Bardes et al. 2022, ICLR, eqs. 1-6).

  Over the global batch of N rows and d dimensions, with C(z) the unbiased covariance
  (1/(N-1)) sum_i (z_i - mean)(z_i - mean)^T:

    invariance = 1/(N d) sum_i ||z1_i - z2_i||^2
    variance   = 1/2 sum_{z in z1,z2} 1/d sum_j max(0, 1 - sqrt(C(z)_jj + eps))
    covariance = sum_{z in z1,z2} 1/d sum_{j != k} C(z)_jk^2
    total = invariance_weight * invariance + variance_weight * variance
            + covariance_weight * covariance

  The defaults (25, 25, 1, eps 1e-4) and the 1/2 on the variance but not on the covariance
  term follow the authors' code (facebookresearch/vicreg `main_vicreg.py`).

  Args:
    z1: `[batch, dim]` embeddings (expander outputs) of the first view.
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    invariance_weight: lambda, weight of the invariance term.
    variance_weight: mu, weight of the variance hinge.
    covariance_weight: nu, weight of the covariance term.
    eps: added to the variance inside the square root.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    `(total, {'invariance', 'variance', 'covariance'})`, scalars, the same on every device.

  Raises:
    ValueError: if `z1`/`z2` are not `[batch, dim]` floating arrays of the same shape, if the
      global batch has fewer than 2 rows (unbiased variance), or if `eps` is a number < 0.
  """
  _common.check_pair("z1", z1, "z2", z2)
  n = _common.check_global_batch("z1", z1, axis_name, 2)
  if _common.is_number(eps) and not eps >= 0:
    raise ValueError(f"`eps` must be >= 0, got {eps}.")
  z1, z2 = _common.to_float(z1), _common.to_float(z2)
  d = z1.shape[1]

  diff = z1 - z2
  invariance = jnp.sum(_common.global_sum(diff * diff, axis_name)) / (n * d)

  def variance_and_covariance(z):
    cov = _common.global_covariance(z, axis_name, ddof=1)
    std = jnp.sqrt(jnp.diagonal(cov) + eps)
    return jnp.mean(jax.nn.relu(1.0 - std)), _common.off_diagonal_square_sum(cov) / d

  var1, cov1 = variance_and_covariance(z1)
  var2, cov2 = variance_and_covariance(z2)
  terms = {
      "invariance": invariance,
      "variance": (var1 + var2) / 2,
      "covariance": cov1 + cov2,
  }
  total = (invariance_weight * terms["invariance"] + variance_weight * terms["variance"]
           + covariance_weight * terms["covariance"])
  return total, terms


def barlow_twins_loss(
    z1: jax.Array,
    z2: jax.Array,
    *,
    off_diagonal_weight: float = 5e-3,
    eps: float = 1e-5,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Barlow Twins: drive the cross-correlation of the two views to the identity.

  Each view is standardised per dimension over the global batch, zhat = (z - mean) /
  sqrt(var + eps) with the biased variance (BatchNorm without affine, as in the authors' code),
  and C = zhat1^T zhat2 / N is their `[dim, dim]` cross-correlation:

    on_diagonal  = sum_i (1 - C_ii)^2
    off_diagonal = sum_{i != j} C_ij^2
    total = on_diagonal + off_diagonal_weight * off_diagonal

  (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
  eq. 1-2; lambda = 5e-3 in the paper, 0.0051 in its code; eps = BatchNorm1d's 1e-5).

  Args:
    z1: `[batch, dim]` embeddings of the first view.
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    off_diagonal_weight: lambda, weight of the redundancy-reduction term.
    eps: added to the variance before standardising.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    `(total, {'on_diagonal', 'off_diagonal'})`, scalars, the same on every device.

  Raises:
    ValueError: if `z1`/`z2` are not `[batch, dim]` floating arrays of the same shape, or if
      the global batch has fewer than 2 rows.
  """
  _common.check_pair("z1", z1, "z2", z2)
  _common.check_global_batch("z1", z1, axis_name, 2)
  c = _common.cross_correlation(
      _common.to_float(z1), _common.to_float(z2), axis_name, eps=eps)
  terms = _barlow_terms(c, target_diagonal=1.0)
  return terms["on_diagonal"] + off_diagonal_weight * terms["off_diagonal"], terms


def _barlow_terms(c: jax.Array, *, target_diagonal: float) -> dict[str, jax.Array]:
  diagonal = jnp.diagonal(c) - target_diagonal
  return {
      "on_diagonal": jnp.sum(diagonal * diagonal),
      "off_diagonal": _common.off_diagonal_square_sum(c),
  }


def decur_loss(
    z1_a: jax.Array,
    z2_a: jax.Array,
    z1_b: jax.Array,
    z2_b: jax.Array,
    *,
    num_common: int,
    off_diagonal_weight: float = 5.1e-3,
    eps: float = 1e-5,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DeCUR: Barlow Twins within each modality, common/unique split across modalities.

  Wang et al. 2023, "Decoupling Common and Unique Representations for Multimodal
  Self-supervised Learning" (ECCV 2024). With BT(x, y; target) the Barlow Twins loss of the
  global-batch cross-correlation C(x, y) whose diagonal is driven to `target`:

    intra_a = BT(z1_a, z2_a; 1)          all dims, two views of modality a
    intra_b = BT(z1_b, z2_b; 1)          all dims, two views of modality b
    common  = BT over C(z1_a, z1_b)[:k, :k] with diagonal -> 1   (k = num_common)
    unique  = BT over C(z1_a, z1_b)[k:, k:] with diagonal -> 0
    total   = (intra_a + intra_b + (common + unique) / 2) / 3

  Each BT term is on_diagonal + off_diagonal_weight * off_diagonal. This follows the authors'
  code (zhu-xlab/DeCUR `src/pretrain/models/decur.py` and `pretrain_mm.py`): the cross-modal
  term uses the first view of each modality, the unique block's off-diagonal is also pushed
  to 0 with weight lambda, the common-unique blocks are left free, and lambda = 0.0051.
  The paper leaves k to the data; its scripts use k = 7168 of 8192 dims for SAR/optical
  (SSL4EO-S12) and 6144 of 8192 for RGB/DEM (GeoNRW) and RGB/depth (SUN RGB-D).

  Args:
    z1_a: `[batch, dim]` first view of modality a.
    z2_a: `[batch, dim]` second view of modality a.
    z1_b: `[batch, dim]` first view of modality b; row i pairs with row i of `z1_a`.
    z2_b: `[batch, dim]` second view of modality b.
    num_common: k, how many leading dims are common to both modalities (1 <= k <= dim); the
      remaining dim - k are modality-unique.
    off_diagonal_weight: lambda of every Barlow Twins term.
    eps: added to the variance before standardising.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    `(total, {'intra_a', 'intra_b', 'common', 'unique'})` (each term already includes its
    lambda-weighted off-diagonal part), scalars, the same on every device.

  Raises:
    ValueError: if the four inputs are not `[batch, dim]` floating arrays of one shape, if
      `num_common` is not an int in [1, dim], or if the global batch has fewer than 2 rows.
  """
  _common.check_pair("z1_a", z1_a, "z2_a", z2_a)
  _common.check_pair("z1_a", z1_a, "z1_b", z1_b)
  _common.check_pair("z1_b", z1_b, "z2_b", z2_b)
  _common.check_global_batch("z1_a", z1_a, axis_name, 2)
  d = z1_a.shape[1]
  if (isinstance(num_common, bool) or not isinstance(num_common, numbers.Integral)
      or not 1 <= num_common <= d):
    raise ValueError(f"`num_common` must be an int in [1, {d}] (the embedding dim), "
                     f"got {num_common!r}.")
  z1_a, z2_a, z1_b, z2_b = map(_common.to_float, (z1_a, z2_a, z1_b, z2_b))

  def bt(c, target_diagonal):
    terms = _barlow_terms(c, target_diagonal=target_diagonal)
    return terms["on_diagonal"] + off_diagonal_weight * terms["off_diagonal"]

  def xcorr(x, y):
    return _common.cross_correlation(x, y, axis_name, eps=eps)

  cross = xcorr(z1_a, z1_b)
  k = int(num_common)
  terms = {
      "intra_a": bt(xcorr(z1_a, z2_a), 1.0),
      "intra_b": bt(xcorr(z1_b, z2_b), 1.0),
      "common": bt(cross[:k, :k], 1.0),
      "unique": bt(cross[k:, k:], 0.0),
  }
  total = (terms["intra_a"] + terms["intra_b"] + (terms["common"] + terms["unique"]) / 2) / 3
  return total, terms
