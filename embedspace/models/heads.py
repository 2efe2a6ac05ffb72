"""Projector heads and the encoder + projector model the SSL losses train.

The projector ("expander" in VICReg) is the MLP of SimCLR (Chen et al. 2020) and VICReg (Bardes
et al. 2022): `Linear-BN-ReLU` blocks and a final `Linear` with neither BN nor ReLU. The losses
see its outputs (`embeddings`); evaluation uses the encoder's `features` before it, which
transfer better (SimCLR, Sec. 4.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedspace.models import resnet

Dtype = Any


class MLP(nn.Module):
  """`Linear-BN-ReLU` x len(hidden) then a final `Linear`.

  The hidden Linears have no bias (the BN after them has one); the final Linear has none either,
  as in the VICReg and Barlow Twins projectors.

  Attributes:
    dims: output sizes of every layer; `dims[-1]` is the embedding size, `dims[:-1]` the hidden
      widths (VICReg's 8192-8192-8192 is `(8192, 8192, 8192)`).
    dtype: compute dtype; parameters are float32 and the output is float32.
    bn_axis_name: mesh axis over which batch-norm statistics are averaged (None: per device).
    kernel_init: initialiser of every Linear's weights (see `resnet.KERNEL_INITS`).
  """
  dims: Sequence[int]
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  kernel_init: nn.initializers.Initializer = resnet.KERNEL_INITS["lecun_normal"]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, D_in] -> float32 [B, dims[-1]].

    Raises:
      ValueError: if `x` is not rank 2 or `dims` is empty.
    """
    if x.ndim != 2:
      raise ValueError(f"MLP expects inputs of shape [batch, dim], got shape {x.shape}.")
    if not self.dims:
      raise ValueError("MLP needs at least one layer (dims is empty).")
    x = x.astype(self.dtype)
    for i, dim in enumerate(self.dims[:-1]):
      x = nn.Dense(dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=self.kernel_init, name=f"dense{i + 1}")(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
          dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name,
          name=f"bn{i + 1}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.dims[-1], use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=self.kernel_init, name=f"dense{len(self.dims)}")(x)
    return x.astype(jnp.float32)


class EmbeddingModel(nn.Module):
  """An encoder (a ResNet by default) followed by a projector (an MLP by default).

  With `encoder=None` the encoder is the `resnet.ResNet` of `stage_sizes` and `width`; any other
  encoder is passed as a module (`vit.ViT(...)`: any flax module with `__call__(images, *, train)
  -> [B, feat_dim]` and a `feat_dim` property), and likewise a projector other than the MLP of
  `projector_dims` (`dino_head.DINOHead(...)`: `__call__(x, *, train) -> [B, out_dim]`, an
  `out_dim` attribute). Either way they are the submodules `encoder` and `projector`, so the
  parameter tree, the outputs and the code that trains and evaluates the model do not depend on
  which encoder or projector it has. A passed-in module keeps its own `dtype` and batch-norm axis.

  Attributes:
    stage_sizes: BasicBlocks per ResNet stage (see `resnet.ResNet`); defaults are `resnet.small`.
    width: channels of the first ResNet stage.
    projector_dims: layer sizes of the projector (see `MLP.dims`); empty means no projector,
      the embeddings are then the features.
    dtype: compute dtype (parameters float32, outputs float32).
    bn_axis_name: mesh axis for synchronised batch norm in encoder and projector alike.
    encoder: the encoder module (unbound), or None for the ResNet of `stage_sizes` and `width`.
    projector: the projector module (unbound), or None for the MLP of `projector_dims`.
    kernel_init: weight initialiser of the ResNet and the MLP built here (not of a passed-in
      encoder or projector); see `resnet.KERNEL_INITS`.

  Example:
    model = EmbeddingModel(stage_sizes=(1, 1, 1, 1), width=16, projector_dims=(512, 512))
    model = EmbeddingModel(encoder=vit.ViT(width=192, depth=12, num_heads=3),
                           projector_dims=(2048, 2048, 256))
    variables = model.init(rng, images, train=False)
    (features, embeddings), updates = model.apply(
        variables, images, train=True, mutable=["batch_stats"])
  """
  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  width: int = 16
  projector_dims: Sequence[int] = (512, 512)
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  encoder: nn.Module | None = None
  projector: nn.Module | None = None
  kernel_init: nn.initializers.Initializer = resnet.KERNEL_INITS["lecun_normal"]

  @property
  def feat_dim(self) -> int:
    """Size of `features`."""
    if self.encoder is not None:
      return self.encoder.feat_dim
    return self.width * 2 ** (len(self.stage_sizes) - 1)

  @property
  def embed_dim(self) -> int:
    """Size of `embeddings`."""
    if self.projector is not None:
      return self.projector.out_dim
    return self.projector_dims[-1] if self.projector_dims else self.feat_dim

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Encodes and projects a batch of images.

    Args:
      images: float [B, H, W, C].
      train: batch statistics (True, needs `mutable=['batch_stats']` when a part has batch
        norm) or running averages.

    Returns:
      `(features, embeddings)`: float32 [B, feat_dim] encoder output (for evaluation) and
      float32 [B, embed_dim] projector output (for the losses).

    Raises:
      ValueError: on images that are not float [B, H, W, C] (see `resnet.ResNet`, `vit.ViT`).
    """
    encoder = self.encoder
    if encoder is None:
      encoder = resnet.ResNet(stage_sizes=self.stage_sizes, width=self.width, dtype=self.dtype,
                              bn_axis_name=self.bn_axis_name, kernel_init=self.kernel_init,
                              name="encoder")
    features = encoder(images, train=train).astype(jnp.float32)
    if self.projector is not None:
      return features, self.projector(features, train=train).astype(jnp.float32)
    if not self.projector_dims:
      return features, features
    embeddings = MLP(
        dims=self.projector_dims, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        kernel_init=self.kernel_init, name="projector")(features, train=train)
    return features, embeddings
