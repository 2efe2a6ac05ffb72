"""A ResNet encoder for small images (28-32 px), as used by SSL papers on CIFAR-10 and MNIST.

The stem follows the CIFAR variant of He et al. (2016) that SimCLR, VICReg and solo-learn use
for small images: one 3x3 convolution with stride 1 and no max-pool, so a 32x32 input keeps its
resolution in the first stage. Stages of BasicBlocks follow, each halving the resolution (except
the first) and doubling the channels; the output is the global average of the last stage.

Batch normalisation is the one place where devices must talk: with `bn_axis_name` set, every
`nn.BatchNorm` averages its batch statistics over that mesh axis, so a per-device forward on
`B` images inside `shard_map` normalises exactly like one forward on the global batch of
`B * devices` images ("SyncBN", which SimCLR and VICReg use on large batches).

Sizes (forward + backward + SGD update, float32, batch 256 of 28x28x1, jit, this 2-core CPU
otherwise idle, jax 0.10.2). A 512-512 projector adds ~1% to `small`; bfloat16 compute is no
faster on this CPU (STACK.md), use it on accelerators.

  stage_sizes   width  feat_dim  params   images/s
  (1, 1, 1)     16      64       0.08 M   ~1240
  (1, 1, 1, 1)  16     128       0.31 M   ~1130   <- `small`, the CPU default
  (2, 2, 2)     16      64       0.17 M    ~660
  (1, 1, 1)     32     128       0.31 M    ~450
  (2, 2, 2)     32     128       0.69 M    ~220
  (2, 2, 2, 2)  64     512      11.2 M      ~47   (`ResNet18`; 24x slower than `small`)

The table is from an AMD 2-core machine. On a 2-core Intel Xeon (Sapphire Rapids, AVX-512/AMX)
the full VICReg training step of `small` (two views, 1024-1024-1024 projector, AdamW, grain
input pipeline) runs at ~480-500 images/s, and bfloat16 compute measured the same as float32
(469/545 vs 465/555 images/s in two alternating runs): XLA's CPU convolutions do not use AMX.

Cost is dominated by the first stages, which run at full resolution, so depth at low resolution
(a 4th stage) is cheap and width at high resolution is not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BN_MOMENTUM = 0.9
"""Running-average momentum of batch norm (flax convention; torch's momentum=0.1)."""

BN_EPSILON = 1e-5

KERNEL_INITS: dict[str, nn.initializers.Initializer] = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "kaiming_uniform": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
}
"""Weight initialisers of the ResNet's convolutions and the projector's linear layers.

- "lecun_normal": flax's default, a normal truncated at 2 sigma with variance 1 / fan_in.
- "kaiming_uniform": PyTorch's default for `Conv2d` and `Linear` (`kaiming_uniform_` with
  a = sqrt(5), the init lightly, solo-learn and torchvision's ResNets train from):
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1 / (3 fan_in). fan_in = in_channels x kernel
  area in both frameworks. The SSL configs' default (`config.model.kernel_init`): on
  Fashion-MNIST it learns faster in the first few hundred VICReg steps than the 3x larger LeCun
  variance (+0.5 kNN points at 300 steps against the PyTorch twin, `benchmarks/RESULTS.md`) and
  ends the default 800-step run level with it (kNN 85.89% vs 85.67%; docs/results.md).

The modules' own default stays flax's, so that a model built in code without the config draws
what flax users expect.
"""


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (He et al. 2016, Fig. 2 left).

  The last batch norm of the residual branch starts with a zero scale ("zero-init residual",
  Goyal et al. 2017; VICReg and Barlow Twins use it), so every block starts as the identity.
  A 1x1 strided projection matches the shortcut when the shape changes.
  """
  filters: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H / strides, W / strides, filters]."""
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = self.norm(name="bn1")(y)
    y = nn.relu(y)
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters, (1, 1), (self.strides, self.strides), name="conv_proj")(residual)
      residual = self.norm(name="bn_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet with a CIFAR stem and BasicBlock stages; returns pooled features.

  Attributes:
    stage_sizes: number of BasicBlocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    width: channels of the stem and of the first stage; stage i has `width * 2**i`.
    dtype: compute dtype of convolutions and batch norm (e.g. jnp.bfloat16). Parameters are
      always float32, and so are the returned features.
    bn_axis_name: mesh axis over which batch-norm statistics are averaged (e.g.
      `embedspace.parallel.AXIS` inside `shard_map`); None for per-device statistics.
    kernel_init: initialiser of every convolution kernel (see `KERNEL_INITS`).
  """
  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  width: int = 16
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  kernel_init: nn.initializers.Initializer = KERNEL_INITS["lecun_normal"]

  @property
  def feat_dim(self) -> int:
    """Size of the output features: channels of the last stage."""
    return self.width * 2 ** (len(self.stage_sizes) - 1)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Encodes a batch of images.

    Args:
      images: float [B, H, W, C] (already normalised; any float dtype).
      train: use and update batch statistics (True) or the running averages (False). With
        `train=True` the caller must pass `mutable=['batch_stats']` to `apply`.

    Returns:
      float32 [B, feat_dim] globally average-pooled features of the last stage.

    Raises:
      ValueError: if `images` is not rank 4 or not floating point, or the config is empty.
    """
    if images.ndim != 4:
      raise ValueError(
          f"ResNet expects images of shape [batch, height, width, channels], got shape "
          f"{images.shape}; add a channel axis to grayscale images (x[..., None]).")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"ResNet expects floating-point images (normalised in the input pipeline), got "
          f"{images.dtype}; convert uint8 pixels with x.astype(np.float32) / 255 first.")
    if not self.stage_sizes or min(self.stage_sizes) < 1 or self.width < 1:
      raise ValueError(
          f"stage_sizes must be non-empty positive ints and width positive, got "
          f"stage_sizes={tuple(self.stage_sizes)} width={self.width}.")

    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=self.kernel_init)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name)

    x = images.astype(self.dtype)
    x = conv(self.width, (3, 3), name="conv_stem")(x)
    x = norm(name="bn_stem")(x)
    x = nn.relu(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = BasicBlock(
            filters=self.width * 2 ** i, strides=2 if i > 0 and j == 0 else 1, conv=conv,
            norm=norm, name=f"stage{i + 1}_block{j + 1}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), width=64)
"""The ResNet-18 of SimCLR/VICReg CIFAR experiments (512-d features, 11.2 M parameters)."""

small = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=16)
"""Default encoder for CPU runs: 4 stages of one block, 128-d features (see the module table)."""
