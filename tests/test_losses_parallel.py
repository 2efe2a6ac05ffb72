"""Every loss and metric on 8 CPU devices equals the single-device loss of the global batch.

A per-device batch of B rows on 8 devices must give the VALUE and the GRADIENT of the same
function on one device with the 8B rows, under both `jax.shard_map` (the path training uses)
and `jax.pmap`. This is what makes the global-batch statistics (psum of sums, not the mean of
per-device statistics) and the gathered negatives testable: a loss that averaged per-device
covariances, or scored only local negatives, fails here.

Gradients of an invariant (psum-ed) loss, as JAX 0.10 computes them (all checked below):
- shard_map, `check_vma=True` (JAX's default): `jax.grad` from outside w.r.t. the sharded
  global array, and `jax.grad` inside w.r.t. a replicated `P()` parameter, are both exactly the
  single-device gradient. `pmean` of the (already invariant) gradient is a no-op; `psum`
  multiplies it by the device count.
- shard_map, `check_vma=False` (what `parallel.sharded` uses) and `jax.pmap`: differentiation
  inside transposes `psum` to `psum`, so `jax.grad` w.r.t. per-device inputs is the device
  count times the matching slice of the single-device gradient, and the per-device parameter
  gradients differ; their `pmean` is the single-device gradient (never `psum` them).
So `pmean(grads, AXIS)` after `jax.grad` of the global loss is right in every mode.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from embedspace import losses
from embedspace import parallel

NUM_DEVICES = 8
B = 3  # rows per device
D = 5

pytestmark = pytest.mark.skipif(
    jax.device_count() != NUM_DEVICES, reason="needs the 8 CPU devices set up by conftest.py")


def _scalar_of_pair(out):
  return out[0] + out[1]


# name -> (fn(*xs, axis_name) -> outputs, number of inputs, outputs -> scalar to differentiate)
CASES = {
    "info_nce": (lambda a, b, axis_name: losses.info_nce(
        a, b, temperature=0.2, axis_name=axis_name), 2, lambda o: o),
    "info_nce_arc": (lambda a, b, axis_name: losses.info_nce(
        a, b, temperature=0.2, similarity="arc_length", axis_name=axis_name), 2, lambda o: o),
    "clip": (lambda a, b, axis_name: losses.clip_loss(
        a, b, logit_scale=losses.CLIP_LOGIT_SCALE_INIT, axis_name=axis_name), 2, lambda o: o),
    "vicreg": (lambda a, b, axis_name: losses.vicreg_loss(a, b, axis_name=axis_name), 2,
               lambda o: o[0]),
    "barlow": (lambda a, b, axis_name: losses.barlow_twins_loss(a, b, axis_name=axis_name), 2,
               lambda o: o[0]),
    "decur": (lambda a, b, c, d, axis_name: losses.decur_loss(
        a, b, c, d, num_common=3, axis_name=axis_name), 4, lambda o: o[0]),
    "alignment": (lambda a, b, axis_name: losses.alignment(a, b, axis_name=axis_name), 2,
                  lambda o: o),
    "uniformity": (lambda a, axis_name: losses.uniformity(a, axis_name=axis_name), 1,
                   lambda o: o),
    "effective_rank": (lambda a, axis_name: losses.effective_rank(a, axis_name=axis_name), 1,
                       lambda o: o),
    "embedding_std": (lambda a, axis_name: losses.embedding_std(a, axis_name=axis_name), 1,
                      lambda o: o),
    "geodesic": (lambda a, b, axis_name: losses.positive_negative_geodesic(
        a, b, axis_name=axis_name), 2, _scalar_of_pair),
}
NAMES = sorted(CASES)


def _global_inputs(num: int, seed: int = 0) -> tuple[jax.Array, ...]:
  rng = np.random.RandomState(seed)
  base = rng.randn(NUM_DEVICES * B, D)
  # Correlated views with per-dimension offsets and scales, so that means, variances and
  # cross-correlations differ between devices' slices and the global batch.
  return tuple(
      jnp.asarray((base + 0.7 * rng.randn(*base.shape)) * rng.uniform(0.5, 2.0, D)
                  + rng.randn(D), jnp.float32)
      for _ in range(num))


def _value_and_grad(fn, num, scalar_of):
  """xs -> (outputs, grads w.r.t. every x) of fn(*xs)."""
  def loss(*xs):
    out = fn(*xs)
    return scalar_of(out), out
  grad_fn = jax.value_and_grad(loss, argnums=tuple(range(num)), has_aux=True)
  return lambda *xs: (lambda r: (r[0][1], r[1]))(grad_fn(*xs))


@functools.cache
def _single(name):
  fn, num, scalar_of = CASES[name]
  xs = _global_inputs(num)
  out, grads = jax.jit(_value_and_grad(functools.partial(fn, axis_name=None), num, scalar_of))(*xs)
  return xs, out, grads


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def _assert_close(actual, expected, what):
  chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-6,
                              custom_message=what)


@pytest.mark.parametrize("name", NAMES)
def test_shard_map_equals_global_batch(name, mesh):
  """Value and gradient (taken outside shard_map w.r.t. the global array) match one device."""
  fn, num, scalar_of = CASES[name]
  xs, out, grads = _single(name)
  per_device = jax.shard_map(functools.partial(fn, axis_name=parallel.AXIS), mesh=mesh,
                             in_specs=(P(parallel.AXIS),) * num, out_specs=P())
  sharded_xs = tuple(jax.device_put(x, parallel.batch_sharded(mesh)) for x in xs)
  out_8, grads_8 = jax.jit(_value_and_grad(per_device, num, scalar_of))(*sharded_xs)
  _assert_close(out_8, out, f"{name}: value")
  _assert_close(grads_8, grads, f"{name}: gradient")
  # A sanity check that the inputs do split into different statistics per device.
  assert not np.allclose(np.asarray(xs[0][:B]).mean(0), np.asarray(xs[0]).mean(0))


@pytest.mark.parametrize("name", NAMES)
def test_pmap_equals_global_batch(name):
  """Every device returns the global value; its gradient is NUM_DEVICES x its slice's."""
  fn, num, scalar_of = CASES[name]
  xs, out, grads = _single(name)
  per_device = _value_and_grad(functools.partial(fn, axis_name=parallel.AXIS), num, scalar_of)
  stacked = tuple(x.reshape(NUM_DEVICES, B, D) for x in xs)
  out_8, grads_8 = jax.pmap(per_device, axis_name=parallel.AXIS)(*stacked)
  for device in range(NUM_DEVICES):
    _assert_close(jax.tree.map(lambda v: v[device], out_8), out, f"{name}: value, device {device}")
  unstacked = tuple(g.reshape(NUM_DEVICES * B, D) for g in grads_8)
  _assert_close(unstacked, jax.tree.map(lambda g: NUM_DEVICES * g, grads),
                f"{name}: pmap gradient = {NUM_DEVICES} x single-device gradient")


