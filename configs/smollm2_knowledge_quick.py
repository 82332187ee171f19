"""configs/smollm2_knowledge.py at a size two CPU cores train over a few sessions.

What was cut: 16 invented people (80 facts, not 500), 64 steps of 4 rows of 128 tokens (about
17 question/answer pairs a row, so each fact is seen about 50 times: long enough for the task
loss to flatten and for FINCH's scale to move), 64 held-out English passages drawn over the
whole Bible. The methods, their sweeps (5 rates 1.4x apart around AdamW's 5e-5), the three
seeds, the measures and the probes stay.

Each finished run's summary is kept in `docs/results/smollm2_knowledge/` (`compare.results_dir`),
so a rerun trains only what is missing and `python -m finch_jax.report
docs/results/smollm2_knowledge` rebuilds the report from those files alone. A session that has
less time trains a subset first, e.g. `"--config.compare.only=('finch','finch_target')"` (the
baseline, AdamW, always comes first) and `"--config.compare.seeds=(0,)"`.
"""

import ml_collections

from configs import smollm2_knowledge


def get_config() -> ml_collections.ConfigDict:
  """The knowledge-acquisition study on SmolLM2, sized for two CPU cores."""
  config = smollm2_knowledge.get_config()
  config.num_train_steps = 64
  config.eval_every = 32
  config.log_every = 4
  config.checkpoint_every = 16
  config.data.options["embedded_biographies"]["num_new_people"] = 16
  config.data.batch_size = 4
  config.data.eval_examples = 64
  config.compare.methods = smollm2_knowledge.methods(adamw=5e-5)
  config.compare.timing = {"rounds": 8, "steps": 1}
  config.compare.results_dir = "docs/results/smollm2_knowledge"
  return config
