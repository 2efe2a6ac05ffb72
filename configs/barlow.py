"""Barlow Twins (Zbontar et al. 2021): cross-correlation to identity, on the embedded Fashion-MNIST.

  python -m embedspace.main --config=configs/barlow.py --workdir=/tmp/barlow
  python -m embedspace.main --config=configs/barlow.py:smoke
"""

from embedspace.config_lib import ssl as common


def get_config(arg: str | None = None):
  variant = common.parse_variant(arg)
  c = common.base("barlow")
  c.loss.off_diagonal_weight = 5e-3
  return common.apply_variant(c, variant)
