"""The blockwise (streamed logsumexp) InfoNCE and CLIP losses equal the dense ones, in O(N) memory.

The dense `losses.info_nce` and `losses.clip_loss` are tested against NumPy written from the
papers in test_losses.py; here they are the reference. Values and gradients must agree for batch
sizes that do and do not divide into tiles, tiles larger than the batch, one row, bfloat16
inputs, and 8 devices against one; and the compiled program must hold no `[2N, 2N]` buffer.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from embedspace import losses
from embedspace import parallel

NUM_DEVICES = 8


def _pair(seed: int, n: int, d: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Two correlated views with varied row norms."""
  rng = np.random.RandomState(seed)
  z1 = rng.randn(n, d) * rng.uniform(0.5, 3.0, (n, 1))
  z2 = z1 + 0.6 * rng.randn(n, d)
  return jnp.asarray(z1, dtype), jnp.asarray(z2, dtype)


def _info_nce_pair(block_size):
  """(dense, blockwise) jitted `(z1, z2, temperature) -> (loss, (dz1, dz2, dtemperature))`."""
  def make(fn):
    return jax.jit(jax.value_and_grad(
        lambda a, b, t: fn(a, b, temperature=t), argnums=(0, 1, 2)))
  return (make(losses.info_nce),
          make(functools.partial(losses.info_nce_blockwise, block_size=block_size)))


def _clip_pair(block_size):
  """(dense, blockwise) jitted `(a, b, logit_scale) -> (loss, (da, db, dscale))`."""
  def make(fn):
    return jax.jit(jax.value_and_grad(
        lambda a, b, s: fn(a, b, logit_scale=s), argnums=(0, 1, 2)))
  return (make(losses.clip_loss),
          make(functools.partial(losses.clip_loss_blockwise, block_size=block_size)))


def _assert_close(actual, expected, what, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol, custom_message=what)


# (batch n, dim d, block_size, temperature = 1 / exp(logit_scale)): tiles that divide 2N, that
# do not, one row (the tile larger than the batch), a tile of one row (a tile of only the masked
# self; also a NumPy integer block_size).
CASES = (
    ("tiles_divide", 16, 8, 8, 0.2),
    ("tiles_do_not_divide", 37, 16, 10, 0.1),
    ("one_row_block_larger_than_batch", 1, 4, 3, 0.5),
    ("block_of_one", 6, 5, np.int64(1), 0.07),
)


class ValueAndGradientTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASES)
  def test_info_nce_equals_dense(self, n, d, block_size, temperature):
    dense, blockwise = _info_nce_pair(block_size)
    z1, z2 = _pair(n, n, d)
    t = jnp.float32(temperature)
    expected, got = dense(z1, z2, t), blockwise(z1, z2, t)
    _assert_close(got[0], expected[0], "value")
    _assert_close(got[1][:2], expected[1][:2], "gradient")
    # d/dT = -(1/T^2) sum_k (E_softmax[cos] - cos_positive) cancels: in float32 both versions are
    # ~1e-4 from the float64 value at T = 0.07 (checked), in different directions.
    _assert_close(got[1][2], expected[1][2], "d loss / d temperature", rtol=5e-4)
    self.assertEqual(got[0].dtype, jnp.float32)

  @parameterized.named_parameters(*CASES)
  def test_clip_equals_dense(self, n, d, block_size, temperature):
    dense, blockwise = _clip_pair(block_size)
    a, b = _pair(n + 1, n, d)
    logit_scale = jnp.float32(np.log(1 / temperature))
    expected, got = dense(a, b, logit_scale), blockwise(a, b, logit_scale)
    _assert_close(got[0], expected[0], "value")
    _assert_close(got[1], expected[1], "gradient (incl. logit_scale)")

  def test_clip_logit_scale_clamped_at_100(self):
    _, blockwise = _clip_pair(4)
    _, (_, _, d_scale) = blockwise(*_pair(3, 9, 4), jnp.float32(5.0))
    self.assertEqual(float(d_scale), 0.0)

  def test_check_grads(self):
    with jax.enable_x64(True):
      a, b = _pair(5, 7, 4, jnp.float64)
      info_nce = jax.jit(functools.partial(losses.info_nce_blockwise, temperature=0.2,
                                           block_size=3))
      jax.test_util.check_grads(info_nce, (a, b), order=1, modes=("rev",), atol=1e-5,
                                rtol=1e-5, eps=1e-6)

  def test_bfloat16_inputs_give_float32_loss(self):
    z1, z2 = _pair(6, 40, 16, jnp.bfloat16)
    dense, blockwise = _info_nce_pair(16)
    value, grads = blockwise(z1, z2, 0.1)
    expected, expected_grads = dense(z1.astype(jnp.float32), z2.astype(jnp.float32), 0.1)
    self.assertEqual(value.dtype, jnp.float32)
    self.assertEqual(grads[0].dtype, jnp.bfloat16)  # cotangents take the input's dtype
    _assert_close(value, expected, "bfloat16 value")
    _assert_close(grads[:2], expected_grads[:2], "bfloat16 gradient", rtol=1e-2, atol=1e-4)

  def test_gradients_finite_at_degenerate_embeddings(self):
    signs = np.float32([[1], [1], [-1], [1], [-1], [1]])
    z = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1, 0]] * signs
    collapsed = np.tile(z[:1], (6, 1))  # every row the same: all cosines 1
    for fn in (functools.partial(losses.info_nce_blockwise, block_size=4),
               functools.partial(losses.clip_loss_blockwise, logit_scale=2.0, block_size=4)):
      value_and_grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
      for case, (x, y) in {"identical": (z, z), "antipodal": (z, -z),
                           "collapsed": (collapsed, collapsed)}.items():
        value, grads = value_and_grad(jnp.asarray(x), jnp.asarray(y))
        self.assertTrue(np.isfinite(value), f"{case}: value {value}")
        self.assertTrue(all(np.all(np.isfinite(g)) for g in grads), f"{case}: gradient")


