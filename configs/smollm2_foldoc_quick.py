"""Instruction tuning on a real pretrained model: SmolLM2-135M-Instruct learns FOLDOC's definitions.

The third setting of the SmolLM2 study, beside knowledge acquisition
(configs/smollm2_knowledge_quick.py) and language adaptation. The base is taught to answer
'What is "TERM" in computing?' with the Free On-line Dictionary of Computing's definition
(`debian/foldoc`, `apt-get install dict-foldoc`), in its own chat template, the loss on the
answers only. The task is held-out definitions: task loss and task token accuracy on terms the
run never saw (exact match means nothing for a paragraph-long answer). What it knew is measured
as in the knowledge setting: the loss rise and KL(base || fine-tuned) on held-out English (the
World English Bible), the accuracy drop and answer-NLL rise on the element facts the base
recalls, and calibration over all element probes before and after.

The size is that of the knowledge setting on two CPU cores (64 steps of 4 rows of 128 tokens);
definitions are cut to about 300 characters so that a question and its answer fit a row. The
methods are the shorter list: AdamW (the baseline), AdamW with warm-up and cosine decay, FINCH's
running-average and target readings, anchoring to the base weights and KL to the base on its own
samples. FINCH's target reading keeps the knowledge setting's target loss (1.0): the training loss
here stays near 3.3, so the reading is a rate about 0.55x AdamW's that still falls on harder
batches; a target near 3.3 would clip it to AdamW's rate instead. Each finished run's summary is
kept in `docs/results/smollm2_foldoc/`; `python -m finch_jax.report docs/results/smollm2_foldoc`
rebuilds the report from those files alone.
"""

import ml_collections

from configs import smollm2_knowledge, smollm2_knowledge_quick

# The shorter list of the settings after the first: AdamW constant and with warm-up and cosine
# decay, the two FINCH readings that forgot least in the knowledge setting at 3 seeds (the
# running average, about as much as AdamW; the target reading, 9% more), and the two remedies
# that forgot less than AdamW there (anchoring, KL to the base). FINCH's defaults (the first batch
# as reference) and LoRA forgot more there (+13%; 4.5-7x AdamW's KL) and are left to that setting.
SHORT_LIST = ("adamw", "adamw_cosine", "finch_running", "finch_target", "anchor", "kl_base")


def get_config() -> ml_collections.ConfigDict:
  """SmolLM2-135M-Instruct taught computing definitions, the study's shorter list compared."""
  config = smollm2_knowledge_quick.get_config()
  config.data.name = "debian/foldoc"
  config.data.options = {
    "debian_foldoc": {"passage_chars": 300},
    "debian_elements": {"known": "recalled"},
  }
  config.data.train = {"name": "", "split": "train"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "validation"},
    "retain": {"name": "debian/bible_web", "split": "validation"},
  }
  # Centred where the held-out task loss still falls with the rate. AdamW's screening at seed 0
  # (1.8e-5 to 9.8e-5): 3.264, 3.230, 3.208 up to 3.6e-5, then 3.197, 3.194, 3.208 while the KL
  # to the base doubled; a rate that buys no task loss on unseen definitions only costs what the
  # model knew, so the sweeps sit below it (AdamW 1.8e-5 to 7.1e-5).
  methods = smollm2_knowledge.methods(adamw=3.6e-5)
  config.compare.methods = {name: methods[name] for name in SHORT_LIST}
  config.compare.results_dir = "docs/results/smollm2_foldoc"
  return config
