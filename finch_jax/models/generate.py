"""Batched autoregressive decoding for the small models this project trains.

Each new token re-runs the model over the whole fixed-size buffer: no KV cache, so one step costs
O(L^2) attention for a buffer of L tokens and N new tokens cost O(N * L^2). That is cheap for tiny
models and keeps every shape static, so the loop is one `jax.lax.fori_loop` inside one jit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# (logits [batch, vocab] float32, step) -> next tokens [batch]
_ChooseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _decode(
  model: Callable[..., jax.Array],
  prompt_tokens: jax.Array,
  prompt_lengths: jax.Array,
  num_new_tokens: int,
  choose: _ChooseFn,
) -> jax.Array:
  """Appends `num_new_tokens` chosen tokens after each prompt and returns them [batch, new]."""
  batch, width = prompt_tokens.shape
  rows = jnp.arange(batch)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  # Room for the continuation of the longest possible prompt; the causal mask makes whatever lies
  # right of a row's write position irrelevant, so prompts can be right-padded with anything.
  tokens = jnp.pad(prompt_tokens, ((0, 0), (0, num_new_tokens)))

  def step(i, tokens):
    logits = model(tokens)[rows, lengths + i - 1]
    return tokens.at[rows, lengths + i].set(choose(logits, i).astype(tokens.dtype))

  tokens = jax.lax.fori_loop(0, num_new_tokens, step, tokens)
  return tokens[rows[:, None], lengths[:, None] + jnp.arange(num_new_tokens)]


@functools.partial(nnx.jit, static_argnames=("num_new_tokens", "greedy"))
def _generate(model, prompt_tokens, prompt_lengths, rng, temperature, *, num_new_tokens, greedy):
  def choose(logits, step):
    if greedy:
      return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits / temperature, axis=-1)

  return _decode(model, prompt_tokens, prompt_lengths, num_new_tokens, choose)


def _check(prompt_tokens: jax.Array, num_new_tokens: int) -> None:
  if jnp.ndim(prompt_tokens) != 2:
    raise ValueError(
      f"prompt_tokens must be [batch, max_len], got shape {jnp.shape(prompt_tokens)}."
    )
  if not isinstance(num_new_tokens, int) or num_new_tokens < 1:
    raise ValueError(f"num_new_tokens must be a positive Python int, got {num_new_tokens!r}.")


def greedy_generate(
  model: nnx.Module, prompt_tokens: jax.Array, prompt_lengths: jax.Array, num_new_tokens: int
) -> jax.Array:
  """Greedy (argmax) continuation of a batch of right-padded prompts.

  Full recomputation per token (O(L^2) per step, no KV cache); jitted with `nnx.jit`, and usable
  inside an outer `jax.jit`/`nnx.jit` (with a model rebuilt by `nnx.merge` there).

  Args:
    model: maps tokens [batch, length] to logits [batch, length, vocab], e.g. `Llama`.
    prompt_tokens: int [batch, max_len]; row b holds its prompt in its first prompt_lengths[b]
      entries (anything after them is ignored).
    prompt_lengths: int [batch], each at least 1 (start prompts with a BOS token).
    num_new_tokens: how many tokens to generate per row (static). The model sees a buffer of
      prompt_tokens.shape[1] + num_new_tokens tokens, which must fit its config's `max_len`.

  Returns:
    int [batch, num_new_tokens], the tokens after each prompt. Generation does not stop at EOS;
    cut each row at its first EOS.
  """
  _check(prompt_tokens, num_new_tokens)
  return _generate(
    model,
    prompt_tokens,
    prompt_lengths,
    jax.random.key(0),
    1.0,
    num_new_tokens=num_new_tokens,
    greedy=True,
  )


def sample(
  model: nnx.Module,
  prompt_tokens: jax.Array,
  prompt_lengths: jax.Array,
  num_new_tokens: int,
  rng: jax.Array,
  temperature: float | jax.Array = 1.0,
) -> jax.Array:
  """Samples a continuation of each prompt from softmax(logits / temperature).

  Same arguments and cost as `greedy_generate`, plus `rng` (a JAX key; the same key gives the same
  tokens) and `temperature` (> 0; small values approach greedy decoding). Used, for example, to
  draw replay data from a base model.

  Returns:
    int [batch, num_new_tokens].
  """
  _check(prompt_tokens, num_new_tokens)
  if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
    raise ValueError(
      f"temperature must be > 0, got {temperature}: use greedy_generate for argmax decoding."
    )
  return _generate(
    model,
    prompt_tokens,
    prompt_lengths,
    rng,
    temperature,
    num_new_tokens=num_new_tokens,
    greedy=False,
  )
