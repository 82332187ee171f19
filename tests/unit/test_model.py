"""Tests for the decoder (the tiny configuration, Llama and Qwen3 options) and generation."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from finch_jax.models import (
  Llama,
  Llama3RopeScaling,
  LlamaConfig,
  attention,
  config_from_dict,
  greedy_generate,
  load_hf,
  sample,
  save_hf,
)
from finch_jax.models.llama import segment_positions

CONFIG = LlamaConfig.tiny(num_layers=2)


@nnx.jit
def forward(model, tokens, segment_ids=None, positions=None):
  return model(tokens, segment_ids=segment_ids, positions=positions)


@pytest.fixture(scope="module")
def model():
  return Llama(CONFIG, rngs=nnx.Rngs(0))


def random_tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 3, CONFIG.vocab_size)


def num_model_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_logits_shape_and_dtype(model):
  logits = forward(model, random_tokens((3, 16)))
  assert logits.shape == (3, 16, CONFIG.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # A fresh model predicts close to uniformly: the loss starts near log(vocab).
  tokens = random_tokens((4, 64), seed=1)
  log_probs = jax.nn.log_softmax(forward(model, tokens)[:, :-1])
  loss = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
  assert abs(float(loss) - np.log(CONFIG.vocab_size)) < 0.3


def test_causal(model):
  tokens = random_tokens((2, 16))
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % CONFIG.vocab_size)
  before, after = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(before[:, :10], after[:, :10])
  assert np.abs(before[:, 10:] - after[:, 10:]).max() > 1e-3


def test_packed_sequences_do_not_see_each_other(model):
  first, second = random_tokens((1, 7), seed=1), random_tokens((1, 6), seed=2)
  tokens = jnp.concatenate([first, second, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1] * 7 + [2] * 6 + [0] * 3])
  positions = jnp.array([list(range(7)) + list(range(6)) + list(range(3))])
  np.testing.assert_array_equal(segment_positions(segment_ids), positions)

  packed = forward(model, tokens, segment_ids, positions)
  np.testing.assert_allclose(packed[:, :7], forward(model, first), atol=1e-5)
  np.testing.assert_allclose(packed[:, 7:13], forward(model, second), atol=1e-5)
  # Positions default to restarting per segment.
  np.testing.assert_array_equal(forward(model, tokens, segment_ids), packed)
  # Without the segment mask the second sequence would see the first: the check above can fail.
  unpacked = forward(model, tokens, None, positions)
  assert np.abs(unpacked[:, 7:13] - forward(model, second)).max() > 1e-3


def test_grouped_query_attention_equals_repeated_kv():
  gqa = Llama(CONFIG, rngs=nnx.Rngs(1))
  mha = Llama(dataclasses.replace(CONFIG, num_kv_heads=CONFIG.num_heads), rngs=nnx.Rngs(2))
  group = CONFIG.num_heads // CONFIG.num_kv_heads
  nnx.update(mha, nnx.state(gqa))
  for gqa_block, mha_block in zip(gqa.blocks, mha.blocks, strict=True):
    # Hugging Face's repeat_kv: query head n reads key/value head n // group.
    mha_block.attn.k_proj.set_value(jnp.repeat(gqa_block.attn.k_proj[...], group, axis=1))
    mha_block.attn.v_proj.set_value(jnp.repeat(gqa_block.attn.v_proj[...], group, axis=1))
  tokens = random_tokens((2, 12))
  np.testing.assert_allclose(forward(gqa, tokens), forward(mha, tokens), atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params(tie):
  config = dataclasses.replace(CONFIG, tie_embeddings=tie)
  model = Llama(config, rngs=nnx.Rngs(0))
  assert num_model_params(model) == config.num_params()
  assert hasattr(model, "lm_head") != tie
  untied_extra = CONFIG.vocab_size * CONFIG.d_model
  assert config.num_params() == CONFIG.num_params() + (0 if tie else untied_extra)
  assert 300_000 <= LlamaConfig.tiny().num_params() <= 500_000


def test_every_param_has_logical_axis_names(model):
  vocabulary = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = param.get_metadata()["out_sharding"]
    assert len(names) == param[...].ndim and set(names) <= vocabulary, (path, names)


def test_bfloat16_compute_returns_float32_logits(model):
  tokens = random_tokens((2, 16))
  bf16 = Llama(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits = forward(bf16, tokens)
  assert logits.dtype == jnp.float32
  assert bf16.embed[...].dtype == jnp.float32
  np.testing.assert_allclose(logits, forward(model, tokens), atol=0.05)
  stored = Llama(dataclasses.replace(CONFIG, param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert stored.blocks[0].mlp.up_proj[...].dtype == jnp.bfloat16
  assert forward(stored, tokens).dtype == jnp.float32


def test_remat_changes_nothing_numerically(model):
  remat = Llama(dataclasses.replace(CONFIG, remat=True), rngs=nnx.Rngs(0))
  tokens = random_tokens((2, 8))

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

  (loss, grads), (remat_loss, remat_grads) = loss_and_grads(model), loss_and_grads(remat)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), remat_grads, grads)


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\): use one of"),
    (dict(d_model=98), r"d_model \(98\) is not divisible by num_heads \(4\)"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(dtype="int32"), "not a floating dtype: use 'float32' or 'bfloat16'"),
    (dict(param_dtype="float31"), "not a floating dtype"),
    (dict(norm_eps=0.0), "must be positive"),
    (dict(max_len=0), "max_len must be a positive integer"),
    (dict(init="xavier"), r"init='xavier'; supported: \('normal', 'scaled'\)"),
    (dict(model_type="gpt2"), "model_type='gpt2'; supported"),
    (dict(attention="flash"), r"attention='flash'; supported: \('auto', 'reference'"),
    (dict(remat_policy="dots"), r"remat_policy='dots' is not a policy .*'nothing_saveable'"),
  ],
)
def test_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CONFIG, **changes)


# Two packed rows of 40 tokens (segments, then padding), and the same rows unpacked.
ATTENTION_TOKENS = jax.random.randint(jax.random.key(3), (2, 40), 3, CONFIG.vocab_size)
ATTENTION_SEGMENTS = jnp.asarray([[1] * 15 + [2] * 25, [1] * 33 + [0] * 7])
# Blocks shorter than the rows, so the blocked paths run several blocks (splash's are multiples
# of 128: one padded block here).
ATTENTION_BLOCKS = {"chunked": 16, "auto": 16}


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("implementation", ["auto", "xla", "chunked", "splash", "cudnn"])
def test_every_attention_implementation_gives_the_reference_logits(
  model, implementation, packed, monkeypatch
):
  segment_ids = ATTENTION_SEGMENTS if packed else None
  expected = forward(model, ATTENTION_TOKENS, segment_ids)  # attention="auto": reference here
  # The same weights with another implementation (models of one seed are identical).
  other = Llama(CONFIG.replace(attention=implementation), rngs=nnx.Rngs(0))
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      forward(other, ATTENTION_TOKENS, segment_ids)
    return
  block = ATTENTION_BLOCKS.get(implementation, attention.DEFAULT_BLOCK_SIZE)
  monkeypatch.setattr(attention, "attend", functools.partial(attention.attend, block_size=block))
  actual = forward(other, ATTENTION_TOKENS, segment_ids)
  # float32 throughout; measured on CPU: at most 5.6e-7 on logits up to 0.87 (xla, chunked,
  # splash; packed or not), from the order of the softmax's sums. auto with blocks of 16 runs
  # chunked on CPU.
  np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def test_auto_is_the_reference_bit_for_bit_on_short_cpu_rows(model):
  # On CPU, where the compact model's published figures were made (elsewhere auto is splash or
  # cuDNN, compared with the reference above).
  if jax.default_backend() != "cpu":
    return
  reference = Llama(CONFIG.replace(attention="reference"), rngs=nnx.Rngs(0))
  for segment_ids in (None, ATTENTION_SEGMENTS):
    np.testing.assert_array_equal(
      forward(model, ATTENTION_TOKENS, segment_ids),
      forward(reference, ATTENTION_TOKENS, segment_ids),
    )


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_and_head_make_the_logits(model, tie):
  model = model if tie else Llama(CONFIG.replace(tie_embeddings=False), rngs=nnx.Rngs(0))
  hidden, head = nnx.jit(lambda m, t: m.hidden_and_head(t))(model, ATTENTION_TOKENS)
  assert hidden.shape == (2, 40, CONFIG.d_model) and head.shape == (CONFIG.d_model, 264)
  np.testing.assert_array_equal(head, model.embed[...].T if tie else model.lm_head[...])
  logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(logits, forward(model, ATTENTION_TOKENS), atol=1e-6, rtol=0)


def test_config_from_config_dict():
  config = ml_collections.ConfigDict(dataclasses.asdict(CONFIG))
  assert LlamaConfig(**config.to_dict()) == CONFIG
  assert config_from_dict(config) == CONFIG
  config.d_modle = 64
  with pytest.raises(ValueError, match=r"Unknown LlamaConfig fields \['d_modle'\]"):
    config_from_dict(config)


def test_longer_than_max_len_raises(model):
  with pytest.raises(ValueError, match="exceeds max_len=256"):
    model(jnp.zeros((1, 257), jnp.int32))


def test_tiny_configuration_keeps_its_parameter_count():
  tiny = LlamaConfig.tiny()
  expected = dict(vocab_size=264, max_len=256, num_layers=4, d_model=96, num_heads=4)
  expected.update(num_kv_heads=2, d_ff=256, tie_embeddings=True, init="scaled")
  assert {name: getattr(tiny, name) for name in expected} == expected
  # Tied 264 x 96 embedding; per layer q and o 96 x 96, k and v 96 x 48, gate, up and down
  # 96 x 256, two norms; the final norm.
  per_layer = 96 * (2 * 96 + 2 * 48) + 3 * 96 * 256 + 2 * 96
  assert tiny.num_params() == 264 * 96 + 4 * per_layer + 96 == 431_712
  abstract = nnx.eval_shape(lambda: Llama(tiny, rngs=nnx.Rngs(0)))
  assert num_model_params(abstract) == tiny.num_params()


SQRT8 = 8**0.5  # sqrt(2 * num_layers) for the tiny model's 4 layers


@pytest.mark.parametrize(
  "init, expected",
  [
    # Inputs d_model ** -0.5 = 0.1021; o_proj (4 heads * 24) ** -0.5 / sqrt(8) = 0.0361;
    # down_proj d_ff ** -0.5 / sqrt(8) = 0.0221; embedding and untied head 0.02.
    (
      "scaled",
      dict(
        embed=0.02,
        lm_head=0.02,
        q_proj=0.10206,
        k_proj=0.10206,
        v_proj=0.10206,
        gate_proj=0.10206,
        up_proj=0.10206,
        o_proj=0.03608,
        down_proj=0.02210,
      ),
    ),
    # Hugging Face's: normal(0, 0.02) for every weight.
    ("normal", dict.fromkeys(["embed", "lm_head", "q_proj", "o_proj", "down_proj"], 0.02)),
  ],
)
def test_init_gives_the_documented_standard_deviations(init, expected):
  config = LlamaConfig.tiny(init=init, tie_embeddings=False, attention_bias=True, mlp_bias=True)
  model = Llama(config, rngs=nnx.Rngs(0))
  by_name = {}
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    by_name.setdefault(path[-1], []).append(np.asarray(param[...]).ravel())
  by_name = {name: np.concatenate(values) for name, values in by_name.items()}
  for name, std in expected.items():
    assert abs(by_name[name].mean()) < 0.05 * std, name
    np.testing.assert_allclose(by_name[name].std(), std, rtol=0.03, err_msg=name)
  biases = [name for name in by_name if name.endswith("_bias")]
  assert len(biases) == 7
  for name in biases:
    assert not by_name[name].any(), name  # biases start at zero
  np.testing.assert_array_equal(by_name["scale"], 1.0)  # and norm scales at one
  stds = config.init_stddevs()
  exact = {"embed": "embed", "in": "q_proj", "attn_out": "o_proj", "mlp_out": "down_proj"}
  for role, name in exact.items():
    np.testing.assert_allclose(stds[role], expected[name], rtol=1e-3, err_msg=role)
  if init == "scaled":
    assert stds["attn_out"] == 96**-0.5 / SQRT8 and stds["mlp_out"] == 256**-0.5 / SQRT8


def test_model_dicts_with_and_without_the_older_family_key():
  sizes = dict(
    vocab_size=264, max_len=256, num_layers=2, d_model=96, num_heads=4, num_kv_heads=2, d_ff=256
  )
  # Without `family`, the fields left out take LlamaConfig's (Hugging Face's) defaults.
  assert config_from_dict(sizes) == LlamaConfig(**sizes)
  assert not LlamaConfig(**sizes).tie_embeddings and LlamaConfig(**sizes).init == "normal"
  assert config_from_dict({**sizes, "family": "llama"}) == LlamaConfig(**sizes)
  # "transformer" stood for the compact model: tied embeddings and the scaled init by default.
  assert config_from_dict({**sizes, "family": "transformer"}) == CONFIG
  untied = config_from_dict({**sizes, "family": "transformer", "tie_embeddings": False})
  assert untied == CONFIG.replace(tie_embeddings=False)
  # A model dict saved before there was one decoder (the compact model's fields) still loads.
  saved = dict(
    sizes, head_dim=None, tie_embeddings=True, rope_theta=10_000.0, norm_eps=1e-6, remat=False
  )
  saved.update(dtype="float32", param_dtype="float32", family="transformer")
  assert config_from_dict(saved) == CONFIG
  with pytest.raises(ValueError, match=r"Unknown model family 'gpt'.*'d_model'.*'init'"):
    config_from_dict({**sizes, "family": "gpt"})


def test_hugging_face_style_llama_round_trips(tmp_path):
  # Llama 3.1's scaling: factor 4, low and high frequency factors 1 and 4, original context 16.
  scaling = Llama3RopeScaling(4.0, 1.0, 4.0, original_max_position_embeddings=16)
  sizes = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96)
  options = dict(attention_bias=True, mlp_bias=True, rope_theta=500_000.0, rope_scaling=scaling)
  config = LlamaConfig(**sizes, **options, max_len=64, eos_token_id=(1, 2))
  assert config.init == "normal" and not config.tie_embeddings  # Hugging Face's defaults
  # Through a run config's JSON: the scaling comes back as its class, the eos ids as a tuple.
  assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
  model = Llama(config, rngs=nnx.Rngs(0))
  save_hf(model, tmp_path)
  again, _ = load_hf(tmp_path)
  assert again.config == config.replace(head_dim=16)  # config.json states head_dim
  before, after = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (model, again))
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(after[path][...], before[path][...], err_msg=str(path))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, config.vocab_size)
  np.testing.assert_array_equal(forward(again, tokens), forward(model, tokens))
  with pytest.raises(ValueError, match="exceeds max_len=64"):
    model(jnp.zeros((1, 65), jnp.int32))


# Right-padded prompts; the last row's padding is junk, which must not matter.
PROMPTS = np.array([[1, 40, 41, 0, 0, 0], [1, 50, 51, 52, 53, 54], [1, 99, 98, 97, 96, 95]])
PROMPT_LENGTHS = np.array([3, 6, 1])


def test_greedy_generate_matches_stepwise_argmax(model):
  generated = greedy_generate(model, jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS), 4)
  assert generated.shape == (3, 4)
  for row, length in enumerate(PROMPT_LENGTHS):
    sequence = list(PROMPTS[row, :length])
    for _ in range(4):
      logits = forward(model, jnp.asarray([sequence]))
      sequence.append(int(jnp.argmax(logits[0, -1])))
    assert list(generated[row]) == sequence[length:]


def test_generate_inside_jit(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def generate(state, prompts, lengths):
    return greedy_generate(nnx.merge(graphdef, state), prompts, lengths, 4)

  expected = greedy_generate(model, jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS), 4)
  np.testing.assert_array_equal(generate(state, PROMPTS, PROMPT_LENGTHS), expected)


def test_sample(model):
  prompts, lengths = jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS)
  first = sample(model, prompts, lengths, 4, jax.random.key(0))
  assert first.shape == (3, 4) and first.dtype == prompts.dtype
  np.testing.assert_array_equal(sample(model, prompts, lengths, 4, jax.random.key(0)), first)
  assert (sample(model, prompts, lengths, 4, jax.random.key(1)) != first).any()
  # A vanishing temperature leaves only the argmax.
  np.testing.assert_array_equal(
    sample(model, prompts, lengths, 4, jax.random.key(2), temperature=1e-6),
    greedy_generate(model, prompts, lengths, 4),
  )
  with pytest.raises(ValueError, match="temperature must be > 0"):
    sample(model, prompts, lengths, 4, jax.random.key(0), temperature=0.0)
