"""configs/smollm2_language.py at the size of the SmolLM2 study on two CPU cores.

The language-adaptation setting of the study (beside configs/smollm2_knowledge_quick.py and
configs/smollm2_foldoc_quick.py): SmolLM2-135M-Instruct fine-tuned on Persian, the handbook
language it handles worst (about 2.6 times English's loss on the same paragraphs), 64 steps of
4 rows of 128 tokens, 64 examples per loss set, three seeds. The methods are the study's shorter
list: AdamW (the baseline), AdamW with warm-up and cosine decay, FINCH's running-average and
target readings, anchoring to the base weights and KL to the base on its own samples, each over
5 rates 1.4x apart.

FINCH's scale can only rise as far as the square root of the first loss over the last, so how
much the task loss falls bounds what FINCH can do here; the report's curves show it. Each
finished run's summary is kept in `docs/results/smollm2_language/`; `python -m finch_jax.report
docs/results/smollm2_language` rebuilds the report from those files alone.

(An earlier version of this config ran 16 steps of 4 x 64 tokens with two seeds; RESULTS.md's
section on it says so.)
"""

import ml_collections

from configs import smollm2_foldoc_quick, smollm2_knowledge, smollm2_language


def get_config() -> ml_collections.ConfigDict:
  """The language-adaptation setting of the SmolLM2 study, sized for two CPU cores."""
  config = smollm2_language.get_config()
  config.num_train_steps = 64
  config.eval_every = 32
  config.log_every = 4
  config.checkpoint_every = 16
  config.data.seq_len = 128
  config.data.batch_size = 4
  config.data.eval_examples = 64
  config.compare.baseline = "adamw"
  config.compare.seeds = (0, 1, 2)
  methods = smollm2_knowledge.methods(adamw=5e-5)
  config.compare.methods = {name: methods[name] for name in smollm2_foldoc_quick.SHORT_LIST}
  config.compare.timing = {"rounds": 8, "steps": 1}
  config.compare.results_dir = "docs/results/smollm2_language"
  return config
