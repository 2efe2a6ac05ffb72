"""Non-finite embeddings (NaN, +-inf) never give a confident answer (issue 23, item 3).

Each measure: a pair with a non-finite row is NaN in `pairwise`, and `top_k` never ranks a
non-finite key; slots it cannot fill are index -1 at the worst value, and a non-finite query is
-1 / NaN throughout. The Mahalanobis fit refuses non-finite rows.
"""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from embedspace import geometry

_pairwise = jax.jit(geometry.pairwise, static_argnames="metric")
_top_k = jax.jit(geometry.top_k, static_argnames=("metric", "k", "block_size"))
_stats = jax.jit(geometry.gaussian_stats, static_argnames="num_classes")

_NONFINITE_QUERIES = (1, 3)
_NONFINITE_KEYS = (2, 5, 7)


def _data() -> tuple[np.ndarray, np.ndarray]:
  """Queries `[4, 3]` and keys `[9, 3]`, some rows NaN, +inf or -inf in one coordinate."""
  rng = np.random.default_rng(23)
  queries = rng.normal(size=(4, 3)).astype(np.float32)
  keys = rng.normal(size=(9, 3)).astype(np.float32)
  queries[1] = np.nan
  queries[3, 0] = np.inf
  keys[2] = np.nan
  keys[5, 1] = np.inf
  keys[7, 0] = -np.inf
  return queries, keys


def _gaussian(metric: str) -> geometry.Gaussian | None:
  if metric != "mahalanobis":
    return None
  a = np.random.default_rng(3).normal(size=(3, 3))
  return geometry.make_gaussian(np.zeros(3), a @ a.T / 3 + 0.5 * np.eye(3))


