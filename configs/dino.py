"""DINO (Caron et al. 2021): self-distillation with a momentum teacher, multi-crop and a ViT, on
the embedded Fashion-MNIST.

  python -m embedspace.main --config=configs/dino.py --workdir=/tmp/dino
  python -m embedspace.main --config=configs/dino.py:smoke      # a few seconds, every part
  python -m embedspace.main --config=configs/dino.py --config.model.name=resnet
"""

import ml_collections

from embedspace.config_lib import ssl as common


def get_config(arg: str | None = None):
  variant = common.parse_variant(arg)
  c = common.base("dino")
  c.model.name = "vit"  # models.vit.small_cpu (config.model.vit), as the paper trains ViTs
  del c.model.projector_dims  # the DINO head is the projector
  c.model.head = ml_collections.ConfigDict()
  c.model.head.out_dim = 1024  # K prototypes (65536 on ImageNet)
  c.model.head.hidden_dim = 512  # 2048 in the paper
  c.model.head.bottleneck_dim = 128  # 256 in the paper
  c.model.head.num_layers = 3
  c.model.head.norm_last_layer = True

  # Multi-crop: 2 global crops at 28 px, local crops of smaller regions at 12 px (3x3 patches;
  # the paper's 96 / 224 = 0.43 of the global side).
  # Global crops milder than the paper's (0.4, 1): on these centred 28 px items VICReg's kNN fell
  # with every step towards aggressive crops (docs/results.md).
  c.data.augment.crop_scale = (0.7, 1.0)
  c.data.num_local_crops = 4  # 6-10 in the paper
  c.data.local_image_size = 12
  c.data.local_crop_scale = (0.1, 0.4)  # (0.05, 0.4) in the paper; 28 px images are small

  c.loss.momentum_base = 0.996
  c.loss.student_temperature = 0.1
  c.loss.teacher_temperature_start = 0.04
  c.loss.teacher_temperature = 0.07
  c.loss.teacher_temperature_warmup_steps = 240  # the paper: the first 30% (30 of 100 epochs)
  c.loss.center_momentum = 0.9

  c.optimizer.base_lr = 1e-3  # AdamW; the paper's 5e-4 per 256 for ViT-S/16
  c.optimizer.grad_clip_norm = 3.0  # the paper's
  if variant == "smoke":
    c = common.smoke(c)
    c.model.head.out_dim, c.model.head.hidden_dim, c.model.head.bottleneck_dim = 64, 32, 16
    c.data.num_local_crops = 2
    c.loss.teacher_temperature_warmup_steps = 3
  return c
