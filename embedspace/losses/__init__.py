"""Self-supervised and multimodal losses, and embedding-health metrics, over the global batch.

Every function is pure, takes `[batch, dim]` embeddings and keyword-only hyperparameters, and
accepts `axis_name`: inside `shard_map`/`pmap` over that axis it computes the loss of the GLOBAL
batch with explicit collectives (negatives gathered, batch statistics psum-ed) and returns the
same value on every device; with `axis_name=None` it is the plain single-device loss.
The self-distillation helpers (BYOL/DINO teacher EMA and temperature schedules) are pure functions
of the step.
"""

from embedspace.losses._blockwise import clip_loss_blockwise
from embedspace.losses._blockwise import info_nce_blockwise
from embedspace.losses._contrastive import CLIP_LOGIT_SCALE_INIT
from embedspace.losses._contrastive import CLIP_MAX_LOGIT_SCALE
from embedspace.losses._contrastive import clip_loss
from embedspace.losses._contrastive import info_nce
from embedspace.losses._distillation import byol_loss
from embedspace.losses._distillation import dino_center_update
from embedspace.losses._distillation import dino_loss
from embedspace.losses._distillation import ema_momentum
from embedspace.losses._distillation import ema_update
from embedspace.losses._distillation import negative_cosine_similarity
from embedspace.losses._distillation import teacher_temperature_schedule
from embedspace.losses._hypersphere import alignment
from embedspace.losses._hypersphere import effective_rank
from embedspace.losses._hypersphere import embedding_std
from embedspace.losses._hypersphere import positive_negative_geodesic
from embedspace.losses._hypersphere import uniformity
from embedspace.losses._redundancy import barlow_twins_loss
from embedspace.losses._redundancy import decur_loss
from embedspace.losses._redundancy import vicreg_loss

__all__ = [
    "CLIP_LOGIT_SCALE_INIT",
    "CLIP_MAX_LOGIT_SCALE",
    "alignment",
    "barlow_twins_loss",
    "byol_loss",
    "clip_loss",
    "clip_loss_blockwise",
    "decur_loss",
    "dino_center_update",
    "dino_loss",
    "effective_rank",
    "ema_momentum",
    "ema_update",
    "embedding_std",
    "info_nce",
    "info_nce_blockwise",
    "negative_cosine_similarity",
    "positive_negative_geodesic",
    "teacher_temperature_schedule",
    "uniformity",
    "vicreg_loss",
]
