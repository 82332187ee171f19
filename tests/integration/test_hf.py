"""Hugging Face Qwen3 / Llama checkpoints: load, compare with torch, export, shard, train.

Every checkpoint is a tiny random model written here by `transformers`; nothing is downloaded.
Skipped as a whole when torch, transformers or tokenizers is not installed.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from safetensors import safe_open  # noqa: E402

import finch_jax  # noqa: E402
from finch_jax import sharding as shd  # noqa: E402
from finch_jax.models import HFTokenizer, load_hf, save_hf  # noqa: E402
from finch_jax.models.hf import _read_block, _to_hf, config_from_hf  # noqa: E402

VOCAB = 128
SIZES = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
# Longer than the llama3 scaling's original context (16), so the scaled frequencies matter.
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 24))

CHECKPOINTS = {
  # head_dim 24 != 64 / 4, biases on: exercises the config's head_dim and attention_bias.
  "qwen3": lambda: transformers.Qwen3Config(
    **SIZES, head_dim=24, attention_bias=True, rope_theta=100_000.0, rms_norm_eps=1e-5
  ),
  "llama3": lambda: transformers.LlamaConfig(
    **SIZES,
    mlp_bias=True,
    rope_theta=500_000.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=4.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
  ),
  "llama_tied": lambda: transformers.LlamaConfig(**SIZES, tie_word_embeddings=True),
}


def torch_model(hf_config, seed=0):
  """A random model with every weight random (HF's init would leave norms 1 and biases 0)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = 0.1 * torch.randn_like(param)
      param.copy_(1 + noise if "norm" in name else noise)
  return model


def torch_logits(model_or_path, tokens=TOKENS):
  model = model_or_path
  if isinstance(model, str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@nnx.jit
def forward(model, tokens, segment_ids=None, positions=None):
  return model(tokens, segment_ids=segment_ids, positions=positions)


def tiny_tokenizer():
  """A word-level tokenizer over a few strings, with Llama-3-style special tokens."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["<unk>", "<pad>", "<s>", "</s>"]
  trainer = trainers.WordLevelTrainer(special_tokens=specials)
  tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ate the hat ."], trainer)
  return tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, torch logits on TOKENS)."""
  out = {}
  for name, make_config in CHECKPOINTS.items():
    path = str(tmp_path_factory.mktemp(name))
    model = torch_model(make_config())
    # The Llama 3 checkpoint is sharded, with model.safetensors.index.json.
    model.save_pretrained(path, max_shard_size="40KB" if name == "llama3" else "5GB")
    out[name] = (path, torch_logits(model))
  tokenizer_dir = out["llama_tied"][0]
  tiny_tokenizer().save(os.path.join(tokenizer_dir, "tokenizer.json"))
  with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), "w") as f:
    settings = dict(bos_token="<s>", eos_token={"content": "</s>"}, pad_token="<pad>")
    json.dump({**settings, "chat_template": "{{ messages }}"}, f)
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
  """name -> (model, tokenizer) loaded here without a mesh."""
  return {name: load_hf(path) for name, (path, _) in checkpoints.items()}


def test_sharded_checkpoint_was_written(checkpoints):
  files = os.listdir(checkpoints["llama3"][0])
  assert "model.safetensors.index.json" in files
  assert sum(name.startswith("model-0") for name in files) > 1


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_torch(checkpoints, loaded, name):
  model, _ = loaded[name]
  logits = forward(model, jnp.asarray(TOKENS))
  assert logits.shape == (*TOKENS.shape, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, checkpoints[name][1], atol=1e-4, rtol=0)


def test_config_fields_read(loaded):
  qwen, llama, tied = (loaded[name][0].config for name in CHECKPOINTS)
  assert qwen.qk_norm and qwen.attention_bias and qwen.resolved_head_dim == 24
  assert qwen.rope_theta == 100_000.0 and qwen.norm_eps == 1e-5 and not qwen.tie_embeddings
  assert (
    llama.rope_scaling.factor == 4.0 and llama.rope_scaling.original_max_position_embeddings == 16
  )
  assert llama.mlp_bias and not llama.qk_norm
  assert tied.tie_embeddings and not hasattr(loaded["llama_tied"][0], "lm_head")


