"""A trained embedding model, loaded from its workdir: `embedspace.load(workdir).embed(images)`.

`trained_model` takes the variables of a training run (restored by `core.workdirs`, each array
checked against the sha256 record training wrote) and checks that the parameters have the shapes
the config builds, so a workdir of another version or model is one clear error, not a shape
error deep inside the forward pass. `TrainedModel.embed` maps raw uint8 images to embeddings
through exactly the evaluation's preprocessing (`data.augment.center_view`: the central square
resized to the training size, normalised with the training dataset's constants) and the same
jitted forward the evaluation uses (`embed`): `jax.jit(jax.shard_map(...))` over a mesh of the
local devices, in batches of one fixed size, the last one padded, so that no input length
compiles the forward again. Outputs stream batch by batch (`embed_stream`), one batch in flight
while the next is preprocessed, so a data set of any size is embedded in bounded memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from embedspace import parallel
from embedspace.core import checkpointing
from embedspace.core.workdirs import IncompatibleWorkdirError
from embedspace.data import normalization
from embedspace.data.augment import center_view
from embedspace.space.inputs import uint8_hint

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]

OUTPUTS = ("encoder", "projector")
"""What `TrainedModel.embed` returns: the encoder's features (what transfers; the evaluation's
default) or the projector's embeddings (what the loss saw)."""


class ImageError(ValueError):
  """An image the model cannot take: `index` is its position in the input, `reason` the fault."""

  def __init__(self, index: int, reason: str):
    super().__init__(f"image {index} {reason}")
    self.index, self.reason = index, reason


LOAD_ERRORS = (FileNotFoundError, checkpointing.NoIntactCheckpointError, IncompatibleWorkdirError)
"""What `load_workdir` and `load` raise for a workdir they cannot use (each a one-line message)."""


# ----------------------------------------------------------------------------------------------
# The sharded forward.


def _to_numpy(x: jax.Array) -> np.ndarray:
  """The whole global array on this host (gathered from the other processes when there are any)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=8)
def _sharded_forward(apply_fn: ApplyFn, mesh: Mesh) -> Callable[..., Any]:
  """One jitted forward per (apply_fn, mesh): the evaluation embeds ~7 datasets with it."""
  return jax.jit(parallel.sharded(
      apply_fn, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS)))


def embed(apply_fn: ApplyFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
          mesh: Mesh) -> dict[str, np.ndarray]:
  """Features, embeddings and labels of every real (unmasked) example of `batches`.

  Args:
    apply_fn: `apply_fn(variables, images) -> (features [b, F], embeddings [b, E])` for one
      device's slice of a batch, in inference mode; e.g.
      `functools.partial(model.apply, train=False)` for an `EmbeddingModel`. It may use
      collectives over `parallel.AXIS`, but in inference mode it usually has none.
    variables: the model variables (`{'params': ..., 'batch_stats': ...}`), replicated here.
    batches: iterable of dicts with 'image' `[B, ...]`, 'label' `[B]` and optionally 'mask'
      `[B]` (nonzero for real rows, 0 for padding; default all real). Each is this process's
      slice of a global batch; `B` must be divisible by the number of local devices. Keep `B`
      fixed (pad the last batch): every new `B` compiles the forward again.
    mesh: the data-parallel mesh (`parallel.make_mesh()`).

  Returns:
    dict with 'features' float32 `[N, F]`, 'embeddings' float32 `[N, E]` and 'labels' `[N]`,
    numpy arrays in the order of `batches`, N = number of unmasked rows over all batches (of all
    processes).

  Raises:
    ValueError: if `batches` is empty, a batch lacks 'image' or 'label', its arrays disagree on
      the batch size, or the batch size is not divisible by the device count.
  """
  forward = _sharded_forward(apply_fn, mesh)
  variables = parallel.replicate(mesh, variables)
  n_local = len(mesh.local_devices)

  outputs = []
  for i, batch in enumerate(batches):
    missing = {"image", "label"} - set(batch)
    if missing:
      raise ValueError(f"batch {i} lacks {sorted(missing)}; got keys {sorted(batch)}.")
    size = np.shape(batch["image"])[0]
    mask = batch.get("mask")
    mask = np.ones((size,), bool) if mask is None else np.asarray(mask).astype(bool)
    if np.shape(batch["label"])[:1] != (size,) or mask.shape != (size,):
      raise ValueError(
          f"batch {i}: 'image', 'label' and 'mask' must share the batch size; got shapes "
          f"{np.shape(batch['image'])}, {np.shape(batch['label'])}, {mask.shape}.")
    if size % n_local:
      raise ValueError(
          f"batch {i} has {size} rows, not divisible by the {n_local} local devices "
          f"({mesh.devices.size} in all); use an evaluation batch size that is a multiple of the "
          f"device count and pad the last batch with mask=0 rows.")
    placed = parallel.shard_batch(
        mesh, {"image": batch["image"], "label": np.asarray(batch["label"]), "mask": mask})
    out = forward(variables, placed["image"])
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(f"apply_fn must return (features, embeddings); got {type(out).__name__}.")
    outputs.append((out[0], out[1], placed["label"], placed["mask"]))  # dispatched, not waited on

  if not outputs:
    raise ValueError("embed got no batches.")
  features, embeddings, labels, masks = (
      np.concatenate([_to_numpy(o[j]) for o in outputs]) for j in range(4))
  return {"features": features[masks].astype(np.float32),
          "embeddings": embeddings[masks].astype(np.float32),
          "labels": labels[masks]}


# ----------------------------------------------------------------------------------------------
# A training workdir.


def _input_channels(variables: Mapping[str, Any]) -> int:
  """`C` of the images the encoder takes, read from its first convolution: a ResNet's stem
  `[3, 3, C, width]` or a ViT's patch embedding `[patch, patch, C, width]`."""
  encoder = variables["params"]["encoder"]
  stem = encoder["conv_stem"] if "conv_stem" in encoder else encoder["patch_embedding"]
  return int(np.shape(stem["kernel"])[2])


