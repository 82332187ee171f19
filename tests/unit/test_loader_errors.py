"""Malformed and crafted input files: each loader refuses them in one line naming the file.

GGUF headers with counts no file can hold, metadata sizes no tensor list supports, invalid
UTF-8; a config.json with a string rope_scaling or a missing factor; JSONL with invalid UTF-8,
deep nesting or more shards than records; a damaged SWORD module. Each is a `FileFormatError`
(a ValueError) within a second, never a hang, an exhausted memory or a raw traceback. Also:
`save_hf` replacing a checkpoint (a crash while writing keeps the old one; an index never
leads it outside its directory), `known_probes` in a bucket, and the validator refusing a
tokenizer larger than the model's vocabulary.
"""

import contextlib
import json
import os
import signal
import struct
import zlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs import default
from finch_jax import data
from finch_jax.data import debian, probes, sft
from finch_jax.formats import FileFormatError
from finch_jax.models import Llama, LlamaConfig, hf
from finch_jax.models.gguf import GGUFError, gguf_config, gguf_tokenizer, load_gguf
from finch_jax.validate import ConfigError, validate


@contextlib.contextmanager
def within(seconds: float):
  """Fails the block (rather than let it hang or fill memory) once it runs `seconds`."""

  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def refused(call, path, *fragments, seconds: float = 2.0) -> str:
  """The one-line `FileFormatError` `call()` raises within `seconds`, naming `path`."""
  with within(seconds), pytest.raises(FileFormatError) as raised:
    call()
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"{path}"), message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


# ----- GGUF -------------------------------------------------------------------------------------

U8, U32, STRING, ARRAY, U64 = 0, 4, 8, 9, 10


def gstring(text: bytes) -> bytes:
  return struct.pack("<Q", len(text)) + text


def header(kvs: bytes, kv_count: int, tensor_count: int = 0) -> bytes:
  """A GGUF v3 header: magic, version, counts, then the metadata as given."""
  return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + kvs


