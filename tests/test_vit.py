"""Tests of the ViT encoder, DINO's head and `EmbeddingModel` with them as encoder and projector.

Sizes are tiny (a few blocks of width 32) except where only shapes are needed (`eval_shape`).
With the `bench` extra installed, the PyTorch twin of the ViT used by `benchmarks/vit_step.py`
and lightly's `DINOProjectionHead` are checked to compute the same outputs from copied weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedspace.models import DINOHead, EmbeddingModel, ResNet, ViT, ViTTiny
from embedspace.models import vit

TINY = dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)


def _images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (n, size, size, channels), jnp.float32)


def _num_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _param_shapes(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]


def vit_param_count(*, patch: int, channels: int, width: int, depth: int, mlp_dim: int,
                    tokens: int, learned_posemb: bool = True) -> int:
  """ViT parameters without a classifier, written out from the architecture."""
  patch_embedding = patch * patch * channels * width + width
  posemb = tokens * width if learned_posemb else 0
  cls = width
  attention = 4 * (width * width + width)  # q, k, v, out projections with biases
  mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
  layer_norms = 2 * 2 * width
  final_norm = 2 * width
  return patch_embedding + posemb + cls + depth * (attention + mlp + layer_norms) + final_norm


# ----------------------------------------------------------------------------------------------
# ViT.


@pytest.mark.parametrize("size,channels,patch,posemb", [
    (28, 1, 4, "learn"), (28, 1, 4, "sincos2d"), (32, 3, 8, "learn"), (28, 1, 7, "sincos2d")])
def test_vit_shapes(size, channels, patch, posemb):
  model = ViT(**{**TINY, "patch_size": patch}, posemb=posemb)
  x = _images(3, size, channels)
  variables = model.init(jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out.shape == (3, model.feat_dim) == (3, 32)
  assert out.dtype == jnp.float32
  grid = size // patch
  params = variables["params"]
  assert params["patch_embedding"]["kernel"].shape == (patch, patch, channels, 32)
  if posemb == "learn":
    assert params["pos_embedding"].shape == (1, grid * grid, 32)
  else:
    assert "pos_embedding" not in params
  assert params["cls"].shape == (1, 1, 32)
  assert {f"block{i}" for i in (1, 2)} <= set(params)


def test_vit_tiny_param_count():
  # 28x28x1, patch 4: 49 patches.
  shapes = _param_shapes(ViTTiny(patch_size=4), _images(2))
  assert _num_params(shapes) == vit_param_count(
      patch=4, channels=1, width=192, depth=12, mlp_dim=768, tokens=49) == 5_351_616
  # ViT-Ti/16 at 224x224x3: timm's `vit_tiny_patch16_224(num_classes=0)` has 5,524,416, which
  # includes a position embedding of the class token (width = 192 more; see vit.py).
  shapes = _param_shapes(ViTTiny(patch_size=16), jnp.zeros((1, 224, 224, 3)))
  assert _num_params(shapes) == vit_param_count(
      patch=16, channels=3, width=192, depth=12, mlp_dim=768, tokens=196) == 5_524_416 - 192
  sincos = _param_shapes(ViTTiny(patch_size=4, posemb="sincos2d"), _images(2))
  assert _num_params(sincos) == 5_351_616 - 49 * 192


def test_vit_default_mlp_dim_is_four_times_width():
  shapes = _param_shapes(ViT(patch_size=4, width=32, depth=1, num_heads=2), _images(1))
  assert shapes["block1"]["mlp"]["dense1"]["kernel"].shape == (32, 128)
  assert vit.small_cpu().feat_dim == 128


def test_posemb_sincos_2d_matches_the_formula():
  h, w, width = 3, 4, 16
  pe = np.asarray(vit.posemb_sincos_2d(h, w, width))
  assert pe.shape == (1, h * w, width)
  quarter = width // 4
  for y in range(h):
    for x in range(w):
      token = pe[0, y * w + x]
      for j in range(quarter):
        omega = 10_000.0 ** (-j / (quarter - 1))
        np.testing.assert_allclose(
            token[[j, quarter + j, 2 * quarter + j, 3 * quarter + j]],
            [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega),
             math.cos(y * omega)], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    vit.posemb_sincos_2d(2, 2, 18)


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_sees_patch_positions(posemb):
  """Without position embeddings the class token would be invariant to the order of patches."""
  model = ViT(**TINY, posemb=posemb)
  x = _images(2)
  variables = model.init(jax.random.key(1), x, train=False)
  # Swap the top-left and bottom-right 4x4 patches.
  swapped = x.at[:, :4, :4].set(x[:, -4:, -4:]).at[:, -4:, -4:].set(x[:, :4, :4])
  out, out_swapped = (model.apply(variables, v, train=False) for v in (x, swapped))
  assert float(jnp.abs(out - out_swapped).max()) > 1e-3


def test_vit_is_deterministic_and_train_does_not_change_it():
  model = ViT(**TINY)
  x = _images(4)
  v1 = model.init(jax.random.key(3), x, train=False)
  v2 = model.init(jax.random.key(3), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, v1, v2)
  apply = jax.jit(model.apply, static_argnames="train")
  a, b, c = apply(v1, x, train=False), apply(v1, x, train=False), apply(v1, x, train=True)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  # Rows are encoded independently: a row's features do not depend on the rest of the batch.
  np.testing.assert_allclose(apply(v1, x[:1], train=False), a[:1], rtol=1e-5, atol=1e-6)
  assert "batch_stats" not in v1


def test_vit_bfloat16_compute_float32_params_and_output():
  x = _images(3)
  ref_model, model = ViT(**TINY), ViT(**TINY, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), x, train=False)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, variables,
               ref_model.init(jax.random.key(0), x, train=False))
  out = model.apply(variables, x, train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_model.apply(variables, x, train=False), atol=0.1, rtol=0.1)


def test_vit_every_parameter_gets_a_gradient():
  model = ViT(**TINY)
  x = _images(2)
  params = model.init(jax.random.key(0), x, train=False)["params"]
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, train=True))))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kwargs,images,match", [
    (dict(TINY), jnp.zeros((2, 30, 28, 1)), "multiples of patch_size"),
    (dict(TINY, num_heads=3), jnp.zeros((2, 28, 28, 1)), "must divide"),
    (dict(TINY, posemb="rope"), jnp.zeros((2, 28, 28, 1)), "posemb"),
    (dict(TINY), jnp.zeros((2, 28, 28)), "channel axis"),
    (dict(TINY), jnp.zeros((2, 28, 28, 1), jnp.uint8), "floating"),
])
def test_vit_rejects_bad_inputs(kwargs, images, match):
  with pytest.raises(ValueError, match=match):
    ViT(**kwargs).init(jax.random.key(0), images, train=False)


# ----------------------------------------------------------------------------------------------
# EmbeddingModel with a ViT encoder or a DINO head.


def test_embedding_model_with_a_vit_encoder():
  model = EmbeddingModel(encoder=ViT(**TINY), projector_dims=(16, 8))
  x = _images(4)
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"encoder", "projector"}
  (features, embeddings), updates = model.apply(variables, x, train=True,
                                                mutable=["batch_stats"])
  assert features.shape == (4, model.feat_dim) == (4, 32)
  assert embeddings.shape == (4, model.embed_dim) == (4, 8)
  assert features.dtype == embeddings.dtype == jnp.float32
  assert set(updates["batch_stats"]) == {"projector"}  # the ViT has no batch norm
  np.testing.assert_allclose(
      features, ViT(**TINY).apply({"params": variables["params"]["encoder"]}, x, train=False),
      rtol=1e-6, atol=1e-6)
  bare = EmbeddingModel(encoder=ViT(**TINY), projector_dims=())
  f, e = bare.apply(bare.init(jax.random.key(0), x, train=False), x, train=False)
  np.testing.assert_array_equal(f, e)


def test_embedding_model_with_a_resnet_module_is_the_default_resnet():
  """The same parameter tree, initial values and outputs as the ResNet built from attributes."""
  kwargs = dict(stage_sizes=(1, 1), width=8)
  ours = EmbeddingModel(encoder=ResNet(**kwargs), projector_dims=(16, 8))
  theirs = EmbeddingModel(**kwargs, projector_dims=(16, 8))
  x = _images(4)
  v_ours = ours.init(jax.random.key(0), x, train=False)
  v_theirs = theirs.init(jax.random.key(0), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_theirs)
  out_ours = ours.apply(v_ours, x, train=True, mutable=["batch_stats"])
  out_theirs = theirs.apply(v_theirs, x, train=True, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, out_ours, out_theirs)
  assert ours.feat_dim == theirs.feat_dim and ours.embed_dim == theirs.embed_dim


def test_embedding_model_with_a_dino_head_as_projector():
  head = DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=6)
  model = EmbeddingModel(encoder=ViT(**TINY), projector=head)
  x = _images(3)
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"encoder", "projector"} and "batch_stats" not in variables
  features, logits = model.apply(variables, x, train=True)
  assert logits.shape == (3, model.embed_dim) == (3, 10)
  np.testing.assert_allclose(
      logits, head.apply({"params": variables["params"]["projector"]}, features), rtol=1e-6,
      atol=1e-6)


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_posemb_grid_takes_other_image_sizes(posemb):
  """DINO's local crops: a table defined on the 7x7 grid, resized to a 3x3 or 4x4 input grid."""
  model = ViT(**TINY, posemb=posemb, posemb_grid=7)
  x = _images(2)
  variables = model.init(jax.random.key(0), x, train=False)
  # On its own grid it is the plain ViT (same parameters, same features).
  plain = ViT(**TINY, posemb=posemb)
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                plain.apply(variables, x, train=False))
  for size in (12, 16):
    out = model.apply(variables, _images(2, size), train=False)
    assert out.shape == (2, 32) and bool(jnp.all(jnp.isfinite(out)))
  # The resized table is a bicubic resize of the 7x7 one (constant tables stay constant).
  if posemb == "learn":
    const = jax.tree.map(lambda a: a, variables)
    const["params"]["pos_embedding"] = jnp.ones_like(const["params"]["pos_embedding"]) * 0.5
    shifted = jax.tree.map(lambda a: a, variables)
    shifted["params"]["pos_embedding"] = jnp.zeros_like(shifted["params"]["pos_embedding"])
    shifted["params"]["patch_embedding"]["bias"] = (
        shifted["params"]["patch_embedding"]["bias"] + 0.5)
    small = _images(2, 12)
    np.testing.assert_allclose(model.apply(const, small, train=False),
                               model.apply(shifted, small, train=False), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="posemb_grid"):
    ViT(**TINY, posemb_grid=0).init(jax.random.key(0), x, train=False)


