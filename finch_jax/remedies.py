"""Remedies for forgetting besides FINCH, as pieces that compose with it.

- `anchor_to_init`: an optax transform that pulls the parameters back toward where fine-tuning
  started (the base model), decoupled from the adaptive scaling like AdamW's weight decay
  (Bethune et al., arXiv 2502.06042, propose such an anchored AdamW).
- `token_kl_to_base`: the KL divergence from the base model's next-token distribution to the
  fine-tuned model's, a loss term on replay data (Marek et al., arXiv 2605.26097).
- `sample_replay_set`: replay data sampled from the base model itself, for when its pretraining
  data is not at hand.

Replay of pretraining data is a data-pipeline matter (`finch_jax.data.mixture`), and LoRA lives
in `finch_jax.lora`; the trainer composes all of them with FINCH (see `configs/compare.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finch_jax import measures
from finch_jax.models.generate import sample


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
  """(sum over weighted tokens of KL(base || model), sum of weights), float32 scalars: the KL
  term of Marek et al.'s replay, `finch_jax.measures.token_kl` with the base as reference (no
  gradient flows into the base's logits).

  Args:
    logits: the fine-tuned model's logits [batch, length, vocab].
    base_logits: the base model's logits on the same tokens.
    weights: [batch, length], 1 on tokens that count.
  """
  return measures.token_kl(logits, base_logits, weights)


def sample_replay_set(
  model: Any,
  *,
  num_samples: int,
  length: int,
  bos_id: int,
  eos_id: int | None,
  seed: int,
  temperature: float = 1.0,
  batch_size: int = 64,
) -> list[np.ndarray]:
  """Texts sampled from the base model, as replay data when its pretraining data is unavailable.

  Each sample starts from the BOS token alone and is drawn with `finch_jax.models.sample`
  (jitted; on the model's devices); it is cut after its first EOS. Marek et al. (arXiv
  2605.26097) replay such samples with a KL term to the base model's predictions.

  Args:
    model: the base model (an NNX module mapping tokens to logits).
    num_samples: how many sequences.
    length: tokens sampled after BOS (the model's `max_len` must hold length + 1).
    bos_id, eos_id: the tokenizer's BOS and EOS ids (eos None: never cut).
    seed: the sampling key's seed; the same seed gives the same set.
    temperature: softmax temperature (> 0).
    batch_size: sequences sampled at a time.

  Returns:
    `num_samples` int32 token vectors, each BOS + sampled tokens (+ EOS when one was drawn).
  """
  if num_samples < 1 or length < 1 or batch_size < 1:
    raise ValueError(
      f"num_samples ({num_samples}), length ({length}) and batch_size ({batch_size}) must be >= 1."
    )
  out: list[np.ndarray] = []
  key = jax.random.key(seed)
  for start in range(0, num_samples, batch_size):
    rows = min(batch_size, num_samples - start)
    prompts = jnp.full((batch_size, 1), bos_id, jnp.int32)  # a fixed shape: one compilation
    tokens = sample(
      model,
      prompts,
      jnp.ones(batch_size, jnp.int32),
      length,
      jax.random.fold_in(key, start),
      temperature,
    )
    for row in np.asarray(jax.device_get(tokens))[:rows]:
      if eos_id is not None and (ends := np.flatnonzero(row == eos_id)).size:
        row = row[: ends[0] + 1]
      out.append(np.concatenate([[bos_id], row]).astype(np.int32))
  return out
