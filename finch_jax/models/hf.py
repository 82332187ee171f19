"""Hugging Face checkpoints in and out: `load_hf` and `save_hf` for Qwen3 and Llama 3 models.

    model, tokenizer = load_hf("/path/to/Qwen3-0.6B", mesh=mesh, dtype="bfloat16")
    save_hf(model, "/path/to/export", tokenizer=tokenizer)

A checkpoint is a local directory as `save_pretrained` writes it: `config.json`, the weights in
`model.safetensors` or in shards listed by `model.safetensors.index.json`, and optionally
`tokenizer.json` (+ `tokenizer_config.json`). Nothing is downloaded.

Tensor names: Hugging Face `model.layers.{i}.X` is `blocks[i].Y` here. torch `nn.Linear` weights
are [out, in]; here projections are [in, out], the attention ones split into heads.

    model.embed_tokens.weight           embed                 [vocab, embed]
    input_layernorm.weight              attn_norm.scale       [embed]
    self_attn.{q,k,v}_proj.weight       attn.{q,k,v}_proj     [embed, (kv_)heads, head_dim]
    self_attn.{q,k,v}_proj.bias         attn.{q,k,v}_bias     [(kv_)heads, head_dim]
    self_attn.o_proj.weight             attn.o_proj           [heads, head_dim, embed]
    self_attn.o_proj.bias               attn.o_bias           [embed]
    self_attn.{q,k}_norm.weight         attn.{q,k}_norm.scale [head_dim]  (Qwen3)
    post_attention_layernorm.weight     mlp_norm.scale        [embed]
    mlp.{gate,up}_proj.weight           mlp.{gate,up}_proj    [embed, mlp]
    mlp.down_proj.weight                mlp.down_proj         [mlp, embed]
    mlp.{gate,up,down}_proj.bias        mlp.{gate,up,down}_bias  (Llama mlp_bias)
    model.norm.weight                   final_norm.scale      [embed]
    lm_head.weight                      lm_head               [embed, vocab]  (absent when tied)

A model with `scan_layers` holds each block parameter once, stacked over the layers:
`blocks.attn.q_proj` [layers, embed, heads, head_dim] stacks the q_proj of
`model.layers.0`, `model.layers.1`, ...; loading stacks the per-layer tensors and saving splits
them, so the files are the same either way.

With a mesh, every tensor is built with `jax.make_array_from_callback`: each device's callback
reads only the rows and columns of its own shard from the memory-mapped safetensors file, so no
device (and no host buffer) ever holds a full copy of a sharded parameter.

`safetensors` and `tokenizers` are imported when first needed, so the rest of the package works
without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads BF16 files)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from finch_jax import files as files_lib
from finch_jax import sharding as shd
from finch_jax.formats import FileFormatError, read_json
from finch_jax.models.llama import (
  EXECUTION_FIELDS,
  MODEL_TYPES,
  Llama,
  Llama3RopeScaling,
  LlamaConfig,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Rope types implemented here; the others (linear, dynamic, yarn, longrope, ...) are refused.
_ROPE_TYPES = ("default", "llama3")


# ----- config -------------------------------------------------------------------------------


# No published decoder comes near these; a config.json beyond them is corrupt, and building
# from it would exhaust memory before anything else could say so.
_MAX_SIZE = 2**24  # widths, heads, vocabulary
_MAX_LAYERS = 2**12
_FIX_CONFIG = "fix config.json or copy the checkpoint again"


def _number(h: Mapping[str, Any], key: str, default: float, source: str) -> float:
  value = h.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise FileFormatError(source, f"{key} is {value!r}, not a number", _FIX_CONFIG)
  return float(value)


def _size(
  h: Mapping[str, Any], key: str, source: str, default: Any = None, most: int = _MAX_SIZE
) -> int:
  """`h[key]` as a positive integer at most `most`; `FileFormatError` naming the key if not."""
  value = h.get(key)
  value = default if value is None else value
  if value is None:
    raise FileFormatError(source, f"{key} is missing", _FIX_CONFIG)
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
    raise FileFormatError(
      source, f"{key} is {value!r}, not an integer from 1 to {most}", _FIX_CONFIG
    )
  return value


def _token_id(h: Mapping[str, Any], key: str, source: str) -> Any:
  value = h.get(key)
  ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
  if not all(i is None or isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise FileFormatError(source, f"{key} is {value!r}, not a token id", _FIX_CONFIG)
  return tuple(value) if isinstance(value, list) else value


def _llama3_rope(rope: Mapping[str, Any], max_len: int, source: str) -> Llama3RopeScaling:
  """The Llama 3 rope scaling of a `rope_scaling` (or `rope_parameters`) object."""
  keys = ("factor", "low_freq_factor", "high_freq_factor")
  if missing := [key for key in keys if key not in rope]:
    raise FileFormatError(
      source,
      f"rope_scaling of rope_type 'llama3' lacks {', '.join(missing)}",
      "Llama 3 rope scaling needs factor, low_freq_factor and high_freq_factor; " + _FIX_CONFIG,
    )
  factors = {key: _number(rope, key, 0.0, source) for key in keys}
  try:
    return Llama3RopeScaling(
      **factors,
      # transformers falls back to max_position_embeddings the same way.
      original_max_position_embeddings=_size(
        rope, "original_max_position_embeddings", source, max_len, most=2**31
      ),
    )
  except ValueError as error:
    raise FileFormatError(source, f"rope_scaling: {error}", _FIX_CONFIG) from None


def config_from_hf(
  hf_config: Mapping[str, Any],
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  source: str = CONFIG_FILE,
) -> LlamaConfig:
  """A `LlamaConfig` from the contents of a Hugging Face `config.json` (Qwen3 or Llama).

  Reads rotary settings in both layouts: `rope_theta` + `rope_scaling` (transformers 4 and most
  published checkpoints) and `rope_parameters` (transformers 5). Raises `FileFormatError` (a
  ValueError) naming `source` (the file the values came from) and the field, for anything this
  implementation would compute differently (other model types, rope types other than
  default/llama3, partial rotary, sliding-window layers, activations other than SiLU, quantized
  weights) and for a field of the wrong type, a missing one, or a size no model has (more than
  2**24 wide or 4096 layers deep).
  """
  if not isinstance(hf_config, Mapping):
    raise FileFormatError(
      source, f"holds {type(hf_config).__name__}, not a JSON object", _FIX_CONFIG
    )
  h = dict(hf_config)
  model_type = h.get("model_type")
  if model_type not in MODEL_TYPES:
    raise FileFormatError(
      source,
      f"model_type {model_type!r} is not supported",
      f"supported: {list(MODEL_TYPES)}, the Qwen3 and Llama 3 architectures",
    )

  def refuse(what: str) -> FileFormatError:
    return FileFormatError(source, f"{what} is not supported", "Qwen3 and Llama 3 models load")

  if h.get("quantization_config"):
    raise refuse("a quantized checkpoint (quantization_config)")
  act = h.get("hidden_act", "silu")
  if act != "silu":
    raise refuse(f"hidden_act={act!r} (the MLP here is SwiGLU, silu)")
  layer_types = h.get("layer_types") or []
  if not isinstance(layer_types, list):
    raise FileFormatError(source, f"layer_types is {layer_types!r}, not a list", _FIX_CONFIG)
  if h.get("use_sliding_window") or any(kind != "full_attention" for kind in layer_types):
    raise refuse("sliding-window attention (every layer must be full_attention)")

  rope = h.get("rope_scaling") or h.get("rope_parameters") or {}
  if not isinstance(rope, Mapping):
    raise FileFormatError(
      source,
      f"rope_scaling is {rope!r}, not an object",
      'write it as {"rope_type": "llama3", "factor": ..., "low_freq_factor": ..., '
      '"high_freq_factor": ...}, or null for none',
    )
  if rope and isinstance(next(iter(rope.values())), Mapping):
    raise refuse(f"per-layer-type rope parameters {sorted(rope)}")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise refuse(f"rope_type {rope_type!r} (supported: {list(_ROPE_TYPES)})")
  partial = rope.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise refuse(f"partial_rotary_factor={partial!r} (only 1.0)")
  max_len = _size(h, "max_position_embeddings", source, 8192, most=2**31)
  scaling = _llama3_rope(rope, max_len, source) if rope_type == "llama3" else None

  hidden, heads = _size(h, "hidden_size", source), _size(h, "num_attention_heads", source)
  kv_heads = _size(h, "num_key_value_heads", source, heads, most=heads)
  if heads % kv_heads:
    raise FileFormatError(
      source,
      f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}",
      _FIX_CONFIG,
    )
  # transformers' Qwen3Config defaults head_dim to 128 rather than hidden_size / heads.
  default_head_dim = 128 if model_type == "qwen3" else max(hidden // heads, 1)
  try:
    config = LlamaConfig(
      vocab_size=_size(h, "vocab_size", source),
      d_model=hidden,
      num_layers=_size(h, "num_hidden_layers", source, most=_MAX_LAYERS),
      num_heads=heads,
      num_kv_heads=kv_heads,
      d_ff=_size(h, "intermediate_size", source),
      head_dim=_size(h, "head_dim", source, default_head_dim),
      model_type=model_type,
      attention_bias=bool(h.get("attention_bias", False)),
      mlp_bias=bool(h.get("mlp_bias", False)),
      tie_embeddings=bool(h.get("tie_word_embeddings", False)),
      rope_theta=_number(rope, "rope_theta", _number(h, "rope_theta", 10_000.0, source), source),
      rope_scaling=scaling,
      norm_eps=_number(h, "rms_norm_eps", 1e-6, source),
      max_len=max_len,
      bos_token_id=_token_id(h, "bos_token_id", source),
      eos_token_id=_token_id(h, "eos_token_id", source),
      pad_token_id=_token_id(h, "pad_token_id", source),
    )
  except ValueError as error:  # what LlamaConfig refuses: odd head_dim, negative theta, ...
    raise FileFormatError(source, f"describes no valid model: {error}", _FIX_CONFIG) from None
  return config.replace(dtype=dtype, param_dtype=param_dtype or dtype)


def hf_config(
  path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None
) -> LlamaConfig:
  """The `LlamaConfig` of the Hugging Face checkpoint directory `path`, from its config.json.

  As `config_from_hf`, with errors naming the file; when the directory holds weights, its
  `num_hidden_layers` must be the number of layers they hold (a corrupt count is refused here,
  before anything is built from it).
  """
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"No {CONFIG_FILE} in {path}: expected a Hugging Face model directory.")
  values = read_json(config_path, _FIX_CONFIG)
  config = config_from_hf(values, dtype=dtype, param_dtype=param_dtype, source=config_path)
  try:
    names = weight_files(path)
  except FileNotFoundError:
    return config  # no weights to compare with: the architecture alone
  layers = {name.split(".")[2] for name in names if name.startswith("model.layers.")}
  if config.num_layers != len(layers):
    raise FileFormatError(
      config_path,
      f"num_hidden_layers is {config.num_layers}, but the weights hold {len(layers)} layers",
      _FIX_CONFIG,
    )
  return config


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The Hugging Face `config.json` contents for `config`, readable by transformers 4 and 5."""
  c = config
  rope_scaling = (
    None
    if c.rope_scaling is None
    else {"rope_type": "llama3", **{k: v for k, v in vars(c.rope_scaling).items()}}
  )
  out = {
    "architectures": [_ARCHITECTURES[c.model_type]],
    "model_type": c.model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.d_model,
    "intermediate_size": c.d_ff,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.resolved_head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": c.max_len,
    "rms_norm_eps": c.norm_eps,
    "attention_bias": c.attention_bias,
    "tie_word_embeddings": c.tie_embeddings,
    # Both layouts: transformers 4 reads rope_theta/rope_scaling, 5 reads either.
    "rope_theta": c.rope_theta,
    "rope_scaling": rope_scaling,
    "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}
    if rope_scaling is None
    else {**rope_scaling, "rope_theta": c.rope_theta},
    "bos_token_id": c.bos_token_id,
    "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
    "pad_token_id": c.pad_token_id,
    "torch_dtype": str(np.dtype(c.param_dtype)),
    "dtype": str(np.dtype(c.param_dtype)),
  }
  if c.model_type == "llama":
    out["mlp_bias"] = c.mlp_bias
  else:
    out["use_sliding_window"] = False
  return out


