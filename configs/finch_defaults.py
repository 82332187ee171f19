"""The study behind FINCH's defaults: variants of FINCH against AdamW at matched task loss.

python train.py --config configs/finch_defaults.py --workdir workdir/finch_defaults

The default benchmark (configs/default.py) with FINCH's `max_scale` at 2, 4 and 8 and with a
smoothed loss (`ema_decay=0.9`), each over the same learning-rate sweep and seeds.
"""

import ml_collections

from configs import default

FINCH_RATES = (1e-4, 3e-4, 1e-3)


def get_config() -> ml_collections.ConfigDict:
  """The default comparison with more FINCH variants."""
  config = default.full_size(default.get_config())
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (3e-4, 1e-3, 3e-3)},
    "finch": {"finch": {"enabled": True}, "learning_rates": FINCH_RATES},
    "finch_max2": {"finch": {"enabled": True, "max_scale": 2.0}, "learning_rates": FINCH_RATES},
    "finch_max8": {"finch": {"enabled": True, "max_scale": 8.0}, "learning_rates": FINCH_RATES},
    "finch_ema09": {"finch": {"enabled": True, "ema_decay": 0.9}, "learning_rates": FINCH_RATES},
  }
  return config