# ----------------------------------------------------------------------------------------------
# DINO head.


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_shapes_and_normalised_last_layer(norm_last_layer):
  head = DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=6, norm_last_layer=norm_last_layer)
  x = jax.random.normal(jax.random.key(0), (5, 7)) * 3
  variables = head.init(jax.random.key(1), x)
  params = variables["params"]
  assert params["last_layer"]["kernel"].shape == (6, 10)
  assert "bias" not in params["last_layer"]
  expected = (7 * 16 + 16) + (16 * 16 + 16) + (16 * 6 + 6) + 6 * 10
  assert _num_params(params) == expected + (0 if norm_last_layer else 10)
  logits = head.apply(variables, x)
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32
  # An L2-normalised bottleneck times unit columns: every logit is a cosine.
  assert float(jnp.abs(logits).max()) <= 1 + 1e-5
  # The output does not depend on the scale of the last kernel (weight normalisation).
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 7.0 if "last_layer" in jax.tree_util.keystr(path)
      and "kernel" in jax.tree_util.keystr(path) and "scale" not in jax.tree_util.keystr(path)
      else a, variables)
  np.testing.assert_allclose(head.apply(scaled, x), logits, rtol=1e-5, atol=1e-6)


def test_dino_head_learned_gain_scales_the_logits():
  head = DINOHead(out_dim=4, hidden_dim=8, bottleneck_dim=3, norm_last_layer=False)
  x = jax.random.normal(jax.random.key(0), (2, 5))
  variables = head.init(jax.random.key(1), x)
  (scope,) = variables["params"]["weight_norm"]
  gain = variables["params"]["weight_norm"][scope]
  np.testing.assert_array_equal(gain, np.ones(4))  # g starts at 1, as in DINO
  doubled = jax.tree.map(lambda a: a, variables)
  doubled["params"]["weight_norm"][scope] = gain * 2
  np.testing.assert_allclose(head.apply(doubled, x), 2 * head.apply(variables, x), rtol=1e-6)