def check_compatible(model: Any, config: Any, variables: Mapping[str, Any], workdir: str) -> None:
  """Checks that `variables` have the parameter shapes of `model` (built from `config`).

  Raises:
    IncompatibleWorkdirError: a config key the model needs is missing or invalid, or a
      parameter is missing, extra or of another shape.
  """
  hint = (f"{workdir} was written by another version of embedspace or for another model; "
          "load it with the version that trained it, or train again")
  try:
    image_size = int(config.data.image_size)
    channels = _input_channels(variables)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise IncompatibleWorkdirError(f"{hint} (config.json or checkpoint lacks {e}).") from None
  init = functools.partial(model.clone(bn_axis_name=None).init, train=False)
  expected = jax.eval_shape(init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, channels), np.float32))
  want, have = (
      {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(np.shape(x))
       for p, x in jax.tree_util.tree_leaves_with_path(dict(tree))}
      for tree in (expected, variables))
  differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
  if differ:
    first = differ[0]
    raise IncompatibleWorkdirError(
        f"{hint}: {len(differ)} parameter(s) differ from what config.json builds, first {first} "
        f"(checkpoint {have.get(first, 'missing')}, config {want.get(first, 'missing')}).")


# ----------------------------------------------------------------------------------------------
# The loaded model.


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
  """A trained encoder + projector with its preprocessing, ready to embed raw images.

  Attributes:
    workdir: the training workdir (absolute).
    step: the training step of the checkpoint.
    config: the training config (`config.json`).
    model: the `EmbeddingModel` (inference mode, no batch-norm axis).
    variables: `{"params", "batch_stats"}`, replicated over `mesh`.
    mesh: a 1-D mesh of this process's devices.
    image_size: the side `S` of the model's input, `config.data.image_size`.
    channels: `C` of the model's input (1 or 3).
    mean, std: per-channel normalisation of pixel/255 (the training dataset's).
    batch_size: rows per forward call, a multiple of the local device count.
  """

  workdir: str
  step: int
  config: Any
  model: Any
  variables: Any
  mesh: Mesh
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  batch_size: int

  @functools.cached_property
  def _forward(self) -> Callable[..., Any]:
    return _sharded_forward(functools.partial(self.model.apply, train=False), self.mesh)

  def dim(self, output: str = "encoder") -> int:
    """Size of the vectors `embed(..., output=output)` returns.

    Raises:
      ValueError: on an unknown output.
    """
    _check_output(output)
    return self.model.feat_dim if output == "encoder" else self.model.embed_dim

  def preprocess(self, images: np.ndarray | Sequence[np.ndarray], *,
                 resize: bool = False) -> np.ndarray:
    """The model's input for raw images: the evaluation's `center_view` of each.

    Args:
      images: uint8 `[n, H, W]` or `[n, H, W, C]` pixels in [0, 255], or a sequence of `n`
        uint8 `[H, W]` / `[H, W, C]` images (sizes may differ when `resize`).
      resize: take the central square resized to `S x S`, as the evaluation does for datasets
        of another size; False requires `H = W = S`.

    Returns:
      float32 `[n, S, S, C]`, normalised with `mean` and `std`.

    Raises:
      ValueError: on a batch that is not `[n, H, W(, C)]`; `ImageError` (a ValueError) on an
        image of non-uint8 pixels, a wrong rank, another channel count than the model's, or
        (without `resize`) another size than `S x S`.
    """
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
      raise ValueError(f"images must be [n, H, W] or [n, H, W, C]; got shape {images.shape}.")
    out = np.empty((len(images), self.image_size, self.image_size, self.channels), np.float32)
    for i, image in enumerate(images):
      out[i] = center_view(self._checked(np.asarray(image), i, resize=resize),
                           size=self.image_size, mean=mean, std=std)
    return out

  def _checked(self, image: np.ndarray, i: int, *, resize: bool) -> np.ndarray:
    """`image` as `[H, W, C]`, or an `ImageError` saying what is wrong with it."""
    if image.dtype != np.uint8:
      raise ImageError(i, f"is {image.dtype}; images must be uint8 pixels in [0, 255] "
                       f"({uint8_hint(image.dtype)}).")
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or min(image.shape) < 1:
      raise ImageError(i, f"has shape {image.shape}; each image must be [H, W] or [H, W, C].")
    if image.shape[-1] != self.channels:
      raise ImageError(i, f"has {image.shape[-1]} channel(s); the model takes {self.channels} "
                       f"(trained on {self.config.data.name}).")
    if not resize and image.shape[:2] != (self.image_size, self.image_size):
      raise ImageError(
          i, f"is {image.shape[0]}x{image.shape[1]}; the model takes {self.image_size}x"
          f"{self.image_size} (config.data.image_size): pass resize=True (--resize) to take the "
          f"central square resized to {self.image_size}x{self.image_size}, as the evaluation "
          "does.")
    return image

  def embed_stream(self, chunks: Iterable[np.ndarray | Sequence[np.ndarray]], *,
                   output: str = "encoder", resize: bool = False) -> Iterator[np.ndarray]:
    """Embeddings of each chunk of images, in order, one chunk in memory at a time.

    Each chunk is preprocessed (`preprocess`) and run in batches of `batch_size` rows, the last
    padded, so every call of the forward has one shape. While the device computes a chunk, the
    host preprocesses the next one.

    Args:
      chunks: iterable of images as `preprocess` takes them (any number of rows each; chunks of
        `batch_size` rows waste no padding).
      output: one of `OUTPUTS`.
      resize: as in `preprocess`.

    Yields:
      float32 `[n_chunk, dim(output)]` for each chunk.

    Raises:
      ValueError: as `preprocess`, or on an unknown output.
    """
    _check_output(output)
    pick = 0 if output == "encoder" else 1
    pending = None
    for chunk in chunks:
      x = self.preprocess(chunk, resize=resize)
      dispatched = []
      for start in range(0, len(x), self.batch_size):
        part = x[start:start + self.batch_size]
        if len(part) < self.batch_size:  # one shape for every call: pad with zeros
          part = np.concatenate([part, np.zeros((self.batch_size - len(part), *x.shape[1:]),
                                                np.float32)])
        out = self._forward(self.variables, parallel.shard_batch(self.mesh, part))
        dispatched.append((out[pick], min(self.batch_size, len(x) - start)))
      if pending is not None:
        yield _collect(pending, self.dim(output))
      pending = dispatched
    if pending is not None:
      yield _collect(pending, self.dim(output))

  def embed(self, images: np.ndarray | Sequence[np.ndarray], *, output: str = "encoder",
            resize: bool = False) -> np.ndarray:
    """Embeddings of raw images (see `preprocess` for the inputs and `OUTPUTS`).

    Returns:
      float32 `[n, dim(output)]`.

    Raises:
      ValueError: as `preprocess`, or on an unknown output.
    """
    chunks = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
    parts = list(self.embed_stream(chunks, output=output, resize=resize))
    return np.concatenate(parts) if parts else np.zeros((0, self.dim(output)), np.float32)


