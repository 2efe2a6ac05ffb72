"""Defaults shared by the self-supervised configs (VICReg, SimCLR, Barlow Twins).

Plain values only: anything derived from them (steps per epoch, learning rate for the batch size)
is computed in the method's task. Each method's config file starts from `base(method)` and sets
its loss hyperparameters; `smoke(config)` shrinks any config to a run of a few seconds.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "smoke")


def parse_variant(arg: str | None) -> str:
  """The `:variant` after a config path; an unknown one is an error naming the valid ones."""
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  return variant


def base(method: str) -> ml_collections.ConfigDict:
  """The default self-supervised run on the embedded Fashion-MNIST (8k train / 2k eval images)."""
  c = ml_collections.ConfigDict()
  c.method = method  # 'vicreg' | 'simclr' | 'barlow'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded_fashion_mnist"  # or a TFDS catalog name, e.g. 'cifar10'
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 28
  c.data.worker_count = 0
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.crop_scale = (0.9, 1.0)  # far milder than ImageNet's 0.08: 28 px, aligned items
  c.data.augment.flip_prob = 0.5
  c.data.augment.brightness = 0.4
  c.data.augment.contrast = 0.4
  c.data.augment.noise_std = 0.0
  c.data.augment.erase_prob = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.stage_sizes = (1, 1, 1, 1)  # 128-d features; ~1100 img/s fwd+bwd on 2 CPU cores
  c.model.width = 16
  c.model.projector_dims = (1024, 1024, 1024)
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 parameters and loss

  c.loss = ml_collections.ConfigDict()  # method-specific, set by each config file

  c.optimizer = ml_collections.ConfigDict()
  # AdamW beat LARS (lr 0.3 and 0.8 per 256) on 500-step kNN trials here; see README results.
  c.optimizer.name = "adamw"  # 'lars' | 'adamw'
  c.optimizer.base_lr = 2e-3  # for a batch of 256; scaled linearly with the global batch
  c.optimizer.weight_decay = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.warmup_steps = 100
  c.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)

  c.batch_size = 256  # global, over all devices of all processes
  c.num_steps = 800  # 25.6 epochs of the 8k train split; ~14 min on 2 CPU cores (~500 img/s)
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 0  # > 0: also a kNN monitor every this many steps; the full report at the end
  c.skip_nonfinite = False  # True: skip non-finite updates and count them; False: stop the run

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  c.eval.max_train_examples = 0  # 0: all
  c.eval.baselines = True  # raw pixels and the randomly initialised encoder, measured the same way
  # True: also kNN/retrieval under every measure, OOD vs MNIST, geometry report and plots in
  # workdir/eval (see `python -m embedspace.evaluate`); False: kNN + probe + baselines only.
  c.eval.full = True
  c.eval.at_end = True  # False: no evaluation after the last step (evaluate later with the CLI)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `c` to a run of a few seconds on CPU that still exercises every part."""
  c.model.stage_sizes = (1,)
  c.model.width = 8
  c.model.projector_dims = (64, 64)
  c.batch_size = 32
  c.num_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.eval_every = 4
  c.optimizer.warmup_steps = 2
  c.eval.batch_size = 256
  c.eval.max_train_examples = 512
  c.eval.full = False
  return c
