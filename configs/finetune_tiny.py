"""Fine-tune a pretrained tiny base on the new population with FINCH, measuring forgetting.

python train.py --config configs/finetune_tiny.py --workdir runs/finch \
    --config.base_checkpoint=runs/base
Add --config.finch.enabled=False for the same run without FINCH.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """One fine-tuning run from `base_checkpoint`; writes report.json with its forgetting."""
  config = default.get_config()
  config.mode = "finetune"
  config.optimizer.learning_rate = 3e-4
  return config