CRAFTED = {
  # An array of 2**63 uint8 items: the gguf package's reader spins while its memory grows.
  "array_of_2**63_items": (
    header(gstring(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, U8, 2**63), 1),
    "declares 9223372036854775808 items, more than the 0 bytes left can hold",
  ),
  "array_of_2**63_strings": (
    header(gstring(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 2**63), 1),
    "declares 9223372036854775808 items",
  ),
  "2**63_metadata_entries": (
    header(b"", 2**63),
    "declares 9223372036854775808 metadata entries and 0 tensors",
  ),
  "string_of_2**62_bytes": (
    header(gstring(b"general.name") + struct.pack("<IQ", STRING, 2**62) + b"x" * 8, 1),
    "general.name (4611686018427387904 bytes) needs 4611686018427387904 bytes",
  ),
  "key_not_utf8": (header(gstring(b"general.\xff") + struct.pack("<IB", U8, 1), 1), "not UTF-8"),
  "value_not_utf8": (
    header(gstring(b"general.name") + struct.pack("<I", STRING) + gstring(b"\xc3\x28"), 1),
    "general.name is not UTF-8",
  ),
  "arrays_nested_20_deep": (
    header(gstring(b"a") + struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * 20, 1),
    "nests arrays more than 8 deep",
  ),
  "tensor_of_2**60_elements": (
    header(b"", 0, 1) + gstring(b"w") + struct.pack("<IQQIQ", 2, 2**30, 2**30, 0, 0),
    "truncated: tensor w ends at byte",
  ),
  "unknown_value_type": (header(gstring(b"k") + struct.pack("<I", 99), 1), "unknown value type"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_gguf_header_is_refused_at_once(case, tmp_path):
  content, fragment = CRAFTED[case]
  assert len(content) < 400  # about 100 bytes each
  path = tmp_path / "crafted.gguf"
  path.write_bytes(content)
  for read in (load_gguf, gguf_config, gguf_tokenizer):
    message = refused(lambda read=read: read(path), path, fragment, "download or copy it again")
  with pytest.raises(GGUFError):  # the GGUF loader's errors are FileFormatErrors too
    load_gguf(path)
  assert message.count(str(path)) == 1


D, HEADS, KV_HEADS, HEAD_DIM, FF = 8, 2, 1, 4, 16
TOKENS = ["<s>", "</s>", *"abcdefghijklmn"]


def tiny_gguf(path, *, metadata=None, tokenizer=True) -> str:
  """A one-layer Llama with F32 weights as llama.cpp writes it; `metadata` overrides keys."""
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), "llama")
  values = {
    "llama.context_length": 64,
    "llama.embedding_length": D,
    "llama.block_count": 1,
    "llama.feed_forward_length": FF,
    "llama.attention.head_count": HEADS,
    "llama.attention.head_count_kv": KV_HEADS,
    "llama.rope.dimension_count": HEAD_DIM,
    "general.name": "tiny",
    **(metadata or {}),
  }
  for key, value in values.items():
    (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
  w.add_layer_norm_rms_eps(1e-5)
  if tokenizer:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
  shapes = {
    "token_embd.weight": (len(TOKENS), D),
    "output_norm.weight": (D,),
    "blk.0.attn_norm.weight": (D,),
    "blk.0.ffn_norm.weight": (D,),
    "blk.0.attn_q.weight": (HEADS * HEAD_DIM, D),
    "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, D),
    "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, D),
    "blk.0.attn_output.weight": (D, HEADS * HEAD_DIM),
    "blk.0.ffn_gate.weight": (FF, D),
    "blk.0.ffn_up.weight": (FF, D),
    "blk.0.ffn_down.weight": (D, FF),
  }
  for name, shape in shapes.items():
    w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_tiny_gguf_loads(tmp_path):
  """The file the next tests break is a valid one."""
  model, tokenizer = load_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
  assert (model.config.num_layers, model.config.num_heads, model.config.vocab_size) == (1, 2, 16)
  assert tokenizer.decode(tokenizer.encode("abc", add_bos=False, add_eos=False)) == "abc"


GGUF_METADATA = {
  "block_count_2**31": (
    {"llama.block_count": 2**31},
    "llama.block_count=2147483648, but its tensors hold 1 layers",
  ),
  "head_count_0": ({"llama.attention.head_count": 0}, "llama.attention.head_count is 0"),
  "head_count_2**31": (
    {"llama.attention.head_count": 2**31},
    "llama.attention.head_count is 2147483648, outside 1 to 16",
  ),
  "kv_heads_not_dividing": (
    {"llama.attention.head_count_kv": 3, "llama.attention.head_count": 4},
    "3 key/value heads do not divide the 4 query heads",
  ),
  "block_count_a_string": (
    {"llama.block_count": "one"},
    "llama.block_count is 'one', not an integer",
  ),
  "name_not_utf8": ({"general.name": "\udcff"}, "general.name is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(GGUF_METADATA))
def test_gguf_metadata_no_model_has_is_refused(case, tmp_path):
  changes, fragment = GGUF_METADATA[case]
  path = tmp_path / "bad.gguf"
  if case == "name_not_utf8":  # the writer encodes strings: write a placeholder, then patch it
    tiny_gguf(path, metadata={"general.name": "NAME"})
    path.write_bytes(path.read_bytes().replace(b"NAME", b"\xff\xfeAM"))
    fragment = "general.name is not UTF-8"
  else:
    tiny_gguf(path, metadata=changes)
  refused(lambda: load_gguf(path), path, fragment)
  refused(lambda: gguf_config(path), path, fragment)


def test_gguf_tokenizer_without_tokens_is_refused(tmp_path):
  path = tmp_path / "no-tokens.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  refused(lambda: gguf_tokenizer(path), path, "its gpt2 tokenizer has no tokenizer.ggml.tokens")


# ----- config.json and save_hf --------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> Llama:
  config = LlamaConfig(
    vocab_size=16, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=16, max_len=32
  )
  return Llama(config, rngs=nnx.Rngs(seed))


def params(model) -> dict:
  return {
    "/".join(map(str, path)): np.asarray(leaf)
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.fixture
def checkpoint(tmp_path):
  path = tmp_path / "ckpt"
  hf.save_hf(tiny_llama(), path)
  return path


def edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, **changes}))
  return path / "config.json"


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4}
CONFIGS = {
  "rope_scaling_a_string": (
    {"rope_scaling": "llama3", "rope_parameters": None},
    "rope_scaling is 'llama3', not an object",
  ),
  "rope_scaling_without_factor": (
    {"rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}},
    "rope_scaling of rope_type 'llama3' lacks factor",
  ),
  "num_hidden_layers_2**31": (
    {"num_hidden_layers": 2**31},
    "num_hidden_layers is 2147483648, not an integer from 1 to 4096",
  ),
  "num_hidden_layers_beyond_the_weights": (
    {"num_hidden_layers": 3},
    "num_hidden_layers is 3, but the weights hold 2 layers",
  ),
  "zero_heads": ({"num_attention_heads": 0}, "num_attention_heads is 0"),
  "heads_a_string": ({"num_attention_heads": "2"}, "num_attention_heads is '2'"),
  "kv_heads_not_dividing": (
    {"num_attention_heads": 4, "num_key_value_heads": 3},
    "num_key_value_heads=3 does not divide num_attention_heads=4",
  ),
  "odd_head_dim": ({"head_dim": 3}, "head_dim must be even"),
  "eos_a_string": ({"eos_token_id": "</s>"}, "eos_token_id is '</s>', not a token id"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_config_json_no_model_has_is_refused(case, checkpoint):
  changes, fragment = CONFIGS[case]
  config_json = edit_config(checkpoint, **changes)
  refused(lambda: hf.load_hf(checkpoint), config_json, fragment)
  refused(lambda: hf.hf_config(checkpoint), config_json, fragment)


def test_config_json_not_utf8_or_not_an_object(checkpoint):
  config_json = checkpoint / "config.json"
  config_json.write_bytes(b'{"model_type": "llama\xff"}')
  refused(lambda: hf.load_hf(checkpoint), config_json, "not UTF-8 text (byte 0xff at 21)")
  config_json.write_text("[" * 100_000)
  refused(lambda: hf.load_hf(checkpoint), config_json, "JSON nested too deeply")
  config_json.write_text("[1]")
  refused(lambda: hf.load_hf(checkpoint), config_json, "holds list, not a JSON object")


def shard(path):
  """Turns the single-file checkpoint in `path` into two shards and an index."""
  tensors = load_file(path / hf.WEIGHTS_FILE)
  names = sorted(tensors)
  files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": []}
  files["model-00002-of-00002.safetensors"] = names[1::2]
  weight_map = {}
  for file, part in files.items():
    save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
    weight_map |= dict.fromkeys(part, file)
  (path / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
  os.remove(path / hf.WEIGHTS_FILE)
  return weight_map


def test_index_never_leads_save_hf_outside_the_directory(checkpoint, tmp_path):
  weight_map = shard(checkpoint)
  outside = tmp_path / "victim.safetensors"
  absolute = tmp_path / "elsewhere" / "absolute.safetensors"
  absolute.parent.mkdir()
  for victim in (outside, absolute):
    victim.write_bytes(b"not the checkpoint's")
  crafted = {**weight_map, "extra.a": "../victim.safetensors", "extra.b": str(absolute)}
  (checkpoint / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": crafted}))
  model = tiny_llama(seed=1)
  hf.save_hf(model, checkpoint)
  assert outside.read_bytes() == absolute.read_bytes() == b"not the checkpoint's"
  # The old shards inside the directory are gone with their index; the new file is whole.
  assert sorted(os.listdir(checkpoint)) == ["config.json", "model.safetensors"]
  loaded, _ = hf.load_hf(checkpoint)
  assert all(np.array_equal(a, params(loaded)[k]) for k, a in params(model).items())
  # Reading such an index refuses it, naming the file and the shard.
  (checkpoint / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": crafted}))
  os.remove(checkpoint / hf.WEIGHTS_FILE)
  refused(
    lambda: hf.load_hf(checkpoint),
    checkpoint / hf.WEIGHTS_INDEX_FILE,
    "names the shard '../victim.safetensors', not a file name inside",
  )


@pytest.mark.parametrize("sharded", [False, True], ids=["single_file", "sharded"])
def test_crash_while_saving_keeps_the_old_checkpoint(sharded, checkpoint, monkeypatch):
  if sharded:
    shard(checkpoint)
  before = sorted(os.listdir(checkpoint))
  old = params(hf.load_hf(checkpoint)[0])

  def crash(tensors, filename, metadata=None):  # the disk fills halfway through the weights
    with open(filename, "wb") as file:
      file.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr("safetensors.numpy.save_file", crash)
  with pytest.raises(OSError, match="No space left"):
    hf.save_hf(tiny_llama(seed=1), checkpoint)
  assert sorted(os.listdir(checkpoint)) == before  # no temporary file left behind either
  loaded = params(hf.load_hf(checkpoint)[0])
  assert all(np.array_equal(a, loaded[k]) for k, a in old.items())


# ----- JSONL ------------------------------------------------------------------------------------


def test_jsonl_not_utf8_nested_or_over_sharded(tmp_path):
  path = tmp_path / "chat.jsonl"
  good = json.dumps({"prompt": "a", "response": "b"}).encode()
  path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "response": "b"}\n')
  refused(lambda: sft.read_sft(path), f"{path}:2", "not UTF-8 text (byte 0xe9 at 15)")
  path.write_bytes(good + b"\n" + b"[" * 100_000 + b"\n")
  refused(lambda: sft.read_sft(path), f"{path}:2", "JSON nested too deeply")
  path.write_bytes(good + b"\n" + good + b"\n")
  message = refused(
    lambda: sft.sft_examples(
      path, tokenizer=data.ByteTokenizer(), seed=0, max_len=8, shard_index=2, shard_count=3
    ),
    path,
    "holds 2 records, none of them in shard 2 of 3",
  )
  assert "use fewer shards than records" in message


# ----- SWORD --------------------------------------------------------------------------------------


def sword_module(root, verses: list[str]) -> str:
  """A one-testament zText module of `verses`, two per block; returns its directory."""
  (root / "usr/share/sword/mods.d").mkdir(parents=True)
  (root / debian.SWORD_WEB_CONF).write_text(
    "[engWEB2015eb]\nDataPath=./modules/texts/ztext/engWEB2015eb/\nModDrv=zText\nCompressType=ZIP\n"
  )
  directory = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
  directory.mkdir(parents=True)
  bzz, bzs, bzv = b"", b"", b""
  for first in range(0, len(verses), 2):
    block = b""
    for verse in verses[first : first + 2]:
      bzv += struct.pack("<IIH", first // 2, len(block), len(verse.encode()))
      block += verse.encode()
    packed = zlib.compress(block)
    bzs += struct.pack("<III", len(bzz), len(packed), len(block))
    bzz += packed
  for ext, content in (("bzz", bzz), ("bzs", bzs), ("bzv", bzv)):
    (directory / f"nt.{ext}").write_bytes(content)
  return str(directory)


def test_damaged_sword_module_is_refused_naming_the_file(tmp_path):
  verses = ['<chapter sID="c1"/>', "In the beginning", "was the Word", "and the Word"]
  directory = sword_module(tmp_path, verses)
  assert list(debian.ztext_entries(directory)) == verses
  nt = os.path.join(directory, "nt")
  bzs, bzv, bzz = (open(f"{nt}.{ext}", "rb").read() for ext in ("bzs", "bzv", "bzz"))

  damage = {
    "bzs": (bzs[:-5], "is 19 bytes, not a whole number of 12-byte records"),
    "bzv": (bzv + struct.pack("<IIH", 7, 0, 3), "entry 4 is in block 7, but the module has 2"),
    "bzz": (b"\x00" * len(bzz), "block 0 is not zlib data"),
  }
  for ext, (content, fragment) in damage.items():
    with open(f"{nt}.{ext}", "wb") as file:
      file.write(content)
    refused(lambda: list(debian.ztext_entries(directory)), f"{nt}.{ext}", fragment)
    refused(lambda: debian.bible_chapters(str(tmp_path)), f"{nt}.{ext}", fragment)
    with open(f"{nt}.{ext}", "wb") as file:
      file.write({"bzs": bzs, "bzv": bzv, "bzz": bzz}[ext])
  # A block whose index claims a little of what it inflates to; an entry past its block.
  with open(f"{nt}.bzs", "wb") as file:
    file.write(struct.pack("<III", 0, len(zlib.compress(b"In the beginning")), 3) + bzs[12:])
  refused(lambda: list(debian.ztext_entries(directory)), f"{nt}.bzz", "inflates to more than")


# ----- known probes in a bucket -----------------------------------------------------------------


class _Successor(nnx.Module):
  """Predicts the next byte value: after "ab" it writes "c"."""

  def __init__(self):
    self.scale = nnx.Param(np.float32(10.0))

  def __call__(self, tokens):
    return nnx.one_hot((tokens + 1) % 259, 259) * self.scale


def test_known_probes_in_a_bucket_go_through_epath(tmp_path, monkeypatch):
  """A gs:// path is written to the bucket, never to a local folder named `gs:`."""
  bucket = tmp_path / "bucket"
  monkeypatch.chdir(tmp_path)

  def local(path) -> str:
    path = os.fspath(path)
    return str(bucket / path.removeprefix("gs://")) if path.startswith("gs://") else path

  def on_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def on_two_paths(original, source, target, *args, **kwargs):
    return original(local(source), local(target), *args, **kwargs)

  mocks = dict.fromkeys(("open", "exists", "isdir", "makedirs", "mkdir", "remove", "stat"), on_path)
  mocks |= dict.fromkeys(("rename", "replace"), on_two_paths)
  records = [{"prompt": "xyz", "answer": "{"}, {"prompt": "ab", "answer": "d"}]  # recalled: 1st
  with epath_testing.mock_epath(**mocks):
    path = probes.known_probes(
      records, _Successor(), data.ByteTokenizer(), "gs://runs/probes/elements.jsonl", model_key="m"
    )
    assert path == "gs://runs/probes/elements.jsonl"
  assert not (tmp_path / "gs:").exists()
  lines = (bucket / "runs/probes/elements.jsonl").read_text().splitlines()
  assert json.loads(lines[0])["num_known"] == 1 and json.loads(lines[1]) == records[0]


# ----- a tokenizer larger than the model's vocabulary -------------------------------------------


def test_ids_past_the_vocabulary_make_nan_logits():
  """Why the validator refuses such a tokenizer: the embedding lookup of an id at or past
  vocab_size fills NaN, so the loss is NaN and every step is skipped as non-finite."""
  model = tiny_llama()
  logits = model(jnp.asarray([[3, 15]]))
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert bool(jnp.all(jnp.isnan(model(jnp.asarray([[3, 16]]))[0, 1])))


def bpe_tokenizer(directory, size: int) -> str:
  """A byte-level BPE tokenizer of `size` tokens saved in `directory`."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {chr(0x100 + i): i for i in range(size - 1)} | {"<eos>": size - 1}
  tokenizer = Tokenizer(models.BPE(vocab, []))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.HFTokenizer(tokenizer, eos_token="<eos>").save(directory)
  return str(directory)


def test_validator_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
  config = default.get_config()
  rows = config.model.vocab_size
  config.data.tokenizer = bpe_tokenizer(tmp_path / "tok", rows + 36)
  with pytest.raises(ConfigError) as raised:
    validate(config)
  (problem,) = raised.value.problems
  assert problem.startswith(f"model.vocab_size={rows}: the tokenizer has {rows + 36} tokens")
  assert f"set --config.model.vocab_size to at least {rows + 36} (e.g. {rows + 40})" in problem
  assert f"or --config.data.tokenizer to a tokenizer of at most {rows} tokens" in problem
  config.data.tokenizer = bpe_tokenizer(tmp_path / "fits", rows)
  validate(config)  # as many tokens as rows: fine
  config.data.tokenizer = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"data.tokenizer='.*missing': No tokenizer in"):
    validate(config)


def test_validator_refuses_a_larger_tokenizer_for_a_pretrained_base(checkpoint, tmp_path):
  config = default.get_config()
  config.mode, config.base_checkpoint = "finetune", str(checkpoint)
  config.data.tokenizer = bpe_tokenizer(tmp_path / "tok", 20)
  with pytest.raises(ConfigError) as raised:
    validate(config)
  expected = (
    f"data.tokenizer='{tmp_path / 'tok'}': the tokenizer has 20 tokens, the model's vocabulary "
    f"16 embedding rows ({checkpoint}): set --config.data.tokenizer='' to use the base model's "
    "own tokenizer, or one of at most 16 tokens."
  )
  assert expected in raised.value.problems
