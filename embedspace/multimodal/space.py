"""A trained multimodal run as one space: embed raw images, recordings and captions, search across.

```python
from embedspace.multimodal import space as mm_space
from embedspace.space import search

space = mm_space.load("workdirs/imagebind")                     # CLIP, ImageBind or DeCUR run
images = space.embed("image", uint8_images)                     # [n, 28, 28(, 1)] -> [n, D]
clips = space.embed("audio", [mm_space.read_wav("7_theo_0.wav")])  # waveforms, any length
words = space.embed("text", ["the number seven"])
values, rows = search.top_k(words, images, measure="cosine", k=5)  # caption -> images
```

The same from the command line (`embedspace.embed` and `embedspace.search` take a multimodal
workdir; `--modality` picks the encoder):

  python -m embedspace.embed --workdir=workdirs/imagebind --modality=image --data=shipped:eval
  python -m embedspace.embed --workdir=workdirs/imagebind --modality=audio --data=shipped:eval
  python -m embedspace.embed --workdir=workdirs/imagebind --modality=audio --data=recordings/
  python -m embedspace.search --embeddings=FILE.npz --query_text="the number seven" --k=8
  python -m embedspace.search --embeddings=FILE.npz --query=7_theo_0.wav --k=8

Every input is prepared as the run's training and evaluation prepare it: images as uint8 28x28
pixels normalised with MNIST's mean and std; recordings as float waveforms at 8 kHz in [-1, 1],
cut to their loudest `config.data.audio_samples` window or zero-padded (`audio.fix_length`);
captions as lower-cased words of the captions' vocabulary (`text.tokenize`; unknown words become
`<unk>` and are named in a warning). The outputs are the joint-space embeddings (after the projector heads), float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from embedspace import data as data_lib
from embedspace.core import workdirs
from embedspace.multimodal import models
from embedspace.multimodal import audio as audio_lib
from embedspace.multimodal import data as mm_data
from embedspace.multimodal import evaluate as mm_evaluate
from embedspace.multimodal import text as text_lib
from embedspace.space import inputs
from embedspace.space import pretrained
from embedspace.space import store

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True, eq=False)
class MultimodalSpace:
  """The encoders of a trained multimodal run (`load`), in eval mode on one device.

  Attributes:
    workdir: the training workdir (absolute).
    step: the training step of the checkpoint.
    config: the training config.
    model: the `MultimodalModel`.
    variables: `{"params", "batch_stats"}`.
    batch_size: items per forward call (the last call padded, so each modality compiles once).
  """

  workdir: str
  step: int
  config: Any
  model: Any
  variables: Any
  batch_size: int

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.model.modalities)

  @property
  def dim(self) -> int:
    return int(self.config.model.projector_dims[-1])

  @functools.cached_property
  def _apply(self):
    return mm_evaluate.make_embed_fn(self.model, self.variables)

  def prepare(self, modality: str, items: Any) -> np.ndarray:
    """The encoder input for raw `items` of `modality` (see the module docstring).

    Raises:
      ValueError: a modality the run has no encoder for, or items of the wrong type or shape
        (the message says what the encoder takes).
    """
    if modality not in self.modalities:
      raise ValueError(f"{self.workdir} has encoders for {', '.join(self.modalities)}, not "
                       f"{modality!r}.")
    if modality == "image":
      x = np.asarray(items)
      if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[1:3] != (28, 28) or (
          x.ndim == 4 and x.shape[-1] != 1):
        raise ValueError(f"images must be uint8 [n, 28, 28] or [n, 28, 28, 1] (grayscale "
                         f"pixels in [0, 255]); got {x.dtype} {x.shape}.")
      mean, std = data_lib.normalization("embedded_mnist", channels=1)
      return ((x.reshape(-1, 28, 28, 1) / 255.0 - mean[0]) / std[0]).astype(np.float32)
    if modality == "audio":
      n = int(self.config.data.audio_samples)
      out = np.zeros((len(items), n), np.float32)
      for i, clip in enumerate(items):
        clip = np.asarray(clip)
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
          raise ValueError(f"recording {i} is {clip.dtype} {clip.shape}; recordings must be 1-D "
                           "float waveforms at 8 kHz in [-1, 1] (read_wav reads a .wav file).")
        if clip.size and np.max(np.abs(clip)) > 1.0 + 1e-6:
          raise ValueError(f"recording {i} reaches {np.max(np.abs(clip)):.4g}; waveforms must be "
                           "in [-1, 1] (int16 PCM: divide by 32768).")
        out[i] = audio_lib.fix_length(clip.astype(np.float32), n)
      return out
    if isinstance(items, str) or not all(isinstance(t, str) for t in items):
      raise ValueError("captions must be a sequence of strings.")
    return text_lib.tokenize(tuple(items), max_length=int(self.config.data.text_length),
                           warn_unknown=True)

  def embed(self, modality: str, items: Any) -> np.ndarray:
    """Joint-space embeddings float32 `[n, D]` of raw `items` (see `prepare`)."""
    x = self.prepare(modality, items)
    if not len(x):
      return np.zeros((0, self.dim), np.float32)
    return mm_evaluate.embed_array(self._apply, modality, x, batch_size=self.batch_size)


def load_workdir(workdir: str) -> tuple[ml_collections.ConfigDict, models.MultimodalModel,
                                        dict[str, Any], int]:
  """`(config, model, variables, step)` of a multimodal run's newest intact checkpoint (`workdir`
  may be "pretrained:NAME", a space shipped in the package).

  The model is built without the batch-norm axis (for use on one device or under plain `jit`);
  `model.apply(variables, modality, x, train=False, method="embed")` gives `(features,
  embeddings)`. Used by the interfaces over frozen encoders (`configs/palme.py`, `find.py`).

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError: see `workdirs.restore_newest`.
    workdirs.IncompatibleWorkdirError: the run is not multimodal or does not fit this version.
  """
  workdir = pretrained.resolve(workdir)  # "pretrained:NAME": a space shipped in the package
  config, variables, step = workdirs.restore_run(
      workdir, lambda c: "pairs" in c, kind="multimodal", config_file="configs/imagebind.py")
  model = models.build_model(config, bn_axis_name=None)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), models.dummy_inputs(config), train=False))["params"]
  workdirs.check_params_fit(workdir, expected, variables["params"])
  return config, model, variables, step


def load(workdir: str, *, batch_size: int = 256) -> MultimodalSpace:
  """The newest intact checkpoint of a CLIP, ImageBind or DeCUR run, ready to embed.

  Raises:
    FileNotFoundError, checkpointing.NoIntactCheckpointError, workdirs.IncompatibleWorkdirError:
      see `load_workdir`.
    ValueError: `batch_size < 1`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  config, model, variables, step = load_workdir(workdir)
  return MultimodalSpace(workdir=os.path.abspath(pretrained.resolve(workdir)), step=int(step), config=config,
                         model=model, variables=variables, batch_size=batch_size)


