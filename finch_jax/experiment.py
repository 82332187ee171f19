"""From a config to a finished job: `train_and_evaluate(config, workdir)`, which `train.py` calls.

Every check of the config runs first (`finch_jax.validate`), before anything compiles; then, by
`config.mode`:

- `pretrain`: train a model from scratch on `config.data.train` (`finch_jax.run.pretrain`).
- `finetune`: fine-tune `config.base_checkpoint` and report its forgetting
  (`finch_jax.run.finetune`).
- `compare`: pretrain a base (kept in `workdir/base`), run each method's learning-rate sweep and
  report forgetting at matched task loss (`finch_jax.sweep.compare`).

Each is resumable: rerunning the same command continues from the newest checkpoint.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath

from finch_jax import run, sweep
from finch_jax.validate import validate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs what `config.mode` asks for in `workdir`; see the module docstring."""
  validate(config, workdir)  # every check before any compilation, each naming its fix
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs:// (a no-op in a bucket)
  if config.mode == "pretrain":
    return run.pretrain(config, workdir)
  if config.mode == "finetune":
    return run.finetune(config, workdir)
  return sweep.compare(config, workdir)


__all__ = ["train_and_evaluate"]
