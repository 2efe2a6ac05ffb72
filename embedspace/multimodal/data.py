"""The multimodal data: shipped MNIST and spoken digits, paired by class as in AV-MNIST.

Images are the MNIST test split shipped in `embedspace/data/assets/mnist`, re-split 8,000 train /
2,000 eval exactly as the `embedded_mnist` dataset (`data.stratified_split`). Audio is the Free
Spoken Digit Dataset (Jackson et al.; 3,000 clips, 6 speakers), shipped as
`assets/fsdd/fsdd_mulaw.npz.xz`: every clip at 8 kHz, 8-bit mu-law, cropped to its loudest
`MAX_SAMPLES` (~6.8 MB; `python -m embedspace.multimodal.data --recordings=DIR` regenerates it
from the wav files). FSDD's official split is kept: recordings 0-4 of each speaker and digit are
eval (300), 5-49 train (2,700), speaker ids kept. Captions come from `text`'s templates.

Pairs are drawn as in AV-MNIST (Vielzeuf et al. 2018): the first modality of a pair is drawn
uniformly from its train split, and its partner is a random train item of the same digit. The
sampler is a function of (seed, step), so resuming needs only the step (its state goes into the
orbax checkpoint like a grain iterator's), and each process augments only its rows.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import glob
import io
import json
import lzma
import os
import re
import wave
from collections.abc import Mapping
from typing import Any

import numpy as np

from embedspace import data as data_lib
from embedspace.data import augment as image_augment
from embedspace.data import idx as idx_lib
from embedspace.multimodal import audio as audio_lib
from embedspace.multimodal import text as text_lib

ASSET = os.path.join(os.path.dirname(__file__), "assets", "fsdd", "fsdd_mulaw.npz.xz")
MNIST_DIR = os.path.join(os.path.dirname(data_lib.__file__), "assets", "mnist")
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
MAX_SAMPLES = 6000
"""Longest clip shipped (0.75 s; 97% of FSDD's clips are shorter)."""
NUM_EVAL_PER_SPEAKER_DIGIT = 5
"""FSDD's official split: recordings 0-4 of each speaker and digit are the test split."""
MODALITIES = ("image", "audio", "text")
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def build_fsdd_asset(recordings: str, out_path: str = ASSET) -> dict[str, int]:
  """Writes the compact FSDD asset from the wav files `{digit}_{speaker}_{index}.wav`.

  Each clip: int16 8 kHz mono -> `audio.fix_length` crop to at most `MAX_SAMPLES` (the loudest
  window) -> 8-bit mu-law; all clips concatenated, sorted by (digit, speaker, index), with
  offsets, digit, speaker and index arrays, in an `.npz` compressed with xz (preset 9).

  Returns:
    `{"clips": n, "bytes": size of the file}`.

  Raises:
    FileNotFoundError: no wav file in `recordings`.
    ValueError: a file name, sample rate or sample format that is not FSDD's.
  """
  paths = sorted(glob.glob(os.path.join(recordings, "*.wav")))
  if not paths:
    raise FileNotFoundError(f"no .wav files in {recordings} (expected FSDD's recordings/)")
  rows = []
  for path in paths:
    m = _NAME.match(os.path.basename(path))
    if not m or m.group(2) not in SPEAKERS:
      raise ValueError(f"{path}: not an FSDD file name {{digit}}_{{speaker}}_{{index}}.wav")
    with wave.open(path) as w:
      if (w.getframerate(), w.getsampwidth(), w.getnchannels()) != (audio_lib.SAMPLE_RATE, 2, 1):
        raise ValueError(f"{path}: expected 8 kHz 16-bit mono")
      pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    if len(pcm) > MAX_SAMPLES:
      pcm = audio_lib.fix_length(pcm.astype(np.float32), MAX_SAMPLES).astype(np.int16)
    rows.append((int(m.group(1)), SPEAKERS.index(m.group(2)), int(m.group(3)),
                 audio_lib.mulaw_encode(pcm)))
  rows.sort(key=lambda r: r[:3])
  lengths = np.array([len(r[3]) for r in rows], np.int64)
  buffer = io.BytesIO()
  np.savez(buffer, codes=np.concatenate([r[3] for r in rows]),
           offsets=np.concatenate([[0], np.cumsum(lengths)]),
           digit=np.array([r[0] for r in rows], np.uint8),
           speaker=np.array([r[1] for r in rows], np.uint8),
           index=np.array([r[2] for r in rows], np.uint8))
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  with lzma.open(out_path, "wb", preset=9) as f:
    f.write(buffer.getvalue())
  return {"clips": len(rows), "bytes": os.path.getsize(out_path)}


@functools.lru_cache(maxsize=2)
def load_fsdd(path: str = ASSET) -> dict[str, Any]:
  """The shipped clips: `{"clips": list of uint8 mu-law [n_i], "digit", "speaker", "index"}`.

  Raises:
    FileNotFoundError: the asset is missing (regenerate it with `build_fsdd_asset`).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m "
                            "embedspace.multimodal.data --recordings=PATH/fsdd/recordings`")
  with lzma.open(path, "rb") as f:
    z = np.load(io.BytesIO(f.read()))
    codes, offsets = z["codes"], z["offsets"]
    return {"clips": [codes[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
            "digit": z["digit"].astype(np.int32), "speaker": z["speaker"].astype(np.int32),
            "index": z["index"].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of every modality, ready for the encoders (`image` normalised float32)."""
  image: np.ndarray  # float32 [Ni, 28, 28, 1], normalised
  image_raw: np.ndarray  # uint8 [Ni, 28, 28, 1] (augmentation input)
  image_label: np.ndarray  # int32 [Ni]
  audio: np.ndarray  # float32 [Na, num_samples] in [-1, 1]
  audio_label: np.ndarray  # int32 [Na]
  audio_speaker: np.ndarray  # int32 [Na]
  audio_id: np.ndarray  # int32 [Na]: position in the shipped asset (the clip's identity)
  text: np.ndarray  # int32 [Nt, max_length]
  text_label: np.ndarray  # int32 [Nt]
  captions: tuple[str, ...]  # [Nt]


SOURCES = ("shipped", "tfds")
"""Where `load_splits` reads: the data shipped in the package, or TFDS `mnist` + `spoken_digit`."""


@functools.lru_cache(maxsize=4)
def load_splits(*, num_samples: int, text_length: int, source: str = "shipped",
                data_dir: str | None = None) -> dict[str, Split]:
  """`{"train": Split, "eval": Split}` (see the module docstring).

  Args:
    num_samples: clip length in samples at 8 kHz (clips are cropped to their loudest window or
      zero-padded).
    text_length: caption length in tokens.
    source: 'shipped' (the package's MNIST test split re-split 8,000/2,000, and its FSDD copy)
      or 'tfds': TFDS `mnist` (train 60,000 / test 10,000) and `spoken_digit` (FSDD v1.0.9,
      2,500 clips, the same official split by recording index), both prepared as array_record
      in `data_dir` (needs network once; see `tfds_records`).
    data_dir: TFDS data dir for `source='tfds'` (default `$TFDS_DATA_DIR`).

  Raises:
    ValueError: if `num_samples` is not in [400, MAX_SAMPLES] or `source` is unknown.
    FileNotFoundError: a TFDS dataset is not prepared (the message says how to prepare it).
  """
  if not 400 <= num_samples <= MAX_SAMPLES:
    raise ValueError(f"num_samples={num_samples} must be in [400, {MAX_SAMPLES}]")
  if source not in SOURCES:
    raise ValueError(f"source={source!r} must be one of {SOURCES}")
  if source == "shipped":
    images, labels = idx_lib.read_idx_pair(
        os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz"),
        os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz"), num_classes=10)
    image_split = {"train": (images, labels), "eval": (images, labels)}
    image_index = dict(zip(("train", "eval"), data_lib.stratified_split(labels, num_train=8000)))
    fsdd = load_fsdd()
    waves = np.stack([audio_lib.fix_length(audio_lib.mulaw_decode(c), num_samples)
                      for c in fsdd["clips"]])
  else:
    image_split = {name: _image_arrays(tfds_records("mnist", split, data_dir))
                   for name, split in (("train", "train"), ("eval", "test"))}
    image_index = {name: np.arange(len(image_split[name][1])) for name in image_split}
    fsdd = fsdd_from_records(tfds_records("spoken_digit", "train", data_dir))
    waves = np.stack([audio_lib.fix_length(c, num_samples) for c in fsdd["clips"]])
  mean, std = data_lib.normalization("embedded_mnist", channels=1)
  is_eval = fsdd["index"] < NUM_EVAL_PER_SPEAKER_DIGIT
  out = {}
  for name, templates in (("train", text_lib.TRAIN_TEMPLATES),
                          ("eval", text_lib.HELD_OUT_TEMPLATES)):
    images, labels = image_split[name]
    ii = image_index[name]
    ai = np.flatnonzero(is_eval if name == "eval" else ~is_eval).astype(np.int32)
    raw = images[ii].reshape(len(ii), 28, 28, 1)
    strings, text_labels = text_lib.captions(templates)
    out[name] = Split(
        image=((raw.astype(np.float32) / 255 - mean[0]) / std[0]).astype(np.float32),
        image_raw=raw, image_label=labels[ii].astype(np.int32), audio=waves[ai],
        audio_label=fsdd["digit"][ai], audio_speaker=fsdd["speaker"][ai], audio_id=ai,
        text=text_lib.tokenize(strings, max_length=text_length), text_label=text_labels,
        captions=tuple(strings))
  return out


def tfds_records(name: str, split: str, data_dir: str | None) -> Any:
  """`tfds.data_source(name, split)` from `data_dir`, or a FileNotFoundError saying what to run.

  Nothing is downloaded at run time: on a machine with network, `tfds build mnist spoken_digit
  --file_format=array_record --data_dir=DIR` prepares both (then copy DIR here).
  """
  import tensorflow_datasets as tfds  # Only for source='tfds'.

  data_dir = os.path.expanduser(data_dir) if data_dir else data_lib.default_data_dir()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, AssertionError) as e:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared as array_record in {data_dir}. On a machine "
        f"with network run `tfds build {name} --file_format=array_record --data_dir=DIR` and "
        f"copy DIR/{name} to {data_dir}/ (or set config.data.tfds_data_dir=DIR); or use the "
        "shipped data (config.data.source='shipped').") from e


