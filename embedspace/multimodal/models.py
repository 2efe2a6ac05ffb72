"""Encoders of the three modalities and one module that holds them in a joint space.

Images go through `embedspace.models.ResNet` (the unimodal trainer's encoder). Audio goes through
the log-mel front end (`audio.log_mel`, no parameters), a batch norm per mel band (input
normalisation with statistics synchronised over the mesh) and a 1-D convolutional network over
time with the mel bands as channels, as in small keyword-spotting models (e.g. TC-ResNet, Choi
et al. 2019). Text goes through a pre-LN transformer (Vaswani et al. 2017) whose output at the
`<eos>` token is the caption's feature, as in CLIP's text encoder (Radford et al. 2021). Each
modality's features then pass through its own projection head into the joint space (a linear
map in CLIP and ImageBind, an MLP for DeCUR and Barlow Twins).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from embedspace import models as image_models
from embedspace import parallel
from embedspace.models import resnet
from embedspace.multimodal import audio as audio_lib
from embedspace.multimodal import data as data_lib
from embedspace.multimodal import text as text_lib


class AudioEncoder(nn.Module):
  """Waveform `[B, samples]` -> log-mel `[B, T, mels]` -> conv stages -> features `[B, channels[-1]]`.

  Each stage: Conv1D(k=3, stride 2) - BN - ReLU - Conv1D(k=3) - BN - ReLU; features are the
  mean over time of the last stage.
  """
  channels: Sequence[int] = (64, 96, 128)
  num_mels: int = 40
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, waveform: jax.Array, *, train: bool) -> jax.Array:
    """Raises ValueError if `waveform` is not float `[batch, samples]`."""
    if waveform.ndim != 2 or not jnp.issubdtype(waveform.dtype, jnp.floating):
      raise ValueError(f"AudioEncoder takes float waveforms [batch, samples], got "
                       f"{waveform.shape} {waveform.dtype}")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                             axis_name=self.bn_axis_name)
    x = audio_lib.log_mel(waveform, num_mels=self.num_mels)  # [B, T, M]
    x = norm(name="bn_input")(x)
    x = nn.relu(norm(name="bn_stem")(nn.Conv(self.channels[0], (5,), use_bias=False,
                                             name="conv_stem")(x)))
    for i, c in enumerate(self.channels):
      x = nn.Conv(c, (3,), strides=(2,), use_bias=False, name=f"stage{i + 1}_conv1")(x)
      x = nn.relu(norm(name=f"stage{i + 1}_bn1")(x))
      x = nn.Conv(c, (3,), use_bias=False, name=f"stage{i + 1}_conv2")(x)
      x = nn.relu(norm(name=f"stage{i + 1}_bn2")(x))
    return jnp.mean(x, axis=1)


class TextEncoder(nn.Module):
  """Token ids `[B, L]` -> pre-LN transformer -> the `<eos>` token's features `[B, width]`."""
  width: int = 64
  depth: int = 2
  heads: int = 4
  max_length: int = 10

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """Raises ValueError if `tokens` is not an int `[batch, max_length]` array."""
    del train  # No dropout or batch statistics.
    if tokens.ndim != 2 or tokens.shape[1] != self.max_length or not jnp.issubdtype(
        tokens.dtype, jnp.integer):
      raise ValueError(f"TextEncoder takes int tokens [batch, {self.max_length}], got "
                       f"{tokens.shape} {tokens.dtype}")
    vocab = text_lib.vocabulary()
    x = nn.Embed(len(vocab), self.width, name="token_embedding")(tokens)
    x = x + self.param("position_embedding", nn.initializers.normal(0.02),
                       (self.max_length, self.width))
    valid = tokens != vocab.index(text_lib.PAD)
    mask = nn.make_attention_mask(valid, valid)
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"block{i + 1}_ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"block{i + 1}_attn")(
          y, y, mask=mask)
      y = nn.LayerNorm(name=f"block{i + 1}_ln2")(x)
      y = nn.Dense(4 * self.width, name=f"block{i + 1}_mlp1")(y)
      x = x + nn.Dense(self.width, name=f"block{i + 1}_mlp2")(nn.gelu(y))
    x = nn.LayerNorm(name="ln_final")(x)
    eos = jnp.argmax(tokens == vocab.index(text_lib.EOS), axis=-1)
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class MultimodalModel(nn.Module):
  """One encoder + projection head per modality, and one learnable log logit scale per pair.

  `embed(modality, x)` returns `(features, embeddings)` of one modality; `__call__` embeds a
  dict of modalities (used to initialise every parameter at once).

  Attributes:
    modalities: the modalities to build, from ('image', 'audio', 'text').
    pair_names: 'image-audio' style names; each gets a `logit_scale/<name>` parameter.
    image: kwargs of `embedspace.models.ResNet` (stage_sizes, width).
    audio: kwargs of `AudioEncoder` (channels, num_mels).
    text: kwargs of `TextEncoder` (width, depth, heads, max_length).
    projector_dims: layers of each head (`embedspace.models.MLP`; one entry: a linear map).
    logit_scale_init: initial log inverse temperature (CLIP: log(1 / 0.07)).
    bn_axis_name: mesh axis for synchronised batch norm.
  """
  modalities: Sequence[str]
  pair_names: Sequence[str]
  image: Mapping[str, object]
  audio: Mapping[str, object]
  text: Mapping[str, object]
  projector_dims: Sequence[int]
  logit_scale_init: float
  bn_axis_name: str | None = None

  def setup(self):
    unknown = set(self.modalities) - {"image", "audio", "text"}
    if unknown:
      raise ValueError(f"unknown modalities {sorted(unknown)}; use image, audio, text")
    encoders = {
        "image": lambda: resnet.ResNet(bn_axis_name=self.bn_axis_name, **self.image),
        "audio": lambda: AudioEncoder(bn_axis_name=self.bn_axis_name, **self.audio),
        "text": lambda: TextEncoder(**self.text),
    }
    self.encoders = {m: encoders[m]() for m in self.modalities}
    self.heads = {m: image_models.MLP(dims=tuple(self.projector_dims),
                                      bn_axis_name=self.bn_axis_name) for m in self.modalities}
    self.logit_scales = {p: self.param(f"logit_scale_{p}", nn.initializers.constant(
        self.logit_scale_init), ()) for p in self.pair_names}

  def embed(self, modality: str, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """`(features [B, F], embeddings [B, projector_dims[-1]])` of one modality's inputs.

    Raises:
      ValueError: a modality this model was not built with.
    """
    if modality not in self.encoders:
      raise ValueError(f"this model has no {modality!r} encoder (modalities: "
                       f"{tuple(self.modalities)})")
    features = self.encoders[modality](x, train=train)
    return features, self.heads[modality](features, train=train)

  def logit_scale(self, pair_name: str) -> jax.Array:
    """The learnable log inverse temperature of one pair (a scalar parameter)."""
    return self.logit_scales[pair_name]

  def __call__(self, inputs: Mapping[str, jax.Array], *, train: bool):
    out = {m: self.embed(m, x, train=train) for m, x in inputs.items()}
    return out, {p: self.logit_scale(p) for p in self.pair_names}


def pairs_of(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
  """The trained pairs, e.g. (('image', 'audio'), ('image', 'text'))."""
  return data_lib.parse_pairs(config.pairs)


def modalities_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Every modality of a trained pair, in the order image, audio, text."""
  used = {m for pair in pairs_of(config) for m in pair}
  return tuple(m for m in data_lib.MODALITIES if m in used)


def build_model(config: ml_collections.ConfigDict, *,
                bn_axis_name: str | None = parallel.AXIS) -> MultimodalModel:
  """The encoders and heads of every modality of `config.pairs`, one logit scale per pair."""
  return MultimodalModel(
      modalities=modalities_of(config), pair_names=tuple("-".join(p) for p in pairs_of(config)),
      image=config.model.image.to_dict(), audio=config.model.audio.to_dict(),
      text=config.model.text.to_dict(), projector_dims=tuple(config.model.projector_dims),
      logit_scale_init=float(config.loss.logit_scale_init), bn_axis_name=bn_axis_name)


def dummy_inputs(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Two zero examples of each modality (shapes only), for `init`."""
  shapes = {"image": ((2, 28, 28, 1), jnp.float32),
            "audio": ((2, config.data.audio_samples), jnp.float32),
            "text": ((2, config.model.text.max_length), jnp.int32)}
  return {m: jnp.zeros(*shapes[m]) for m in modalities_of(config)}
