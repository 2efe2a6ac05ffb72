"""Scenes of several shipped MNIST digits on a larger canvas, with their boxes and masks.

A scene is a `canvas_size`^2 canvas cut into a 2x2 grid of cells; 2-4 digits of distinct
classes (so that a prompt naming a digit names one item) are pasted into distinct cells, each at a
random offset of up to `canvas_size // 2 - 28` pixels inside its cell, so items never overlap.
An item's mask is its digit's pixels at or above `threshold` (of 255) and its box the tight box of
that mask, `[x0, y0, x1, y1]` in pixels with x1, y1 exclusive. Scene `i` of a set is a function of
`(seed, i)` only; train scenes draw digits from the multimodal train split and eval scenes from
its eval split, so no eval digit is ever seen in training (the frozen encoders never saw them
either). `SceneBatches` adds a prompt to each training scene: the embedding, from the frozen
encoders, of a caption or a spoken clip of one of its digits (the "target" item).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from embedspace.multimodal import data as mm_data

DIGIT_SIZE = 28
GRID = 2


@dataclasses.dataclass(frozen=True)
class Scenes:
  """`N` scenes of at most `Q` items; slots `>= count` are empty (`valid` False, label -1)."""
  canvas: np.ndarray  # uint8 [N, S, S, 1]
  masks: np.ndarray  # bool [N, Q, S, S]
  boxes: np.ndarray  # float32 [N, Q, 4]: x0, y0, x1, y1 in pixels (x1, y1 exclusive)
  labels: np.ndarray  # int32 [N, Q]: digit, -1 for an empty slot
  valid: np.ndarray  # bool [N, Q]
  items: np.ndarray  # int32 [N, Q]: index of the digit in the source split, -1 if empty
  positions: np.ndarray  # int32 [N, Q, 2]: (row, col) of the digit's top-left pixel


def mask_box(mask: np.ndarray) -> np.ndarray:
  """The tight box `[x0, y0, x1, y1]` (x1, y1 exclusive) of the True pixels of `mask` [H, W].

  An empty mask has the empty box `[0, 0, 0, 0]`.
  """
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  if not len(rows):
    return np.zeros(4, np.float32)
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes `[..., 4]` (x0, y0, x1, y1), broadcast; 0 where the union is empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  def area(x):
    return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
  inter = w * h
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boolean masks `[..., H, W]`, broadcast; 1 where both are empty."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  inter = np.sum(a & b, axis=(-2, -1))
  union = np.sum(a | b, axis=(-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def make_scenes(images: np.ndarray, labels: np.ndarray, *, num_scenes: int, seed: int,
                canvas_size: int, min_items: int, max_items: int, threshold: int,
                first: int = 0) -> Scenes:
  """Scenes `first, ..., first + num_scenes - 1` drawn from `images` (see the module docstring).

  Args:
    images: uint8 `[n, 28, 28, 1]` digits (a split's `image_raw`).
    labels: int `[n]` their digits.
    num_scenes: how many scenes.
    seed: scene `i` uses `np.random.default_rng([seed, i])`.
    canvas_size: side of the canvas, >= 56 (two digits per row).
    min_items, max_items: items per scene, uniform in [min_items, max_items], within [1, 4].
    threshold: a pixel belongs to its digit's mask when >= threshold (0-255).
    first: index of the first scene.

  Raises:
    ValueError: bad sizes, or a class with no image.
  """
  if images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE, 1) or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [n, 28, 28, 1], got {images.shape} {images.dtype}")
  if canvas_size < GRID * DIGIT_SIZE:
    raise ValueError(f"canvas_size={canvas_size} must be >= {GRID * DIGIT_SIZE} (a 2x2 grid of "
                     "28-pixel digits)")
  if not 1 <= min_items <= max_items <= GRID * GRID:
    raise ValueError(f"need 1 <= min_items={min_items} <= max_items={max_items} <= {GRID**2}")
  if not 0 < threshold <= 255:
    raise ValueError(f"threshold={threshold} must be in (0, 255]")
  by_class = [np.flatnonzero(labels == c) for c in range(10)]
  if any(len(p) == 0 for p in by_class):
    raise ValueError("every digit 0-9 needs at least one image")
  cell = canvas_size // GRID
  jitter = cell - DIGIT_SIZE
  n, q, s = num_scenes, max_items, canvas_size
  out = Scenes(canvas=np.zeros((n, s, s, 1), np.uint8), masks=np.zeros((n, q, s, s), bool),
               boxes=np.zeros((n, q, 4), np.float32), labels=np.full((n, q), -1, np.int32),
               valid=np.zeros((n, q), bool), items=np.full((n, q), -1, np.int32),
               positions=np.zeros((n, q, 2), np.int32))
  for i in range(n):
    rng = np.random.default_rng([seed, first + i])
    count = int(rng.integers(min_items, max_items + 1))
    digits = rng.choice(10, count, replace=False)
    cells = rng.choice(GRID * GRID, count, replace=False)
    for k, (digit, c) in enumerate(zip(digits, cells)):
      item = int(by_class[digit][rng.integers(len(by_class[digit]))])
      r0 = (c // GRID) * cell + int(rng.integers(jitter + 1))
      c0 = (c % GRID) * cell + int(rng.integers(jitter + 1))
      pixels = images[item]
      out.canvas[i, r0:r0 + DIGIT_SIZE, c0:c0 + DIGIT_SIZE] = pixels
      out.masks[i, k, r0:r0 + DIGIT_SIZE, c0:c0 + DIGIT_SIZE] = pixels[..., 0] >= threshold
      out.boxes[i, k] = mask_box(out.masks[i, k])
      out.labels[i, k], out.valid[i, k], out.items[i, k] = digit, True, item
      out.positions[i, k] = (r0, c0)
  return out


def downsample_masks(masks: np.ndarray, size: int) -> np.ndarray:
  """Soft masks `float32 [..., size, size]`: the share of each block's pixels in the mask.

  Raises:
    ValueError: if `size` does not divide the masks' side.
  """
  side = masks.shape[-1]
  if side % size:
    raise ValueError(f"mask size {size} must divide the canvas size {side}")
  f = side // size
  blocks = masks.reshape(*masks.shape[:-2], size, f, size, f).astype(np.float32)
  return blocks.mean(axis=(-3, -1))


def normalize(canvas: np.ndarray, mean: float, std: float) -> np.ndarray:
  """uint8 canvas -> the frozen image encoder's input, `(x / 255 - mean) / std`, float32."""
  return ((canvas.astype(np.float32) / 255 - mean) / std).astype(np.float32)


class SceneBatches(mm_data.StepSampler):
  """Endless training scenes with one prompted item each; resumable like a grain iterator.

  Row `r` of the global batch of step `s` is train scene `s * B + r` (`make_scenes`), its target
  a uniformly drawn item, and its prompt a random embedding of the target's digit from a uniformly
  drawn modality of `prompts` (`np.random.default_rng([seed, s, r])`); this process returns
  its rows `[p B / P, (p + 1) B / P)`. Arrays: `canvas` float32 [B, S, S, 1] (normalised),
  `masks` float32 [B, Q, m, m] (soft, at `mask_size`), `boxes` float32 [B, Q, 4] (divided by S),
  `labels` int32 [B, Q], `valid` float32 [B, Q], `target` int32 [B], `prompt` float32 [B, D].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               prompts: Mapping[str, tuple[np.ndarray, np.ndarray]], global_batch_size: int,
               seed: int, scene_kwargs: Mapping[str, int], mask_size: int, mean: float,
               std: float, process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    if not prompts:
      raise ValueError("SceneBatches needs prompt embeddings of at least one modality")
    self.images, self.labels, self.seed = images, labels, seed
    self.prompts = {m: (np.asarray(e, np.float32), np.asarray(y)) for m, (e, y) in prompts.items()}
    self.by_class = {m: [np.flatnonzero(y == c) for c in range(10)]
                     for m, (_, y) in self.prompts.items()}
    self.global_batch_size, self.scene_kwargs = global_batch_size, dict(scene_kwargs)
    self.mask_size, self.mean, self.std = mask_size, mean, std
    self.rows = np.arange(global_batch_size // process_count) + (
        process_index * global_batch_size // process_count)
    self.step = 0

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step` (see the class docstring)."""
    b = self.global_batch_size
    parts = [make_scenes(self.images, self.labels, num_scenes=1, seed=self.seed,
                         first=step * b + int(r), **self.scene_kwargs) for r in self.rows]
    sc = Scenes(*(np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(Scenes)))
    modalities = sorted(self.prompts)
    target, prompt = [], []
    for i, row in enumerate(self.rows):
      rng = np.random.default_rng([self.seed, step, int(row)])
      k = int(rng.integers(int(sc.valid[i].sum())))
      m = modalities[int(rng.integers(len(modalities)))]
      pool = self.by_class[m][sc.labels[i, k]]
      target.append(k)
      prompt.append(self.prompts[m][0][pool[rng.integers(len(pool))]])
    side = sc.canvas.shape[1]
    return {"canvas": normalize(sc.canvas, self.mean, self.std),
            "masks": downsample_masks(sc.masks, self.mask_size),
            "boxes": sc.boxes / side, "labels": sc.labels, "valid": sc.valid.astype(np.float32),
            "target": np.asarray(target, np.int32), "prompt": np.stack(prompt)}
