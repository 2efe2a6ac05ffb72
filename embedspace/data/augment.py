"""Per-example image augmentation for self-supervised views, in plain numpy.

The SimCLR family of augmentations (Chen et al. 2020, "A Simple Framework for Contrastive Learning
of Visual Representations"; VICReg and Barlow Twins use the same recipe): random resized crop,
horizontal flip, colour jitter, optional gaussian blur, noise and random erasing (Zhong et al.
2017). Crop, resize, flip and blur are all linear maps along rows and columns, so each view is
computed as `R @ image @ C^T` with two small weight matrices (`resize_weights`, folded with a
flip and a blur): one pair of matmuls per view, whatever the source size. Resizing uses a triangle
(bilinear) filter whose support widens when downsampling, i.e. antialiased like PIL's bilinear.
Crop boxes are continuous (sub-pixel), not rounded to whole pixels.

Every random draw comes from the `np.random.Generator` that grain hands to a `RandomMap` for the
record, so a view depends only on (seed, record position): runs are reproducible and resumable.
Outputs are normalised as `(x / 255 - mean) / std` per channel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation strengths; the defaults suit 28x28 images (a milder crop than ImageNet's 0.08).

  Attributes:
    crop_scale: range of the crop's area as a fraction of the image's.
    crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    flip_prob: probability of a horizontal flip.
    jitter_prob: probability of applying brightness/contrast/saturation jitter.
    brightness: brightness factor drawn from `[1 - b, 1 + b]` (multiplies pixels).
    contrast: contrast factor from `[1 - c, 1 + c]` (scales deviations from the image mean).
    saturation: saturation factor from `[1 - s, 1 + s]` (RGB only).
    grayscale_prob: probability of converting to grayscale (RGB only).
    blur_prob: probability of a gaussian blur.
    blur_sigma: range of the blur's sigma, in output pixels.
    noise_prob: probability of adding gaussian noise.
    noise_std: standard deviation of that noise, in units of the [0, 1] pixel range.
    erase_prob: probability of random erasing (a rectangle set to the dataset mean).
    erase_scale: range of the erased area as a fraction of the image's.
    erase_ratio: range of the erased rectangle's aspect ratio.
  """

  crop_scale: tuple[float, float] = (0.3, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  grayscale_prob: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 1.0)
  noise_prob: float = 0.0
  noise_std: float = 0.05
  erase_prob: float = 0.0
  erase_scale: tuple[float, float] = (0.02, 0.2)
  erase_ratio: tuple[float, float] = (0.3, 3.3)

  def __post_init__(self):
    for name in ("crop_scale", "crop_ratio", "blur_sigma", "erase_scale", "erase_ratio"):
      lo, hi = getattr(self, name)
      object.__setattr__(self, name, (float(lo), float(hi)))
      if not 0 < lo <= hi:
        raise ValueError(f"AugmentConfig.{name}={(lo, hi)}: need 0 < low <= high")
    for name in ("crop_scale", "erase_scale"):
      if getattr(self, name)[1] > 1:
        raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: a fraction, at most 1")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "noise_prob",
                 "erase_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation", "noise_std"):
      if getattr(self, name) < 0:
        raise ValueError(f"AugmentConfig.{name}={getattr(self, name)}: must be >= 0")

  @classmethod
  def create(cls, value: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
    """An `AugmentConfig` from itself, a mapping (dict or `ml_collections.ConfigDict`) or None.

    Raises:
      ValueError: on keys that are not fields, naming them and the valid ones.
    """
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
      value = value.to_dict()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
      raise ValueError(f"unknown augmentation keys {unknown}; valid keys are {names}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def resize_weights(in_size: int, out_size: int, start: Any = 0.0,
                   length: Any = None) -> np.ndarray:
  """Weights that resample the span `[start, start + length)` of an axis to `out_size` pixels.

  Output pixel `i` is centred at input coordinate `c_i = start + (i + 0.5) * s - 0.5` with
  `s = length / out_size` (pixel centres at integers); its weights are the triangle filter
  `max(0, 1 - |j - c_i| / max(s, 1))` over input pixels `j`, normalised to sum to 1. This is
  bilinear interpolation when upsampling and an antialiasing average when downsampling.
  `start` and `length` may be arrays `[k]` (k spans at once, same `in_size`).

  Returns:
    float32 `[out_size, in_size]` (or `[k, out_size, in_size]`); `resized = weights @ signal`.
  """
  length = np.float32(in_size) if length is None else np.asarray(length, np.float32)
  start = np.asarray(start, np.float32)
  scale = length / np.float32(out_size)
  centers = (start[..., None] - 0.5) + _half_steps(out_size) * scale[..., None]
  inv_support = (1.0 / np.maximum(scale, 1.0))[..., None, None]
  w = 1.0 - np.abs(_arange(in_size) - centers[..., None]) * inv_support
  np.maximum(w, 0.0, out=w)
  w /= np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
  return w


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _half_steps(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.float32) + np.float32(0.5)


def gaussian_weights(size: int, sigma: float) -> np.ndarray:
  """A gaussian blur along one axis as a matrix, float32 `[size, size]`, rows summing to 1.

  `B[i, j] ~ exp(-(i - j)^2 / (2 sigma^2))` for `|i - j| <= 3 sigma`; rows are renormalised at
  the borders (so the image does not darken there).
  """
  d = np.arange(size, dtype=np.float32)
  d = d[:, None] - d[None, :]
  w = np.exp(-0.5 * (d / np.float32(sigma)) ** 2) * (np.abs(d) <= max(3 * float(sigma), 1.0))
  return w / w.sum(axis=1, keepdims=True)


def sample_crops(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], num: int) -> tuple[np.ndarray, ...]:
  """`num` random boxes inside the image, as in Inception/SimCLR's random resized crop.

  Area fraction ~ U(scale), aspect ratio (w / h) log-uniform in `ratio`; the first of 10 tries
  that fits, else the largest centred box with the ratio clipped to `ratio`.

  Returns:
    `(top, left, box_height, box_width)`, each float `[num]`, in (fractional) pixels.
  """
  area = height * width * rng.uniform(scale[0], scale[1], size=(num, 10))
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(num, 10)))
  w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
  fits = (w <= width) & (h <= height)
  first = fits.argmax(axis=1)
  found = fits[np.arange(num), first]
  h, w = h[np.arange(num), first], w[np.arange(num), first]
  fallback = min(max(width / height, ratio[0]), ratio[1])
  fh, fw = (height, height * fallback) if width / height > fallback else (width / fallback, width)
  h, w = np.where(found, h, fh), np.where(found, w, fw)
  u = np.where(found, rng.random((2, num)), 0.5)
  return u[0] * (height - h), u[1] * (width - w), h, w


