"""The comparison of configs/compare.py in under five minutes on two CPU cores.

python train.py --config configs/compare_quick.py --workdir workdir/compare_quick

A smoke run of every method (one seed, the two lower rates of each sweep, 40-step runs, a base
pretrained for 200 steps on fewer people): it shows the pipeline end to end and the rough shape
of the trade-off; the figures to quote come from configs/compare.py. The lower rates keep each
two-point sweep monotone (a higher rate reaching a lower task loss), which reading a sweep at
matched task loss needs.
"""

import ml_collections

from configs import compare


def get_config() -> ml_collections.ConfigDict:
  """Every method of configs/compare.py, smaller."""
  config = compare.get_config()
  config.num_train_steps = 40
  config.eval_every = 20
  config.log_every = 20
  config.checkpoint_every = 40
  config.data.options = {"embedded_biographies": {"num_base_people": 40, "num_new_people": 40}}
  config.data.eval_examples = 64
  config.data.fact_sets = {}
  config.replay.num_samples = 64
  config.compare.seeds = (0,)
  config.compare.pretrain.num_train_steps = 200
  config.compare.pretrain.checkpoint_every = 200
  methods = {}
  for name, spec in compare.methods().items():
    rates = spec["learning_rates"]
    methods[name] = {**spec, "learning_rates": (rates[0], rates[1])}
  config.compare.methods = methods
  return config
