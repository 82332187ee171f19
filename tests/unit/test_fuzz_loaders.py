"""The GGUF, config.json and JSONL readers fuzzed: every input is read, or refused in one line.

hypothesis writes headers whose counts, lengths, types and strings are drawn at random (huge
counts among them), mutates and cuts a valid GGUF file, puts random values in a valid
config.json, and writes JSONL lines of random JSON, random bytes and deep nesting. Each case
must end within a second (the deadline) with a result or a `FileFormatError`; any other
exception, a hang or a slow case fails the test. 520 cases in all: 160 + 120 + 140 + 100.
Under CI (CI=true) the cases are drawn from a fixed seed, so a run is reproducible; elsewhere
they differ from run to run.
"""

import json
import os
import struct
import warnings

import gguf
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finch_jax import data
from finch_jax.data import sft
from finch_jax.formats import FileFormatError
from finch_jax.models import Llama, LlamaConfig, hf
from finch_jax.models.gguf import load_gguf
from tests.unit.test_loader_errors import within

FUZZ = settings(
  deadline=1000,  # milliseconds: no case may take more than a second
  derandomize=os.environ.get("CI") == "true",
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def read_or_refuse(read, *args, **kwargs) -> bool:
  """Whether `read` succeeded; a `FileFormatError` is the other allowed outcome."""
  with warnings.catch_warnings(), within(5.0):  # a hang fails the case, not the whole run
    warnings.simplefilter("ignore")  # an unknown pre-tokenizer is a warning, not an error
    try:
      read(*args, **kwargs)
    except FileFormatError as error:
      assert "\n" not in str(error)
      event(f"{read.__name__}: refused")  # `--hypothesis-show-statistics` counts the outcomes
      return False
  event(f"{read.__name__}: read")
  return True


# ----- GGUF ---------------------------------------------------------------------------------------

KEYS = [
  b"general.architecture",
  b"general.alignment",
  b"llama.block_count",
  b"llama.embedding_length",
  b"llama.attention.head_count",
  b"llama.attention.head_count_kv",
  b"llama.feed_forward_length",
  b"tokenizer.ggml.model",
  b"tokenizer.ggml.tokens",
  b"tokenizer.ggml.merges",
  b"tokenizer.ggml.token_type",
  b"tokenizer.ggml.bos_token_id",
  b"split.count",
]
COUNTS = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1]))
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@st.composite
def gguf_values(draw, kind: int, depth: int = 0) -> bytes:
  """The bytes of one value of GGUF type `kind`, sometimes short or lying about its length."""
  if kind in SCALAR_SIZES:
    return draw(st.binary(min_size=0, max_size=SCALAR_SIZES[kind] + 1))
  if kind == 8:  # a string: length, then bytes that may not be UTF-8 or as long as declared
    text = draw(st.one_of(st.sampled_from([b"llama", b"gpt2", b"a b"]), st.binary(max_size=8)))
    return struct.pack("<Q", draw(st.one_of(st.just(len(text)), COUNTS))) + text
  if kind == 9 and depth < 2:
    item = draw(st.sampled_from([0, 4, 8, 9, 10, 13]))
    count = draw(COUNTS)
    items = [draw(gguf_values(item, depth + 1)) for _ in range(min(count, 3))]
    return struct.pack("<IQ", item, count) + b"".join(items)
  return b""