def read_wav(path: str) -> np.ndarray:
  """A `.wav` file as a float32 mono waveform at 8 kHz in [-1, 1] (`audio.read_wav`)."""
  return audio_lib.read_wav(path, sample_rate=audio_lib.SAMPLE_RATE)


@dataclasses.dataclass(frozen=True)
class Data:
  """Raw items of one modality with their ids, labels (-1: none), class names and source."""
  items: Any
  ids: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  source: dict[str, Any]


_FSDD_NAME = re.compile(r"^(\d)_")


def open_data(space: MultimodalSpace, modality: str, spec: str, *,
              data_dir: str | None = None) -> Data:
  """The items of `--data=spec` for `modality`.

  `shipped:train` / `shipped:eval`: the run's own split of the shipped data (MNIST images, FSDD
  recordings, the training or held-out captions), with digit labels. Otherwise, for images, what
  `inputs.open_items` opens (a dataset, a folder, a `.npy`); for audio, a folder of `.wav`
  files (a name starting `<digit>_`, as FSDD's, gives the label); for text, a `.txt` file of one
  caption per line. Everything is read into memory (these data sets hold thousands of small
  items); `space.image.TrainedModel.embed_stream` is the streaming path of the image models.

  Raises:
    ValueError, FileNotFoundError: a spec that names nothing of the modality (says what it takes).
  """
  digits = tuple(str(d) for d in range(10))
  if spec.startswith("shipped:"):
    split = spec.split(":", 1)[1]
    if split not in SPLITS:
      raise ValueError(f"--data={spec}: the shipped splits are shipped:train and shipped:eval.")
    c = space.config.data
    s = mm_data.load_splits(num_samples=c.audio_samples, text_length=c.text_length)[split]
    items, labels, ids = {
        "image": (s.image_raw, s.image_label, np.arange(len(s.image_label))),
        "audio": (s.audio, s.audio_label, np.array([  # FSDD's file names
            f"{d}_{mm_data.SPEAKERS[p]}_{i}" for d, p, i in zip(
                s.audio_label, s.audio_speaker, mm_data.load_fsdd()["index"][s.audio_id])])),
        "text": (list(s.captions), s.text_label, np.arange(len(s.captions)))}[modality]
    return Data(items, ids, labels.astype(np.int32), digits,
                {"kind": "multimodal", "modality": modality, "split": split})
  if modality == "image":
    found = inputs.open_items(spec, channels=1, data_dir=data_dir)
    images, labels = found.read(0, len(found))
    return Data(np.stack([np.asarray(x) for x in images]), np.asarray(found.ids),
                np.asarray(labels, np.int32), tuple(found.class_names), found.source)
  if modality == "audio":
    if not os.path.isdir(spec):
      raise FileNotFoundError(f"--data={spec}: audio is shipped:train, shipped:eval or a folder "
                              "of .wav files.")
    paths = sorted(os.path.relpath(os.path.join(d, n), spec) for d, _, names in os.walk(spec)
                   for n in names if n.lower().endswith(".wav"))
    if not paths:
      raise ValueError(f"--data={spec} holds no .wav files.")
    labels = [int(m.group(1)) if (m := _FSDD_NAME.match(os.path.basename(p))) else -1
              for p in paths]
    return Data([read_wav(os.path.join(spec, p)) for p in paths], np.array(paths),
                np.array(labels, np.int32), digits, {"kind": "folder", "path": spec})
  if not spec.endswith(".txt") or not os.path.isfile(spec):
    raise FileNotFoundError(f"--data={spec}: text is shipped:train, shipped:eval or a .txt file "
                            "of one caption per line.")
  with open(spec, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  return Data(lines, np.arange(len(lines)), np.full(len(lines), -1, np.int32), digits,
              {"kind": "text", "path": spec})


def embed_to_file(space: MultimodalSpace, modality: str, data: Data, path: str, *,
                  overwrite: bool = True) -> dict[str, Any]:
  """Writes the embeddings of `data` to the embeddings file `path` (`store`), with its sidecar.

  Returns the sidecar record. `overwrite`: replace an existing embeddings file there
  (`store.check_output`).
  """
  if not len(data.ids):
    raise ValueError("there is nothing to embed: the data holds no items.")
  started = time.perf_counter()
  meta = {"model": {"workdir": space.workdir, "step": space.step,
                    "method": space.config.method, "modality": modality,
                    **({"channels": 1} if modality == "image" else {})},
          "output": "joint", "source": data.source, "class_names": list(data.class_names)}
  with store.EmbeddingsWriter(path, num=len(data.ids), dim=space.dim, ids=data.ids,
                              meta=meta, overwrite=overwrite) as writer:
    for start in range(0, len(data.ids), space.batch_size):
      stop = start + space.batch_size
      writer.write(space.embed(modality, data.items[start:stop]), data.labels[start:stop])
    seconds = time.perf_counter() - started
    writer.meta.update(seconds=round(seconds, 3),
                       items_per_second=round(len(data.ids) / max(seconds, 1e-9), 1))
  return {"shape": [len(data.ids), space.dim], **writer.meta}


def embed_query(space: MultimodalSpace, *, text: str | None = None,
                path: str | None = None) -> tuple[np.ndarray, str]:
  """`(vector [D], description)` of a caption, a `.wav` file or an image file."""
  if text is not None:
    return space.embed("text", [text])[0], f'"{text}"'
  if path.lower().endswith(".wav"):
    return space.embed("audio", [read_wav(path)])[0], os.path.basename(path)
  image = inputs.read_image(path, channels=1)
  return space.embed("image", image[None])[0], os.path.basename(path)


def is_multimodal_workdir(workdir: str | None) -> bool:
  """True when `workdir/config.json` is a CLIP, ImageBind or DeCUR run's (it binds `pairs`)."""
  try:
    with open(os.path.join(workdir or "", "config.json"), encoding="utf-8") as f:
      return "pairs" in json.load(f)
  except (OSError, ValueError, AttributeError):
    return False
