"""Token losses from hidden states and the output projection, optionally without whole logits.

A language model's float32 logits [batch, length, vocab] are the largest activation of a
fine-tuning step (Qwen3-4B, 8 x 4096 tokens: 151,936 x 4 bytes a token, 20 GB), and the backward
pass keeps a second array of that size. The functions here take the final hidden states
[batch, length, d_model] and the head [d_model, vocab] instead, so the logits can be made a chunk
of the sequence at a time: `lax.scan` over chunks, each under `jax.checkpoint`, holds one chunk's
logits [batch, chunk, vocab] in the forward and recomputes them one chunk at a time in the
backward. Per token the arithmetic is that of the whole-logits loss (float32 accumulation of
hidden @ head, as the models compute logits), so the chunked and plain versions agree to
float32 rounding, values and gradients.

Every loss returns sums, (sum over tokens of weight * loss, sum of weights), both float32
scalars: the trainer divides by the global batch's weight, so gradient accumulation over
micro-batches gives exactly the mean over the whole batch.

  cross_entropy_sums          next-token cross-entropy (`measures.token_cross_entropy`)
  kl_to_base_sums             KL(base || model) per token (`measures.token_kl`)
  cross_entropy_and_kl_sums   both at once, the model's logits computed once per chunk

Each takes `chunk_size`: None for the plain computation (whole logits), an integer for the
chunked one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Sums = tuple[jax.Array, jax.Array]

# Tokens of each row per chunk. At Qwen3's vocabulary a chunk's float32 logits are 311 MB a row
# (2.5 GB for 8 rows), against 20 GB for 8 whole rows of 4096 tokens; the backward holds about
# two chunks' worth.
DEFAULT_CHUNK_SIZE = 512


def logits_from_hidden(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """hidden [..., d_model] @ head [d_model, vocab] -> float32 logits, as the models compute them.

  The head is cast to the hidden states' dtype and the products accumulate in float32: a
  bfloat16 logit loses the small differences the loss depends on.
  """
  return jnp.einsum(
    "...d,dv->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
  )


def per_token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [...] of float32 logits [..., vocab] against integer targets."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def per_token_kl(logits: jax.Array, base_logits: jax.Array) -> jax.Array:
  """Per-token KL(softmax(base_logits) || softmax(logits)), float32 [...]."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  log_q = jax.nn.log_softmax(base_logits, axis=-1)
  return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def _weighted_sum(values: jax.Array, weights: jax.Array) -> Sums:
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights), jnp.sum(weights)


def _per_token(
  fn: Callable[..., tuple[jax.Array, ...]],
  hidden: tuple[jax.Array, ...],
  heads: tuple[jax.Array, ...],
  extras: tuple[jax.Array, ...],
  chunk_size: int | None,
) -> tuple[jax.Array, ...]:
  """Per-token values [batch, length] of `fn(*logits, *extras)`, with one logits array per
  (hidden, head) pair and `extras` [batch, length] arrays (the targets), whole or a chunk of the
  sequence at a time.

  Chunks run along the length, so every chunk keeps the batch axis and whatever sharding it has
  (a batch sharded over devices stays so; no device waits for another's rows). A length the
  chunk does not divide is padded with zero hidden states; those tokens' values are cut off
  before anything is summed, so they touch neither the sums nor the gradients.
  """

  def chunk_values(chunk_hidden, chunk_extras, chunk_heads):
    logits = [logits_from_hidden(h, w) for h, w in zip(chunk_hidden, chunk_heads, strict=True)]
    return fn(*logits, *chunk_extras)

  if chunk_size is None:
    return chunk_values(hidden, extras, heads)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
  chunk_size = int(chunk_size)
  batch, length = hidden[0].shape[:2]
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def to_chunks(x):
    # [batch, length, ...] -> [num_chunks, batch, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

  # Checkpointed: the backward keeps only each chunk's inputs and recomputes its logits.
  body = jax.checkpoint(chunk_values, prevent_cse=False)

  def step(carry, xs):
    return carry, body(*xs, heads)

  xs = (tuple(to_chunks(h) for h in hidden), tuple(to_chunks(e) for e in extras))
  _, values = jax.lax.scan(step, None, xs)
  # [num_chunks, batch, chunk] -> [batch, length]
  return tuple(jnp.moveaxis(v, 0, 1).reshape(batch, num_chunks * chunk)[:, :length] for v in values)


def _check(hidden: jax.Array, head: jax.Array, **per_token: jax.Array) -> None:
  if hidden.ndim != 3 or head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
    raise ValueError(
      f"Expected hidden [batch, length, d_model] and head [d_model, vocab], got hidden "
      f"{hidden.shape} and head {head.shape} (a tied embedding [vocab, d_model] goes in as .T)."
    )
  for name, x in per_token.items():
    if x.shape != hidden.shape[:2]:
      raise ValueError(f"{name} must be [batch, length] = {hidden.shape[:2]}, got {x.shape}.")


