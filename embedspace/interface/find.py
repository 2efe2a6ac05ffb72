"""A FIND-style interface over frozen embeddings: grounding, retrieval, segmentation, one space.

FIND (Zou et al., NeurIPS 2024, "Interfacing Foundation Models' Embeddings") keeps the
foundation models frozen and trains only a small transformer "interface" that reads their
embeddings and answers several tasks through one shared space. Here the foundation models are
the encoders of an ImageBind run (`config.encoders_workdir`): the ResNet's feature maps of a
whole scene (it is fully convolutional before its pooling; read with flax's
`capture_intermediates`, so the encoder is not modified) and the joint-space embedding of a
prompt, a caption or a spoken digit. The interface holds `num_queries` learned queries and one
prompt token; the queries attend to each other and the prompt token to everything (FIND's
interleaved attention mask, so the queries' outputs do not depend on the prompt), and all of
them cross-attend to the scene's feature map. Outputs:

- per query: a mask (its embedding dotted with per-pixel features, as in Mask2Former), an
  objectness logit, and an embedding in the prompt space (segmentation of every item; retrieval
  scores a scene by its best query: no extra forward per prompt);
- the prompt token: a box and a mask of the item the prompt names (grounding).

Training (`make_loss_fn`, the loss of the core's step): queries are matched to items by the
exact minimum-cost assignment, enumerated over all permutations (4! = 24; DETR's Hungarian
matching for a handful of slots); then mask BCE + dice on matched queries, objectness BCE on all,
cross-entropy of each matched query's embedding against the ten digits' caption prototypes
(temperature `loss.temperature`), and for the prompt token mask BCE + dice, box L1 + GIoU (DETR's
box losses, Carion et al. 2020). Everything is float32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from embedspace import parallel
from embedspace.models import resnet


class FindModel(NamedTuple):
  """The trained interface and the frozen image encoder it reads."""
  interface: "FindInterface"
  encoder: resnet.ResNet


def spatial_features(encoder: resnet.ResNet, variables: Any, images: jax.Array) -> list[jax.Array]:
  """The output of each stage of the frozen ResNet, `[B, H / 2**i, W / 2**i, width * 2**i]`.

  Reads the blocks' outputs with `capture_intermediates` (eval mode, running batch statistics),
  under `stop_gradient`.
  """
  _, state = encoder.apply(variables, images, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, resnet.BasicBlock))
  blocks = state["intermediates"]
  out = []
  for i, n in enumerate(encoder.stage_sizes):
    out.append(jax.lax.stop_gradient(blocks[f"stage{i + 1}_block{n}"]["__call__"][0]))
  return out


class FindInterface(nn.Module):
  """Learned queries and a prompt token over a scene's feature maps (see the module docstring).

  Attributes:
    num_queries: learned queries (the most items a scene holds).
    embed_dim: dimension of the prompt space (the frozen encoders' joint space).
    width, depth, heads: the transformer's width, layers and attention heads.
    mask_size: side of the predicted masks (the canvas side divided by an integer).
    memory_size: the last feature map is average-pooled to at most this side.
  """
  num_queries: int
  embed_dim: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  mask_size: int = 32
  memory_size: int = 16

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array], prompt: jax.Array) -> dict[str, jax.Array]:
    """`stages`: feature maps `[B, h_i, w_i, c_i]`; `prompt`: `[B, embed_dim]`.

    Returns:
      `query_masks` [B, Q, m, m] logits, `objectness` [B, Q] logits, `query_embed` [B, Q, D]
      (unit norm), `prompt_mask` [B, m, m] logits, `box` [B, 4] (x0, y0, x1, y1 in [0, 1]).

    Raises:
      ValueError: a prompt of the wrong size or a feature map `memory_size` cannot pool.
    """
    b, w, q, m = prompt.shape[0], self.width, self.num_queries, self.mask_size
    if prompt.shape != (b, self.embed_dim):
      raise ValueError(f"prompt must be [batch, {self.embed_dim}], got {prompt.shape}")
    pix = sum(jax.image.resize(nn.Dense(w, name=f"pixel_proj{i}")(s), (b, m, m, w), "linear")
              for i, s in enumerate(stages))
    pix = nn.LayerNorm(name="pixel_ln")(pix)
    pix = jnp.concatenate([pix, jnp.broadcast_to(sincos_2d(m, m, w), pix.shape)], axis=-1)
    pix = nn.Dense(w, name="pixel_out")(nn.gelu(nn.Dense(w, name="pixel_mix")(pix)))

    last = stages[-1]
    if last.shape[1] > self.memory_size:
      f = last.shape[1] // self.memory_size
      if last.shape[1] % self.memory_size or last.shape[2] % f:
        raise ValueError(f"memory_size={self.memory_size} must divide the last feature map's "
                         f"side {last.shape[1]}")
      last = nn.avg_pool(last, (f, f), (f, f))
    h_, w_ = last.shape[1], last.shape[2]
    mem = nn.LayerNorm(name="memory_ln")(nn.Dense(w, name="memory_proj")(last))
    mem = jnp.concatenate([mem, jnp.broadcast_to(sincos_2d(h_, w_, w), mem.shape)], axis=-1)
    mem = nn.Dense(w, name="memory_mix")(mem).reshape(b, h_ * w_, w)

    queries = jnp.broadcast_to(self.param("queries", nn.initializers.normal(1.0), (q, w)),
                               (b, q, w))
    unit = prompt / jnp.maximum(jnp.linalg.norm(prompt, axis=-1, keepdims=True), 1e-6)
    x = jnp.concatenate([queries, nn.Dense(w, name="prompt_proj")(unit)[:, None]], axis=1)
    # Queries see queries only; the prompt token sees everything.
    rows, cols = jnp.arange(q + 1)[:, None], jnp.arange(q + 1)[None, :]
    attend = (cols < q) | (rows == q)
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"block{i}_ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"block{i}_self")(
          y, y, mask=attend[None, None])
      y = nn.LayerNorm(name=f"block{i}_ln2")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"block{i}_cross")(
          y, mem)
      y = nn.Dense(4 * w, name=f"block{i}_mlp1")(nn.LayerNorm(name=f"block{i}_ln3")(x))
      x = x + nn.Dense(w, name=f"block{i}_mlp2")(nn.gelu(y))
    x = nn.LayerNorm(name="ln_final")(x)
    mask_embed = nn.Dense(w, name="mask_embed2")(nn.gelu(nn.Dense(w, name="mask_embed1")(x)))
    masks = jnp.einsum("bqd,bhwd->bqhw", mask_embed, pix) / math.sqrt(w)
    query_embed = nn.Dense(self.embed_dim, name="query_embed")(x[:, :q])
    query_embed = query_embed / jnp.maximum(
        jnp.linalg.norm(query_embed, axis=-1, keepdims=True), 1e-6)
    cxcywh = nn.sigmoid(nn.Dense(4, name="box2")(nn.gelu(nn.Dense(w, name="box1")(x[:, q]))))
    box = jnp.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2],
                          axis=-1)
    return {"query_masks": masks[:, :q], "objectness": nn.Dense(1, name="objectness")(
        x[:, :q])[..., 0], "query_embed": query_embed, "prompt_mask": masks[:, q], "box": box}


def sincos_2d(height: int, width: int, dim: int) -> jax.Array:
  """Fixed 2-D sine-cosine position features `[height, width, dim]` (DETR's, Carion et al. 2020).

  A quarter of the channels each are sin(2 pi f y), cos(2 pi f y), sin(2 pi f x), cos(2 pi f x)
  for `dim / 4` frequencies f log-spaced from half a cycle to side / 4 cycles per map, with x, y in
  [0, 1): the coarse ones tell the quadrant, the fine ones the pixel.
  """
  if dim % 4:
    raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
  def axis(side):
    freqs = jnp.geomspace(0.5, max(side / 4, 1.0), dim // 4)
    return 2 * jnp.pi * (jnp.arange(side, dtype=jnp.float32) / side)[:, None] * freqs
  y, x = axis(height)[:, None, :], axis(width)[None, :, :]
  y = jnp.broadcast_to(y, (height, width, dim // 4))
  x = jnp.broadcast_to(x, (height, width, dim // 4))
  return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1)


def forward(model: FindModel, params: Any, frozen: Any, canvas: jax.Array,
            prompt: jax.Array) -> dict[str, jax.Array]:
  """The interface's outputs for normalised canvases `[B, S, S, 1]` and prompts `[B, D]`."""
  stages = spatial_features(model.encoder, frozen["encoder"], canvas)
  return model.interface.apply({"params": params}, stages, prompt)


def select_query(out: dict[str, jax.Array], prompt: jax.Array) -> jax.Array:
  """FIND's grounding by matching: the query `[B]` whose prompt-space embedding is closest (cosine)
  to the prompt `[B, D]`, among the queries that claim an object (all of them if none does).

  The query embeddings are unit vectors, so the largest dot product with a row's prompt is its
  largest cosine: the prompt's own norm does not change the choice.
  """
  sims = jnp.einsum("bqd,bd->bq", out["query_embed"], prompt)
  live = out["objectness"] > 0
  live = jnp.where(jnp.any(live, axis=1, keepdims=True), live, True)
  return jnp.argmax(jnp.where(live, sims, -jnp.inf), axis=1)


# ---------------------------------------------------------------------------------------------
# Losses: pure functions, float32, per example (the step averages them over the global batch).


def mask_bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean sigmoid cross-entropy over the last two (pixel) axes; soft targets allowed."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=(-2, -1))


def dice_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logits), over the pixel axes
  (Milletari et al. 2016, with +1 smoothing as in Mask2Former)."""
  p = nn.sigmoid(logits)
  inter = jnp.sum(p * target, axis=(-2, -1))
  return 1 - (2 * inter + 1) / (jnp.sum(p, axis=(-2, -1)) + jnp.sum(target, axis=(-2, -1)) + 1)


def generalized_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """GIoU of boxes `[..., 4]` (x0, y0, x1, y1): IoU - |C \\ (A u B)| / |C|, C the enclosing box
  (Rezatofighi et al. 2019); in [-1, 1]."""
  def area(x):
    return jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)
  lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
  union = area(a) + area(b) - inter
  enclose = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]),
                     axis=-1)
  return inter / jnp.maximum(union, 1e-9) - (enclose - union) / jnp.maximum(enclose, 1e-9)


def match_queries(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """The minimum-cost one-to-one assignment of items to queries, by enumeration.

  Args:
    cost: `[B, Q, I]`, cost of query q for item i (I <= Q <= 6).
    valid: `[B, I]`, 1 for real items (empty slots cost nothing).

  Returns:
    int32 `[B, I]`: the query assigned to each item slot.
  """
  q, i = cost.shape[1], cost.shape[2]
  if not i <= q <= 6:
    raise ValueError(f"enumerated matching needs items {i} <= queries {q} <= 6")
  perms = jnp.array(list(itertools.permutations(range(q), i)), jnp.int32)  # [P, I]
  per_item = jnp.take_along_axis(cost[:, None], perms[None, :, None, :].repeat(cost.shape[0], 0),
                                 axis=2)[:, :, 0]  # [B, P, I]
  best = jnp.argmin(jnp.sum(per_item * valid[:, None], axis=-1), axis=-1)
  return perms[best]


def find_losses(out: dict[str, jax.Array], batch: dict[str, jax.Array], prototypes: jax.Array,
                *, weights: Any, temperature: float) -> dict[str, jax.Array]:
  """Per-example losses `{name: [B]}` of the interface's outputs (see the module docstring)."""
  masks, valid = batch["masks"], batch["valid"]  # [B, I, m, m], [B, I]
  qm = out["query_masks"]
  pair_mask = (mask_bce(qm[:, :, None], masks[:, None]) + dice_loss(qm[:, :, None], masks[:, None]))
  cost = pair_mask - jax.nn.log_sigmoid(out["objectness"])[:, :, None]
  assigned = jax.lax.stop_gradient(match_queries(cost, valid))  # [B, I]
  matched = jnp.take_along_axis(qm, assigned[:, :, None, None], axis=1)  # [B, I, m, m]
  n_valid = jnp.maximum(jnp.sum(valid, axis=-1), 1)
  seg = jnp.sum((weights.mask_bce * mask_bce(matched, masks)
                 + weights.dice * dice_loss(matched, masks)) * valid, axis=-1) / n_valid
  is_object = jnp.zeros_like(out["objectness"]).at[
      jnp.arange(valid.shape[0])[:, None], assigned].max(valid)
  objectness = jnp.mean(optax.sigmoid_binary_cross_entropy(out["objectness"], is_object), -1)
  protos = prototypes / jnp.linalg.norm(prototypes, axis=-1, keepdims=True)
  embed = jnp.take_along_axis(out["query_embed"], assigned[:, :, None], axis=1)
  logits = embed @ protos.T / temperature  # [B, I, 10]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["labels"], 0))
  classify = jnp.sum(ce * valid, axis=-1) / n_valid
  rows = jnp.arange(masks.shape[0])
  t_mask, t_box = masks[rows, batch["target"]], batch["boxes"][rows, batch["target"]]
  ground_mask = (weights.mask_bce * mask_bce(out["prompt_mask"], t_mask)
                 + weights.dice * dice_loss(out["prompt_mask"], t_mask))
  l1 = jnp.sum(jnp.abs(out["box"] - t_box), axis=-1)
  giou = 1 - generalized_iou(out["box"], t_box)
  return {"segment": seg, "objectness": weights.objectness * objectness,
          "classify": weights.classify * classify, "ground_mask": ground_mask,
          "box_l1": weights.box_l1 * l1, "box_giou": weights.box_giou * giou}


def make_loss_fn(model: FindModel, config: ml_collections.ConfigDict):
  """The per-device loss (`step.LossFn`) on this device's rows of a batch of scenes (see
  `scenes.SceneBatches`): the terms of `find_losses` as global-batch means, summed. Only the
  interface's parameters are trained; the image encoder and prototypes are `state.frozen`."""

  def loss_fn(params, state, batch, rng, *, axis_name):
    del rng
    out = forward(model, params, state.frozen, batch["canvas"], batch["prompt"])
    terms = find_losses(out, batch, state.frozen["prototypes"], weights=config.loss,
                        temperature=config.loss.temperature)
    terms = {k: parallel.batch_mean(v, axis_name) for k, v in terms.items()}
    return sum(terms.values()), (terms, state.batch_stats)

  return loss_fn
