"""Key/value-cache decoding (`Llama.decode`, `greedy_generate`, `sample`) against the full
recomputation it replaced: the same logits and, token for token, the same continuations."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.decode import full_recompute_sample  # noqa: E402
from finch_jax import lora  # noqa: E402
from finch_jax.models import Llama, Llama3RopeScaling, LlamaConfig, greedy_generate, sample  # noqa: E402

TINY = LlamaConfig.tiny(num_layers=2)
# Grouped queries (3 per kv head), Qwen3's q/k norms, Llama 3.1 rope scaling, biases, untied head.
GQA = LlamaConfig(
  vocab_size=96,
  d_model=48,
  num_layers=3,
  num_heads=6,
  num_kv_heads=2,
  head_dim=16,
  d_ff=80,
  model_type="qwen3",
  attention_bias=True,
  rope_scaling=Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
  ),
  max_len=64,
)
CONFIGS = {
  "tiny": TINY,
  "tiny_scanned": TINY.replace(scan_layers=True),
  "gqa": GQA,
  "gqa_scanned": GQA.replace(scan_layers=True),
}

# Right-padded prompts of lengths 3, 7, 1 and 5; the padding is junk that must not matter.
PROMPTS = np.array(
  [
    [1, 40, 41, 9, 9, 9, 9],
    [1, 50, 51, 52, 53, 54, 55],
    [1, 77, 76, 75, 74, 73, 72],
    [1, 5, 6, 7, 8, 0, 0],
  ]
)
LENGTHS = np.array([3, 7, 1, 5])
NEW = 12


def build(name):
  model = Llama(CONFIGS[name], rngs=nnx.Rngs(0))
  if CONFIGS[name].attention_bias:
    # Biases start at zero; random ones make sure the decode path applies them.
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    state = jax.tree.map_with_path(
      lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if "bias" in str(p[-1]) else x,
      state,
    )
    model = nnx.merge(graphdef, state)
  return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def named_model(request):
  return request.param, build(request.param)


def full_recompute(model, rng=None, temperature=1.0):
  return full_recompute_sample(
    model,
    jnp.asarray(PROMPTS),
    jnp.asarray(LENGTHS),
    jax.random.key(0) if rng is None else rng,
    temperature,
    num_new_tokens=NEW,
    greedy=rng is None,
  )


def test_decode_logits_match_the_forward_pass(named_model):
  """Prefill half a row, then one token per call: every position's logits are the forward's."""
  _, model = named_model
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 96, (2, 10)))
  expected = nnx.jit(lambda m, t: m(t))(model, tokens)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))

  @nnx.jit
  def incremental(model, tokens):
    cache = model.init_cache(2, 10)
    first, cache = model.decode(tokens[:, :4], positions[:, :4], cache)
    rest = []
    for t in range(4, 10):
      logits, cache = model.decode(tokens[:, t : t + 1], positions[:, t : t + 1], cache)
      rest.append(logits)
    return jnp.concatenate([first, *rest], axis=1), cache

  logits, cache = incremental(model, tokens)
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)
  config = model.config
  shape = (config.num_layers, 2, 10, config.num_kv_heads, config.resolved_head_dim)
  assert cache.k.shape == cache.v.shape == shape
  assert float(jnp.abs(cache.k).min(axis=(0, 3, 4)).min()) > 0  # every slot written


def test_greedy_matches_full_recompute_token_for_token(named_model):
  _, model = named_model
  generated = greedy_generate(model, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), NEW)
  assert generated.shape == (4, NEW) and generated.dtype == jnp.asarray(PROMPTS).dtype
  np.testing.assert_array_equal(generated, full_recompute(model))
  # A row decodes from its own length: the same prompt alone gives the same tokens.
  alone = greedy_generate(model, jnp.asarray(PROMPTS[3:, :5]), jnp.asarray([5]), NEW)
  np.testing.assert_array_equal(alone[0], generated[3])


def test_sampling_matches_full_recompute_token_for_token(named_model):
  _, model = named_model
  prompts, lengths = jnp.asarray(PROMPTS), jnp.asarray(LENGTHS)
  for seed in range(4):
    for temperature in (1.0, 0.7):
      key = jax.random.key(seed)
      np.testing.assert_array_equal(
        sample(model, prompts, lengths, NEW, key, temperature),
        full_recompute(model, key, temperature),
        err_msg=f"seed {seed}, temperature {temperature}",
      )


def test_lora_merged_model_decodes_like_full_recompute():
  model = build("gqa_scanned")
  graphdef, base = nnx.split(model)
  base = nnx.as_pure(base)
  config = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_lora(base, config, jax.random.key(0))
  # B starts at zero; nonzero B makes the merge change the model.
  adapters = jax.tree.map(lambda x: x + 0.05, adapters)
  adapted = nnx.merge(graphdef, lora.merge(base, adapters, config))
  generated = greedy_generate(adapted, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), NEW)
  np.testing.assert_array_equal(generated, full_recompute(adapted))
  assert (
    generated != greedy_generate(model, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), NEW)
  ).any()


def test_sample_inside_an_outer_jit_with_scanned_layers():
  model = build("tiny_scanned")
  graphdef, state = nnx.split(model)

  @jax.jit
  def draw(state, prompts, lengths, key):
    return sample(nnx.merge(graphdef, state), prompts, lengths, NEW, key, 0.8)

  key = jax.random.key(3)
  np.testing.assert_array_equal(
    draw(state, PROMPTS, LENGTHS, key), sample(model, jnp.asarray(PROMPTS), LENGTHS, NEW, key, 0.8)
  )


def test_too_long_and_cacheless_models_are_refused():
  model = build("gqa")
  with pytest.raises(ValueError, match="exceeds max_len=64"):
    greedy_generate(model, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), 64 - 7 + 1)
  with pytest.raises(TypeError, match="lacks"):
    greedy_generate(lambda tokens: tokens, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), 2)
