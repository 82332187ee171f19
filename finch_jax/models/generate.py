"""Batched autoregressive decoding with a key/value cache.

The prompts go through the model once (`Llama.decode` on the whole right-padded buffer, which
fills the cache), then each step feeds one token per row at that row's next position and attends
to the cache: a step costs one token's projections and MLP plus attention to the cache, not a
pass over the whole buffer. Shapes are static (the cache holds prompt width + new tokens), so
the loop is one `jax.lax.fori_loop` inside one jit, and rows of different prompt lengths decode
side by side, each from its own length.
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
  model: nnx.Module,
  prompt_tokens: jax.Array,
  prompt_lengths: jax.Array,
  num_new_tokens: int,
  choose: _ChooseFn,
) -> jax.Array:
  """Appends `num_new_tokens` chosen tokens after each prompt and returns them [batch, new]."""
  batch, width = prompt_tokens.shape
  rows = jnp.arange(batch)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  # Slots for the continuation of the longest possible prompt. Whatever lies right of a row's
  # length (padding) is written to the cache by the prefill but masked from every position before
  # it, and overwritten by the row's own tokens before any later position can see it.
  cache = model.init_cache(batch, width + num_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
  hidden, head, cache = model.decode_hidden_and_head(prompt_tokens, positions, cache)
  last = hidden[rows, lengths - 1]  # logits at each prompt's last token only
  logits = jnp.einsum(
    "bd,dv->bv", last, head.astype(last.dtype), preferred_element_type=jnp.float32
  )
  first = choose(logits, jnp.int32(0)).astype(prompt_tokens.dtype)
  out = jnp.zeros((batch, num_new_tokens), prompt_tokens.dtype).at[:, 0].set(first)

  # NNX transforms inside the model (nnx.scan over stacked layers) cannot take a module from
  # outside the loop's trace: each step rebuilds it from its state.
  graphdef, state = nnx.split(model)
  state = nnx.as_pure(state)

  def step(i, carry):
    out, cache = carry
    # Token i - 1 sits at position lengths + i - 1; its logits choose token i.
    logits, cache = nnx.merge(graphdef, state).decode(
      out[:, i - 1, None], (lengths + i - 1)[:, None], cache
    )
    return out.at[:, i].set(choose(logits[:, 0], i).astype(out.dtype)), cache

  out, _ = jax.lax.fori_loop(1, num_new_tokens, step, (out, cache))
  return out


@functools.partial(nnx.jit, static_argnames=("num_new_tokens", "greedy"))
def _generate(model, prompt_tokens, prompt_lengths, rng, temperature, *, num_new_tokens, greedy):
  def choose(logits, step):
    if greedy:
      return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits / temperature, axis=-1)

  return _decode(model, prompt_tokens, prompt_lengths, num_new_tokens, choose)


_DECODE_METHODS = ("init_cache", "decode", "decode_hidden_and_head")


def _check(model: nnx.Module, prompt_tokens: jax.Array, num_new_tokens: int) -> None:
  if missing := [name for name in _DECODE_METHODS if not hasattr(model, name)]:
    raise TypeError(
      f"generation needs a model with a key/value cache (finch_jax.models.Llama); "
      f"{type(model).__name__} lacks {missing}."
    )
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

  Decodes with a key/value cache (one pass over the prompts, then one token per step); jitted
  with `nnx.jit`, and usable inside an outer `jax.jit`/`nnx.jit` (with a model rebuilt by
  `nnx.merge` there).

  Args:
    model: a `Llama` (or a module with its `init_cache`, `decode` and `decode_hidden_and_head`),
      e.g. one with LoRA adapters merged (`finch_jax.lora.merge`).
    prompt_tokens: int [batch, max_len]; row b holds its prompt in its first prompt_lengths[b]
      entries (anything after them is ignored).
    prompt_lengths: int [batch], each at least 1 (start prompts with a BOS token).
    num_new_tokens: how many tokens to generate per row (static). The cache holds
      prompt_tokens.shape[1] + num_new_tokens positions, which must fit the config's `max_len`.

  Returns:
    int [batch, num_new_tokens], the tokens after each prompt. Generation does not stop at EOS;
    cut each row at its first EOS.
  """
  _check(model, prompt_tokens, num_new_tokens)
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
  _check(model, prompt_tokens, num_new_tokens)
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