def _image_arrays(records: Any) -> tuple[np.ndarray, np.ndarray]:
  """`(uint8 [N, 28, 28, 1], int32 [N])` of a TFDS `mnist` split."""
  n = len(records)
  rows = [records[i] for i in range(n)]
  return (np.stack([np.asarray(r["image"], np.uint8) for r in rows]),
          np.array([int(r["label"]) for r in rows], np.int32))


def fsdd_from_records(records: Any) -> dict[str, Any]:
  """Records of TFDS `spoken_digit` (int PCM `audio`, `audio/filename`) as `load_fsdd`'s dict.

  The clips are float32 waveforms in [-1, 1] (not mu-law codes); digit, speaker and index
  come from the file name `{digit}_{speaker}_{index}.wav`, sorted as the shipped asset is.

  Raises:
    ValueError: a file name that is not FSDD's, or a speaker not in `SPEAKERS`.
  """
  rows = []
  for i in range(len(records)):
    r = records[i]
    name = r["audio/filename"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    m = _NAME.match(os.path.basename(name))
    if not m or m.group(2) not in SPEAKERS:
      raise ValueError(f"{name!r}: not an FSDD file name {{digit}}_{{speaker}}_{{index}}.wav "
                       f"with a speaker in {SPEAKERS}")
    pcm = np.asarray(r["audio"]).reshape(-1).astype(np.float32) / 32768.0
    rows.append((int(m.group(1)), SPEAKERS.index(m.group(2)), int(m.group(3)), pcm))
  rows.sort(key=lambda row: row[:3])
  return {"clips": [row[3] for row in rows],
          "digit": np.array([row[0] for row in rows], np.int32),
          "speaker": np.array([row[1] for row in rows], np.int32),
          "index": np.array([row[2] for row in rows], np.int32)}


def parse_pairs(pairs: str) -> tuple[tuple[str, str], ...]:
  """'image-audio,image-text' -> (('image', 'audio'), ('image', 'text')).

  Raises:
    ValueError: an unknown modality, a pair of one modality twice, or a repeated pair.
  """
  out = []
  for item in pairs.split(","):
    parts = tuple(item.strip().split("-"))
    if len(parts) != 2 or parts[0] == parts[1] or not set(parts) <= set(MODALITIES):
      raise ValueError(f"pair {item!r} must be two different modalities of {MODALITIES} "
                       "joined by '-', e.g. 'image-audio'")
    if parts in out:
      raise ValueError(f"pair {item!r} is repeated in {pairs!r}")
    out.append(parts)
  return tuple(out)


def batch_keys(pairs: tuple[tuple[str, str], ...], *, views: int) -> list[tuple[str, str]]:
  """`(key, modality)` of every array in a batch: 'image-audio/image', '.../image2' (view 2)."""
  keys = []
  for a, b in pairs:
    for m in (a, b):
      keys += [(f"{a}-{b}/{m}{'' if v == 0 else v + 1}", m) for v in range(views)]
  return keys


class StepSampler(abc.ABC):
  """Batches that are a function of (seed, step): iterate them, checkpoint only the step.

  Subclasses set `self.seed` and `self.step` and define `batch(step)`. `get_state`/`set_state`
  make the sampler an orbax/grain checkpoint item (the `Checkpointer` saves it beside the train
  state); restoring a sampler of another seed is refused.
  """
  seed: int
  step: int

  @abc.abstractmethod
  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The global batch's rows of this process at `step`."""

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step, "seed": self.seed}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state.decode())
    if saved["seed"] != self.seed:
      raise ValueError(f"checkpointed sampler has seed {saved['seed']}, this run {self.seed}")
    self.step = int(saved["step"])

  def start_prefetch(self) -> None:
    """Nothing to prefetch (grain's checkpoint handler calls this after a restore)."""

  def seek(self, step: int) -> None:
    """Positions the sampler at the global `step`: its batches are a function of (seed, step)
    on any number of processes, so a checkpoint of another process count resumes exactly."""
    self.step = int(step)


