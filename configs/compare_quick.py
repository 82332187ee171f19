"""The comparison of configs/compare.py in under five minutes on two CPU cores.

python train.py --config configs/compare_quick.py --workdir workdir/compare_quick

A smoke run of every method (one seed, the two lower rates of each sweep, 30-step runs, a base
pretrained for 200 steps of 16 rows on fewer people): it shows the pipeline end to end and the
rough shape of the trade-off; the figures to quote come from configs/compare.py. The lower
rates keep each two-point sweep monotone (a higher rate reaching a lower task loss), which
reading a sweep at matched task loss needs.
"""

import ml_collections

from configs import compare


def get_config() -> ml_collections.ConfigDict:
  """Every method of configs/compare.py, smaller."""
  config = compare.get_config()
  config.num_train_steps = 30
  config.eval_every = 15
  config.log_every = 15
  config.checkpoint_every = 30
  config.data.options = {"embedded_biographies": {"num_base_people": 40, "num_new_people": 40}}
  config.data.eval_examples = 64
  config.data.fact_sets = {}
  config.replay.num_samples = 64
  config.compare.seeds = (0,)
  config.compare.pretrain.num_train_steps = 200
  config.compare.pretrain.checkpoint_every = 200
  config.compare.pretrain.data.batch_size = 16
  config.compare.timing = {"rounds": 3, "steps": 5}
  methods = {}
  for name, spec in compare.methods().items():
    rates = spec["learning_rates"]
    methods[name] = {**spec, "learning_rates": (rates[0], rates[1])}
  config.compare.methods = methods
  return config
