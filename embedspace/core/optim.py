"""Optimizers of the self-supervised literature, from optax, configured in one place.

LARS (You et al. 2017) is the SimCLR/VICReg/Barlow standard; AdamW is the robust alternative.
As in those papers, biases and normalisation parameters are excluded from weight decay and from
LARS's trust-ratio adaptation; the learning rate follows linear warm-up then cosine decay, scaled
linearly with the global batch (`base_lr * batch_size / 256`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("lars", "adamw")


def decay_mask(params: Any) -> Any:
  """True for weight matrices and convolution kernels; False for biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Warm-up from 0 to `base_lr * batch_size / 256`, then cosine decay to 0 at `num_steps`."""
  peak = config.optimizer.base_lr * config.batch_size / 256
  warmup = min(config.optimizer.warmup_steps, max(config.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.num_steps, warmup + 1), end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax transformation named by `config.optimizer.name`.

  Raises:
    ValueError: for an unknown optimizer name.
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config)
  if opt.name == "lars":
    tx = optax.lars(
        learning_rate=schedule, weight_decay=opt.weight_decay, weight_decay_mask=decay_mask,
        trust_ratio_mask=decay_mask, momentum=opt.momentum)
  elif opt.name == "adamw":
    tx = optax.adamw(learning_rate=schedule, weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r} is not one of {OPTIMIZERS}")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
