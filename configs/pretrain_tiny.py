"""Pretrain the tiny base model from scratch on the embedded biographies' base population.

python train.py --config configs/pretrain_tiny.py --workdir runs/base
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Pretraining: no FINCH, cosine schedule, the `pretrain` split."""
  config = default.get_config()
  config.mode = "pretrain"
  config.num_train_steps = 320  # as the default run's base (configs/default.py)
  config.checkpoint_every = 160
  config.eval_every = 0
  config.log_every = 50
  config.finch.enabled = False
  config.data.train = {"name": "", "split": "pretrain"}
  config.data.batch_size = 32
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.final_lr_fraction = 0.1
  return config
