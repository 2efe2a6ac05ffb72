"""PaLM-E-style multimodal sentences over frozen ImageBind embeddings (Driess et al. 2023).

  python -m embedspace.main --config=configs/palme.py --config.encoders_workdir=/tmp/imagebind \
      --workdir=/tmp/palme
  python -m embedspace.main --config=configs/palme.py:text_only \
      --config.encoders_workdir=/tmp/imagebind --workdir=/tmp/palme_text_only   # the baseline
  python -m embedspace.main --config=configs/palme.py:smoke --config.encoders_workdir=DIR

`encoders_workdir` is a trained ImageBind run (`python -m embedspace.main
--config=configs/imagebind.py --workdir=/tmp/imagebind`); its image and audio encoders stay
frozen. A decoder-only transformer, trained from scratch, answers questions such as
`q: what is <img> plus <audio> ? a: twelve`, each item entering as `tokens_per_item` soft tokens
from a learned projector; the loss is on the answer tokens only. `:text_only` is the baseline
whose placeholders carry no item (the model can only guess from the words); `:features` injects
each encoder's output before its ImageBind head instead of the joint-space embedding.
"""

import ml_collections

from embedspace.config_lib import multimodal as common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = common.parse_variants(arg, ("text_only", "features"))
  c = ml_collections.ConfigDict()
  c.method = "palme"  # embedspace.methods maps it to its task
  c.encoders_workdir = ml_collections.config_dict.placeholder(str)  # a trained ImageBind run
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.source = "features" if "features" in variants else "embeddings"  # | 'features'
  c.model.use_items = "text_only" not in variants  # False: the text-only baseline
  c.model.tokens_per_item = 2  # soft tokens per image or recording
  c.model.width = 128
  c.model.depth = 2
  c.model.heads = 4

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.base_lr = 2e-3  # per 256 prompts
  c.optimizer.weight_decay = 0.01
  c.optimizer.momentum = 0.9  # LARS only
  c.optimizer.warmup_steps = 100
  c.optimizer.grad_clip_norm = 1.0

  c.batch_size = 128  # prompts per step (a quarter per training task)
  c.num_steps = 2000
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.skip_nonfinite = False

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500
  c.eval.examples_per_task = 1000  # what_audio: all 300 test clips
  c.eval.num_shown = 3  # example prompts per task in report.md
  c.eval.rerun = False  # True: evaluate a finished run again though its eval.json is up to date

  if "smoke" in variants:
    c.model.width, c.model.depth, c.model.heads = 32, 1, 2
    c.batch_size = 16
    c.num_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.eval.batch_size = 64
    c.eval.examples_per_task = 64
  return c
