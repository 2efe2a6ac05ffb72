"""CLIP (Radford et al. 2021) on MNIST images and digit captions; zero-shot image classification.

  python -m embedspace.main --config=configs/clip.py --workdir=/tmp/clip
  python -m embedspace.main --config=configs/clip.py:smoke       # a few seconds, every part

Image-text contrastive training (`losses.clip_loss`) with the learnable logit scale,
initialised at log(1/0.07) and clamped at 100, linear projections into a 64-d joint space.
"""

from embedspace.config_lib import multimodal as common


def get_config(arg: str | None = None):
  variants = common.parse_variants(arg, ())
  c = common.base("clip", "image-text")
  return common.smoke(c) if "smoke" in variants else c
