"""VICReg (Bardes et al. 2022) on the embedded Fashion-MNIST.

  python -m embedspace.main --config=configs/vicreg.py --workdir=/tmp/vicreg
  python -m embedspace.main --config=configs/vicreg.py:smoke       # a few seconds, every part
  python -m embedspace.main --config=configs/vicreg.py --config.optimizer.base_lr=0.2
"""

from embedspace.config_lib import ssl as common


def get_config(arg: str | None = None):
  variant = common.parse_variant(arg)
  c = common.base("vicreg")
  c.loss.invariance_weight = 25.0
  c.loss.variance_weight = 25.0
  c.loss.covariance_weight = 1.0
  return common.apply_variant(c, variant)
