"""Remedies for forgetting besides FINCH, as pieces that compose with it.

- `anchor_to_init`: an optax transform that pulls the parameters back toward where fine-tuning
  started (the base model), decoupled from the adaptive scaling like AdamW's weight decay
  (Bethune et al., arXiv 2502.06042, propose such an anchored AdamW).
- `token_kl_to_base`: the KL divergence from the base model's next-token distribution to the
  fine-tuned model's, a loss term on replay data (Marek et al., arXiv 2605.26097).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AnchorState(NamedTuple):
  """State of `anchor_to_init`: a copy of the parameters fine-tuning started from."""

  anchor: Any  # the parameter tree at `init`, same shapes and dtypes as the parameters.


def anchor_to_init(strength: float | jax.Array) -> optax.GradientTransformation:
  """Adds `strength * (params - anchor)` to the updates, with `anchor` the parameters at `init`.

  Put it where AdamW puts its weight decay, after the adaptive scaling and before the learning
  rate, so the pull is decoupled from the gradient statistics:

    optax.chain(optax.scale_by_adam(), anchor_to_init(1e-2), optax.scale_by_learning_rate(lr))

  Each step then moves the parameters `lr * strength` of the way back toward the base. The state
  holds one copy of the parameters (their bytes are the cost of this remedy).

  Args:
    strength: the pull per unit learning rate (>= 0); 0 is plain fine-tuning.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.
  """
  if not isinstance(strength, jax.core.Tracer) and float(strength) < 0:
    raise ValueError(f"anchor strength must be >= 0, got {strength}.")

  def init_fn(params):
    return AnchorState(anchor=jax.tree.map(jnp.copy, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("anchor_to_init needs the parameters: call update(grads, state, params).")
    updates = jax.tree.map(
      lambda u, p, a: u + jnp.asarray(strength, u.dtype) * (p - a).astype(u.dtype),
      updates,
      params,
      state.anchor,
    )
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def token_kl_to_base(
  logits: jax.Array, base_logits: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum over weighted tokens of KL(base || model), sum of weights), float32 scalars.

  KL(p_base || p_model) = sum_v p_base(v) (log p_base(v) - log p_model(v)) at each position:
  zero where the fine-tuned model predicts exactly what the base did.

  Args:
    logits: the fine-tuned model's logits [batch, length, vocab].
    base_logits: the base model's logits on the same tokens (no gradient flows into them).
    weights: [batch, length], 1 on tokens that count.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(base_logits).astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  weights = weights.astype(jnp.float32)
  return jnp.sum(kl * weights), jnp.sum(weights)