def test_packed_rows_match_separate_rows(loaded):
  model, _ = loaded["qwen3"]
  first, second = TOKENS[:1, :10], TOKENS[1:, :14]
  packed = jnp.asarray(np.concatenate([first, second], axis=1))
  segment_ids = jnp.asarray([[1] * 10 + [2] * 14])
  logits = forward(model, packed, segment_ids=segment_ids)
  np.testing.assert_allclose(logits[:, :10], forward(model, jnp.asarray(first)), atol=1e-5)
  np.testing.assert_allclose(logits[:, 10:], forward(model, jnp.asarray(second)), atol=1e-5)


def params(model):
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["qwen3", "llama_tied"])
def test_save_load_round_trip_is_bitwise(tmp_path, loaded, name):
  model, _ = loaded[name]
  save_hf(model, tmp_path)
  again, _ = load_hf(tmp_path)
  assert again.config == model.config
  before, after = params(model), params(again)
  assert before.keys() == after.keys()
  for path in before:
    a, b = np.asarray(before[path].get_value()), np.asarray(after[path].get_value())
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32)), path


def test_bfloat16_params_round_trip(tmp_path, checkpoints):
  model, _ = load_hf(checkpoints["qwen3"][0], dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16
  save_hf(model, tmp_path)
  with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  again, _ = load_hf(tmp_path, dtype="bfloat16")
  for path, variable in params(model).items():
    a, b = np.asarray(variable.get_value()), np.asarray(params(again)[path].get_value())
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), path
  # Mixed precision: float32 parameters, bfloat16 compute, still close to torch's float32.
  mixed, _ = load_hf(tmp_path, dtype="bfloat16", param_dtype="float32")
  assert mixed.embed[...].dtype == jnp.float32
  logits = forward(mixed, jnp.asarray(TOKENS))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, checkpoints["qwen3"][1], atol=0.1)


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_transformers_reads_save_hf(tmp_path, checkpoints, loaded, name):
  # Written over a copy of the original: a sharded one's index and shards must go.
  shutil.copytree(checkpoints[name][0], tmp_path, dirs_exist_ok=True)
  save_hf(loaded[name][0], tmp_path)
  assert not any(
    file.startswith("model-") or file.endswith(".index.json") for file in os.listdir(tmp_path)
  )
  np.testing.assert_allclose(torch_logits(str(tmp_path)), checkpoints[name][1], atol=1e-4, rtol=0)


def test_mesh_load_is_sharded_and_matches(checkpoints):
  path, expected = checkpoints["llama3"]
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  model, _ = load_hf(path, mesh=mesh)
  q_proj = model.blocks[0].attn.q_proj[...]
  assert q_proj.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert model.embed[...].sharding.spec == PartitionSpec("tensor", "fsdp")
  assert model.lm_head[...].sharding.spec == PartitionSpec("fsdp", "tensor")
  # Each device holds only its shard: [64, 4, 16] split 2 x 2.
  assert {shard.data.shape for shard in q_proj.addressable_shards} == {(32, 2, 16)}
  # Four rows, so the batch splits over data x fsdp.
  tokens = jax.device_put(jnp.asarray(np.tile(TOKENS, (2, 1))), shd.batch_sharding(mesh))
  logits = forward(model, tokens)
  np.testing.assert_allclose(logits, np.tile(expected, (2, 1, 1)), atol=1e-4, rtol=0)


