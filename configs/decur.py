"""DeCUR (Wang et al. 2023) on image and audio: common and unique dimensions of one embedding.

  python -m embedspace.main --config=configs/decur.py --workdir=/tmp/decur
  python -m embedspace.main --config=configs/decur.py:barlow   # plain cross-modal Barlow Twins
  python -m embedspace.main --config=configs/decur.py:clip     # plain CLIP on image-audio
  python -m embedspace.main --config=configs/decur.py:smoke    # (also barlow,smoke / clip,smoke)

Two augmented views of an image and of a recording of the same digit; `losses.decur_loss` with
the first `num_common` of the 256 projector dims common to both modalities (DeCUR's scripts use
3/4 to 7/8 common) and the rest unique. The comparisons train the same encoders and projector
with `barlow_twins_loss` between the modalities (every dim common, one view each) or with
`clip_loss`. The evaluation probes digit from the common and unique dims of each modality, and
speaker identity from the audio's unique vs. its common dims.
"""

from embedspace.config_lib import multimodal as common


def get_config(arg: str | None = None):
  variants = common.parse_variants(arg, ("barlow", "clip"))
  if {"barlow", "clip"} <= variants:
    raise ValueError("variants 'barlow' and 'clip' exclude each other")
  c = common.base("decur", "image-audio")
  c.model.projector_dims = (512, 512, 256)  # DeCUR/Barlow's 3-layer projector, scaled down
  c.num_steps = 300  # two views of two modalities: each step costs ~2 CLIP steps
  if "clip" in variants:
    c.loss.name = "clip"
  else:
    c.loss.name = "barlow" if "barlow" in variants else "decur"
    c.loss.num_common = 0 if "barlow" in variants else 192
    c.optimizer.weight_decay = 1e-4
  return common.smoke(c) if "smoke" in variants else c