class PairedBatches(StepSampler):
  """Endless class-paired batches; `get_state`/`set_state` make it an orbax/grain checkpoint item.

  Batch at step s: for each pair (a, b), the global batch's `i`-th row draws an `a` item
  uniformly and a `b` item of the same digit, from `np.random.default_rng([seed, s, pair])`;
  this process returns its rows `[p B / P, (p + 1) B / P)`, each item's views augmented with
  `default_rng([seed, s, k, row])` (k: the array's position among the sorted batch keys). Text
  is not augmented (its views repeat).
  """

  def __init__(self, split: Split, *, pairs: tuple[tuple[str, str], ...], global_batch_size: int,
               seed: int, views: int, augment: Mapping[str, Any], process_index: int = 0,
               process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    self.split, self.pairs, self.views, self.seed = split, pairs, views, seed
    self.global_batch_size = global_batch_size
    self.rows = np.arange(global_batch_size // process_count) + (
        process_index * global_batch_size // process_count)
    self.image_config = image_augment.AugmentConfig(
        crop_scale=tuple(augment["crop_scale"]), flip_prob=0.0, jitter_prob=0.8,
        brightness=augment["brightness"], contrast=augment["contrast"])
    self.audio_kwargs = {"max_shift": augment["max_shift"], "gain_db": augment["gain_db"],
                         "noise_std": augment["noise_std"]}
    mean, std = data_lib.normalization("embedded_mnist", channels=1)
    self._mean, self._std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self._by_class = {m: [np.flatnonzero(getattr(split, f"{m}_label") == c) for c in range(10)]
                      for m in MODALITIES}
    self.step = 0

  def indices(self, step: int) -> dict[str, np.ndarray]:
    """`{'a-b/a': [B], 'a-b/b': [B]}`: the global batch's item indices into each split array."""
    out = {}
    for p, (a, b) in enumerate(self.pairs):
      rng = np.random.default_rng([self.seed, step, p])
      first = rng.integers(0, len(getattr(self.split, f"{a}_label")), self.global_batch_size)
      labels = getattr(self.split, f"{a}_label")[first]
      pools = self._by_class[b]
      second = np.array([pools[c][rng.integers(len(pools[c]))] for c in labels])
      out[f"{a}-{b}/{a}"], out[f"{a}-{b}/{b}"] = first, second
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step` (see the class docstring)."""
    out = {}
    for k, (key, index) in enumerate(sorted(self.indices(step).items())):
      modality = key.split("/")[1]
      views = [[] for _ in range(self.views)]
      for row, item in zip(self.rows, index[self.rows]):
        rng = np.random.default_rng([self.seed, step, k, int(row)])
        for v, x in enumerate(self._views(modality, item, rng)):
          views[v].append(x)
      for v in range(self.views):
        out[key + ("" if v == 0 else str(v + 1))] = np.stack(views[v])
    return out

  def _views(self, modality: str, item: int, rng: np.random.Generator) -> list[np.ndarray]:
    if modality == "image":
      return list(image_augment.random_views(
          self.split.image_raw[item], rng, self.image_config, size=28, mean=self._mean,
          std=self._std, num_views=self.views))
    if modality == "audio":
      return [audio_lib.augment(self.split.audio[item], rng, **self.audio_kwargs)
              for _ in range(self.views)]
    return [self.split.text[item]] * self.views


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  stats = build_fsdd_asset(flags.FLAGS.recordings, flags.FLAGS.out)
  print(f"wrote {flags.FLAGS.out}: {stats['clips']} clips, {stats['bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("recordings", None, "FSDD's recordings/ folder of wav files.",
                      required=True)
  flags.DEFINE_string("out", ASSET, "Output file.")
  app.run(main)
