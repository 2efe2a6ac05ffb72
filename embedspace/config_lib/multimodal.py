"""Defaults shared by the multimodal configs (CLIP, ImageBind, DeCUR) on the shipped digits.

Plain values only (what follows from them, e.g. the modalities of `pairs`, is computed in
`embedspace.multimodal.models`). A config file starts from `base(method, pairs)`, sets its loss
and calls `apply_variants`; `:smoke` shrinks any of them to a run of a few seconds. Variants are
comma-separated words after the config path, e.g. `configs/decur.py:barlow,smoke`.
"""

from __future__ import annotations

import math

import ml_collections


def parse_variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """The set of `,`-separated variants in `arg`; an unknown one is an error naming the valid."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip() and w.strip() != "default"}
  unknown = words - set(known) - {"smoke"}
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; valid: "
                     f"{', '.join(('default', 'smoke') + known)} (comma-separated)")
  return words


def base(method: str, pairs: str) -> ml_collections.ConfigDict:
  """A multimodal run of a few minutes on 2 CPU cores: MNIST 8k/2k, FSDD 2,700/300, captions."""
  c = ml_collections.ConfigDict()
  c.method = method  # 'clip' | 'imagebind' | 'decur': embedspace.methods maps it to its task
  c.pairs = pairs  # comma-separated 'a-b' pairs of image/audio/text trained with the loss
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'shipped': the package's MNIST test split and FSDD copy; 'tfds': TFDS mnist + spoken_digit,
  # prepared as array_record in tfds_data_dir (default $TFDS_DATA_DIR; needs network once).
  c.data.source = "shipped"
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.data.audio_samples = 6000  # 0.75 s at 8 kHz: 72 log-mel frames of 10 ms
  c.data.text_length = 10
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.crop_scale = (0.6, 1.0)
  c.data.augment.brightness = 0.4
  c.data.augment.contrast = 0.4
  c.data.augment.max_shift = 800  # samples (0.1 s)
  c.data.augment.gain_db = 6.0
  c.data.augment.noise_std = 0.05  # relative to the clip's RMS

  c.model = ml_collections.ConfigDict()
  c.model.image = ml_collections.ConfigDict({"stage_sizes": (1, 1, 1), "width": 16})  # 64-d
  c.model.audio = ml_collections.ConfigDict({"channels": (64, 96, 128), "num_mels": 40})
  c.model.text = ml_collections.ConfigDict(
      {"width": 64, "depth": 2, "heads": 4, "max_length": 10})
  c.model.projector_dims = (64,)  # one layer: CLIP's linear projection into the joint space

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "clip"  # 'clip' | 'barlow' | 'decur'
  c.loss.logit_scale_init = math.log(1 / 0.07)
  c.loss.learn_logit_scale = True
  c.loss.num_common = 0  # DeCUR: leading common dims (0: unused)
  c.loss.off_diagonal_weight = 5.1e-3

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.base_lr = 2e-3  # per 256 pairs
  c.optimizer.weight_decay = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)

  c.batch_size = 128  # pairs per pair type per step, over all devices of all processes
  c.num_steps = 600
  c.log_every = 25
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.skip_nonfinite = False

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500
  c.eval.probe_steps = 300
  c.eval.max_train_examples = 0  # 0: every train item when fitting probes
  c.eval.plots = True
  c.eval.rerun = False  # True: evaluate a finished run again though its eval.json is up to date
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `c` to a run of seconds that exercises every part (tiny models, 4 steps)."""
  c.model.image = ml_collections.ConfigDict({"stage_sizes": (1,), "width": 4})
  c.model.audio = ml_collections.ConfigDict({"channels": (8,), "num_mels": 16})
  c.model.text = ml_collections.ConfigDict({"width": 16, "depth": 1, "heads": 2,
                                            "max_length": 10})
  c.model.projector_dims = (16, 16) if len(c.model.projector_dims) > 1 else (16,)
  c.data.audio_samples = 2000
  c.batch_size = 16
  c.num_steps = 4
  c.log_every = 2
  c.checkpoint_every = 2
  c.optimizer.warmup_steps = 1
  c.eval.batch_size = 256
  c.eval.probe_steps = 20
  c.eval.max_train_examples = 400
  c.eval.plots = False
  if c.loss.num_common:
    c.loss.num_common = 12
  return c
