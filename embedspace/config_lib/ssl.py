"""Defaults shared by the self-supervised image configs (VICReg, SimCLR, Barlow, BYOL, DINO).

Plain values only: anything derived from them (steps per epoch, learning rate for the batch size)
is computed in the method's task. Each method's config file starts from `base(method)` and sets
its loss hyperparameters; `smoke(config)` shrinks any config to a run of a few seconds.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "smoke", "long")


def parse_variant(arg: str | None) -> str:
  """The `:variant` after a config path; an unknown one is an error naming the valid ones."""
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
  return variant


def base(method: str) -> ml_collections.ConfigDict:
  """The default self-supervised run: Fashion-MNIST's 60k train images, scored on its 10k test."""
  c = ml_collections.ConfigDict()
  c.method = method  # 'vicreg' | 'simclr' | 'barlow' | 'byol' | 'dino'
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
  c.model.name = "resnet"  # the encoder: 'resnet' (stage_sizes, width) | 'vit' (model.vit)
  c.model.stage_sizes = (1, 1, 1, 1)  # 128-d features; ~1100 img/s fwd+bwd on 2 CPU cores
  c.model.width = 16
  c.model.vit = ml_collections.ConfigDict()  # models.vit.small_cpu: 0.80 M params, 128-d features
  c.model.vit.patch_size = 4  # 28x28 -> 7x7 tokens (+ the class token)
  c.model.vit.width = 128
  c.model.vit.depth = 4
  c.model.vit.num_heads = 4
  c.model.vit.mlp_dim = 512
  c.model.vit.posemb = "learn"  # 'learn' | 'sincos2d'
  c.model.projector_dims = (1024, 1024, 1024)
  c.model.kernel_init = "kaiming_uniform"  # torch's default law; or flax's "lecun_normal"
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
  c.num_steps = 800  # 3.4 epochs of the 60k train split (204,800 pairs); see docs/results.md
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 200  # the learning curve: kNN + probe every this many steps (0: none)
  c.skip_nonfinite = False  # True: skip non-finite updates and count them; False: stop the run

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.knn_k = 20
  c.eval.knn_temperature = 0.07
  c.eval.max_train_examples = 0  # 0: all (the kNN database and probe training set)
  c.eval.max_eval_examples = 0  # 0: all (the queries)
  c.eval.monitor_examples = 10_000  # train and test images of each learning-curve point
  c.eval.measures_examples = 10_000  # the every-measure table's database and queries (0: all)
  c.eval.baselines = True  # raw pixels and the randomly initialised encoder, measured the same way
  # True: also kNN/retrieval under every measure, OOD vs MNIST, geometry report and plots in
  # workdir/eval (see `python -m embedspace.evaluate`); False: kNN + probe + baselines only.
  c.eval.full = True
  c.eval.at_end = True  # False: no evaluation after the last step (evaluate later with the CLI)
  c.eval.rerun = False  # True: evaluate a finished run again though its eval.json is up to date
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks `c` to a run of a few seconds on CPU that still exercises every part."""
  c.model.stage_sizes = (1,)
  c.model.width = 8
  c.model.vit.width, c.model.vit.depth, c.model.vit.num_heads, c.model.vit.mlp_dim = 32, 2, 2, 64
  if "projector_dims" in c.model:  # DINO's projector is its head (config.model.head)
    c.model.projector_dims = (64, 64)
  c.batch_size = 32
  c.num_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.eval_every = 4
  c.optimizer.warmup_steps = 2
  c.eval.batch_size = 256
  c.eval.max_train_examples = 512
  c.eval.max_eval_examples = 1000
  c.eval.monitor_examples = 512
  c.eval.full = False
  return c


def long(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` trained 6x as long. VICReg's 4,800 steps: 41 minutes of training and 48.6 minutes in
  all on a 2-core AMD EPYC (2026-12-07; about 1.5 hours at the ~480 img/s of the Intel Xeon
  machines), kNN 86.72% / probe 87.86% against the default's 85.89% / 86.18%; its curve is flat
  from step ~3,000 (docs/results.md)."""
  c.num_steps *= 6
  c.eval_every *= 3
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """`c` shrunk (`smoke`), lengthened (`long`) or as it is (`default`)."""
  return {"smoke": smoke, "long": long}.get(variant, lambda x: x)(c)