def _check_output(output: str) -> None:
  if output not in OUTPUTS:
    raise ValueError(f"unknown output {output!r}; valid outputs are {', '.join(OUTPUTS)}.")


def _collect(dispatched: list[tuple[jax.Array, int]], dim: int) -> np.ndarray:
  """The real rows of dispatched forward calls, fetched to the host: float32 `[n, dim]`."""
  if not dispatched:
    return np.zeros((0, dim), np.float32)
  return np.concatenate([np.asarray(out)[:n] for out, n in dispatched]).astype(np.float32)


def trained_model(workdir: str, config: Any, model: Any, variables: Mapping[str, Any], step: int,
                  *, batch_size: int = 256, devices: Sequence[jax.Device] | None = None
                  ) -> TrainedModel:
  """A `TrainedModel` of `model` (an `EmbeddingModel`) with `variables` restored from `workdir`.

  The method's task builds `model` from the workdir's `config` (`embedspace.load(workdir)` is
  the public way in); this checks the shapes and places the variables on `devices`.

  ```python
  import embedspace
  model = embedspace.load("workdirs/vicreg")
  z = model.embed(images)                       # uint8 [n, 28, 28] -> float32 [n, 128]
  z = model.embed(images, output="projector")   # -> [n, 1024]
  ```

  Args:
    batch_size: images per forward call; rounded up to a multiple of the device count.
    devices: the devices to shard batches over (default: all of this process's).

  Raises:
    IncompatibleWorkdirError: the workdir comes from another version or model.
    ValueError: if `batch_size < 1`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  check_compatible(model, config, variables, workdir)
  mesh = parallel.make_mesh(jax.local_devices() if devices is None else devices)
  n = mesh.devices.size
  channels = _input_channels(variables)
  mean, std = normalization(config.data.name, channels=channels)
  return TrainedModel(
      workdir=os.path.abspath(workdir), step=int(step), config=config,
      model=model.clone(bn_axis_name=None), variables=parallel.replicate(mesh, variables),
      mesh=mesh, image_size=int(config.data.image_size), channels=channels,
      mean=tuple(mean), std=tuple(std), batch_size=-(-batch_size // n) * n)
