"""Tests of embedspace.geometry against loop-based numpy references, plus metric axioms."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np

from embedspace import geometry
from embedspace import parallel

_HYPOTHESIS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)

# Jitted entry points: one compilation per shape is much faster on CPU than eager op-by-op.
_pairwise = jax.jit(geometry.pairwise, static_argnames="metric")
_stats = jax.jit(geometry.gaussian_stats, static_argnames="num_classes")
_merge = jax.jit(geometry.merge_stats)
_fit = jax.jit(geometry.fit_gaussian, static_argnames=("shrinkage", "ridge"))
_mahalanobis = jax.jit(geometry.mahalanobis_distance, static_argnames="squared")
_top_k = jax.jit(geometry.top_k, static_argnames=("metric", "k", "block_size"))


# ----------------------------------------------------------------------------------------------
# Independent numpy references (float64, explicit loops over pairs).


def _ref_pair(metric: str, a: np.ndarray, b: np.ndarray, precision: np.ndarray | None) -> float:
  if metric == "hamming":
    return float(sum(int(ai > 0) != int(bi > 0) for ai, bi in zip(a, b)))
  if metric == "manhattan":
    return float(sum(abs(ai - bi) for ai, bi in zip(a, b)))
  if metric == "sqeuclidean":
    return float(sum((ai - bi) ** 2 for ai, bi in zip(a, b)))
  if metric == "euclidean":
    return float(np.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b))))
  if metric == "mahalanobis":
    diff = a - b
    return float(np.sqrt(diff @ precision @ diff))
  cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  cos = min(1.0, max(-1.0, cos))
  if metric == "cosine":
    return cos
  if metric == "geodesic":
    return float(np.arccos(cos))
  if metric == "negative_arc_length":
    return 1.0 - float(np.arccos(cos)) / np.pi
  raise AssertionError(metric)


def _ref_pairwise(metric, x, y, covariance=None):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  precision = None if covariance is None else np.linalg.inv(np.asarray(covariance, np.float64))
  out = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      out[i, j] = _ref_pair(metric, x[i], y[j], precision)
  return out


def _ref_tied_gaussian(x, labels, num_classes):
  """Class means and the pooled (tied) maximum-likelihood covariance, by loops."""
  x = np.asarray(x, np.float64)
  d = x.shape[1]
  means = np.zeros((num_classes, d))
  for c in range(num_classes):
    rows = [x[i] for i in range(len(x)) if labels[i] == c]
    if rows:
      means[c] = sum(rows) / len(rows)
  cov = np.zeros((d, d))
  for i in range(len(x)):
    diff = x[i] - means[labels[i]]
    cov += np.outer(diff, diff)
  return means, cov / len(x)


def _random_covariance(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.5 * np.eye(d)


_DISTANCES = ("hamming", "manhattan", "euclidean", "sqeuclidean", "geodesic", "mahalanobis")
_SMOOTH = ("manhattan", "euclidean", "sqeuclidean", "cosine", "geodesic", "negative_arc_length",
           "mahalanobis")


def _gaussian_for(metric, d, rng):
  if metric != "mahalanobis":
    return None, None
  cov = _random_covariance(rng, d)
  return geometry.make_gaussian(np.zeros(d), cov), cov


# ----------------------------------------------------------------------------------------------


class PairwiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*geometry.METRICS)
  def test_matches_numpy_reference(self, metric):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    y = rng.normal(size=(7, 6)).astype(np.float32)
    gaussian, cov = _gaussian_for(metric, 6, rng)
    fn = self.variant(functools.partial(geometry.pairwise, metric=metric))
    got = fn(x, y, gaussian=gaussian)
    self.assertEqual(got.shape, (5, 7))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, _ref_pairwise(metric, x, y, cov), rtol=1e-4, atol=1e-4)

  @parameterized.parameters(
      (geometry.manhattan_distance, "manhattan"),
      (geometry.euclidean_distance, "euclidean"),
      (geometry.squared_euclidean_distance, "sqeuclidean"),
      (geometry.cosine_similarity, "cosine"),
      (geometry.geodesic_distance, "geodesic"),
      (geometry.negative_arc_length, "negative_arc_length"),
  )
  def test_named_functions_match_reference(self, fn, metric):
    rng = np.random.default_rng(1)
    x = 3.0 * rng.normal(size=(4, 3)).astype(np.float32)
    y = 3.0 * rng.normal(size=(6, 3)).astype(np.float32)
    np.testing.assert_allclose(fn(x, y), _ref_pairwise(metric, x, y), rtol=1e-4, atol=1e-4)

  @parameterized.parameters(jnp.bool_, jnp.uint8, jnp.int32)
  def test_hamming_on_codes(self, dtype):
    a = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    b = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    expected = np.array([[0, 2, 3], [3, 5, 2]])
    got = geometry.hamming_distance(a.astype(dtype), b.astype(dtype))
    np.testing.assert_array_equal(got, expected)

  def test_binarize_is_sign(self):
    x = np.array([[-1.0, 0.0, 2.0, 1e-9]])
    np.testing.assert_array_equal(geometry.binarize(x), [[0, 0, 1, 1]])
    self.assertEqual(geometry.binarize(x).dtype, jnp.uint8)

  def test_hamming_through_pairwise_binarizes(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 9)).astype(np.float32)
    y = rng.normal(size=(3, 9)).astype(np.float32)
    np.testing.assert_array_equal(
        geometry.pairwise(x, y, metric="hamming"),
        geometry.hamming_distance(geometry.binarize(x), geometry.binarize(y)))

  def test_l2_normalize(self):
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
    got = geometry.l2_normalize(x)
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(geometry.l2_normalize(v) * jnp.arange(2.0)))(x)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_allclose(grad[1], [0.0, 1e8], rtol=1e-6)  # x / eps near 0: slope 1 / eps
    self.assertEqual(geometry.l2_normalize(x.astype(jnp.bfloat16)).dtype, jnp.bfloat16)
    np.testing.assert_allclose(geometry.l2_normalize(x.T, axis=0), got.T, rtol=1e-6)

  def test_zero_vector_similarity_is_finite(self):
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(geometry.cosine_similarity(x, x), [[0.0, 0.0], [0.0, 1.0]],
                               atol=1e-6)
    np.testing.assert_allclose(geometry.geodesic_distance(x, x)[0], [np.pi / 2] * 2, atol=1e-6)

  @parameterized.parameters(*[m for m in geometry.METRICS if m != "mahalanobis"])
  def test_bfloat16_accumulates_in_float32(self, metric):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 64)), jnp.bfloat16)
    y = jnp.asarray(rng.normal(size=(5, 64)), jnp.bfloat16)
    got = _pairwise(x, y, metric=metric)
    self.assertEqual(got.dtype, jnp.float32)
    expected = _ref_pairwise(metric, np.asarray(x, np.float32), np.asarray(y, np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

  def test_is_similarity(self):
    self.assertEqual({m for m in geometry.METRICS if geometry.is_similarity(m)},
                     {"cosine", "negative_arc_length"})
    with self.assertRaisesRegex(ValueError, "euclidean"):
      geometry.is_similarity("l2")


class GradientTest(parameterized.TestCase):

  @parameterized.parameters(*_SMOOTH)
  def test_check_grads(self, metric):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    y = rng.normal(size=(2, 4)).astype(np.float32)
    gaussian, _ = _gaussian_for(metric, 4, rng)
    weights = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    fn = jax.jit(lambda a, b: jnp.sum(weights * geometry.pairwise(a, b, metric=metric,
                                                                 gaussian=gaussian)))
    check_grads(fn, (x, y), order=1, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2)

  @parameterized.parameters(
      "euclidean", "sqeuclidean", "cosine", "geodesic", "negative_arc_length", "mahalanobis")
  def test_finite_gradient_at_identical_and_antipodal(self, metric):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    gaussian, _ = _gaussian_for(metric, 4, rng)
    fn = lambda a, b: jnp.sum(geometry.pairwise(a, b, metric=metric, gaussian=gaussian))
    grad_both = jax.jit(jax.grad(fn, argnums=(0, 1)))
    grad_diag = jax.jit(jax.grad(
        lambda a, sign: jnp.sum(jnp.diag(
            geometry.pairwise(a, sign * a, metric=metric, gaussian=gaussian)))))
    for sign in (1.0, -1.0):
      gx, gy = grad_both(x, sign * x)
      self.assertTrue(np.all(np.isfinite(gx)) and np.all(np.isfinite(gy)), (sign, gx, gy))
      g = grad_diag(x, sign)
      self.assertTrue(np.all(np.isfinite(g)), (sign, g))
      if metric in ("geodesic", "negative_arc_length", "cosine") or sign > 0:
        # Each diagonal term is at a stationary point or a kink: the gradient chosen there is 0.
        np.testing.assert_allclose(g, 0.0, atol=1e-2, err_msg=f"sign={sign}")

  def test_geodesic_gradient_exact_away_from_poles(self):
    # d angle / dx for x = (cos t, sin t), y = (1, 0) is (-sin t, cos t) . (d t / dx) -> |grad| = 1.
    y = jnp.array([[1.0, 0.0]], jnp.float32)
    grad = jax.jit(jax.grad(lambda a: geometry.geodesic_distance(a, y)[0, 0]))
    for t in (1e-2, 0.5, 3.0):
      g = grad(jnp.array([[np.cos(t), np.sin(t)]], jnp.float32))
      np.testing.assert_allclose(g[0], [-np.sin(t), np.cos(t)], atol=2e-3)


# ----------------------------------------------------------------------------------------------
# Metric axioms (hypothesis over values; shapes fixed so each function compiles once).

_POINTS = hnp.arrays(
    np.float32, (3, 4),
    elements=st.floats(-10, 10, width=32, allow_nan=False, allow_subnormal=False))


def _tolerance(metric, points):
  scale = 1.0 + float(np.max(np.linalg.norm(points, axis=-1)))
  return {"hamming": 0.0, "manhattan": 1e-5 * scale * 4, "euclidean": 3e-3 * scale,
          "geodesic": 2e-3}[metric]


class AxiomTest(parameterized.TestCase):

  @parameterized.parameters("hamming", "manhattan", "euclidean", "geodesic")
  @hypothesis.given(points=_POINTS)
  @_HYPOTHESIS
  def test_metric_axioms(self, metric, points):
    dist = np.asarray(_pairwise(points, points, metric=metric), np.float64)
    tol = _tolerance(metric, points)
    self.assertTrue(np.all(dist >= 0.0), dist)
    np.testing.assert_allclose(dist, dist.T, atol=tol + 1e-6)
    # Identity of indiscernibles; the geodesic distance is only defined for non-zero vectors.
    nonzero = np.linalg.norm(points, axis=-1) > 1e-3 if metric == "geodesic" else np.ones(3, bool)
    np.testing.assert_array_less(np.diag(dist)[nonzero], tol + 1e-6)
    for i in range(3):
      for j in range(3):
        for k in range(3):
          self.assertLessEqual(dist[i, k], dist[i, j] + dist[j, k] + 2 * tol + 1e-6)

  @hypothesis.given(points=_POINTS, other=_POINTS)
  @_HYPOTHESIS
  def test_similarity_ranges(self, points, other):
    cos = np.asarray(_pairwise(points, other, metric="cosine"))
    nal = np.asarray(_pairwise(points, other, metric="negative_arc_length"))
    self.assertTrue(np.all((cos >= -1.0) & (cos <= 1.0)), cos)
    self.assertTrue(np.all((nal >= 0.0) & (nal <= 1.0)), nal)
    # negative_arc_length is a decreasing function of the angle, so it orders pairs like cosine.
    np.testing.assert_allclose(nal, 1.0 - np.arccos(cos) / np.pi, atol=1e-6)

  def test_antipodal_extremes(self):
    # In float32 the cosine resolves angles near 0 and pi only to ~5e-4 rad.
    x = np.array([[1.0, 2.0, -3.0]], np.float32)
    np.testing.assert_allclose(geometry.geodesic_distance(x, -x), [[np.pi]], atol=1e-3)
    np.testing.assert_allclose(geometry.negative_arc_length(x, -x), [[0.0]], atol=1e-3)
    np.testing.assert_allclose(geometry.negative_arc_length(x, 2 * x), [[1.0]], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Mahalanobis.


class MahalanobisTest(chex.TestCase):

  def test_identity_covariance_is_euclidean(self):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.normal(size=(4, 3)).astype(np.float32)
    mu = rng.normal(size=(3,)).astype(np.float32)
    gaussian = geometry.make_gaussian(mu, np.eye(3))
    np.testing.assert_allclose(geometry.mahalanobis_pairwise(x, y, gaussian),
                               geometry.euclidean_distance(x, y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_mahalanobis(x, gaussian),
                               np.linalg.norm(x - mu, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(_mahalanobis(x, gaussian, squared=True),
                               np.sum((x - mu) ** 2, axis=-1), rtol=1e-5)

  @parameterized.parameters((0.0, 0.0), (0.3, 1e-3), (1.0, 0.0))
  def test_fit_matches_numpy(self, shrinkage, ridge):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4)) + 3.0
    gaussian = _fit(_stats(x.astype(np.float32)), shrinkage=shrinkage, ridge=ridge)
    mean, cov = _ref_tied_gaussian(x, np.zeros(50, int), 1)
    cov = (1 - shrinkage) * cov + (shrinkage * np.trace(cov) / 4 + ridge) * np.eye(4)
    np.testing.assert_allclose(gaussian.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gaussian.covariance, cov, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gaussian.cholesky @ gaussian.cholesky.T, cov, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.triu(gaussian.cholesky, 1), 0.0)

  @chex.variants(with_jit=True)
  def test_class_conditional_matches_numpy(self):
    rng = np.random.default_rng(8)
    num_classes, d = 4, 3
    labels = rng.integers(0, num_classes - 1, size=60)  # the last class stays empty
    centres = 4.0 * rng.normal(size=(num_classes, d))
    x = (centres[labels] + rng.normal(size=(60, d)) @ rng.normal(size=(d, d))).astype(np.float32)
    queries = (3.0 * rng.normal(size=(9, d))).astype(np.float32)

    fit = self.variant(lambda v, y: geometry.fit_gaussian(
        geometry.gaussian_stats(v, y, num_classes=num_classes), ridge=0.0))
    gaussian = fit(x, labels)
    means, cov = _ref_tied_gaussian(x, labels, num_classes)
    precision = np.linalg.inv(cov)
    expected = np.full((9, num_classes), np.inf)
    for i in range(9):
      for c in range(num_classes - 1):
        diff = queries[i] - means[c]
        expected[i, c] = np.sqrt(diff @ precision @ diff)
    np.testing.assert_array_equal(gaussian.count, np.bincount(labels, minlength=num_classes))
    np.testing.assert_allclose(gaussian.covariance, cov, rtol=1e-4, atol=1e-5)
    got = self.variant(geometry.mahalanobis_to_classes)(queries, gaussian)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(self.variant(geometry.mahalanobis_distance)(queries, gaussian),
                               expected.min(axis=1), rtol=1e-4)

  def test_streaming_merge_equals_whole(self):
    rng = np.random.default_rng(9)
    # A large offset: raw-moment formulas lose everything here in float32; mean/scatter do not.
    x = (1000.0 + rng.normal(size=(40, 3))).astype(np.float32)
    labels = rng.integers(0, 3, size=40)
    labels[:7] = 0  # the first batch holds only class 0
    whole = _stats(x, labels, num_classes=3)
    parts = [_stats(x[a:b], labels[a:b], num_classes=3) for a, b in ((0, 7), (7, 20), (20, 40))]
    merged = functools.reduce(_merge, parts)
    merged_reversed = functools.reduce(_merge, parts[::-1])
    for stats in (merged, merged_reversed):
      np.testing.assert_array_equal(stats.count, whole.count)
      np.testing.assert_allclose(stats.mean, whole.mean, rtol=1e-6)
      np.testing.assert_allclose(stats.scatter, whole.scatter, rtol=1e-3, atol=1e-2)
    _, cov = _ref_tied_gaussian(x.astype(np.float64), labels, 3)
    np.testing.assert_allclose(_fit(merged, ridge=0.0).covariance, cov,
                               rtol=1e-3, atol=1e-3)

  def test_padding_labels_are_ignored(self):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(10, 2)).astype(np.float32)
    labels = np.array([0, 1] * 5)
    padded = _stats(np.concatenate([x, 99 * np.ones((3, 2), np.float32)]),
                    np.concatenate([labels, [-1, -1, 2]]), num_classes=2)
    plain = _stats(x, labels, num_classes=2)
    chex.assert_trees_all_close(padded, plain, rtol=1e-6, atol=1e-6)

  def test_psum_stats_over_eight_devices(self):
    mesh = parallel.make_mesh()
    self.assertEqual(mesh.devices.size, 8)
    rng = np.random.default_rng(11)
    x = (5.0 + rng.normal(size=(64, 3))).astype(np.float32)
    labels = rng.integers(0, 3, size=64).astype(np.int32)
    labels[:8] = 1  # device 0 sees a single class

    def per_device(xs, ys):
      return geometry.psum_stats(geometry.gaussian_stats(xs, ys, num_classes=3), parallel.AXIS)

    fn = jax.jit(parallel.sharded(per_device, mesh, in_specs=(P(parallel.AXIS), P(parallel.AXIS)),
                                  out_specs=P()))
    sharding = parallel.batch_sharded(mesh)
    got = fn(jax.device_put(x, sharding), jax.device_put(labels, sharding))
    expected = _stats(x, labels, num_classes=3)
    np.testing.assert_array_equal(got.count, expected.count)
    np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-6)
    np.testing.assert_allclose(got.scatter, expected.scatter, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(jax.jit(geometry.psum_stats, static_argnums=1)(expected, None),
                                expected)

  def test_out_of_distribution_point(self):
    # A strongly correlated 2-D Gaussian: (2, -2) is off the principal axis, (3, 3) is on it.
    rng = np.random.default_rng(12)
    cov = np.array([[1.0, 0.95], [0.95, 1.0]])
    x = rng.multivariate_normal(np.zeros(2), cov, size=2000).astype(np.float32)
    gaussian = _fit(_stats(x))
    ood, on_axis = np.array([[2.0, -2.0]], np.float32), np.array([[3.0, 3.0]], np.float32)
    self.assertLess(np.linalg.norm(ood), np.linalg.norm(on_axis))
    self.assertGreater(np.linalg.norm(ood), np.median(np.linalg.norm(x, axis=1)))
    m_ood, m_axis = np.asarray(_mahalanobis(np.concatenate([ood, on_axis]), gaussian))
    self.assertGreater(m_ood, 8.0)  # sqrt(8 / 0.05) = 12.6 in theory
    self.assertLess(m_axis, 4.0)  # sqrt(18 / 1.95) = 3.04 in theory
    # On the training set, the OOD point is further out than every sample.
    self.assertGreater(m_ood, float(jnp.max(_mahalanobis(x, gaussian))))


# ----------------------------------------------------------------------------------------------
# Nearest neighbours.


class TopKTest(chex.TestCase):

  @parameterized.parameters(*geometry.METRICS)
  def test_every_metric_matches_brute_force(self, metric):
    self._check(metric, block_size=8, k=5)  # 8 does not divide N = 28: a padded last block

  @parameterized.product(
      metric=("euclidean", "hamming"),
      block_size=(4, 64),  # divides N = 28; larger than N
      k=(1, 28))
  def test_block_sizes_and_k(self, metric, block_size, k):
    self._check(metric, block_size, k)

  def test_eager(self):
    self._check("cosine", block_size=3, k=4, fn=geometry.top_k)

  def _check(self, metric, block_size, k, fn=_top_k):
    rng = np.random.default_rng(13)
    queries = rng.normal(size=(6, 5)).astype(np.float32)
    keys = rng.normal(size=(28, 5)).astype(np.float32)
    if metric == "hamming":
      keys[3] = keys[17]  # an exact tie: the lower index must come first
    gaussian, cov = _gaussian_for(metric, 5, rng)
    values, indices = fn(queries, keys, metric=metric, k=k, block_size=block_size,
                         gaussian=gaussian)
    self.assertEqual(values.shape, (6, k))
    self.assertEqual(indices.shape, (6, k))

    full = _ref_pairwise(metric, queries, keys, cov)
    sign = -1.0 if geometry.is_similarity(metric) else 1.0
    order = np.argsort(sign * full, axis=1, kind="stable")[:, :k]
    expected_values = np.take_along_axis(full, order, axis=1)
    np.testing.assert_allclose(values, expected_values, rtol=1e-4, atol=1e-4)
    # The returned indices are real neighbours: their reference values are the returned values.
    np.testing.assert_allclose(np.take_along_axis(full, np.asarray(indices), axis=1), values,
                               rtol=1e-4, atol=1e-4)
    for row in np.asarray(indices):
      self.assertEqual(len(set(row.tolist())), k)
    if metric == "hamming":
      np.testing.assert_array_equal(indices, order)  # integer values: ties in index order

  def test_values_agree_with_pairwise(self):
    rng = np.random.default_rng(14)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    keys = rng.normal(size=(10, 4)).astype(np.float32)
    for metric in ("geodesic", "negative_arc_length"):  # ranked by cosine, mapped afterwards
      values, indices = _top_k(q, keys, metric=metric, k=4, block_size=3)
      full = _pairwise(q, keys, metric=metric)
      np.testing.assert_allclose(values, np.take_along_axis(full, indices, axis=1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input.

_X = np.ones((4, 3), np.float32)
_Y = np.ones((5, 3), np.float32)
_GAUSSIAN = geometry.make_gaussian(np.zeros(3), np.eye(3))
_STATS = geometry.gaussian_stats(_X)


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("rank_x", lambda: geometry.euclidean_distance(_X[0], _Y), "x must have shape"),
      ("rank_y", lambda: geometry.cosine_similarity(_X, _Y[None]), "y must have shape"),
      ("dims", lambda: geometry.manhattan_distance(_X, _Y[:, :2]), "x and y must have the same"),
      ("dims_pairwise", lambda: geometry.pairwise(_X, _Y[:, :2], metric="geodesic"), r"y\.shape"),
      ("hamming_floats", lambda: geometry.hamming_distance(_X, _Y), "binarize"),
      ("unknown_metric", lambda: geometry.pairwise(_X, _Y, metric="l3"),
       "hamming, manhattan, euclidean, sqeuclidean, cosine, geodesic, negative_arc_length, "
       "mahalanobis"),
      ("missing_gaussian", lambda: geometry.pairwise(_X, _Y, metric="mahalanobis"), "gaussian"),
      ("stray_gaussian", lambda: geometry.pairwise(_X, _Y, metric="cosine", gaussian=_GAUSSIAN),
       "gaussian"),
      ("k_too_large", lambda: geometry.top_k(_X, _Y, metric="cosine", k=6), "k must be"),
      ("k_zero", lambda: geometry.top_k(_X, _Y, metric="cosine", k=0), "k must be"),
      ("block_size", lambda: geometry.top_k(_X, _Y, metric="cosine", k=1, block_size=0),
       "block_size"),
      ("top_k_dims", lambda: geometry.top_k(_X, _Y[:, :2], metric="cosine", k=1),
       "queries and keys"),
      ("top_k_rank", lambda: geometry.top_k(_X[0], _Y, metric="cosine", k=1), "queries must"),
      ("negative_shrinkage", lambda: geometry.fit_gaussian(_STATS, shrinkage=-0.1), "shrinkage"),
      ("shrinkage_above_one", lambda: geometry.fit_gaussian(_STATS, shrinkage=1.5), "shrinkage"),
      ("negative_ridge", lambda: geometry.fit_gaussian(_STATS, ridge=-1.0), "ridge"),
      ("negative_eps", lambda: geometry.l2_normalize(_X, eps=-1.0), "eps"),
      ("labels_shape", lambda: geometry.gaussian_stats(_X, np.zeros(3, int), num_classes=2),
       "labels"),
      ("labels_float", lambda: geometry.gaussian_stats(_X, np.zeros(4), num_classes=2), "labels"),
      ("no_num_classes", lambda: geometry.gaussian_stats(_X, np.zeros(4, int)), "num_classes"),
      ("stats_rank", lambda: geometry.gaussian_stats(_X[0]), "x must have shape"),
      ("merge_mismatch", lambda: geometry.merge_stats(
          _STATS, geometry.gaussian_stats(_X, np.zeros(4, int), num_classes=2)), "stats a and b"),
      ("mahalanobis_dims", lambda: geometry.mahalanobis_distance(_X[:, :2], _GAUSSIAN), "x has"),
      ("mahalanobis_not_gaussian", lambda: geometry.mahalanobis_distance(_X, _STATS), "gaussian"),
      ("covariance_shape", lambda: geometry.make_gaussian(np.zeros(3), np.eye(2)), "covariance"),
  )
  def test_raises(self, call, message):
    with self.assertRaisesRegex(ValueError, message):
      call()

  def test_raises_at_trace_time(self):
    fn = jax.jit(functools.partial(geometry.top_k, metric="euclidean", k=9))
    with self.assertRaisesRegex(ValueError, "k must be"):
      fn(_X, _Y)


if __name__ == "__main__":
  absltest.main()