# ----- name mapping -------------------------------------------------------------------------

# How an NNX parameter is laid out relative to its Hugging Face tensor:
#   copy       same shape
#   linear     NNX [in, out] = HF [out, in].T
#   in_heads   NNX [embed, heads, head_dim] = HF [heads * head_dim, embed].T, split
#   out_heads  NNX [heads, head_dim, embed] = HF [embed, heads * head_dim].T, split
#   bias_heads NNX [heads, head_dim] = HF [heads * head_dim], split
_Path = tuple[str | int, ...]


def _layout(config: LlamaConfig) -> dict[_Path, tuple[str, str]]:
  """NNX parameter path -> (Hugging Face tensor name, layout kind) for every parameter, the
  blocks' as the unscanned model names them (`blocks`, i, ...); `_sources` maps a scanned
  model's stacked parameters onto these."""
  table: dict[_Path, tuple[str, str]] = {
    ("embed",): ("model.embed_tokens.weight", "copy"),
    ("final_norm", "scale"): ("model.norm.weight", "copy"),
  }
  if not config.tie_embeddings:
    table[("lm_head",)] = ("lm_head.weight", "linear")
  for i in range(config.num_layers):
    hf, me = f"model.layers.{i}", ("blocks", i)
    table[(*me, "attn_norm", "scale")] = (f"{hf}.input_layernorm.weight", "copy")
    table[(*me, "mlp_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", "copy")
    for name in "qkv":
      table[(*me, "attn", f"{name}_proj")] = (f"{hf}.self_attn.{name}_proj.weight", "in_heads")
      if config.attention_bias:
        table[(*me, "attn", f"{name}_bias")] = (f"{hf}.self_attn.{name}_proj.bias", "bias_heads")
    table[(*me, "attn", "o_proj")] = (f"{hf}.self_attn.o_proj.weight", "out_heads")
    if config.attention_bias:
      table[(*me, "attn", "o_bias")] = (f"{hf}.self_attn.o_proj.bias", "copy")
    if config.qk_norm:
      for name in "qk":
        table[(*me, "attn", f"{name}_norm", "scale")] = (
          f"{hf}.self_attn.{name}_norm.weight",
          "copy",
        )
    for name in ("gate", "up", "down"):
      table[(*me, "mlp", f"{name}_proj")] = (f"{hf}.mlp.{name}_proj.weight", "linear")
      if config.mlp_bias:
        table[(*me, "mlp", f"{name}_bias")] = (f"{hf}.mlp.{name}_proj.bias", "copy")
  return table


def _sources(config: LlamaConfig) -> dict[_Path, tuple[tuple[str, ...], str, bool]]:
  """Path of each parameter of `Llama(config)` -> (its Hugging Face tensors, layout kind,
  whether it stacks them on a leading layer axis).

  Unscanned, each parameter is one tensor. With `scan_layers`, a block parameter
  (`blocks`, ...) is the stack of its `num_layers` tensors, layer 0 first.
  """
  table = _layout(config)
  if not config.scan_layers:
    return {path: ((name,), kind, False) for path, (name, kind) in table.items()}
  sources: dict[_Path, tuple[tuple[str, ...], str, bool]] = {}
  for path, (name, kind) in table.items():
    if path[0] != "blocks":
      sources[path] = ((name,), kind, False)
    elif path[1] == 0:  # one entry per stacked parameter, listing every layer's tensor
      rest = path[2:]
      names = tuple(table[("blocks", i, *rest)][0] for i in range(config.num_layers))
      sources[("blocks", *rest)] = (names, kind, True)
  return sources


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The Hugging Face shape of a tensor whose NNX shape is `shape`."""
  if kind == "linear":
    return shape[::-1]
  if kind == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if kind == "out_heads":
    return (shape[2], shape[0] * shape[1])
  if kind == "bias_heads":
    return (shape[0] * shape[1],)
  return shape


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """An NNX parameter in Hugging Face layout (contiguous, as safetensors needs)."""
  if kind == "linear":
    x = x.T
  elif kind == "in_heads":
    x = x.reshape(x.shape[0], -1).T
  elif kind == "out_heads":
    x = x.reshape(-1, x.shape[-1]).T
  elif kind == "bias_heads":
    x = x.reshape(-1)
  return np.ascontiguousarray(x)


def _read_block(
  tensor: Any, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]
) -> np.ndarray:
  """The block `index` of the NNX-layout parameter, reading only what it needs from `tensor`.

  `tensor` is a safetensors slice (or anything indexable by a tuple of slices) in Hugging Face
  layout; `index` is a tuple of slices over the NNX shape `shape`, as `make_array_from_callback`
  passes. Heads are read whole (contiguous rows or columns), then cut to the head_dim range.
  """
  (a0, a1), *rest = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
  if kind == "copy":
    return tensor[tuple(slice(*r) for r in [(a0, a1), *rest])]
  if kind == "linear":
    (b0, b1) = rest[0]
    return tensor[b0:b1, a0:a1].T
  if kind == "in_heads":  # NNX [embed, heads, head_dim] from HF [heads * head_dim, embed]
    (n0, n1), (h0, h1) = rest
    head_dim = shape[2]
    rows = tensor[n0 * head_dim : n1 * head_dim, a0:a1]
    return rows.T.reshape(a1 - a0, n1 - n0, head_dim)[:, :, h0:h1]
  if kind == "out_heads":  # NNX [heads, head_dim, embed] from HF [embed, heads * head_dim]
    (h0, h1), (d0, d1) = rest
    head_dim = shape[1]
    cols = tensor[d0:d1, a0 * head_dim : a1 * head_dim]
    return cols.T.reshape(a1 - a0, head_dim, d1 - d0)[:, h0:h1, :]
  if kind == "bias_heads":  # NNX [heads, head_dim] from HF [heads * head_dim]
    (h0, h1) = rest[0]
    head_dim = shape[1]
    return tensor[a0 * head_dim : a1 * head_dim].reshape(a1 - a0, head_dim)[:, h0:h1]
  raise ValueError(f"unknown layout kind {kind!r}")


# ----- loading ------------------------------------------------------------------------------


def with_execution_options(config: LlamaConfig, options: Mapping[str, Any]) -> LlamaConfig:
  """`config` with the fields of `options` that say how the model runs (`EXECUTION_FIELDS`);
  any other field raises ValueError, since the checkpoint decides what the model is."""
  if unknown := sorted(set(options) - set(EXECUTION_FIELDS)):
    raise ValueError(
      f"{unknown} cannot be set when loading a checkpoint, which decides the architecture: "
      f"only {list(EXECUTION_FIELDS)} (and dtype, param_dtype) can."
    )
  return config.replace(**options) if options else config


def _safetensors_names(file: str) -> list[str]:
  """The tensor names of a safetensors file; `FileFormatError` when its header is unreadable."""
  from safetensors import safe_open

  try:
    with safe_open(file, framework="numpy") as f:
      return list(f.keys())
  except Exception as error:  # safetensors raises its own SafetensorError for a bad header
    raise FileFormatError(
      file, f"not a readable safetensors file ({error})", "copy the checkpoint again"
    ) from None


def _is_plain(name: Any) -> bool:
  """Whether an index's shard name is a plain file name, inside the checkpoint directory."""
  return isinstance(name, str) and os.path.basename(name) == name and name not in ("", ".", "..")


def _index(path: str) -> dict[str, Any] | None:
  """Tensor name -> shard name as the sharded index in `path` gives it, if there is one."""
  index_path = os.path.join(path, WEIGHTS_INDEX_FILE)
  if not os.path.exists(index_path):
    return None
  index = read_json(index_path, "fix or delete the index")
  weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
  if not isinstance(weight_map, Mapping) or not all(isinstance(n, str) for n in weight_map):
    raise FileFormatError(
      index_path, "has no weight_map object of tensor names", "fix or delete the index"
    )
  return dict(weight_map)


def weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file holding it: the single file, else the sharded index.

  The single file wins when both exist, as in transformers. An index may name only files
  inside `path`.
  """
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.exists(single):
    return dict.fromkeys(_safetensors_names(single), single)
  shards = _index(path)
  if shards is not None:
    if bad := [file for file in shards.values() if not _is_plain(file)]:
      raise FileFormatError(
        os.path.join(path, WEIGHTS_INDEX_FILE),
        f"names the shard {bad[0]!r}, not a file name inside {path}",
        "an index lists shards by their file names in the same directory; fix or delete it",
      )
    return {name: os.path.join(path, file) for name, file in shards.items()}
  found = sorted(os.listdir(path))
  raise FileNotFoundError(
    f"No {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {path} (found {found}); only safetensors "
    "checkpoints are read (convert .bin weights with transformers' save_pretrained)."
  )


def place_weights(
  config: LlamaConfig,
  tensors: Mapping[str, Any],
  *,
  mesh: Mesh | None = None,
  rules: shd.LogicalRules = shd.DEFAULT_RULES,
  source: str = "config.json",
) -> Llama:
  """A `Llama` for `config` whose parameters are read from Hugging Face-named tensors.

  `tensors` maps every Hugging Face name that `config` needs (see the module docstring; extra
  names are ignored) to a tensor in Hugging Face layout: a numpy array, or anything with `shape`
  (or safetensors' `get_shape()`) that reads just the block a tuple of slices asks for, such as a
  safetensors slice. Tensors are cast to `config.param_dtype`. With `config.scan_layers`, each
  block parameter is the stack of its per-layer tensors. With `mesh`, each parameter is built in
  its sharded layout (by its logical axis names and `rules`), each device's callback reading only
  its own block; otherwise parameters go to the default device. Raises ValueError naming a
  missing tensor, or a shape that disagrees with the config (`source` says where the config came
  from).
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  sources = _sources(config)
  missing = sorted({name for names, _, _ in sources.values() for name in names} - set(tensors))
  if missing:
    raise ValueError(f"Missing tensors {missing[:8]} that {source} implies.")
  shardings = (
    dict(nnx.to_flat_state(shd.param_shardings(abstract, mesh, rules))) if mesh is not None else {}
  )
  target_dtype = np.dtype(config.param_dtype)

  def build(nnx_path: _Path, variable: nnx.Variable) -> nnx.Variable:
    names, kind, stacked = sources[nnx_path]
    shape = tuple(variable.get_value().shape)
    layer_shape = shape[1:] if stacked else shape  # the shape of one layer's tensor
    for name in names:
      tensor = tensors[name]
      found = tuple(tensor.shape if hasattr(tensor, "shape") else tensor.get_shape())
      if found != _hf_shape(kind, layer_shape):
        expected = _hf_shape(kind, layer_shape)
        raise ValueError(f"{name} has shape {found}, {source} implies {expected}.")
    if mesh is None:
      sharding = SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = shardings[nnx_path].get_value()

    def read(index: tuple[slice, ...]) -> np.ndarray:
      if not stacked:
        block = _read_block(tensors[names[0]], kind, shape, index)
      else:  # the layers of this block, each read as an unscanned parameter's block
        layers = range(*index[0].indices(len(names)))
        block = np.stack(
          [_read_block(tensors[names[i]], kind, layer_shape, index[1:]) for i in layers]
        )
      return np.ascontiguousarray(block, dtype=target_dtype)

    return variable.replace(jax.make_array_from_callback(shape, sharding, read))

  flat = nnx.to_flat_state(abstract)
  return nnx.merge(graphdef, nnx.from_flat_state([(p, build(p, v)) for p, v in flat]))


def load_hf(
  path: str | os.PathLike,
  *,
  mesh: Mesh | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  rules: shd.LogicalRules = shd.DEFAULT_RULES,
  **options: Any,
) -> tuple[Llama, HFTokenizer | None]:
  """Loads a local Hugging Face Qwen3 or Llama checkpoint as a `Llama` model and its tokenizer.

  Args:
    path: directory with config.json and safetensors weights (single file or sharded + index).
    mesh: when given, every parameter is created directly in its sharded layout on this mesh
      (by its logical axis names and `rules`), each device reading only its own shard.
      Otherwise parameters go to the default device.
    dtype: compute dtype of the model.
    param_dtype: dtype the parameters are stored in; None means `dtype`. Checkpoint tensors are
      cast to it (bfloat16 -> float32 is exact).
    rules: logical-axis rules for `mesh`.
    **options: how the model runs, `LlamaConfig` fields the checkpoint says nothing about
      (`llama.EXECUTION_FIELDS`: attention, remat, remat_policy, scan_layers), e.g.
      `scan_layers=True` for a model whose blocks are stacked and scanned.

  Returns:
    (model, tokenizer): the tokenizer is an `HFTokenizer` from tokenizer.json, or None when the
    directory has no tokenizer.json.
  """
  path = os.fspath(path)
  config = with_execution_options(hf_config(path, dtype=dtype, param_dtype=param_dtype), options)

  table = _layout(config)
  files = weight_files(path)
  expected = {name for name, _ in table.values()}
  # Tied checkpoints sometimes store lm_head anyway; old ones store rotary buffers.
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  unexpected = sorted(
    name
    for name in files
    if name not in expected and name not in ignorable and not name.endswith("rotary_emb.inv_freq")
  )
  missing = sorted(expected - set(files))
  if missing or unexpected:
    raise ValueError(
      f"Checkpoint {path} does not match its config.json: missing tensors {missing[:8]}, "
      f"unexpected tensors {unexpected[:8]}."
    )

  from safetensors import safe_open

  with contextlib.ExitStack() as stack:
    handles = {}
    for file in sorted(set(files.values())):
      _safetensors_names(file)  # a missing or unreadable shard, named
      handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
    tensors = {}
    for name in expected:
      try:
        tensors[name] = handles[files[name]].get_slice(name)
      except Exception:  # safetensors' own error: the index places a tensor the shard lacks
        raise FileFormatError(
          files[name], f"lacks the tensor {name} that the index places in it", "copy it again"
        ) from None
    try:
      model = place_weights(config, tensors, mesh=mesh, rules=rules)
    except ValueError as error:  # a tensor of a shape config.json does not imply
      raise FileFormatError(path, str(error).rstrip("."), _FIX_CONFIG) from None
  return model, load_tokenizer(path)


# ----- saving -------------------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process sharded) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _old_shards(path: str) -> set[str]:
  """The shards an existing sharded index in `path` lists, by file name, that saving the single
  file makes stale: only plain `.safetensors` names inside `path`; a name with a directory part
  (`../x`, `/abs/x`) or one the new checkpoint writes is never a shard to delete."""
  try:
    shards = _index(path) or {}
  except FileFormatError as error:
    logging.warning("%s; its shards are left in place.", error)
    return set()
  ours = {WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, WEIGHTS_INDEX_FILE}
  return {
    file
    for file in shards.values()
    if _is_plain(file) and file.endswith(".safetensors") and file not in ours
  }


def save_hf(model: Llama, path: str | os.PathLike, *, tokenizer: HFTokenizer | None = None) -> None:
  """Writes `model` as a Hugging Face checkpoint: config.json and model.safetensors.

  Tensors keep the parameter dtype and use torch's names and layout, so `load_hf` reads them back
  bit for bit and `transformers.AutoModelForCausalLM.from_pretrained(path)` loads them. With
  `tokenizer`, its tokenizer.json and tokenizer_config.json are written too. Each file is
  written under a temporary name and renamed over the old one, so a crash while writing leaves
  the checkpoint that was there loadable. A sharded checkpoint already in `path` is deleted
  after the new files are in place, so the directory holds one model: its index, and the
  `.safetensors` shards it lists by plain file name (a name outside `path` is never followed).
  The whole model is gathered on the host; with several processes, all must call this and
  process 0 writes. A model with `scan_layers` is written as the unscanned one would be, one
  tensor per layer.
  """
  from safetensors.numpy import save_file

  if not isinstance(model, Llama):
    raise TypeError(f"save_hf writes Llama models (from load_hf), got {type(model).__name__}.")
  config = model.config
  sources = _sources(config)
  tensors = {}
  for nnx_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names, kind, stacked = sources[nnx_path]
    value = _host(variable.get_value())
    layers = value if stacked else [value]  # a stacked parameter: one tensor per layer
    for name, layer in zip(names, layers, strict=True):
      tensors[name] = _to_hf(kind, layer)
  if jax.process_index() != 0:
    return
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  stale = _old_shards(path)
  files = [os.path.join(path, name) for name in (WEIGHTS_FILE, CONFIG_FILE)]
  with files_lib.staged(files) as (weights, config_json):
    save_file(tensors, weights, metadata={"format": "pt"})
    with open(config_json, "w") as f:
      json.dump(config_to_hf(config), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(path)
  # Only now is the old sharded checkpoint replaced: its index, then the shards it listed.
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(path, WEIGHTS_INDEX_FILE))
  for shard in sorted(stale):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(path, shard))


# ----- tokenizer ----------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
  """A special token from tokenizer_config.json: a string or an AddedToken dict."""
  return value.get("content") if isinstance(value, Mapping) else value


class HFTokenizer:
  """A `tokenizers.Tokenizer` behind the interface of `finch_jax.data.tokenizer.Tokenizer`.

  `encode` adds bos/eos itself (not through the tokenizer's post-processor), so they are added
  exactly once and only when asked. Models trained without a BOS token (Qwen3) use eos as bos,
  the separator their pretraining put between documents; `pad_id` falls back to eos likewise
  (padding carries no loss weight in the pipelines). `vocab_size` counts the tokenizer's tokens,
  which may be fewer than the model's embedding rows.
  """

  def __init__(
    self,
    tokenizer: Any,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
  ):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._id(eos_token)
    self.bos_id = self._id(bos_token) if bos_token is not None else self.eos_id
    self.pad_id = self._id(pad_token) if pad_token is not None else self.eos_id
    # Whether the model's text format starts a document with bos: what the tokenizer's own
    # post-processor does (SmolLM2-Instruct, Qwen3: no; Llama 3: yes).
    added = tokenizer.encode("a", add_special_tokens=True).ids
    self.adds_bos = bos_token is not None and added[:1] == [self.bos_id]

  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"Special token {token!r} is not in the tokenizer's vocabulary.")
    return token_id

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
    """Reads tokenizer.json, and tokenizer_config.json and chat_template.jinja when present."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    tokenizer_path = os.path.join(path, TOKENIZER_FILE)
    try:
      tokenizer = Tokenizer.from_file(tokenizer_path)
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
      raise FileFormatError(
        tokenizer_path, f"not a tokenizer the tokenizers library reads ({error})", "copy it again"
      ) from None
    settings: dict[str, Any] = {}
    config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
    if os.path.exists(config_path):
      settings = read_json(config_path, "fix it or copy it again")
      if not isinstance(settings, Mapping):
        raise FileFormatError(config_path, "not a JSON object", "fix it or copy it again")
    chat_template = settings.get("chat_template")
    template_path = os.path.join(path, "chat_template.jinja")
    if chat_template is None and os.path.exists(template_path):
      with open(template_path) as f:
        chat_template = f.read()
    return cls(
      tokenizer,
      bos_token=_token_text(settings.get("bos_token")),
      eos_token=_token_text(settings.get("eos_token")),
      pad_token=_token_text(settings.get("pad_token")),
      chat_template=chat_template if isinstance(chat_template, str) else None,
    )

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """Token ids of `text` as an int32 vector, with bos and eos when asked."""
    for flag, token_id, what in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
      if flag and token_id is None:
        raise ValueError(
          f"This tokenizer has no {what} token (tokenizer_config.json names none): "
          f"call encode(..., add_{what}=False)."
        )
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    ids = ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`, special tokens dropped."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    return self.tokenizer.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    settings = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "pad_token": self.pad_token,
    }
    if self.chat_template is not None:
      settings["chat_template"] = self.chat_template
    files = [os.path.join(path, name) for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)]
    with files_lib.staged(files) as (tokenizer_json, config_json):
      self.tokenizer.save(tokenizer_json)
      with open(config_json, "w") as f:
        json.dump(settings, f, indent=2)


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
  """`HFTokenizer.from_dir(path)`, or None when `path` has no tokenizer.json."""
  if not os.path.exists(os.path.join(os.fspath(path), TOKENIZER_FILE)):
    return None
  return HFTokenizer.from_dir(path)


__all__ = [
  "HFTokenizer",
  "config_from_hf",
  "config_to_hf",
  "load_hf",
  "load_tokenizer",
  "save_hf",
  "with_execution_options",
]
