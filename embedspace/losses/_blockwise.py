"""Exact InfoNCE and CLIP losses for global batches too large for a dense similarity matrix.

The dense losses of `_contrastive` build the `[2N, 2N]` (InfoNCE) or `[N, N]` (CLIP) logits: at
N = 65,536 that is 64 GiB of float32 per buffer, and reverse mode keeps several. Both losses are
a sum of per-anchor terms `logsumexp_j(l_kj) - l_k,pos(k)`; the positive logit is one dot
product per row, and only the logsumexp needs every candidate. Here it is streamed over tiles
of `[block, block]` logits with a running maximum and sum of exponentials, the online softmax of
Milakov & Gimelshein (2018, "Online normalizer calculation for softmax") that FlashAttention
(Dao et al. 2022) is built on. A `jax.custom_vjp` keeps only the per-anchor logsumexp for the
backward pass, which recomputes each tile's logits, turns them into probabilities
`exp(l_kj - lse_k)` and accumulates the anchor and candidate cotangents tile by tile. Nothing
is approximated: values and gradients equal the dense losses' up to float rounding.

Memory: O((A + C) d + block^2) for A local anchors and C candidates of dimension d (the inputs,
their normalised copies and cotangents, and one tile of logits at a time), i.e. linear in N.
Time: the dense losses' FLOPs plus one recomputation of the logits in the backward pass
(about 8 A C d in all for value and gradient, against 6 A C d dense).

Across devices the candidates are gathered with `parallel.all_gather` outside the custom VJP,
so JAX transposes the gather into a reduce-scatter of the candidate cotangents, exactly as in
the dense losses; the per-device sums are `psum`-ed.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from embedspace import geometry
from embedspace import parallel
from embedspace.losses import _common
from embedspace.losses._contrastive import CLIP_MAX_LOGIT_SCALE

DEFAULT_BLOCK_SIZE = 1024
"""Rows of anchors and of candidates per tile: a 4 MiB float32 tile of logits."""

Residuals = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]
"""What the forward pass keeps: anchors, candidates, scale, self_index and the `[A]` lse."""


def _check_block_size(block_size: object) -> None:
  if (not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool)
      or block_size < 1):
    raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")


def _tiles(x: jax.Array, block: int, fill: float | int = 0) -> jax.Array:
  """Pads axis 0 of `x` with `fill` to a multiple of `block`, then splits: `[tiles, block, ...]`."""
  pad = -x.shape[0] % block
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((-1, block) + x.shape[1:])


def _zero_like(*arrays: jax.Array) -> jax.Array:
  """A float zero that varies over the same shard_map axes as `arrays` (for loop carries)."""
  return sum(jnp.zeros_like(x, shape=(), dtype=arrays[0].dtype) for x in arrays)


def _tile_cosines(anchor_tile: jax.Array, self_tile: jax.Array, candidate_tiles: jax.Array,
                  j: jax.Array, num_candidates: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Raw dot products, clipped cosines and validity mask of anchor tile x candidate tile j."""
  block = candidate_tiles.shape[1]
  raw = _common.matmul(anchor_tile, candidate_tiles[j].T)  # [block_a, block_c]
  column = j * block + jnp.arange(block)
  valid = (column[None, :] < num_candidates) & (column[None, :] != self_tile[:, None])
  return raw, jnp.clip(raw, -1.0, 1.0), valid


def _streamed_logsumexp(anchors: jax.Array, candidates: jax.Array, scale: jax.Array,
                        self_index: jax.Array, block_size: int) -> jax.Array:
  """`[A]` logsumexp over j != self_index[k] of scale * clip(<anchors_k, candidates_j>, -1, 1).

  Inside `shard_map` (with its default `check_vma=True`) a replicated `scale` is first made to
  vary like the anchors, so that JAX sums its per-device cotangents (the transpose of `pvary`).
  """
  scale = scale + _zero_like(anchors)
  return _logsumexp(anchors, candidates, scale, self_index, block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _logsumexp(anchors: jax.Array, candidates: jax.Array, scale: jax.Array,
               self_index: jax.Array, block_size: int) -> jax.Array:
  return _logsumexp_fwd(anchors, candidates, scale, self_index, block_size)[0]


def _logsumexp_fwd(anchors: jax.Array, candidates: jax.Array, scale: jax.Array,
                   self_index: jax.Array, block_size: int) -> tuple[jax.Array, Residuals]:
  """Online logsumexp: per anchor tile, a running max and sum of exp over candidate tiles."""
  num_anchors, num_candidates = anchors.shape[0], candidates.shape[0]
  block_a, block_c = min(block_size, num_anchors), min(block_size, num_candidates)
  candidate_tiles = _tiles(candidates, block_c)
  zero = _zero_like(anchors, candidates, scale, self_index)

  def anchor_tile_lse(args):
    anchor_tile, self_tile = args

    def step(j, carry):
      running_max, running_sum = carry
      _, cos, valid = _tile_cosines(anchor_tile, self_tile, candidate_tiles, j, num_candidates)
      logits = jnp.where(valid, scale * cos, -jnp.inf)
      new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
      shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)  # a tile of only masked columns
      running_sum = (running_sum * jnp.exp(running_max - shift)
                     + jnp.sum(jnp.exp(logits - shift[:, None]), axis=1))
      return new_max, running_sum

    init = (jnp.full((block_a,), -jnp.inf, anchors.dtype) + zero,
            jnp.zeros((block_a,), anchors.dtype) + zero)
    running_max, running_sum = jax.lax.fori_loop(0, candidate_tiles.shape[0], step, init)
    return running_max + jnp.log(running_sum)

  lse = jax.lax.map(anchor_tile_lse, (_tiles(anchors, block_a), _tiles(self_index, block_a, -1)))
  lse = lse.reshape(-1)[:num_anchors]
  return lse, (anchors, candidates, scale, self_index, lse)