def test_dino_head_one_layer_and_bfloat16():
  head = DINOHead(out_dim=4, bottleneck_dim=3, num_layers=1, dtype=jnp.bfloat16)
  x = jnp.ones((2, 5))
  variables = head.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"dense1", "last_layer"}
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  assert head.apply(variables, x).dtype == jnp.float32
  with pytest.raises(ValueError, match="num_layers"):
    DINOHead(out_dim=4, num_layers=0).init(jax.random.key(0), x)


# ----------------------------------------------------------------------------------------------
# Against PyTorch (the `bench` extra).


@pytest.fixture(scope="module")
def torch():
  from benchmarks import common  # noqa: F401  Sets OMP_WAIT_POLICY before torch is imported.
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)
  return torch


def test_torch_twin_of_the_benchmark_computes_the_same_features(torch):
  from benchmarks import vit_step
  model = ViT(**TINY)
  x = _images(3)
  params = model.init(jax.random.key(5), x, train=False)["params"]
  twin = vit_step.load_flax_params(
      vit_step.torch_vit(**TINY, channels=1, image_size=28), params).eval()
  with torch.no_grad():
    ref = twin(torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(model.apply({"params": params}, x, train=False), ref, rtol=1e-4,
                             atol=1e-5)
  assert sum(p.numel() for p in twin.parameters()) == _num_params(params)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # lightly uses the old API
def test_dino_head_matches_lightly(torch):
  pytest.importorskip("lightly")
  from lightly.models.modules.heads import DINOProjectionHead
  ref = DINOProjectionHead(input_dim=7, hidden_dim=16, bottleneck_dim=6, output_dim=10)
  head = DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=6)
  layers = [m for m in ref.layers if isinstance(m, torch.nn.Linear)]
  assert len(layers) == 3
  params = {f"dense{i + 1}": {"kernel": jnp.asarray(m.weight.detach().numpy().T),
                              "bias": jnp.asarray(m.bias.detach().numpy())}
            for i, m in enumerate(layers)}
  # weight_norm: weight = g * v / |v| per output row; g = 1 and frozen (norm_last_layer).
  v = ref.last_layer.parametrizations.weight.original1 if hasattr(
      ref.last_layer, "parametrizations") else ref.last_layer.weight_v
  params["last_layer"] = {"kernel": jnp.asarray(v.detach().numpy().T * 5.0)}  # scale-free
  x = np.random.RandomState(0).randn(4, 7).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.tensor(x)).numpy()
  np.testing.assert_allclose(head.apply({"params": params}, jnp.asarray(x)), expected,
                             rtol=1e-5, atol=1e-6)