class MemoryTest(absltest.TestCase):

  def test_no_dense_similarity_buffer(self):
    """At N = 8192 the dense matrix is 2N x 2N x 4 B = 1 GiB; blockwise needs a few MiB."""
    n, d, block_size = 8192, 16, 512
    spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
    dense_bytes = 4 * (2 * n) ** 2

    def compiled(fn):
      return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(spec, spec).compile()

    blockwise = compiled(functools.partial(losses.info_nce_blockwise, block_size=block_size))
    temp = blockwise.memory_analysis().temp_size_in_bytes
    self.assertLess(temp, 4 * n * d * 4 * 4 + 16 * block_size ** 2 * 4)
    self.assertLess(temp, dense_bytes / 50)
    self.assertNotIn(f"[{2 * n},{2 * n}]", blockwise.as_text())
    # The check can fail: the dense loss's program does hold such buffers.
    dense = compiled(losses.info_nce).memory_analysis().temp_size_in_bytes
    self.assertGreater(dense, dense_bytes)


class BadInputTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.z = jnp.ones((4, 3), jnp.float32) + jnp.arange(12.0).reshape(4, 3) ** 2

  @parameterized.parameters(0, -1, 1.5, True, "8", None)
  def test_bad_block_size(self, block_size):
    for fn in (losses.info_nce_blockwise,
               functools.partial(losses.clip_loss_blockwise, logit_scale=1.0)):
      with self.assertRaisesRegex(ValueError, "block_size.*positive integer"):
        fn(self.z, self.z, block_size=block_size)

  @parameterized.parameters(0.0, -0.1, float("nan"))
  def test_bad_temperature(self, temperature):
    with self.assertRaisesRegex(ValueError, "temperature.*> 0"):
      losses.info_nce_blockwise(self.z, self.z, temperature=temperature)

  @parameterized.named_parameters(
      ("info_nce", losses.info_nce_blockwise, "z1"),
      ("clip", functools.partial(losses.clip_loss_blockwise, logit_scale=1.0), "`a`"))
  def test_bad_shapes(self, fn, arg):
    with self.assertRaisesRegex(ValueError, f"{arg}.*shape \\[batch, dim\\]"):
      fn(self.z[0], self.z[0])
    with self.assertRaisesRegex(ValueError, f"{arg}.*floating"):
      fn(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "same shape"):
      fn(self.z, self.z[:3])


# ----------------------------------------------------------------------------------------------
# 8 devices against one (see test_losses_parallel.py for the gradient conventions).