def _logsumexp_bwd(block_size: int, residuals: Residuals,
                   g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, None]:
  """Recomputes each tile's softmax from the saved lse; accumulates d anchors, d candidates."""
  anchors, candidates, scale, self_index, lse = residuals
  num_anchors, num_candidates = anchors.shape[0], candidates.shape[0]
  block_a, block_c = min(block_size, num_anchors), min(block_size, num_candidates)
  candidate_tiles = _tiles(candidates, block_c)
  zero = _zero_like(anchors, candidates, scale, self_index, lse, g)

  def anchor_tile_grads(carry, args):
    anchor_tile, self_tile, lse_tile, g_tile = args

    def step(j, inner):
      d_anchor, d_candidates, d_scale = inner
      raw, cos, valid = _tile_cosines(anchor_tile, self_tile, candidate_tiles, j, num_candidates)
      prob = jnp.where(valid, jnp.exp(scale * cos - lse_tile[:, None]), 0.0)
      d_logits = g_tile[:, None] * prob  # d lse_k / d l_kj = softmax_kj
      d_scale = d_scale + jnp.sum(d_logits * cos)
      d_cos = jnp.where(jnp.abs(raw) <= 1.0, scale * d_logits, 0.0)  # through the clip
      d_anchor = d_anchor + _common.matmul(d_cos, candidate_tiles[j])
      d_candidates = d_candidates.at[j].add(_common.matmul(d_cos.T, anchor_tile))
      return d_anchor, d_candidates, d_scale

    d_candidates, d_scale = carry
    init = (jnp.zeros_like(anchor_tile) + zero, d_candidates, d_scale)
    d_anchor, d_candidates, d_scale = jax.lax.fori_loop(
        0, candidate_tiles.shape[0], step, init)
    return (d_candidates, d_scale), d_anchor

  # Padded anchors get lse = +inf (probabilities exactly 0) and a zero cotangent.
  per_tile = (_tiles(anchors, block_a), _tiles(self_index, block_a, -1),
              _tiles(lse, block_a, jnp.inf), _tiles(g, block_a))
  init = (jnp.zeros_like(candidate_tiles) + zero, zero)
  (d_candidates, d_scale), d_anchors = jax.lax.scan(anchor_tile_grads, init, per_tile)
  d_anchors = d_anchors.reshape(-1, anchors.shape[1])
  d_candidates = d_candidates.reshape(-1, candidates.shape[1])
  return (d_anchors[:num_anchors], d_candidates[:num_candidates],
          d_scale.astype(scale.dtype), None)


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _rowwise_cosine(x: jax.Array, y: jax.Array) -> jax.Array:
  """`[N]` clipped cosines of unit rows x_i and y_i (the positives' similarities)."""
  return jnp.clip(jnp.sum(x * y, axis=1), -1.0, 1.0)