@st.composite
def gguf_headers(draw) -> bytes:
  version = draw(st.sampled_from([3, 2, 1, 0x03000000, 2**32 - 1]))
  kvs = []
  for _ in range(draw(st.integers(0, 5))):
    key = draw(st.one_of(st.sampled_from(KEYS), st.binary(max_size=6)))
    kind = draw(st.integers(0, 13))
    kvs.append(struct.pack("<Q", len(key)) + key + struct.pack("<I", kind))
    kvs.append(draw(gguf_values(kind)))
  tensors = []
  for _ in range(draw(st.integers(0, 2))):
    name = draw(st.sampled_from([b"token_embd.weight", b"blk.0.attn_q.weight", b"\xff"]))
    dims = draw(st.lists(st.one_of(st.integers(0, 64), COUNTS), min_size=0, max_size=5))
    fields = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    kind, offset = draw(st.integers(0, 40)), draw(st.one_of(st.integers(0, 64), COUNTS))
    tensors.append(struct.pack("<Q", len(name)) + name + fields + struct.pack("<IQ", kind, offset))
  kv_count = draw(st.one_of(st.just(len(kvs) // 2), COUNTS))
  tensor_count = draw(st.one_of(st.just(len(tensors)), COUNTS))
  body = b"".join(kvs) + b"".join(tensors)
  return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count) + body


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
  """The bytes of a valid one-layer Llama GGUF file with a tokenizer (about 4 KB)."""
  path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in {
    "llama.context_length": 64,
    "llama.embedding_length": 8,
    "llama.block_count": 1,
    "llama.feed_forward_length": 16,
    "llama.attention.head_count": 2,
    "llama.attention.head_count_kv": 1,
  }.items():
    w.add_uint32(key, value)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["<s>", "</s>", *"abcdefgh", "ab", "cd", "abcd", "e", "f", "g"][:16])
  w.add_token_merges(["a b", "c d", "ab cd"])
  w.add_token_types([3, 3] + [1] * 14)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  for name, shape in {
    "token_embd.weight": (16, 8),
    "output_norm.weight": (8,),
    "blk.0.attn_norm.weight": (8,),
    "blk.0.ffn_norm.weight": (8,),
    "blk.0.attn_q.weight": (8, 8),
    "blk.0.attn_k.weight": (4, 8),
    "blk.0.attn_v.weight": (4, 8),
    "blk.0.attn_output.weight": (8, 8),
    "blk.0.ffn_gate.weight": (16, 8),
    "blk.0.ffn_up.weight": (16, 8),
    "blk.0.ffn_down.weight": (8, 16),
  }.items():
    w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  content = path.read_bytes()
  load_gguf(path)  # the file the mutations start from loads
  return content


@settings(FUZZ, max_examples=160)
@given(content=gguf_headers())
def test_fuzzed_gguf_headers(content, tmp_path):
  path = tmp_path / "fuzzed.gguf"
  path.write_bytes(content)
  read_or_refuse(load_gguf, path)


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_mutated_gguf_files(data, tiny_gguf, tmp_path):
  content = bytearray(tiny_gguf)
  header_end = tiny_gguf.index(b"blk.0.ffn_down.weight") + 64  # the tensor table ends near it
  for _ in range(data.draw(st.integers(1, 6))):
    at = data.draw(st.integers(4, header_end))
    content[at] = data.draw(st.integers(0, 255))
  cut = data.draw(st.one_of(st.just(len(content)), st.integers(4, len(content))))
  path = tmp_path / "mutated.gguf"
  path.write_bytes(bytes(content[:cut]))
  read_or_refuse(load_gguf, path)


# ----- config.json --------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
  st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.sampled_from([2**31, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["llama3", "llama", "qwen3", "silu", "default", ""]),
  ),
  lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
  ),
  max_leaves=6,
)
CONFIG_KEYS = [
  "model_type",
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "intermediate_size",
  "head_dim",
  "max_position_embeddings",
  "rope_theta",
  "rms_norm_eps",
  "rope_scaling",
  "rope_parameters",
  "layer_types",
  "eos_token_id",
  "bos_token_id",
  "hidden_act",
  "partial_rotary_factor",
]
ROPE = st.fixed_dictionaries(
  {},
  optional={
    "rope_type": st.sampled_from(["llama3", "default", "yarn", 3]),
    "factor": JSON_VALUES,
    "low_freq_factor": JSON_VALUES,
    "high_freq_factor": JSON_VALUES,
    "original_max_position_embeddings": JSON_VALUES,
  },
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A saved two-layer Llama (config.json + model.safetensors) and its config.json values."""
  path = tmp_path_factory.mktemp("fuzz") / "ckpt"
  config = LlamaConfig(
    vocab_size=16, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=16, max_len=32
  )
  hf.save_hf(Llama(config, rngs=nnx.Rngs(0)), path)
  return path, json.loads((path / hf.CONFIG_FILE).read_text())


@settings(FUZZ, max_examples=140)
@given(
  changes=st.dictionaries(
    st.sampled_from(CONFIG_KEYS), st.one_of(JSON_VALUES, ROPE), min_size=1, max_size=4
  ),
  raw=st.one_of(st.none(), st.binary(max_size=24)),
)
def test_fuzzed_config_json(changes, raw, checkpoint):
  path, values = checkpoint
  text = json.dumps({**values, **changes}).encode() if raw is None else b'{"a": "' + raw + b'"}'
  (path / hf.CONFIG_FILE).write_bytes(text)
  try:
    read_or_refuse(hf.hf_config, path)
  finally:
    (path / hf.CONFIG_FILE).write_text(json.dumps(values))


# ----- JSONL --------------------------------------------------------------------------------------

LINES = st.one_of(
  st.just('{"prompt": "2 + 2?", "response": "4"}'),
  st.just(
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}'
  ),
  JSON_VALUES.map(json.dumps),
  st.fixed_dictionaries({"prompt": JSON_VALUES, "response": JSON_VALUES}).map(json.dumps),
  st.fixed_dictionaries({"messages": JSON_VALUES}).map(json.dumps),
  st.integers(1, 50_000).map(lambda depth: "[" * depth + "]" * (depth % 3)),
  st.text(max_size=12),
)


@settings(FUZZ, max_examples=100)
@given(
  lines=st.lists(st.one_of(LINES.map(str.encode), st.binary(max_size=12)), max_size=5),
  shards=st.integers(1, 4),
)
def test_fuzzed_jsonl(lines, shards, tmp_path):
  path = tmp_path / "fuzzed.jsonl"
  path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
  if read_or_refuse(sft.read_sft, path):
    tokenizer = data.ByteTokenizer()
    read_or_refuse(
      sft.sft_examples,
      path,
      tokenizer=tokenizer,
      seed=0,
      max_len=16,
      shard_index=shards - 1,
      shard_count=shards,
    )
