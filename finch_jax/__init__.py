"""finch_jax: fine-tune JAX models without losing what they knew.

FINCH (arXiv 2605.20005) as an optax gradient transformation, with helpers for
Flax NNX and Linen.
"""

from finch_jax import linen
from finch_jax.transform import (
  DEFAULT_EMA_DECAY,
  DEFAULT_MAX_SCALE,
  DEFAULT_MIN_SCALE,
  FinchState,
  finch,
  finch_stats,
  find_finch_states,
  global_loss,
  scale_by_finch,
)

__version__ = "0.1.0"

__all__ = [
  "DEFAULT_EMA_DECAY",
  "DEFAULT_MAX_SCALE",
  "DEFAULT_MIN_SCALE",
  "FinchState",
  "find_finch_states",
  "finch",
  "finch_stats",
  "global_loss",
  "linen",
  "scale_by_finch",
]
