"""A Vision Transformer encoder for small images: the class-token features of a pre-LN ViT.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT), at the sizes DINO (Caron et al.
2021) trains: non-overlapping patches embedded by a strided convolution, a learned class token,
position embeddings, `depth` pre-LayerNorm blocks (multi-head self-attention and a GELU MLP, each
added to the residual stream), a final LayerNorm, and the class token's output as the features.
With the default patch of 4, a 28x28 image is a 7x7 grid of tokens (50 with the class token).

The module follows big_vision's `vit.py`: position embeddings are added to the patch tokens
before the class token is prepended, so the class token has none (the ViT paper's extra
position embedding of the class token is a redundant second bias of that token; timm and DINO
count it, so their ViT-Ti/16 at 224 px has `width` = 192 parameters more than this one's
5,524,224); `posemb='sincos2d'` is MoCo v3's fixed 2-D sine-cosine table (Chen et al. 2021).
Initialisation is big_vision's: Xavier-uniform kernels, biases of the MLP ~N(0, 1e-6), zero
class token, learned position embeddings ~N(0, 1/width). The MLP uses the exact (erf) GELU of
the ViT paper and of torch's `nn.GELU`, and LayerNorm epsilon 1e-6 as ViT, timm and DINO do.
There is no dropout or stochastic depth, so `train` does not change the output.

`ViT` is a drop-in alternative to `resnet.ResNet`: `__call__(images, *, train)` returns float32
`[batch, feat_dim]`, and `feat_dim` is a property. `heads.EmbeddingModel(encoder=ViT(...),
projector_dims=...)` puts an MLP projector on it.

Images of another size than the position table's (DINO's smaller local crops): with
`posemb_grid` set, the table is defined on that grid and resized to the input's grid, as DINO's
`interpolate_pos_encoding` does (bicubic; `jax.image.resize` also antialiases when it shrinks,
torch's `interpolate` does not).

Approximate sizes at 28x28x1 with patch 4 (49 patches, 50 tokens; forward FLOPs per image are
~2 x params x 50 plus attention):

  preset        width  depth  heads  mlp_dim  params
  `ViTTiny`       192     12      3      768    5.34 M
  `small_cpu`     128      4      4      512    0.80 M
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
PosEmb = Literal["learn", "sincos2d"]

LAYER_NORM_EPSILON = 1e-6
"""LayerNorm epsilon of ViT, timm's and DINO's ViTs (torch's default is 1e-5)."""


def posemb_sincos_2d(h: int, w: int, width: int, *, temperature: float = 10_000.0) -> jax.Array:
  """MoCo v3's fixed 2-D sine-cosine position embeddings of an `h x w` grid, `[1, h*w, width]`.

  For the token at row y, column x (row-major), with omega_j = temperature^(-j / (width/4 - 1)),
  j = 0 .. width/4 - 1: `[sin(x omega), cos(x omega), sin(y omega), cos(y omega)]` (big_vision's
  `posemb_sincos_2d`).

  Raises:
    ValueError: if `width` is not a multiple of 4 or is below 8.
  """
  if width % 4 or width < 8:
    raise ValueError(f"sincos2d position embeddings need a width that is a multiple of 4 and "
                     f">= 8, got {width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


class MlpBlock(nn.Module):
  """The transformer's feed-forward block: Dense(mlp_dim) - GELU (exact) - Dense(width)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, width] -> [B, L, width] in `dtype`."""
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, name="dense1")(x)
    y = nn.gelu(y, approximate=False)
    return dense(x.shape[-1], name="dense2")(y)


class EncoderBlock(nn.Module):
  """One pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, width] -> [B, L, width] in `dtype`."""
    norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                             param_dtype=jnp.float32)
    y = norm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(), deterministic=True,
        name="attention")(y, y)
    x = x + y
    y = norm(name="ln2")(x)
    return x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class ViT(nn.Module):
  """Vision Transformer encoder; returns the class token's final features.

  Attributes:
    patch_size: side of the square patches (4: a 28x28 image is 7x7 tokens).
    width: token dimension D (also `feat_dim`).
    depth: number of transformer blocks.
    num_heads: attention heads; must divide `width`.
    mlp_dim: hidden size of the blocks' MLP; None means 4 x width.
    posemb: 'learn' (learned, ViT/DINO) or 'sincos2d' (fixed, MoCo v3).
    posemb_grid: side of the square patch grid the position table is defined on (e.g. 7 for
      28x28 images and patch 4), so that inputs of any size multiple of the patch take the
      table resized to their grid; None: the table is that of the input's grid (a learned
      table then fits one input size only).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are float32, and so are the features.
  """
  patch_size: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int | None = None
  posemb: PosEmb = "learn"
  dtype: Dtype = jnp.float32
  posemb_grid: int | None = None

  @property
  def feat_dim(self) -> int:
    """Size of the output features: the token width."""
    return self.width

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Encodes a batch of images.

    Args:
      images: float [B, H, W, C] (already normalised); H and W multiples of `patch_size`.
      train: accepted for the encoder interface of `resnet.ResNet`; this ViT has no dropout,
        stochastic depth or batch norm, so it does not change the output.

    Returns:
      float32 [B, width] final-LayerNorm output of the class token.

    Raises:
      ValueError: if `images` is not a floating rank-4 array whose sides are multiples of
        `patch_size`, or if the configuration is invalid (`num_heads` not dividing `width`,
        an unknown `posemb`, non-positive sizes).
    """
    del train
    if images.ndim != 4:
      raise ValueError(
          f"ViT expects images of shape [batch, height, width, channels], got shape "
          f"{images.shape}; add a channel axis to grayscale images (x[..., None]).")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"ViT expects floating-point images (normalised in the input pipeline), got "
          f"{images.dtype}; convert uint8 pixels with x.astype(np.float32) / 255 first.")
    grid = 1 if self.posemb_grid is None else self.posemb_grid
    if min(self.patch_size, self.width, self.depth, self.num_heads, grid) < 1:
      raise ValueError(
          f"patch_size, width, depth, num_heads and posemb_grid must be positive, got "
          f"{self.patch_size}, {self.width}, {self.depth}, {self.num_heads}, {self.posemb_grid}.")
    if self.width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide width={self.width}.")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}.")
    _, height, width, _ = images.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f"image sides {height}x{width} must be multiples of patch_size={self.patch_size} "
          f"(the patch embedding would silently drop the remainder).")

    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embedding")(images.astype(self.dtype))
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    gh, gw = (h, w) if self.posemb_grid is None else (self.posemb_grid, self.posemb_grid)
    if self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(d)),
                       (1, gh * gw, d), jnp.float32)
    else:
      pos = posemb_sincos_2d(gh, gw, d)
    if (gh, gw) != (h, w):
      pos = jax.image.resize(pos.reshape(gh, gw, d), (h, w, d), "bicubic").reshape(1, h * w, d)
    x = x + pos.astype(self.dtype)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, d)), x], axis=1)
    for i in range(self.depth):
      x = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * d,
                       dtype=self.dtype, name=f"block{i + 1}")(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                     name="encoder_norm")(x[:, 0])
    return x.astype(jnp.float32)


ViTTiny = functools.partial(ViT, width=192, depth=12, num_heads=3, mlp_dim=768)
"""ViT-Ti (Touvron et al. 2021's DeiT-Ti, DINO's ViT-tiny): width 192, 12 blocks, 3 heads."""

small_cpu = functools.partial(ViT, width=128, depth=4, num_heads=4, mlp_dim=512)
"""A ViT that trains on 2 CPU cores in minutes: width 128, 4 blocks, 4 heads (0.80 M params)."""
