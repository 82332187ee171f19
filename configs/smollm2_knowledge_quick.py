"""configs/smollm2_knowledge.py cut to run on two CPU cores in about half an hour.

What was cut: 8 invented people (40 facts, not 500), 16 steps of 4 rows of 128 tokens (about
11 question/answer pairs a step, so each fact is seen about 4 times), three learning rates per
method close together (FINCH's lower: its scale rises as the loss falls, so it reaches a task
loss at a lower base rate, and 3e-4 overshot), 40 held-out English passages; the seeds (two),
the measures and the probes stay.
"""

import ml_collections

from configs import smollm2_knowledge


def get_config() -> ml_collections.ConfigDict:
  """The knowledge-acquisition comparison on SmolLM2, small enough for a laptop."""
  config = smollm2_knowledge.get_config()
  config.num_train_steps = 16
  config.eval_every = 8
  config.log_every = 4
  config.checkpoint_every = 16
  config.data.options["embedded_biographies"]["num_new_people"] = 8
  config.data.batch_size = 4
  config.data.eval_examples = 40
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (1e-4, 1.7e-4, 3e-4)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (5e-5, 1e-4, 1.7e-4)},
  }
  config.compare.timing = {"rounds": 2, "steps": 2}
  return config