def test_loaded_model_takes_a_finch_training_step(loaded):
  # A copy over the same (immutable) arrays: the update leaves the fixture's model as it was.
  model = nnx.merge(*nnx.split(loaded["llama_tied"][0]))
  optimizer = nnx.Optimizer(model, finch_jax.finch(optax.adamw(1e-3)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss

  before = np.asarray(model.embed[...])
  loss = train_step(model, optimizer, jnp.asarray(TOKENS))
  assert np.isfinite(float(loss))
  assert not np.array_equal(before, np.asarray(model.embed[...]))


def test_tokenizer_adapter(checkpoints, loaded):
  tokenizer = loaded["llama_tied"][1]
  assert isinstance(tokenizer, HFTokenizer)
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (1, 2, 3)
  assert tokenizer.vocab_size == len(tiny_tokenizer().get_vocab())
  assert tokenizer.chat_template == "{{ messages }}"
  ids = tokenizer.encode("the cat ate the hat")
  assert ids.dtype == np.int32 and ids[0] == 2 and ids[-1] == 3 and len(ids) == 7
  assert tokenizer.decode(ids) == "the cat ate the hat"
  vocab = tokenizer.tokenizer.get_vocab()
  bare = tokenizer.encode("a dog", add_bos=False, add_eos=False)
  assert bare.tolist() == [vocab["a"], vocab["dog"]]
  # No tokenizer.json beside the Qwen3 checkpoint: no tokenizer.
  assert loaded["qwen3"][1] is None


def test_save_hf_writes_the_tokenizer(tmp_path, loaded):
  model, tokenizer = loaded["llama_tied"]
  save_hf(model, tmp_path, tokenizer=tokenizer)
  _, again = load_hf(tmp_path)
  assert (again.pad_id, again.bos_id, again.eos_id) == (1, 2, 3)
  assert again.chat_template == tokenizer.chat_template
  assert again.encode("the mat").tolist() == tokenizer.encode("the mat").tolist()


def write_config(path, **overrides):
  config = transformers.LlamaConfig(**SIZES).to_dict()
  config.update(overrides)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(model_type="gpt2"), "supported: \\['llama', 'qwen3'\\]"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "rope_type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act"),
  ],
)
def test_unsupported_configs_are_refused(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    load_hf(write_config(tmp_path, **overrides))


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path, checkpoints):
  path = checkpoints["qwen3"][0]
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["attention_bias"] = False  # the file holds the biases
  target = str(tmp_path)
  os.symlink(os.path.join(path, "model.safetensors"), os.path.join(target, "model.safetensors"))
  with open(os.path.join(target, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="unexpected tensors"):
    load_hf(target)


def test_config_from_hf_reads_transformers_4_layout():
  legacy = dict(
    model_type="llama",
    rope_theta=500_000.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
    ),
    **SIZES,
  )
  config = config_from_hf(legacy)
  assert config.rope_theta == 500_000.0 and config.rope_scaling.factor == 8.0
  assert config.resolved_head_dim == 16 and not config.tie_embeddings


class RecordingTensor:
  """A Hugging Face-layout array that records how many elements each read touches."""

  def __init__(self, array):
    self.array, self.reads = array, []

  def __getitem__(self, index):
    block = self.array[index]
    self.reads.append(block.size)
    return block


@pytest.mark.parametrize(
  "kind, shape",
  [
    ("copy", (8, 6)),
    ("linear", (8, 6)),
    ("in_heads", (8, 4, 6)),
    ("out_heads", (4, 6, 8)),
    ("bias_heads", (4, 6)),
  ],
)
def test_shard_reader_reads_only_its_block(kind, shape):
  nnx_value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  tensor = RecordingTensor(_to_hf(kind, nnx_value))
  # Every axis split in two, head_dim included (the default rules leave it whole).
  index = tuple(slice(n // 2, n) for n in shape)
  block = _read_block(tensor, kind, shape, index)
  np.testing.assert_array_equal(block, nnx_value[index])
  # Heads are read whole, so at most head_dim / (head_dim / 2) = 2x the block is touched.
  limit = 2 * block.size if kind.endswith("heads") else block.size
  assert tensor.reads and max(tensor.reads) <= limit < nnx_value.size
