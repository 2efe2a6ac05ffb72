"""Contrastive losses: SimCLR's NT-Xent (InfoNCE) and CLIP's symmetric cross-entropy.

Across devices the negatives are the GLOBAL batch: each device scores its own anchors against
candidates `all_gather`-ed from every device, sums its anchors' losses, and `psum`s the sums, so
every device returns the same global-batch loss (Chen et al. 2020 use the same trick, "global BN"
aside; big_vision's contrastive trainer does the same). The gradient is exact because the
transpose of `all_gather` is a reduce-scatter: each device receives the cotangents that every
device's anchors sent to its rows.

Non-finite embeddings are not checked (that would need a host round-trip or `checkify`): a NaN or
inf in any row makes the loss NaN on every device, which the train step should watch for.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from embedspace import geometry
from embedspace import parallel
from embedspace.losses import _common

Similarity = Literal["cosine", "arc_length"]

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
"""Initial value of CLIP's learnable log logit scale, log(1/0.07) (Radford et al. 2021)."""

CLIP_MAX_LOGIT_SCALE = 100.0
"""CLIP clamps exp(logit_scale) at 100 "to prevent scaling the logits by more than 100"."""

_SIMILARITIES = {
    "cosine": geometry.cosine_similarity,
    "arc_length": geometry.negative_arc_length,
}


def info_nce(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    similarity: Similarity = "cosine",
    axis_name: str | None = None,
) -> jax.Array:
  """NT-Xent (normalised temperature-scaled cross-entropy) of SimCLR over 2N views.

  Stack the views as u = [z1; z2] (2N rows over the global batch). The positive of anchor k is
  its other view p(k) = k +- N; the anchor itself is excluded, so each anchor scores 2N-1
  candidates (its positive and 2N-2 negatives):

    loss = 1/(2N) sum_k -log( exp(s(u_k, u_p(k)) / T) / sum_{j != k} exp(s(u_k, u_j) / T) )

  with s the cosine similarity (Chen et al. 2020, "A Simple Framework for Contrastive Learning
  of Visual Representations", eq. 1) or, with `similarity='arc_length'`, the negative arc
  length 1 - arccos(cos(u_k, u_j)) / pi in [0, 1] of Koishekenov et al. 2023, "Geometric
  Contrastive Learning". Equals `optax.losses.ntxent(u, labels=[0..N-1, 0..N-1], T)`.

  Under `axis_name`, the N rows are the global batch: local anchors are scored against the
  gathered candidates, their self/positive columns offset by `axis_index * local_batch`, and the
  per-device sums are `psum`-ed, so every device returns the same global loss.

  Args:
    z1: `[batch, dim]` embeddings of the first view (need not be normalised).
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    temperature: T > 0 (SimCLR uses 0.1-0.5; 0.1 is this default).
    similarity: 'cosine' or 'arc_length'.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar float32 loss (float64 for float64 inputs), the same on every device.

  Raises:
    ValueError: if `z1`/`z2` are not `[batch, dim]` floating arrays of the same shape, if
      `temperature` is a Python number <= 0, or if `similarity` is unknown.
  """
  _common.check_pair("z1", z1, "z2", z2)
  _common.check_positive("temperature", temperature)
  if similarity not in _SIMILARITIES:
    raise ValueError(
        f"`similarity` must be one of {sorted(_SIMILARITIES)}, got {similarity!r}.")
  z1, z2 = _common.to_float(z1), _common.to_float(z2)
  b = z1.shape[0]
  n = _common.global_batch_size(z1, axis_name)

  anchors = jnp.concatenate([z1, z2], axis=0)  # [2b, d]
  candidates = jnp.concatenate(
      [parallel.all_gather(z1, axis_name), parallel.all_gather(z2, axis_name)], axis=0)  # [2n, d]
  logits = _SIMILARITIES[similarity](anchors, candidates) / temperature  # [2b, 2n]

  rows = _common.global_row_offset(z1, axis_name) + jnp.arange(b)
  self_index = jnp.concatenate([rows, rows + n])
  positive_index = jnp.concatenate([rows + n, rows])
  is_self = jnp.arange(2 * n)[None, :] == self_index[:, None]
  log_prob = jax.nn.log_softmax(jnp.where(is_self, -jnp.inf, logits), axis=-1)
  positive_log_prob = jnp.take_along_axis(log_prob, positive_index[:, None], axis=-1)
  return -parallel.psum(jnp.sum(positive_log_prob), axis_name) / (2 * n)


def clip_loss(
    a: jax.Array,
    b: jax.Array,
    *,
    logit_scale: float | jax.Array,
    axis_name: str | None = None,
) -> jax.Array:
  """CLIP's symmetric cross-entropy between paired embeddings of two modalities.

  With a_i, b_j L2-normalised and s = min(exp(logit_scale), 100):

    L_ab = -1/N sum_i log softmax_j(s <a_i, b_j>)_i,   L_ba the same with a and b swapped,
    loss = (L_ab + L_ba) / 2

  (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", Figure 3). `logit_scale` is the learnable log of the inverse temperature,
  initialised at `CLIP_LOGIT_SCALE_INIT` = log(1/0.07); its gradient flows through this loss.

  ImageBind (Girdhar et al. 2023, "ImageBind: One Embedding Space To Bind Them All", eq. 1) is
  this loss with `a` the image embeddings and `b` any other modality (audio, depth, text, ...),
  with a fixed temperature tau: pass `logit_scale=math.log(1 / tau)` (a Python float is not
  learned). ImageBind's L_{I,M} + L_{M,I} is twice this value.

  Under `axis_name`, each device scores its rows against the gathered rows of the other
  modality (labels offset by `axis_index * local_batch`), and the sums are `psum`-ed.

  Args:
    a: `[batch, dim]` embeddings of the first modality (e.g. images).
    b: `[batch, dim]` embeddings of the second modality; row i pairs with row i of `a`.
    logit_scale: scalar log inverse temperature (a parameter, or a Python float).
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar loss, the same on every device.

  Raises:
    ValueError: if `a`/`b` are not `[batch, dim]` floating arrays of the same shape.
  """
  _common.check_pair("a", a, "b", b)
  a = geometry.l2_normalize(_common.to_float(a))
  b = geometry.l2_normalize(_common.to_float(b))
  scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, a.dtype)), CLIP_MAX_LOGIT_SCALE)
  n = _common.global_batch_size(a, axis_name)
  labels = _common.global_row_offset(a, axis_name) + jnp.arange(a.shape[0])

  def cross_entropy_sum(logits):  # [b, n]: row i's positive is column labels[i]
    log_prob = jax.nn.log_softmax(scale * logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_prob, labels[:, None], axis=-1))

  if axis_name is None:  # One product: b's logits are the transpose of a's.
    logits = _common.matmul(a, b.T)
    return (cross_entropy_sum(logits) + cross_entropy_sum(logits.T)) / (2 * n)
  total = (cross_entropy_sum(_common.matmul(a, parallel.all_gather(b, axis_name).T))
           + cross_entropy_sum(_common.matmul(b, parallel.all_gather(a, axis_name).T)))
  return parallel.psum(total, axis_name) / (2 * n)