def _check_base(head: jax.Array, base_hidden: jax.Array, base_head: jax.Array, batch_length):
  _check(base_hidden, base_head)
  if base_hidden.shape[:2] != tuple(batch_length) or base_head.shape[1] != head.shape[1]:
    raise ValueError(
      f"The base's hidden states {base_hidden.shape} and head {base_head.shape} must cover the "
      f"same [batch, length] = {tuple(batch_length)} tokens and vocabulary ({head.shape[1]}) as "
      "the model's."
    )


def _constrain(sharding: jax.sharding.Sharding | None):
  """Lays each logits array out as `sharding` says (identity when None)."""
  if sharding is None:
    return lambda x: x
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def cross_entropy_sums(
  hidden: jax.Array,
  head: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  *,
  chunk_size: int | None = None,
  logits_sharding: jax.sharding.Sharding | None = None,
) -> Sums:
  """(sum of weight * next-token cross-entropy, sum of weights), float32 scalars.

  The same as `measures.token_cross_entropy(logits_from_hidden(hidden, head), targets, weights)`.

  Args:
    hidden: final (normalised) hidden states [batch, length, d_model], in the compute dtype.
    head: output projection [d_model, vocab] (a tied embedding's transpose).
    targets: int [batch, length].
    weights: [batch, length], the weight of each token's loss (0 drops it).
    chunk_size: tokens of each row per chunk; None computes the whole logits at once. Need not
      divide the length (the last chunk is padded).
    logits_sharding: optional sharding for the logits (whole or one chunk, [batch, tokens,
      vocab]), e.g. batch over the data axes and vocab over `tensor`.
  """
  _check(hidden, head, targets=targets, weights=weights)
  constrain = _constrain(logits_sharding)
  (losses,) = _per_token(
    lambda logits, t: (per_token_cross_entropy(constrain(logits), t),),
    (hidden,),
    (head,),
    (targets,),
    chunk_size,
  )
  return _weighted_sum(losses, weights)


def kl_to_base_sums(
  hidden: jax.Array,
  head: jax.Array,
  base_hidden: jax.Array,
  base_head: jax.Array,
  weights: jax.Array,
  *,
  chunk_size: int | None = None,
  logits_sharding: jax.sharding.Sharding | None = None,
) -> Sums:
  """(sum over weighted tokens of KL(base || model), sum of weights), float32 scalars.

  The same as `measures.token_kl(logits_from_hidden(hidden, head),
  logits_from_hidden(base_hidden, base_head), weights)`: KL(p_base || p_model) = sum_v
  p_base(v) (log p_base(v) - log p_model(v)) at each position, summed over the vocabulary. No
  gradient flows into the base's hidden states or head.

  Args:
    hidden, head: the fine-tuned model's final hidden states [batch, length, d_model] and output
      projection [d_model, vocab].
    base_hidden, base_head: the base model's, on the same tokens.
    weights: [batch, length], 1 on tokens that count.
    chunk_size, logits_sharding: as in `cross_entropy_sums`.
  """
  _check(hidden, head, weights=weights)
  _check_base(head, base_hidden, base_head, hidden.shape[:2])
  constrain = _constrain(logits_sharding)
  base_hidden, base_head = jax.lax.stop_gradient((base_hidden, base_head))
  (kl,) = _per_token(
    lambda logits, base_logits: (per_token_kl(constrain(logits), constrain(base_logits)),),
    (hidden, base_hidden),
    (head, base_head),
    (),
    chunk_size,
  )
  return _weighted_sum(kl, weights)


def cross_entropy_and_kl_sums(
  hidden: jax.Array,
  head: jax.Array,
  targets: jax.Array,
  ce_weights: jax.Array,
  base_hidden: jax.Array,
  base_head: jax.Array,
  kl_weights: jax.Array,
  *,
  chunk_size: int | None = None,
  logits_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`cross_entropy_sums` with `ce_weights` and `kl_to_base_sums` with `kl_weights`, together.

  For replay with a KL term: both read the model's logits, which are computed once per chunk
  here instead of once per loss. Arguments as in those two functions.

  Returns:
    (cross-entropy sum, sum of ce_weights, KL sum, sum of kl_weights), float32 scalars.
  """
  _check(hidden, head, targets=targets, ce_weights=ce_weights, kl_weights=kl_weights)
  _check_base(head, base_hidden, base_head, hidden.shape[:2])
  constrain = _constrain(logits_sharding)
  base_hidden, base_head = jax.lax.stop_gradient((base_hidden, base_head))

  def per_token(logits, base_logits, t):
    logits = constrain(logits)
    return per_token_cross_entropy(logits, t), per_token_kl(logits, constrain(base_logits))

  ce, kl = _per_token(per_token, (hidden, base_hidden), (head, base_head), (targets,), chunk_size)
  return (*_weighted_sum(ce, ce_weights), *_weighted_sum(kl, kl_weights))
