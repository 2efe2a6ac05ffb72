"""A PaLM-E-style decoder-only language model over multimodal sentences, with a KV cache.

PaLM-E (Driess et al. 2023) feeds a language model "multimodal sentences": the embeddings of
the words, with the outputs of frozen encoders mapped by learned projectors into the same
token-embedding space wherever a placeholder stands (Sec. 3, "Input & Scene Representations").
Here the language model is a small pre-LN GPT-style transformer (Radford et al. 2019) trained
from scratch; each image or recording is one frozen vector, mapped by its modality's MLP
projector to `tokens_per_item` soft tokens that replace that many consecutive `<img>` (or
`<audio>`) placeholder tokens. With `use_items=False` (the text-only baseline) the placeholders
keep their own (learned, item-independent) token embeddings, so the model sees only the words.

`generate` decodes greedily with a key/value cache: the prompt is run once, filling each layer's
keys and values for every prompt position, then each new token attends to the cache. A test
checks that it returns what re-running the whole sequence for every token returns.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Cache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per layer `(keys, values)`, each `[batch, max_length, heads, head_dim]`."""


class Block(nn.Module):
  """Pre-LN transformer block: causal self-attention (optionally cached) and a GELU MLP."""
  width: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, *, index: jax.Array | int,
               cache: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """`x [B, T, W]` at positions `index .. index + T - 1`; returns `(y [B, T, W], cache)`.

    Without a cache the keys are `x`'s own T positions; with one, `x`'s keys and values are
    written at `index` into the cache `[B, S, H, D]` and the queries attend to all S cached
    positions, masked to those at or before their own.
    """
    head_dim = self.width // self.heads
    dense = functools.partial(nn.DenseGeneral, features=(self.heads, head_dim))
    y = nn.LayerNorm(name="ln1")(x)
    q, k, v = (dense(name=n)(y) for n in ("query", "key", "value"))  # [B, T, H, D]
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
      cache = (k, v)
    query_pos = index + jnp.arange(x.shape[1])
    mask = jnp.arange(k.shape[1])[None, :] <= query_pos[:, None]  # [T, S]
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    logits = jnp.where(mask[None, None], logits, jnp.finfo(logits.dtype).min)
    attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
    x = x + nn.DenseGeneral(self.width, axis=(-2, -1), name="out")(attn)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(4 * self.width, name="mlp1")(y)
    return x + nn.Dense(self.width, name="mlp2")(nn.gelu(y)), cache


