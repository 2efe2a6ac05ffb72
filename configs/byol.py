"""BYOL (Grill et al. 2020): an online network predicts its momentum target's projection of the
other view, on the embedded Fashion-MNIST.

  python -m embedspace.main --config=configs/byol.py --workdir=/tmp/byol
  python -m embedspace.main --config=configs/byol.py:smoke      # a few seconds, every part
  python -m embedspace.main --config=configs/byol.py --config.model.name=vit   # a ViT encoder
"""

from embedspace.config_lib import ssl as common


def get_config(arg: str | None = None):
  variant = common.parse_variant(arg)
  c = common.base("byol")
  # The paper's 4096-256 projector and predictor, narrower for 28 px and 2 CPU cores.
  c.model.projector_dims = (1024, 256)
  c.model.predictor_dims = (1024, 256)
  c.loss.momentum_base = 0.99  # tau_base, cosine to 1 (0.996 in the paper's 1000-epoch runs)
  if variant == "smoke":
    c = common.smoke(c)
    c.model.predictor_dims = (64, 64)
  return c