@pytest.mark.parametrize("name", NAMES)
def test_grad_inside_shard_map_wrt_replicated_params(name, mesh):
  """The training-step pattern: jit(shard_map(grad of the global loss w.r.t. P() params)).

  A linear encoder W (and CLIP's logit scale) is replicated; each device embeds its slice.
  - default `check_vma=True`: the gradient inside shard_map is already the single-device
    gradient; `pmean` of it is a no-op and `psum` would multiply it by the device count.
  - `parallel.sharded` (the train step's wrapper, whatever its `check_vma`): `pmean` of the
    per-device gradients is the single-device gradient. With `check_vma=False` (pmap's
    semantics) the per-device gradients differ and only their mean is right.
  """
  fn, num, scalar_of = CASES[name]
  rng = np.random.RandomState(1)
  d_in = 4
  inputs = tuple(jnp.asarray(rng.randn(NUM_DEVICES * B, d_in) + rng.randn(d_in), jnp.float32)
                 for _ in range(num))
  params = {"w": jnp.asarray(rng.randn(d_in, D), jnp.float32),
            "logit_scale": jnp.asarray(2.0, jnp.float32)}

  def loss(p, *xs, axis_name):
    zs = [x @ p["w"] for x in xs]
    if name == "clip":
      return losses.clip_loss(*zs, logit_scale=p["logit_scale"], axis_name=axis_name)
    return scalar_of(fn(*zs, axis_name=axis_name))

  expected = jax.jit(jax.grad(functools.partial(loss, axis_name=None)))(params, *inputs)
  assert float(jnp.abs(expected["w"]).max()) > 1e-4  # the check is not vacuous
  grad_fn = jax.grad(functools.partial(loss, axis_name=parallel.AXIS))
  in_specs = (P(),) + (P(parallel.AXIS),) * num
  args = (parallel.replicate(mesh, params),
          *(jax.device_put(x, parallel.batch_sharded(mesh)) for x in inputs))
  times_n = jax.tree.map(lambda g: NUM_DEVICES * g, expected)

  def step_vma(p, *xs):
    g = grad_fn(p, *xs)
    return g, jax.lax.pmean(g, parallel.AXIS), jax.lax.psum(g, parallel.AXIS)

  grad, grad_pmean, grad_psum = jax.jit(jax.shard_map(
      step_vma, mesh=mesh, in_specs=in_specs, out_specs=P()))(*args)
  _assert_close(grad, expected, f"{name}: grad inside shard_map (check_vma=True)")
  _assert_close(grad_pmean, expected, f"{name}: pmean of grads (check_vma=True)")
  _assert_close(grad_psum, times_n, f"{name}: psum of grads (check_vma=True)")

  def step_train(p, *xs):
    g = grad_fn(p, *xs)
    return jax.lax.pmean(g, parallel.AXIS), jax.tree.map(lambda v: v[None], g)

  grad_pmean, per_device = jax.jit(parallel.sharded(
      step_train, mesh, in_specs=in_specs, out_specs=(P(), P(parallel.AXIS))))(*args)
  _assert_close(grad_pmean, expected, f"{name}: pmean of grads (parallel.sharded)")
  _assert_close(jax.tree.map(lambda g: g.mean(0), per_device), expected,
                f"{name}: mean of per-device grads (parallel.sharded)")