class PalmE(nn.Module):
  """Token ids with item placeholders + frozen item vectors -> next-token logits `[B, T, V]`.

  Attributes:
    vocab_size: number of token ids.
    image_token, audio_token: the placeholder ids replaced by the projected image / audio vector.
    width, depth, heads: the transformer.
    max_length: positions of the learned position embedding (longest prompt + answer).
    tokens_per_item: soft tokens per image or recording (its placeholder repeats that often).
    use_items: False for the text-only baseline (placeholders keep their token embeddings).
  """
  vocab_size: int
  image_token: int
  audio_token: int
  width: int = 128
  depth: int = 2
  heads: int = 4
  max_length: int = 16
  tokens_per_item: int = 2
  use_items: bool = True

  def setup(self):
    if self.width % self.heads:
      raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
    self.embed = nn.Embed(self.vocab_size, self.width, name="token_embedding")
    self.position = self.param("position_embedding", nn.initializers.normal(0.02),
                               (self.max_length, self.width))
    self.blocks = [Block(self.width, self.heads, name=f"block{i + 1}") for i in range(self.depth)]
    self.ln_final = nn.LayerNorm(name="ln_final")
    if self.use_items:
      self.projectors = {m: [nn.Dense(self.width, name=f"{m}_projector1"),
                             nn.Dense(self.tokens_per_item * self.width, name=f"{m}_projector2")]
                         for m in ("image", "audio")}

  def project(self, modality: str, vectors: jax.Array) -> jax.Array:
    """A frozen vector per item `[B, F]` -> its soft tokens `[B, tokens_per_item, width]`."""
    first, second = self.projectors[modality]
    x = second(nn.gelu(first(vectors.astype(jnp.float32))))
    return x.reshape(x.shape[0], self.tokens_per_item, self.width)

  def __call__(self, tokens: jax.Array, image: jax.Array, audio: jax.Array, *,
               index: jax.Array | int = 0, cache: Cache | None = None
               ) -> tuple[jax.Array, Cache | None]:
    """Logits of the next token at each position of `tokens [B, T]` (positions index..index+T-1).

    `image [B, Fi]` and `audio [B, Fa]` are the items of each row (zeros where a row has none);
    the j-th `<img>` placeholder of a row becomes its image's j-th soft token (j counted within
    `tokens`, so a prompt's placeholders must all lie in the same call: the prefill).

    Returns:
      `(logits float32 [B, T, vocab_size], the updated cache or None)`.

    Raises:
      ValueError: `tokens` is not an int `[batch, length]` array, or runs past `max_length`.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [batch, length], got {tokens.shape} {tokens.dtype}")
    if isinstance(index, int) and index + tokens.shape[1] > self.max_length:
      raise ValueError(f"positions {index}..{index + tokens.shape[1] - 1} exceed "
                       f"max_length={self.max_length}")
    x = self.embed(tokens)
    if self.use_items:
      for token, modality, vectors in ((self.image_token, "image", image),
                                       (self.audio_token, "audio", audio)):
        is_slot = tokens == token
        slot = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, self.tokens_per_item - 1)
        soft = jnp.take_along_axis(self.project(modality, vectors), slot[..., None], axis=1)
        x = jnp.where(is_slot[..., None], soft, x)
    x = x + jax.lax.dynamic_slice_in_dim(self.position, index, tokens.shape[1])[None]
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, index=index, cache=None if cache is None else cache[i])
      new_cache.append(layer_cache)
    logits = self.embed.attend(self.ln_final(x)).astype(jnp.float32)
    return logits, None if cache is None else tuple(new_cache)

  def init_cache(self, batch_size: int, length: int) -> Cache:
    """Zero keys and values for `length` positions of `batch_size` rows."""
    shape = (batch_size, length, self.heads, self.width // self.heads)
    return tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
                 for _ in range(self.depth))


def answer_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the answer tokens, and their count.

  `sum_t w_t * -log softmax(logits_t)[targets_t]` with `w_t` 1 where `targets_t` is an answer
  token (or the `<eos>` that ends it) and 0 on prompt and padding positions, so only the answer
  is learned (PaLM-E trains on the answer/continuation only; Sec. 5). Accumulated in float32.

  Args:
    logits: `[B, T, V]`.
    targets: int `[B, T]`, the next token of each position.
    weights: `[B, T]` in {0, 1}.

  Returns:
    `(sum of the weighted losses, sum of the weights)`, float32 scalars.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def next_token(model: PalmE, logits: jax.Array) -> jax.Array:
  """The greedy choice `[B]` from `logits [B, V]`, never a placeholder: items enter only in
  the prompt (a generated `<img>` would have no item to stand for)."""
  banned = jnp.isin(jnp.arange(logits.shape[-1]), jnp.array([model.image_token,
                                                              model.audio_token]))
  return jnp.argmax(jnp.where(banned, -jnp.inf, logits), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def generate(model: PalmE, params: Any, prompt: jax.Array, image: jax.Array, audio: jax.Array,
             *, steps: int) -> jax.Array:
  """Greedy decoding with a KV cache: `steps` new tokens after each row's `prompt [B, P]`.

  The prompt (all rows of the same length, holding every placeholder) fills the cache in one
  call; each later token is one call of length 1 at the next position.

  Returns:
    int32 `[B, steps]`.
  """
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + steps)
  logits, cache = model.apply({"params": params}, prompt, image, audio, index=0, cache=cache)
  first = next_token(model, logits[:, -1])

  def step(carry, i):
    token, cache = carry
    logits, cache = model.apply({"params": params}, token[:, None], image, audio,
                                index=length + i, cache=cache)
    nxt = next_token(model, logits[:, -1])
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(step, (first, cache), jnp.arange(steps - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def generate_uncached(model: PalmE, params: Any, prompt: jax.Array, image: jax.Array,
                      audio: jax.Array, *, steps: int) -> jax.Array:
  """The reference for `generate`: the whole sequence is run again for every new token."""
  tokens = prompt
  for _ in range(steps):
    logits, _ = model.apply({"params": params}, tokens, image, audio)
    tokens = jnp.concatenate([tokens, next_token(model, logits[:, -1])[:, None]], axis=1)
  return tokens[:, prompt.shape[1]:]