class NonFiniteTest(parameterized.TestCase):

  def _check(self, metric: str) -> None:
    """pairwise: NaN exactly on non-finite pairs; top_k: finite keys only, -1 for the rest."""
    queries, keys = _data()
    gaussian = _gaussian(metric)
    good_q = [i for i in range(len(queries)) if i not in _NONFINITE_QUERIES]
    good_k = [j for j in range(len(keys)) if j not in _NONFINITE_KEYS]
    finite_part = np.asarray(_pairwise(queries[good_q], keys[good_k], metric=metric,
                                       gaussian=gaussian))
    for fn in (geometry.pairwise, _pairwise):
      full = np.asarray(fn(queries, keys, metric=metric, gaussian=gaussian))
      self.assertTrue(np.all(np.isnan(full[list(_NONFINITE_QUERIES)])), (metric, full))
      self.assertTrue(np.all(np.isnan(full[:, list(_NONFINITE_KEYS)])), (metric, full))
      np.testing.assert_allclose(full[np.ix_(good_q, good_k)], finite_part, rtol=1e-6)

    sign = -1.0 if geometry.is_similarity(metric) else 1.0
    worst = -np.inf if geometry.is_similarity(metric) else np.inf
    order = np.asarray(good_k)[np.argsort(sign * finite_part, axis=1, kind="stable")]
    for k, block_size in ((9, 4), (3, 2), (9, 64)):
      values, indices = _top_k(queries, keys, metric=metric, k=k, block_size=block_size,
                               gaussian=gaussian)
      values, indices = np.asarray(values), np.asarray(indices)
      found = min(k, len(good_k))
      np.testing.assert_array_equal(indices[good_q, :found], order[:, :found], err_msg=metric)
      np.testing.assert_allclose(
          values[good_q, :found], np.take_along_axis(finite_part, np.argsort(
              sign * finite_part, axis=1, kind="stable"), axis=1)[:, :found], rtol=1e-4,
          atol=1e-5)
      np.testing.assert_array_equal(indices[good_q, found:], -1, err_msg=metric)
      np.testing.assert_array_equal(values[good_q, found:], worst, err_msg=metric)
      np.testing.assert_array_equal(indices[list(_NONFINITE_QUERIES)], -1, err_msg=metric)
      self.assertTrue(np.all(np.isnan(values[list(_NONFINITE_QUERIES)])), (metric, values))

  def test_hamming(self):
    # Was: binarize(NaN) = 0, so a NaN row was the all-zero code at a finite distance.
    self._check("hamming")
    nan_row = np.full((1, 4), np.nan, np.float32)
    self.assertTrue(np.isnan(geometry.pairwise(nan_row, nan_row, metric="hamming"))[0, 0])

  def test_manhattan(self):
    # Was: an infinite coordinate gave distance inf (a far point), not NaN.
    self._check("manhattan")

  def test_euclidean(self):
    # Was: the safe square root mapped NaN to 0, so a NaN key was at distance 0 from everything.
    self._check("euclidean")
    x = np.array([[np.nan, 0.0]], np.float32)
    self.assertTrue(np.isnan(geometry.euclidean_distance(x, np.zeros((1, 2), np.float32)))[0, 0])

  def test_sqeuclidean(self):
    # Was: an infinite coordinate gave inf or NaN depending on signs.
    self._check("sqeuclidean")

  def test_cosine(self):
    # Was: lax.top_k puts NaN above every number, so a NaN key ranked first.
    self._check("cosine")

  def test_geodesic(self):
    # Was: ranked by the cosine, so a NaN key ranked first (at distance NaN).
    self._check("geodesic")

  def test_negative_arc_length(self):
    self._check("negative_arc_length")

  def test_mahalanobis(self):
    self._check("mahalanobis")
    queries, _ = _data()
    gaussian = _gaussian("mahalanobis")
    for fn in (geometry.mahalanobis_distance, geometry.mahalanobis_to_classes):
      d = np.asarray(fn(queries, gaussian))
      self.assertTrue(np.all(np.isnan(d[list(_NONFINITE_QUERIES)])))
      self.assertTrue(np.all(np.isfinite(d[[0, 2]])))

  def test_mahalanobis_fit_refuses_nonfinite_rows(self):
    # Was: one NaN row made the whole fit NaN, and every search under it returned -1 at inf.
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    x[4] = np.nan
    x[11, 2] = np.inf
    with self.assertRaisesRegex(ValueError, "2 of 20 rows of x are not finite"):
      geometry.gaussian_stats(x)
    with self.assertRaisesRegex(ValueError, "2 of 20 rows"):
      geometry.gaussian_stats(x, np.arange(20) % 2, num_classes=2)
    # Under jit gaussian_stats cannot raise: the statistics turn NaN and the (eager) fit refuses.
    stats = _stats(jnp.asarray(x))
    self.assertFalse(np.all(np.isfinite(stats.scatter)))
    with self.assertRaisesRegex(ValueError, "not finite"):
      geometry.fit_gaussian(stats)
    # Rows with an ignored label (padding) are not counted and do not reach the statistics.
    labels = np.where(np.arange(20) % 2 == 0, 0, 1)
    labels[[4, 11]] = -1
    keep = labels >= 0
    for fn in (geometry.gaussian_stats, _stats):
      padded = fn(x, labels, num_classes=2)
      clean = geometry.gaussian_stats(x[keep], labels[keep], num_classes=2)
      for a, b in zip(padded, clean):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class PolicyTest(absltest.TestCase):

  def test_finite_rows(self):
    x = np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, -np.inf], [1e38, -1e38]], np.float32)
    np.testing.assert_array_equal(geometry.finite_rows(x), [True, False, False, True])
    np.testing.assert_array_equal(jax.jit(geometry.finite_rows)(x), [True, False, False, True])
    np.testing.assert_array_equal(geometry.finite_rows(np.ones((2, 3), np.int32)), [True, True])
    self.assertEqual(geometry.finite_rows(np.zeros((0, 3), np.float32)).shape, (0,))

  def test_euclidean_gradient_stays_safe(self):
    # The square root keeps NaN, but its gradient at distance 0 is still 0, not NaN.
    x = jnp.ones((1, 3))
    grad = jax.grad(lambda v: jnp.sum(geometry.euclidean_distance(v, x)))(x)
    np.testing.assert_array_equal(grad, 0.0)

  def test_no_finite_keys(self):
    _, keys = _data()
    queries = np.zeros((2, 3), np.float32)
    values, indices = _top_k(queries, keys[list(_NONFINITE_KEYS)], metric="euclidean", k=2,
                             block_size=2)
    np.testing.assert_array_equal(indices, -1)
    np.testing.assert_array_equal(values, np.inf)


if __name__ == "__main__":
  absltest.main()