B = 5  # rows per device: 10 local anchors, 80 candidates; block_size 3 divides neither
PARALLEL_CASES = {
    "info_nce": lambda a, b, p, axis_name: losses.info_nce_blockwise(
        a, b, temperature=0.2, block_size=3, axis_name=axis_name),
    "clip": lambda a, b, p, axis_name: losses.clip_loss_blockwise(
        a, b, logit_scale=p, block_size=3, axis_name=axis_name),
}
needs_8_devices = pytest.mark.skipif(
    jax.device_count() != NUM_DEVICES, reason="needs the 8 CPU devices set up by conftest.py")


@needs_8_devices
@pytest.mark.parametrize("name", sorted(PARALLEL_CASES))
def test_shard_map_equals_global_batch(name):
  """Value and gradient w.r.t. the global arrays (taken outside shard_map) match one device."""
  fn = PARALLEL_CASES[name]
  mesh = parallel.make_mesh(jax.devices()[:NUM_DEVICES])
  a, b = _pair(7, NUM_DEVICES * B, 6)
  scale = jnp.float32(2.0)
  grad_fn = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  expected = grad_fn(functools.partial(fn, axis_name=None))(a, b, scale)
  dense = {"info_nce": lambda x, y, s: losses.info_nce(x, y, temperature=0.2),
           "clip": lambda x, y, s: losses.clip_loss(x, y, logit_scale=s)}[name]
  _assert_close(expected, grad_fn(dense)(a, b, scale), f"{name}: one device vs dense")

  per_device = jax.shard_map(functools.partial(fn, axis_name=parallel.AXIS), mesh=mesh,
                             in_specs=(P(parallel.AXIS), P(parallel.AXIS), P()), out_specs=P())
  sharded = [jax.device_put(x, parallel.batch_sharded(mesh)) for x in (a, b)]
  got = grad_fn(per_device)(*sharded, scale)
  _assert_close(got, expected, f"{name}: 8 devices vs one", rtol=2e-5, atol=2e-6)


@needs_8_devices
def test_pmap_equals_global_batch():
  """Under `jax.pmap`, every device returns the global value; its gradient is 8 x its slice's."""
  fn = functools.partial(PARALLEL_CASES["info_nce"], p=None)
  a, b = _pair(10, NUM_DEVICES * B, 6)
  value, grads = jax.jit(jax.value_and_grad(
      functools.partial(fn, axis_name=None), argnums=(0, 1)))(a, b)
  values, grads_8 = jax.pmap(jax.value_and_grad(
      functools.partial(fn, axis_name=parallel.AXIS), argnums=(0, 1)),
                             axis_name=parallel.AXIS)(a.reshape(NUM_DEVICES, B, -1),
                                                      b.reshape(NUM_DEVICES, B, -1))
  _assert_close(values, jnp.full((NUM_DEVICES,), value), "pmap value", rtol=2e-5, atol=2e-6)
  _assert_close(tuple(g.reshape(NUM_DEVICES * B, -1) for g in grads_8),
                tuple(NUM_DEVICES * g for g in grads), "pmap gradient", rtol=2e-5, atol=2e-6)


@needs_8_devices
def test_train_step_pattern_equals_global_batch():
  """`parallel.sharded` (check_vma=False): pmean of per-device parameter gradients is exact.

  CLIP only (its replicated logit scale is a parameter too); InfoNCE shares the code path.
  """
  name = "clip"
  fn = PARALLEL_CASES[name]
  mesh = parallel.make_mesh(jax.devices()[:NUM_DEVICES])
  x1, x2 = _pair(8, NUM_DEVICES * B, 4)
  rng = np.random.RandomState(9)
  params = {"w": jnp.asarray(rng.randn(4, 6), jnp.float32), "s": jnp.float32(2.0)}

  def loss(p, u, v, axis_name):
    return fn(u @ p["w"], v @ p["w"], p["s"], axis_name=axis_name)

  expected = jax.jit(jax.grad(functools.partial(loss, axis_name=None)))(params, x1, x2)
  step = lambda p, u, v: jax.lax.pmean(
      jax.grad(functools.partial(loss, axis_name=parallel.AXIS))(p, u, v), parallel.AXIS)
  got = jax.jit(parallel.sharded(step, mesh, in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                                 out_specs=P()))(
      parallel.replicate(mesh, params),
      *(jax.device_put(x, parallel.batch_sharded(mesh)) for x in (x1, x2)))
  _assert_close(got, expected, f"{name}: pmean of per-device gradients", rtol=2e-5, atol=2e-6)


if __name__ == "__main__":
  absltest.main()
