"""Language adaptation: fine-tune the biographies base on an invented language, with FINCH.

The same comparison as configs/default.py, but the new task is text in a synthetic language
whose letters (Greek script, so bytes the base never saw) and words pretraining never showed,
the low-resource language setting of the FINCH paper. What must be kept is still the base
population's biographies.

python train.py --config configs/language.py --workdir workdir/language
"""

import ml_collections

from configs import default

BIOGRAPHIES = "embedded/biographies"


def get_config() -> ml_collections.ConfigDict:
  """The default comparison with the invented language as the fine-tuning task."""
  config = default.full_size(default.get_config())
  config.data.name = "embedded/synthetic_language"
  config.data.options["embedded_synthetic_language"] = {"num_finetune": 800}
  config.data.train = {"name": "", "split": "finetune"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "finetune"},
    "retain": {"name": BIOGRAPHIES, "split": "pretrain"},
  }
  config.data.fact_sets = {"retain": {"name": BIOGRAPHIES, "split": "retain_facts"}}
  config.compare.pretrain["data"]["train"] = {"name": BIOGRAPHIES, "split": "pretrain"}
  config.compare.methods = {  # the sweeps RESULTS.md measured
    "standard": {"finch": {"enabled": False}, "learning_rates": (3e-4, 1e-3, 3e-3)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (1e-4, 3e-4, 1e-3)},
  }
  return config
