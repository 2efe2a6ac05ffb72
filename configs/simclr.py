"""SimCLR (Chen et al. 2020): NT-Xent / InfoNCE on the embedded Fashion-MNIST.

  python -m embedspace.main --config=configs/simclr.py --workdir=/tmp/simclr
  python -m embedspace.main --config=configs/simclr.py:smoke
  python -m embedspace.main --config=configs/simclr.py --config.loss.similarity=arc_length
"""

from embedspace.config_lib import ssl as common


def get_config(arg: str | None = None):
  variant = common.parse_variant(arg)
  c = common.base("simclr")
  c.loss.temperature = 0.2
  c.loss.similarity = "cosine"  # or 'arc_length': the seed's negative arc length (geodesic)
  c.model.projector_dims = (512, 128)
  return common.apply_variant(c, variant)
