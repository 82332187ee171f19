"""The convergence reading of the knowledge setting: train until the exact answers plateau.

configs/smollm2_knowledge_quick.py reads forgetting where every sweep ends, after 64 steps. The
claim to test is "as much forgetting prevented at the task performance of standard fine-tuning":
a user trains until the model has learned the facts, and a small constant rate also forgets
little but needs more steps to get there. Here every method trains three times as long (192
steps of 4 rows of 128 tokens, so each of the 80 facts is seen about 150 times) and is
evaluated every 16 steps; the report (`finch_jax.convergence`) reads each run where its
exact-match accuracy on the taught questions first reaches the plateau every method attains:
the steps it took, the time that is at the method's step time, and the retain loss's rise and
KL to the base by then (each method at its rate with the lowest KL there), and the same at exact
answers 0.5, 0.75 and 0.9 on the way. Each method runs the lower three rates of its sweep in the
quick setting (at three times the steps they reach the plateau), three seeds.

Summaries are kept in `docs/results/smollm2_knowledge_convergence/`; `python -m finch_jax.report
docs/results/smollm2_knowledge_convergence` rebuilds the report from those files alone. On two
CPU cores a run takes about 40 minutes (one at a time, `--config.compare.concurrent_runs=1`;
steps of about 6 s, the 12 evaluations the rest): run a few methods per session with
`"--config.compare.only=(...)"` and `"--config.compare.seeds=(0,)"`.
"""

import ml_collections

from configs import smollm2_knowledge_quick

STEPS_FACTOR = 3  # the quick setting's 64 steps, three times over
RATES = 3  # the lower rates of each method's quick sweep


def get_config() -> ml_collections.ConfigDict:
  """Every method of the knowledge setting trained to its plateau, evaluated every 16 steps."""
  config = smollm2_knowledge_quick.get_config()
  config.num_train_steps = STEPS_FACTOR * config.num_train_steps
  config.eval_every = 16
  config.checkpoint_every = 32
  config.log_every = 8
  for method in config.compare.methods.values():
    method.learning_rates = tuple(method.learning_rates)[:RATES]
  config.compare.results_dir = "docs/results/smollm2_knowledge_convergence"
  return config
