"""Every remedy beside FINCH, alone and with FINCH, at matched task loss.

python train.py --config configs/compare.py --workdir workdir/compare

The embedded benchmark of configs/default.py (a tiny byte-level transformer pretrained on one
population of synthetic biographies, fine-tuned on another), with each method's learning-rate
sweep over two seeds, read at matched task loss (finch_jax.sweep, finch_jax.report). About 35
minutes on two CPU cores. Methods, with the settings chosen before any run (never tuned on the
outcome):

- standard: AdamW at a constant rate; cosine: the same with cosine decay to 10%.
- finch: FINCH around the same AdamW.
- replay: 1% of the fine-tuning examples from the pretraining split (Bethune et al., arXiv
  2502.06042, report 1% already prevents forgetting of the pretraining set).
- kl_base: 5% of the examples sampled from the base model itself, trained on the KL divergence
  to the base's next-token distribution (Marek et al., arXiv 2605.26097) - for when the
  pretraining data is not at hand. Samples: 256 x 96 tokens, temperature 1.
- anchor: each step pulls the weights lr * 3 of the way back to the base (anchored AdamW); at
  lr 1e-3 that is 0.3% per step, an equilibrium where a weight sits where the gradient's push
  balances a pull of 0.3% of its distance from the base.
- lora: rank-8 adapters (alpha 16) on every attention and MLP projection, base frozen
  (Kalajdzievski, arXiv 2401.05605: LoRA still forgets); it needs larger rates.
- X+finch: method X with FINCH on top, so each remedy's combination is measured too; the
  report reads it against X as well as against the baseline (a name X+finch_READING, e.g.
  kl_base+finch_target, says which of FINCH's readings it uses).

The sweeps span the task losses every method reaches, so that all can be read at one matched
task loss: AdamW's best 150-step loss comes at 1e-3 (3e-3 overshoots), LoRA's at 3e-3. FINCH's
scale rises from 1 toward max_scale=4 as the loss falls, so it takes larger steps than AdamW at
the same base rate (docs/design.md, "The rule").
"""

import ml_collections

from configs import default

ADAMW_RATES = (1e-4, 3e-4, 1e-3)
FINCH_RATES = (1e-4, 3e-4, 1e-3)
COSINE_RATES = (3e-4, 1e-3, 3e-3)
LORA_RATES = (1e-3, 3e-3, 1e-2)
LORA_FINCH_RATES = (3e-4, 1e-3, 3e-3)

OFF = {"enabled": False}
ON = {"enabled": True}
REPLAY = {"share": 0.01, "data": {"name": "", "split": "pretrain"}}
KL_BASE = {"share": 0.05, "data": {"name": "base_samples"}, "kl_weight": 1.0}
ANCHOR = {"anchor_strength": 3.0}
LORA = {"rank": 8, "alpha": 16.0}


def methods() -> dict:
  """Name -> config overrides and the learning rates to sweep."""
  return {
    "standard": {"finch": OFF, "learning_rates": ADAMW_RATES},
    "cosine": {
      "finch": OFF,
      "optimizer": {"schedule": "cosine", "final_lr_fraction": 0.1},
      "learning_rates": COSINE_RATES,
    },
    "finch": {"finch": ON, "learning_rates": FINCH_RATES},
    "replay": {"finch": OFF, "replay": REPLAY, "learning_rates": ADAMW_RATES},
    "replay+finch": {"finch": ON, "replay": REPLAY, "learning_rates": FINCH_RATES},
    "kl_base": {"finch": OFF, "replay": KL_BASE, "learning_rates": ADAMW_RATES},
    "kl_base+finch": {"finch": ON, "replay": KL_BASE, "learning_rates": FINCH_RATES},
    "anchor": {"finch": OFF, "optimizer": ANCHOR, "learning_rates": ADAMW_RATES},
    "anchor+finch": {"finch": ON, "optimizer": ANCHOR, "learning_rates": FINCH_RATES},
    "lora": {"finch": OFF, "lora": LORA, "learning_rates": LORA_RATES},
    "lora+finch": {"finch": ON, "lora": LORA, "learning_rates": LORA_FINCH_RATES},
  }


def get_config() -> ml_collections.ConfigDict:
  """The full comparison of remedies on the embedded benchmark."""
  config = default.full_size(default.get_config())
  config.compare.methods = methods()
  return config
