"""ImageBind (Girdhar et al. 2023): images bind audio and text; emergent audio<->text retrieval.

  python -m embedspace.main --config=configs/imagebind.py --workdir=/tmp/imagebind
  python -m embedspace.main --config=configs/imagebind.py:direct   # upper bound: audio-text pairs
  python -m embedspace.main --config=configs/imagebind.py:smoke    # a few seconds, every part

Images are the anchor: only image-audio and image-text pairs are trained (each with its own
batch of `batch_size` pairs, never audio with text), with ImageBind's InfoNCE
(`losses.clip_loss`). The evaluation measures audio->text and text->audio retrieval and audio
zero-shot classification from text prompts, which no loss ever saw. `:direct` trains the same
encoders on audio-text pairs only, the upper bound of that measurement. Unlike the paper, whose
image and text encoders are a frozen, pre-trained OpenCLIP, every encoder here is trained from
scratch, jointly (there is no pre-trained digit CLIP to start from).
"""

import math

from embedspace.config_lib import multimodal as common


def get_config(arg: str | None = None):
  variants = common.parse_variants(arg, ("direct",))
  c = common.base("imagebind", "audio-text" if "direct" in variants else "image-audio,image-text")
  # ImageBind fixes the temperature of its non-CLIP modalities; here tau = 0.07 for both pairs.
  c.loss.logit_scale_init = math.log(1 / 0.07)
  c.loss.learn_logit_scale = False
  return common.smoke(c) if "smoke" in variants else c