def _apply(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """`rows[v] @ image[:, :, c] @ cols[v]^T`: float32 `[H, W, C]` -> `[V, R, K, C]`."""
  chw = np.moveaxis(image, -1, 0)[None]  # [1, C, H, W]
  x = (rows[:, None] @ chw) @ np.swapaxes(cols, -1, -2)[:, None]  # [V, C, R, K]
  return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def random_views(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig, *,
                 size: int, mean: np.ndarray, std: np.ndarray, num_views: int = 2) -> np.ndarray:
  """Independently augmented, normalised views of one image.

  Each view: random resized crop to `size` x `size`, flip, (with `jitter_prob`) brightness then
  contrast then saturation jitter, grayscale, blur, noise, clipping to [0, 1], normalisation,
  random erasing. The views are computed together (the cost is numpy's per-call overhead).

  Args:
    image: uint8 or float32 `[H, W, C]` in [0, 255], any size, C = 1 or 3.
    rng: the source of every random draw.
    config: augmentation strengths.
    size: output height and width.
    mean, std: float32 `[C]`, normalisation of pixel/255.
    num_views: views to draw.

  Returns:
    float32 `[num_views, size, size, C]`, `(x / 255 - mean) / std` of the augmented views.
  """
  h, w, c = image.shape
  v = num_views
  top, left, bh, bw = sample_crops(rng, h, w, config.crop_scale, config.crop_ratio, v)
  if h == w:  # One call for both axes.
    weights = resize_weights(h, size, np.concatenate([top, left]), np.concatenate([bh, bw]))
    rows, cols = weights[:v], weights[v:]
  else:
    rows, cols = resize_weights(h, size, top, bh), resize_weights(w, size, left, bw)
  rows *= np.float32(1 / 255)
  flip = rng.random(v) < config.flip_prob
  cols[flip] = cols[flip][:, ::-1]
  if config.blur_prob > 0:
    blur = rng.random(v) < config.blur_prob
    sigma = rng.uniform(config.blur_sigma[0], config.blur_sigma[1], v)
    for i in np.flatnonzero(blur):
      g = gaussian_weights(size, sigma[i])
      rows[i], cols[i] = g @ rows[i], g @ cols[i]
  x = _apply(image.astype(np.float32, copy=False), rows, cols)  # [v, size, size, c] in [0, 1]

  if config.jitter_prob > 0:
    on = rng.random(v) < config.jitter_prob
    b = np.where(on, rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness, v), 1)
    k = np.where(on, rng.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast, v), 1)
    m = x.reshape(v, -1).mean(axis=1) * b  # contrast after brightness: (b x - m) k + m
    x *= (b * k).astype(np.float32)[:, None, None, None]
    x += ((1 - k) * m).astype(np.float32)[:, None, None, None]
    if c == 3 and config.saturation > 0:
      s = np.where(on, rng.uniform(max(0.0, 1 - config.saturation), 1 + config.saturation, v), 1)
      s = s.astype(np.float32)[:, None, None, None]
      x = x * s + (1 - s) * (x @ _LUMA)[..., None]
  if c == 3 and config.grayscale_prob > 0:
    gray = rng.random(v) < config.grayscale_prob
    x[gray] = (x[gray] @ _LUMA)[..., None]
  if config.noise_prob > 0:
    noisy = rng.random(v) < config.noise_prob
    x[noisy] += config.noise_std * rng.standard_normal(x[noisy].shape, dtype=np.float32)
  np.maximum(x, 0.0, out=x)
  np.minimum(x, 1.0, out=x)
  x -= mean
  x /= std

  if config.erase_prob > 0:
    for i in np.flatnonzero(rng.random(v) < config.erase_prob):
      area = size * size * rng.uniform(*config.erase_scale)
      aspect = math.exp(rng.uniform(math.log(config.erase_ratio[0]),
                                    math.log(config.erase_ratio[1])))
      eh = min(size, max(1, round(math.sqrt(area / aspect))))
      ew = min(size, max(1, round(math.sqrt(area * aspect))))
      t0, l0 = rng.integers(0, size - eh + 1), rng.integers(0, size - ew + 1)
      x[i, t0:t0 + eh, l0:l0 + ew] = 0.0  # the dataset mean after normalisation
  return x


def center_view(image: np.ndarray, *, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """The deterministic evaluation view: the central square, resized to `size`, normalised.

  Args:
    image: uint8 `[H, W, C]`.
    size: output height and width (a 28x28 image at size 28 is returned unchanged but for the
      normalisation).
    mean, std: float32 `[C]`.

  Returns:
    float32 `[size, size, C]`.
  """
  h, w, _ = image.shape
  side = min(h, w)
  rows = resize_weights(h, size, (h - side) / 2, side) * np.float32(1 / 255)
  cols = resize_weights(w, size, (w - side) / 2, side)
  x = _apply(image.astype(np.float32, copy=False), rows[None], cols[None])[0]
  x -= mean
  x /= std
  return x
