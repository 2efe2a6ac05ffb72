"""FIND-style interface (Zou et al. 2024) over frozen ImageBind encoders: ground, retrieve, segment.

  python -m embedspace.main --config=configs/imagebind.py --workdir=workdirs/imagebind  # encoders
  python -m embedspace.main --config=configs/find.py --workdir=workdirs/find
  python -m embedspace.main --config=configs/find.py --config.encoders_workdir=/tmp/mm/imagebind
  python -m embedspace.main --config=configs/find.py:smoke   # seconds (needs an encoders run)

Scenes of 2-4 distinct digits on a 64x64 canvas (`embedspace/interface/scenes.py`); the frozen
image encoder's feature maps, 4 learned queries and a prompt (a caption or a spoken digit,
embedded by the frozen text/audio encoder) go through a 2-layer transformer interface that
outputs the prompted item's box and mask, per-item masks and prompt-space embeddings for
retrieval (`embedspace/interface/find.py`). The evaluation compares it with matching the prompt to
crops directly (`find_eval.py`).
"""

import ml_collections

from embedspace.config_lib import multimodal as common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(arg, ())
  c = ml_collections.ConfigDict()
  c.method = "find"  # embedspace.methods maps it to its task
  c.encoders_workdir = "workdirs/imagebind"  # a trained ImageBind run (image, audio, text)
  c.prompts = ("text", "audio")  # prompt modalities, drawn uniformly per training scene
  c.seed = 0

  c.scenes = ml_collections.ConfigDict()
  c.scenes.canvas_size = 64  # a 2x2 grid of 32-px cells: each digit at a 0-4 px offset
  c.scenes.min_items = 2
  c.scenes.max_items = 4  # also the number of learned queries
  c.scenes.threshold = 128  # a digit's mask: its pixels >= 128 / 255

  c.model = ml_collections.ConfigDict()
  c.model.width = 64
  c.model.depth = 2
  c.model.heads = 4
  c.model.mask_size = 64  # full resolution; 32 halves the step cost, but caps mask IoU at 0.72
  c.model.memory_size = 16  # the last feature map (16x16 for a 64-px canvas) as 256 tokens

  c.loss = ml_collections.ConfigDict()
  c.loss.mask_bce = 2.0
  c.loss.dice = 1.0
  c.loss.objectness = 1.0
  c.loss.classify = 1.0
  c.loss.box_l1 = 5.0  # DETR's weights
  c.loss.box_giou = 2.0
  c.loss.temperature = 0.07

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.base_lr = 8e-3  # per 256 scenes: 1e-3 at batch 32
  c.optimizer.weight_decay = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = 1.0

  c.batch_size = 32
  c.num_steps = 2400  # 26 min on 2 CPU cores; 800 steps already ground 0.97 (README)
  c.log_every = 25
  c.checkpoint_every = 600
  c.keep_checkpoints = 2
  c.skip_nonfinite = False

  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1
  c.eval.num_scenes = 500
  c.eval.batch_size = 250
  c.eval.window_stride = 4  # baseline: 28x28 windows every 4 px (100 per scene)
  c.eval.plots = True
  c.eval.rerun = False  # True: evaluate a finished run again though its eval.json is up to date
  if "smoke" in variants:
    c.scenes.canvas_size = 56
    c.model.width, c.model.depth, c.model.heads = 16, 1, 2
    c.model.mask_size, c.model.memory_size = 14, 7
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 16, 4, 2, 2
    c.optimizer.warmup_steps = 1
    c.eval.num_scenes, c.eval.batch_size, c.eval.window_stride = 24, 64, 14
    c.eval.plots = False
  return c
