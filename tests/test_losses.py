"""Single-device tests of embedspace.losses against float64 NumPy written from the papers.

The references below are deliberately naive (explicit loops over anchors, pairs and dimensions)
so they share no code or vectorisation trick with the implementation.
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized

from embedspace import losses

# ----------------------------------------------------------------------------------------------
# NumPy references (float64).


def _unit(v):
  return v / np.linalg.norm(v)


def _cos(u, v):
  return float(np.dot(_unit(u), _unit(v)))


def _neg_arc(u, v):
  return 1.0 - math.acos(min(1.0, max(-1.0, _cos(u, v)))) / math.pi


def np_info_nce(z1, z2, temperature, similarity="cosine"):
  sim = _cos if similarity == "cosine" else _neg_arc
  n = len(z1)
  views = list(z1) + list(z2)
  total = 0.0
  for k in range(2 * n):
    positive = k + n if k < n else k - n
    logits = {j: sim(views[k], views[j]) / temperature for j in range(2 * n) if j != k}
    log_denominator = math.log(sum(math.exp(v) for v in logits.values()))
    total += -(logits[positive] - log_denominator)
  return total / (2 * n)


def np_clip(a, b, logit_scale):
  scale = min(math.exp(logit_scale), 100.0)
  n = len(a)

  def one_way(x, y):
    loss = 0.0
    for i in range(n):
      logits = [scale * _cos(x[i], y[j]) for j in range(n)]
      loss += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return loss / n

  return (one_way(a, b) + one_way(b, a)) / 2


def _np_cov(z):
  n, d = z.shape
  mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
  cov = np.zeros((d, d))
  for j in range(d):
    for k in range(d):
      cov[j, k] = sum((z[i, j] - mean[j]) * (z[i, k] - mean[k]) for i in range(n)) / (n - 1)
  return cov


def np_vicreg(z1, z2, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
  n, d = z1.shape
  invariance = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
  variance = 0.0
  covariance = 0.0
  for z in (z1, z2):
    cov = _np_cov(z)
    variance += sum(max(0.0, 1.0 - math.sqrt(cov[j, j] + eps)) for j in range(d)) / d / 2
    covariance += sum(cov[j, k] ** 2 for j in range(d) for k in range(d) if j != k) / d
  total = lam * invariance + mu * variance + nu * covariance
  return total, dict(invariance=invariance, variance=variance, covariance=covariance)


def _np_standardize(z, eps):
  n, d = z.shape
  out = np.zeros_like(z)
  for j in range(d):
    col = z[:, j]
    mean = col.sum() / n
    var = ((col - mean) ** 2).sum() / n  # biased, as BatchNorm normalises
    out[:, j] = (col - mean) / math.sqrt(var + eps)
  return out


def np_cross_correlation(x, y, eps=1e-5):
  xs, ys = _np_standardize(x, eps), _np_standardize(y, eps)
  n, d = x.shape
  c = np.zeros((d, d))
  for i in range(d):
    for j in range(d):
      c[i, j] = sum(xs[b, i] * ys[b, j] for b in range(n)) / n
  return c


def _np_bt_terms(c, target):
  d = c.shape[0]
  on = sum((c[i, i] - target) ** 2 for i in range(d))
  off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
  return on, off


def np_barlow(z1, z2, lam=5e-3, eps=1e-5):
  on, off = _np_bt_terms(np_cross_correlation(z1, z2, eps), 1.0)
  return on + lam * off, dict(on_diagonal=on, off_diagonal=off)


def np_decur(z1a, z2a, z1b, z2b, k, lam=5.1e-3, eps=1e-5):
  def bt(c, target):
    on, off = _np_bt_terms(c, target)
    return on + lam * off

  cross = np_cross_correlation(z1a, z1b, eps)
  terms = dict(
      intra_a=bt(np_cross_correlation(z1a, z2a, eps), 1.0),
      intra_b=bt(np_cross_correlation(z1b, z2b, eps), 1.0),
      common=bt(cross[:k, :k], 1.0),
      unique=bt(cross[k:, k:], 0.0))
  total = (terms["intra_a"] + terms["intra_b"] + (terms["common"] + terms["unique"]) / 2) / 3
  return total, terms


def np_alignment(z1, z2, alpha=2.0):
  return float(np.mean([np.linalg.norm(_unit(a) - _unit(b)) ** alpha for a, b in zip(z1, z2)]))


def np_uniformity(z, t=2.0):
  u = [_unit(v) for v in z]
  values = [math.exp(-t * np.sum((u[i] - u[j]) ** 2))
            for i in range(len(u)) for j in range(len(u)) if i != j]
  return math.log(sum(values) / len(values))


def np_effective_rank(z):
  centred = z - z.mean(axis=0)
  sigma = np.linalg.svd(centred, compute_uv=False)
  p = sigma / sigma.sum()
  p = p[p > 0]
  return math.exp(-np.sum(p * np.log(p)))


def np_embedding_std(z):
  u = np.stack([_unit(v) for v in z])
  return float(np.mean(np.std(u, axis=0)))


def np_geodesic(z1, z2):
  n = len(z1)
  pos = sum(math.acos(np.clip(_cos(z1[i], z2[i]), -1, 1)) for i in range(n)) / n
  neg = sum(math.acos(np.clip(_cos(z1[i], z2[j]), -1, 1))
            for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  return pos, neg


# ----------------------------------------------------------------------------------------------
# Helpers.


def _randn(seed, *shape):
  return np.random.RandomState(seed).randn(*shape)


def _f32(*arrays):
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _jit(fn, **hyperparameters):
  """`fn` with its keyword hyperparameters bound, compiled as one program (eager op-by-op
  dispatch compiles every primitive separately and is several times slower here)."""
  return jax.jit(functools.partial(fn, **hyperparameters))


def _pair(seed, n, d, noise=0.5):
  """Two correlated views, float64 NumPy."""
  z1 = _randn(seed, n, d)
  return z1, z1 + noise * _randn(seed + 1, n, d)


# Every loss / metric as f(*arrays) -> scalar (jitted: one compilation per shape instead of one
# per eager op), with its NumPy reference and its number of inputs.
SCALAR_FNS = {
    "info_nce": (lambda a, b: losses.info_nce(a, b, temperature=0.2),
                 lambda a, b: np_info_nce(a, b, 0.2), 2),
    "info_nce_arc": (lambda a, b: losses.info_nce(a, b, temperature=0.2, similarity="arc_length"),
                     lambda a, b: np_info_nce(a, b, 0.2, "arc_length"), 2),
    "clip": (lambda a, b: losses.clip_loss(a, b, logit_scale=losses.CLIP_LOGIT_SCALE_INIT),
             lambda a, b: np_clip(a, b, math.log(1 / 0.07)), 2),
    "vicreg": (lambda a, b: losses.vicreg_loss(a, b)[0], lambda a, b: np_vicreg(a, b)[0], 2),
    "barlow": (lambda a, b: losses.barlow_twins_loss(a, b)[0], lambda a, b: np_barlow(a, b)[0], 2),
    "decur": (lambda a, b, c, e: losses.decur_loss(a, b, c, e, num_common=3)[0],
              lambda a, b, c, e: np_decur(a, b, c, e, 3)[0], 4),
    "alignment": (lambda a, b: losses.alignment(a, b), np_alignment, 2),
    "uniformity": (lambda a: losses.uniformity(a), np_uniformity, 1),
    "effective_rank": (lambda a: losses.effective_rank(a), np_effective_rank, 1),
    "embedding_std": (lambda a: losses.embedding_std(a), np_embedding_std, 1),
    "geodesic": (lambda a, b: sum(losses.positive_negative_geodesic(a, b)),
                 lambda a, b: sum(np_geodesic(a, b)), 2),
}
SCALAR_FNS = {k: (jax.jit(fn), ref, num) for k, (fn, ref, num) in SCALAR_FNS.items()}
NAMES = [(k, k) for k in sorted(SCALAR_FNS)]


def _inputs(num, seed, n, d):
  base = _randn(seed, n, d)
  return tuple(base + 0.7 * _randn(seed + 10 + i, n, d) for i in range(num))


# ----------------------------------------------------------------------------------------------
# Values against the references.


class ValueTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{name}_{n}x{d}", name, (n, d)) for name in sorted(SCALAR_FNS) for n, d in [(6, 5), (9, 4)])
  def test_matches_numpy(self, name, shape):
    fn, ref, num = SCALAR_FNS[name]
    xs = _inputs(num, seed=3, n=shape[0], d=shape[1])
    np.testing.assert_allclose(fn(*_f32(*xs)), ref(*xs), rtol=2e-5, atol=2e-5)

  def test_info_nce_matches_optax_ntxent(self):
    z1, z2 = _pair(0, 7, 5)
    labels = jnp.concatenate([jnp.arange(7), jnp.arange(7)])
    expected = jax.jit(optax.losses.ntxent)(jnp.concatenate(_f32(z1, z2)), labels, 0.3)
    np.testing.assert_allclose(_jit(losses.info_nce, temperature=0.3)(*_f32(z1, z2)), expected,
                               rtol=1e-5)

  @parameterized.parameters(("vicreg", np_vicreg), ("barlow", np_barlow))
  def test_redundancy_terms(self, name, ref):
    z1, z2 = _pair(1, 10, 4)
    fn = jax.jit(losses.vicreg_loss if name == "vicreg" else losses.barlow_twins_loss)
    total, terms = fn(*_f32(z1, z2))
    ref_total, ref_terms = ref(z1, z2)
    np.testing.assert_allclose(total, ref_total, rtol=2e-5)
    chex.assert_trees_all_close(terms, ref_terms, rtol=2e-5, atol=1e-6)

  def test_vicreg_weights_and_eps(self):
    z1, z2 = _pair(2, 8, 3, noise=0.1)
    z1, z2 = 0.3 * z1, 0.3 * z2  # std < 1: the variance hinge is active
    kwargs = dict(invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5, eps=1e-2)
    total, terms = _jit(losses.vicreg_loss, **kwargs)(*_f32(z1, z2))
    ref_total, ref_terms = np_vicreg(z1, z2, 2.0, 3.0, 0.5, 1e-2)
    np.testing.assert_allclose(total, ref_total, rtol=2e-5)
    chex.assert_trees_all_close(terms, ref_terms, rtol=2e-5)
    self.assertGreater(float(terms["variance"]), 0.1)

  def test_decur_terms(self):
    xs = _inputs(4, seed=4, n=12, d=6)
    total, terms = _jit(losses.decur_loss, num_common=4, off_diagonal_weight=0.1)(*_f32(*xs))
    ref_total, ref_terms = np_decur(*xs, 4, lam=0.1)
    np.testing.assert_allclose(total, ref_total, rtol=2e-5)
    chex.assert_trees_all_close(terms, ref_terms, rtol=2e-5, atol=1e-6)

  def test_decur_all_common_is_barlow_across_modalities(self):
    z1a, z2a, z1b, z2b = _f32(*_inputs(4, seed=5, n=10, d=4))
    _, terms = _jit(losses.decur_loss, num_common=4, off_diagonal_weight=5e-3)(z1a, z2a, z1b, z2b)
    barlow = _jit(losses.barlow_twins_loss)
    np.testing.assert_allclose(terms["unique"], 0.0)
    np.testing.assert_allclose(terms["common"], barlow(z1a, z1b)[0], rtol=1e-6)
    np.testing.assert_allclose(terms["intra_b"], barlow(z1b, z2b)[0], rtol=1e-6)

  def test_alignment_alpha(self):
    z1, z2 = _pair(6, 8, 3)
    np.testing.assert_allclose(_jit(losses.alignment, alpha=1.0)(*_f32(z1, z2)),
                               np_alignment(z1, z2, 1.0), rtol=1e-5)

  def test_uniformity_large_t_does_not_underflow(self):
    z = _randn(7, 6, 3)
    value = _jit(losses.uniformity, t=60.0)(jnp.asarray(z, jnp.float32))
    self.assertTrue(np.isfinite(value))
    # exp(-60 |d|^2) underflows float64 only near |d|^2 ~ 12 > 4, so the reference is exact.
    np.testing.assert_allclose(value, np_uniformity(z, 60.0), rtol=1e-4)

  def test_geodesic_terms(self):
    z1, z2 = _pair(8, 7, 4)
    pos, neg = _jit(losses.positive_negative_geodesic)(*_f32(z1, z2))
    np.testing.assert_allclose((pos, neg), np_geodesic(z1, z2), rtol=1e-5)

  def test_clip_scale_is_clamped(self):
    a, b = _pair(9, 6, 4)
    clip = jax.jit(lambda a, b, s: losses.clip_loss(a, b, logit_scale=s))
    at_100 = clip(*_f32(a, b), math.log(100.0))
    above = clip(*_f32(a, b), 10.0)
    np.testing.assert_allclose(above, at_100, rtol=1e-6)
    np.testing.assert_allclose(above, np_clip(a, b, 10.0), rtol=1e-4)
    self.assertEqual(losses.CLIP_LOGIT_SCALE_INIT, math.log(1 / 0.07))

  def test_effective_rank_of_low_rank_and_collapsed(self):
    basis = _randn(10, 3, 8)
    low_rank = _randn(11, 20, 3) @ basis  # rank 3 (centring keeps it <= 3)
    erank = jax.jit(losses.effective_rank)
    value = float(erank(jnp.asarray(low_rank, jnp.float32)))
    self.assertBetween(value, 1.0, 3.0 + 1e-4)
    np.testing.assert_allclose(value, np_effective_rank(low_rank), rtol=1e-3)
    same_row = np.tile(_randn(12, 1, 8) + 5.0, (16, 1)).astype(np.float32)
    self.assertEqual(float(erank(same_row)), 0.0)
    one_direction = np.outer(_randn(13, 16), _randn(14, 8)).astype(np.float32) + 3.0
    np.testing.assert_allclose(erank(one_direction), 1.0, rtol=1e-5)

  def test_healthy_and_collapsed_std(self):
    d = 64
    std = jax.jit(losses.embedding_std)
    spread = std(jnp.asarray(_randn(15, 512, d), jnp.float32))
    np.testing.assert_allclose(spread, 1 / math.sqrt(d), rtol=0.05)
    collapsed = np.tile(_randn(16, 1, d), (32, 1)).astype(np.float32)
    self.assertLess(float(std(collapsed)), 1e-6)

  def test_info_nce_prefers_aligned_views(self):
    z1, z2 = _pair(17, 16, 8, noise=0.05)
    info_nce = jax.jit(losses.info_nce)
    aligned = info_nce(*_f32(z1, z2))
    shuffled = info_nce(*_f32(z1, z2[::-1]))
    self.assertLess(float(aligned), float(shuffled))

  def test_under_jit_with_traced_hyperparameters(self):
    z1, z2 = _f32(*_pair(18, 6, 4))
    fn = jax.jit(lambda a, b, t, s: (losses.info_nce(a, b, temperature=t),
                                     losses.clip_loss(a, b, logit_scale=s)))
    got = fn(z1, z2, 0.2, 1.5)
    np.testing.assert_allclose(got, (np_info_nce(*_pair(18, 6, 4), 0.2),
                                     np_clip(*_pair(18, 6, 4), 1.5)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Properties, generated.

# Compiled once for every generated example (a jit made inside the test recompiles each time).
_INFO_NCE_JIT = jax.jit(lambda a, b, t: losses.info_nce(a, b, temperature=t))
_BARLOW_NO_EPS_JIT = jax.jit(lambda a, b: losses.barlow_twins_loss(a, b, eps=0.0)[0])


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
    scale=hnp.arrays(np.float64, (6, 1), elements=st.floats(0.1, 10.0)),
    temperature=st.floats(0.05, 1.0))
def test_info_nce_cosine_ignores_row_norms(scale, temperature):
  """Cosine InfoNCE depends only on directions, and matches the reference at any T."""
  z1, z2 = _pair(19, 6, 4)
  fn = _INFO_NCE_JIT
  base = fn(*_f32(z1, z2), temperature)
  scaled = fn(*_f32(z1 * scale, z2 * scale[::-1]), temperature)
  np.testing.assert_allclose(scaled, base, rtol=1e-4)
  np.testing.assert_allclose(base, np_info_nce(z1, z2, temperature), rtol=1e-4)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)
@hypothesis.given(
    scale=hnp.arrays(np.float64, (4,), elements=st.floats(0.5, 20.0)),
    shift=hnp.arrays(np.float64, (4,), elements=st.floats(-5.0, 5.0)))
def test_barlow_invariant_to_per_dimension_affine(scale, shift):
  """Batch standardisation removes any per-dimension scale and shift (up to eps)."""
  z1, z2 = _pair(20, 10, 4)
  fn = _BARLOW_NO_EPS_JIT
  base = fn(*_f32(z1, z2))
  moved = fn(*_f32(z1 * scale + shift, z2))
  np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients.


class GradientTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMES)
  def test_check_grads(self, name):
    fn, _, num = SCALAR_FNS[name]
    with jax.enable_x64(True):
      xs = tuple(jnp.asarray(x, jnp.float64) for x in _inputs(num, seed=21, n=5, d=4))
      jax.test_util.check_grads(fn, xs, order=1, modes=("rev",), atol=1e-5, rtol=1e-5, eps=1e-6)

  def test_check_grads_clip_logit_scale(self):
    a, b = _inputs(2, seed=22, n=5, d=4)
    with jax.enable_x64(True):
      fn = jax.jit(lambda s: losses.clip_loss(jnp.asarray(a), jnp.asarray(b), logit_scale=s))
      jax.test_util.check_grads(fn, (jnp.asarray(1.3),), order=1, modes=("rev",),
                                atol=1e-6, rtol=1e-6, eps=1e-6)
      self.assertEqual(float(jax.grad(fn)(jnp.asarray(5.0))), 0.0)  # clamped at 100

  @parameterized.named_parameters(
      (f"{name}_{case}", name, case) for name in sorted(SCALAR_FNS)
      for case in ["identical", "antipodal", "collapsed"])
  def test_gradients_finite_at_degenerate_embeddings(self, name, case):
    # Rows of +-1 on one axis are unit vectors exactly, so under jit the two views' normalisations
    # agree to the bit (random rows may round differently and never reach cos = +-1 exactly).
    fn, _, num = SCALAR_FNS[name]
    signs = np.float32([[1], [1], [-1], [1], [-1], [1]])
    z = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1, 0]] * signs
    if case == "collapsed":  # every row the same: zero variance, all cosines 1
      z = np.tile(z[:1], (6, 1))
    views = [z, -z if case == "antipodal" else z, z, z][:num]
    value, grads = jax.value_and_grad(fn, argnums=tuple(range(num)))(*_f32(*views))
    self.assertTrue(np.isfinite(value), f"{name} {case}: value {value}")
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)), f"{name} {case}: gradient {g}")

  def test_arc_length_gradient_at_identical_views_is_informative(self):
    """Identical positives (cos = 1) still pass a gradient from the negatives."""
    z = jnp.asarray(_randn(24, 6, 4), jnp.float32)
    g = jax.jit(jax.grad(lambda a: losses.info_nce(a, z, similarity="arc_length")))(z)
    self.assertTrue(np.all(np.isfinite(g)))
    self.assertGreater(float(jnp.abs(g).max()), 1e-3)


# ----------------------------------------------------------------------------------------------
# Precision.


class DtypeTest(parameterized.TestCase):

  @parameterized.named_parameters(*NAMES)
  def test_bfloat16_inputs_give_float32(self, name):
    fn, _, num = SCALAR_FNS[name]
    xs = _f32(*_inputs(num, seed=25, n=16, d=8))
    low = fn(*(x.astype(jnp.bfloat16) for x in xs))
    self.assertEqual(low.dtype, jnp.float32)
    # The only error left is rounding the inputs to bfloat16 (8 bits of mantissa).
    np.testing.assert_allclose(low, fn(*xs), rtol=3e-2, atol=3e-2)
    rounded = tuple(x.astype(jnp.bfloat16).astype(jnp.float32) for x in xs)
    np.testing.assert_allclose(low, fn(*rounded), rtol=1e-5, atol=1e-5)

  def test_terms_are_float32(self):
    z1, z2 = (x.astype(jnp.bfloat16) for x in _f32(*_pair(26, 8, 4)))
    for fn in (losses.vicreg_loss, losses.barlow_twins_loss):
      total, terms = fn(z1, z2)
      self.assertEqual(total.dtype, jnp.float32)
      for v in terms.values():
        self.assertEqual(v.dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Bad input.


class BadInputTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.z = jnp.ones((4, 3), jnp.float32) + jnp.arange(12.0).reshape(4, 3) ** 2

  @parameterized.named_parameters(
      ("info_nce", lambda z, w: losses.info_nce(z, w), "z1"),
      ("clip", lambda z, w: losses.clip_loss(z, w, logit_scale=1.0), "`a`"),
      ("vicreg", lambda z, w: losses.vicreg_loss(z, w), "z1"),
      ("barlow", lambda z, w: losses.barlow_twins_loss(z, w), "z1"),
      ("decur", lambda z, w: losses.decur_loss(z, w, w, w, num_common=1), "z1_a"),
      ("alignment", lambda z, w: losses.alignment(z, w), "z1"),
      ("uniformity", lambda z, w: losses.uniformity(z), "`z`"),
      ("effective_rank", lambda z, w: losses.effective_rank(z), "`z`"),
      ("embedding_std", lambda z, w: losses.embedding_std(z), "`z`"),
      ("geodesic", lambda z, w: losses.positive_negative_geodesic(z, w), "z1"),
  )
  def test_wrong_rank_and_dtype(self, fn, arg):
    with self.assertRaisesRegex(ValueError, f"{arg}.*shape \\[batch, dim\\]"):
      fn(self.z[0], self.z[0])
    with self.assertRaisesRegex(ValueError, f"{arg}.*shape \\[batch, dim\\]"):
      fn(self.z[None], self.z[None])
    with self.assertRaisesRegex(ValueError, f"{arg}.*floating"):
      fn(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32))

  @parameterized.named_parameters(
      ("info_nce", lambda z, w: losses.info_nce(z, w), "z1.*z2"),
      ("clip", lambda z, w: losses.clip_loss(z, w, logit_scale=1.0), "`a`.*`b`"),
      ("vicreg", lambda z, w: losses.vicreg_loss(z, w), "z1.*z2"),
      ("barlow", lambda z, w: losses.barlow_twins_loss(z, w), "z1.*z2"),
      ("decur_views", lambda z, w: losses.decur_loss(z, w, z, z, num_common=1), "z1_a.*z2_a"),
      ("decur_modalities", lambda z, w: losses.decur_loss(z, z, w, z, num_common=1), "z1_a.*z1_b"),
      ("alignment", lambda z, w: losses.alignment(z, w), "z1.*z2"),
      ("geodesic", lambda z, w: losses.positive_negative_geodesic(z, w), "z1.*z2"),
  )
  def test_mismatched_views(self, fn, args):
    with self.assertRaisesRegex(ValueError, f"{args}.*same shape"):
      fn(self.z, self.z[:3])
    with self.assertRaisesRegex(ValueError, f"{args}.*same shape"):
      fn(self.z, self.z[:, :2])

  @parameterized.named_parameters(
      ("vicreg", lambda z: losses.vicreg_loss(z, z), "z1"),
      ("barlow", lambda z: losses.barlow_twins_loss(z, z), "z1"),
      ("decur", lambda z: losses.decur_loss(z, z, z, z, num_common=1), "z1_a"),
      ("uniformity", lambda z: losses.uniformity(z), "`z`"),
      ("geodesic", lambda z: losses.positive_negative_geodesic(z, z), "z1"),
  )
  def test_global_batch_too_small(self, fn, arg):
    with self.assertRaisesRegex(ValueError, f"{arg}.*global batch of 1 rows.*at least 2"):
      fn(self.z[:1])
    jax.eval_shape(fn, self.z[:2])  # two rows are enough (traced only: the check is static)

  @parameterized.parameters(0.0, -0.1, float("nan"), np.float32(0.0))
  def test_bad_temperature(self, temperature):
    with self.assertRaisesRegex(ValueError, "temperature.*> 0"):
      losses.info_nce(self.z, self.z, temperature=temperature)

  def test_bad_similarity(self):
    with self.assertRaisesRegex(ValueError, "similarity.*'arc_length', 'cosine'"):
      losses.info_nce(self.z, self.z, similarity="euclidean")

  @parameterized.parameters(0, 4, -1, 1.5, True, None)
  def test_bad_num_common(self, num_common):
    with self.assertRaisesRegex(ValueError, "num_common.*\\[1, 3\\]"):
      losses.decur_loss(self.z, self.z, self.z, self.z, num_common=num_common)

  def test_num_common_accepts_numpy_int(self):
    total, _ = losses.decur_loss(self.z, self.z, self.z, self.z, num_common=np.int64(3))
    expected, _ = losses.decur_loss(self.z, self.z, self.z, self.z, num_common=3)
    np.testing.assert_allclose(total, expected)

  def test_bad_metric_hyperparameters(self):
    with self.assertRaisesRegex(ValueError, "alpha.*> 0"):
      losses.alignment(self.z, self.z, alpha=0.0)
    with self.assertRaisesRegex(ValueError, "`t`.*> 0"):
      losses.uniformity(self.z, t=-1.0)
    with self.assertRaisesRegex(ValueError, "eps.*>= 0"):
      losses.vicreg_loss(self.z, self.z, eps=-1.0)


if __name__ == "__main__":
  absltest.main()