def info_nce_blockwise(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    axis_name: str | None = None,
) -> jax.Array:
  """SimCLR's NT-Xent over 2N views, exactly `info_nce(..., similarity='cosine')`, in O(N) memory.

  With u = [z1; z2] (2N rows over the global batch), L2-normalised, and p(k) = k +- N:

    loss = 1/(2N) sum_k ( logsumexp_{j != k} <u_k, u_j> / T  -  <u_k, u_p(k)> / T )

  (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
  eq. 1). The logsumexp is streamed over `[block_size, block_size]` tiles with an online
  maximum (Milakov & Gimelshein 2018; Dao et al. 2022) and differentiated by a custom VJP that
  recomputes the tiles, so no `[2N, 2N]` array exists in either pass. Peak memory is
  O(N d + block_size^2); time is about 4/3 of the dense loss's for value and gradient.

  Under `axis_name`, local anchors are scored against the gathered candidates and the sums are
  `psum`-ed, as in `info_nce`; every device returns the same global loss.

  Example:
    >>> z1, z2 = jax.random.normal(jax.random.key(0), (2, 65536, 256))
    >>> loss, grads = jax.jit(jax.value_and_grad(info_nce_blockwise, (0, 1)))(z1, z2)

  Args:
    z1: `[batch, dim]` embeddings of the first view (need not be normalised; any float dtype,
      computed in float32, or float64 for float64 inputs).
    z2: `[batch, dim]` embeddings of the second view; row i pairs with row i of `z1`.
    temperature: T > 0 (a Python number, or an array, which is then differentiable).
    block_size: rows of anchors and of candidates per tile (clamped to the row counts); any
      batch size works, the last tile is padded and masked.
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar float32 loss (float64 for float64 inputs), the same on every device.

  Raises:
    ValueError: if `z1`/`z2` are not `[batch, dim]` floating arrays of the same shape, if
      `temperature` is a Python number <= 0, or if `block_size` is not a positive integer.
  """
  _common.check_pair("z1", z1, "z2", z2)
  _common.check_positive("temperature", temperature)
  _check_block_size(block_size)
  u1 = geometry.l2_normalize(_common.to_float(z1))
  u2 = geometry.l2_normalize(_common.to_float(z2))
  scale = 1.0 / jnp.asarray(temperature, u1.dtype)
  b = u1.shape[0]
  n = _common.global_batch_size(u1, axis_name)

  anchors = jnp.concatenate([u1, u2], axis=0)  # [2b, d]
  candidates = jnp.concatenate(
      [parallel.all_gather(u1, axis_name), parallel.all_gather(u2, axis_name)], axis=0)  # [2n, d]
  rows = _common.global_row_offset(u1, axis_name) + jnp.arange(b)
  self_index = jnp.concatenate([rows, rows + n])
  lse = _streamed_logsumexp(anchors, candidates, scale, self_index, block_size)
  positives = 2 * scale * jnp.sum(_rowwise_cosine(u1, u2))  # each pair is positive twice
  return parallel.psum(jnp.sum(lse) - positives, axis_name) / (2 * n)


def clip_loss_blockwise(
    a: jax.Array,
    b: jax.Array,
    *,
    logit_scale: float | jax.Array,
    block_size: int = DEFAULT_BLOCK_SIZE,
    axis_name: str | None = None,
) -> jax.Array:
  """CLIP's symmetric cross-entropy, exactly `clip_loss`, in O(N) memory.

  With a_i, b_j L2-normalised and s = min(exp(logit_scale), 100):

    loss = 1/(2N) sum_i ( logsumexp_j s<a_i, b_j> + logsumexp_j s<b_i, a_j> - 2 s<a_i, b_i> )

  (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", Figure 3), each logsumexp streamed over `[block_size, block_size]` tiles as in
  `info_nce_blockwise` (Milakov & Gimelshein 2018; Dao et al. 2022). The gradient reaches
  `logit_scale` (below the clamp). Peak memory O(N d + block_size^2).

  Args:
    a: `[batch, dim]` embeddings of the first modality (e.g. images).
    b: `[batch, dim]` embeddings of the second modality; row i pairs with row i of `a`.
    logit_scale: scalar log inverse temperature (a parameter, or a Python float).
    block_size: rows per tile (clamped to the row counts; the last tile is padded and masked).
    axis_name: mesh/pmap axis of the data-parallel devices, or None on one device.

  Returns:
    Scalar loss, the same on every device.

  Raises:
    ValueError: if `a`/`b` are not `[batch, dim]` floating arrays of the same shape, or if
      `block_size` is not a positive integer.
  """
  _common.check_pair("a", a, "b", b)
  _check_block_size(block_size)
  a = geometry.l2_normalize(_common.to_float(a))
  b = geometry.l2_normalize(_common.to_float(b))
  scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, a.dtype)), CLIP_MAX_LOGIT_SCALE)
  n = _common.global_batch_size(a, axis_name)
  no_self = jnp.full((a.shape[0],), -1, jnp.int32)

  total = (jnp.sum(_streamed_logsumexp(a, parallel.all_gather(b, axis_name), scale, no_self,
                                       block_size))
           + jnp.sum(_streamed_logsumexp(b, parallel.all_gather(a, axis_name), scale, no_self,
                                         block_size))
           - 2 * scale * jnp.sum(_rowwise_cosine(a, b)))
  return parallel.psum(total, axis_name) / (2 * n)
