"""DINO's projection head: an MLP, an L2-normalised bottleneck and a weight-normalised output layer.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (Sec. 3.1 and
Appendix), after SwAV: a 3-layer MLP with hidden width 2048 and GELU, no batch norm (a ViT
backbone has none), ending in a 256-d bottleneck; the bottleneck is L2-normalised and fed to a
bias-free linear layer to K outputs whose weight is weight-normalised (Salimans & Kingma 2016):
each output unit's weight vector is v_k / |v_k|, times a gain g_k. With `norm_last_layer=True`
(the authors' default, lightly's too) g_k is fixed at 1, so every logit is a cosine between the
bottleneck and a unit prototype. The weight normalisation is flax's `nn.WeightNorm` (no scale
parameter when g is fixed). Dense layers start truncated-normal with std 0.02 and zero bias,
as in the authors' `DINOHead`.

The student and the teacher use the same head; `losses.dino_loss` reads its outputs. As the
`projector` of `heads.EmbeddingModel` it puts the head on any encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class DINOHead(nn.Module):
  """MLP -> L2-normalised bottleneck -> weight-normalised Dense to `out_dim` logits.

  Attributes:
    out_dim: K, the number of outputs (prototypes); 65536 in DINO, a few thousand on small data.
    hidden_dim: width of the hidden layers (2048 in DINO).
    bottleneck_dim: size of the normalised bottleneck (256 in DINO).
    num_layers: Dense layers of the MLP, bottleneck included (>= 1; 3 in DINO). With 1 the
      MLP is a single Dense to the bottleneck.
    norm_last_layer: fix the weight-norm gain g at 1 (True, DINO's default; no parameter) or
      learn it from 1 (False: better results in DINO's ViT-S/16 runs, less stable).
    dtype: compute dtype; parameters are float32 and the output is float32.

  Example:
    head = DINOHead(out_dim=4096)
    logits = head.apply(head.init(rng, features), features)   # [B, 4096]
  """
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, D_in] -> float32 [B, out_dim] logits.

    `train` is accepted for the projector interface of `heads.EmbeddingModel`; the head has no
    batch norm or dropout, so it does not change the output.

    Raises:
      ValueError: if `x` is not rank 2 or `num_layers` < 1.
    """
    del train
    if x.ndim != 2:
      raise ValueError(f"DINOHead expects inputs of shape [batch, dim], got shape {x.shape}.")
    if self.num_layers < 1:
      raise ValueError(f"DINOHead needs num_layers >= 1, got {self.num_layers}.")
    init = nn.initializers.truncated_normal(stddev=0.02)
    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=init, name=f"dense{i + 1}")(x)
      x = nn.gelu(x, approximate=False)
    x = nn.Dense(self.bottleneck_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=init, name=f"dense{self.num_layers}")(x)
    x = x.astype(jnp.float32)  # x / max(|x|, 1e-12), torch's F.normalize
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    last = nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=init, name="last_layer")
    x = nn.WeightNorm(last, use_scale=not self.norm_last_layer, feature_axes=-1,
                      name="weight_norm")(x.astype(self.dtype))
    return x.astype(jnp.float32)
