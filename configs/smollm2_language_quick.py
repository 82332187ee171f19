"""configs/smollm2_language.py cut to run on two CPU cores in about half an hour.

What was cut: 16 steps of 4 rows of 64 tokens (not 300 steps of 16 x 256), two learning rates
for AdamW and three for FINCH (whose scale rises with training, so it reaches a given task loss
at a lower base rate), 16 examples per loss set; the seeds (two), the measures and the probes
stay. With this little training the task loss moves a little, so the sweeps overlap on a narrow
band of task loss; read the report's pairwise and matched figures with that in mind.
"""

import ml_collections

from configs import smollm2_language


def get_config() -> ml_collections.ConfigDict:
  """The language-adaptation comparison on SmolLM2, small enough for a laptop."""
  config = smollm2_language.get_config()
  config.num_train_steps = 16
  config.eval_every = 16
  config.log_every = 4
  config.checkpoint_every = 16
  config.data.seq_len = 64
  config.data.batch_size = 4
  config.data.eval_examples = 16
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (3e-5, 1e-4)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (1e-5, 3e-5, 1e-4)},
  }
  config.compare.timing = {"rounds": 2, "steps": 2}
  return config
