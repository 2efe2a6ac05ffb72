"""Tests of the ResNet encoder, the projector and synchronised batch norm over 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from embedspace import parallel
from embedspace.models import MLP, EmbeddingModel, ResNet, resnet

TINY = dict(stage_sizes=(1, 1), width=8, projector_dims=(16, 8))


def _init(model, x: jax.Array):
  """`model.init` in inference mode (eager: jit compiles of conv nets cost more CPU here)."""
  return model.init(jax.random.key(0), x, train=False)


def _images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (n, size, size, channels), jnp.float32)


@pytest.mark.parametrize("stage_sizes,width,size,channels,feat_dim", [
    ((1, 1, 1), 16, 28, 1, 64),
    ((2, 1), 8, 32, 3, 16),
])
def test_resnet_shapes(stage_sizes, width, size, channels, feat_dim):
  model = ResNet(stage_sizes=stage_sizes, width=width)
  x = _images(3, size, channels)
  variables = _init(model, x)
  out = model.apply(variables, x, train=False)
  assert out.shape == (3, feat_dim) == (3, model.feat_dim)
  assert out.dtype == jnp.float32
  # CIFAR stem: no downsampling before the first stage, 3x3 stride-1 convolution.
  assert variables["params"]["conv_stem"]["kernel"].shape == (3, 3, channels, width)


def test_resnet18_preset_size():
  model = resnet.ResNet18()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _images(2, 32, 3), train=False))
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(shapes["params"]))
  assert 11.0e6 < n < 11.3e6  # the CIFAR ResNet-18 without its classifier has 11.17 M
  assert model.feat_dim == 512


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_model_shapes_and_dtypes(dtype):
  model = EmbeddingModel(**TINY, dtype=dtype)
  x = _images(4)
  variables = _init(model, x)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32  # params and batch stats stay float32
  (features, embeddings), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert features.shape == (4, model.feat_dim) == (4, 16)
  assert embeddings.shape == (4, model.embed_dim) == (4, 8)
  assert features.dtype == embeddings.dtype == jnp.float32
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.float32
  # Eval mode needs no mutable collections and agrees with float32 compute up to bf16 rounding.
  f_eval, e_eval = model.apply(variables, x, train=False)
  assert f_eval.dtype == e_eval.dtype == jnp.float32
  if dtype == jnp.bfloat16:
    ref = EmbeddingModel(**TINY).apply(variables, x, train=False)
    np.testing.assert_allclose(f_eval, ref[0], rtol=0.1, atol=0.1)


def test_embedding_model_without_projector_and_grads():
  model = EmbeddingModel(stage_sizes=(1,), width=4, projector_dims=())
  x = _images(4)
  variables = _init(model, x)
  assert "projector" not in variables["params"]
  features, embeddings = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(features, embeddings)

  def loss(params):
    (_, e), _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(e ** 2)

  grads = jax.grad(loss)(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["encoder"]["conv_stem"]["kernel"]).sum()) > 0


def test_mlp_layers():
  mlp = MLP(dims=(32, 32, 10))
  x = jax.random.normal(jax.random.key(0), (5, 7))
  variables = _init(mlp, x)
  params = variables["params"]
  assert set(params) == {"dense1", "bn1", "dense2", "bn2", "dense3"}  # no BN after the last
  assert "bias" not in params["dense3"]
  out, _ = mlp.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (5, 10) and out.dtype == jnp.float32
  assert float(jnp.min(out)) < 0  # the last layer has no ReLU


@pytest.mark.parametrize("bad", [np.zeros((28, 28, 1), np.float32), np.zeros((2, 28, 28)),
                                 np.zeros((2, 28, 28, 1), np.uint8)])
def test_bad_images_raise(bad):
  model = EmbeddingModel(**TINY)
  with pytest.raises(ValueError, match="images"):
    model.init(jax.random.key(0), jnp.asarray(bad), train=False)


def test_bad_mlp_input_raises():
  with pytest.raises(ValueError, match="batch, dim"):
    MLP(dims=(4,)).init(jax.random.key(0), jnp.zeros((2, 3, 4)), train=False)


def test_synchronised_batch_norm_matches_global_batch():
  """8 devices x B images with bn_axis_name == one device with the global batch of 8B."""
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  assert n_dev == 8, "conftest.py sets 8 CPU devices"
  per_device = 4
  x = _images(n_dev * per_device, seed=1) * 2.0 + 0.5
  single = EmbeddingModel(**TINY)
  synced = EmbeddingModel(**TINY, bn_axis_name=parallel.AXIS)
  variables = _init(single, x)
  # Non-trivial running averages, so that the momentum update is checked as well.
  variables = {**variables, "batch_stats": jax.tree.map(
      lambda a: a + 0.3, variables["batch_stats"])}

  (f_ref, e_ref), upd_ref = jax.jit(
      lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)

  def per_device_fn(v, x):
    (f, e), upd = synced.apply(v, x, train=True, mutable=["batch_stats"])
    return f, e, upd

  step = jax.jit(parallel.sharded(
      per_device_fn, mesh, in_specs=(P(), P(parallel.AXIS)),
      out_specs=(P(parallel.AXIS), P(parallel.AXIS), P())))
  f, e, upd = step(parallel.replicate(mesh, variables), parallel.shard_batch(mesh, x))

  np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(e, e_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), upd, upd_ref)

  # Without synchronisation every device normalises by its own statistics: outputs differ.
  unsynced = jax.jit(parallel.sharded(
      lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"])[0], mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=(P(parallel.AXIS), P(parallel.AXIS))))
  f_local, _ = unsynced(parallel.replicate(mesh, variables), parallel.shard_batch(mesh, x))
  assert not np.allclose(f_local, f_ref, rtol=1e-3, atol=1e-3)


def _kernels(params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat if k[-1].key == "kernel"}


@pytest.mark.parametrize("name", ["lecun_normal", "kaiming_uniform"])
def test_kernel_init_has_the_documented_law_in_every_conv_and_linear(name):
  # fan_in computed here from the shape alone: in_channels x kernel area (HWIO) or inputs (IO).
  model = EmbeddingModel(stage_sizes=(1, 1), width=16, projector_dims=(256, 256),
                         kernel_init=resnet.KERNEL_INITS[name])
  kernels = _kernels(_init(model, _images(2))["params"])
  assert len(kernels) == 1 + 4 + 1 + 2  # stem, 2 x 2 block convs, a shortcut, 2 Linears
  for path, w in kernels.items():
    fan_in = int(np.prod(w.shape[:-1]))
    if name == "kaiming_uniform":  # torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
      bound = 1 / np.sqrt(fan_in)
      assert np.abs(w).max() <= bound, path
      std = bound / np.sqrt(3)
    else:  # LeCun normal, truncated at 2 sigma and rescaled to variance 1 / fan_in.
      std = 1 / np.sqrt(fan_in)
      assert np.abs(w).max() <= 2 * std / 0.8796 + 1e-6, path
    if w.size >= 2000:  # Enough draws for the standard deviation to be within 5%.
      assert abs(w.std() / std - 1) < 0.05, (path, w.std(), std)


def test_kaiming_uniform_draws_like_torch():
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(16, 32, 3, bias=False).weight.detach().numpy()
  linear = torch.nn.Linear(128, 1024, bias=False).weight.detach().numpy()
  ours = _kernels(_init(EmbeddingModel(stage_sizes=(1, 1), width=16, projector_dims=(1024,),
                                       kernel_init=resnet.KERNEL_INITS["kaiming_uniform"]),
                        _images(2))["params"])
  conv_ours = next(w for p, w in ours.items() if "stage2" in p and "conv1" in p)  # 3x3x16x32
  linear_ours = next(w for p, w in ours.items() if "projector" in p)  # [32, 1024]: fan_in 32
  np.testing.assert_allclose(np.abs(conv_ours).max(), np.abs(conv).max(), rtol=0.02)
  np.testing.assert_allclose(conv_ours.std(), conv.std(), rtol=0.05)
  fan_in_ratio = np.sqrt(128 / linear_ours.shape[0])  # Same law, scaled by 1/sqrt(fan_in).
  np.testing.assert_allclose(linear_ours.std(), linear.std() * fan_in_ratio, rtol=0.05)
