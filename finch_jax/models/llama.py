"""The decoder in Flax NNX: Llama 3 and Qwen3, and the compact model the benchmarks train.

One pre-norm decoder: RMSNorm, rotary position embeddings (rotate-half layout), grouped-query
causal attention and a SwiGLU MLP, laid out to load Hugging Face checkpoints. Qwen3 is Llama with
an RMSNorm over each query and key head before the rotary embedding, so one module serves both
(`LlamaConfig.model_type` picks); Llama 3.1's rotary frequency scaling and the biases some
checkpoints carry are options. `LlamaConfig.tiny()` is the compact model the embedded benchmarks
train from scratch: a small Llama with a byte-level vocabulary, tied embeddings and a depth-scaled
init (`LlamaConfig.init`). Parameters are kept in `param_dtype` and cast to the compute `dtype`
where they are used; logits are float32.

Every parameter carries logical axis names in its `out_sharding` metadata; the rules in
`finch_jax.sharding` map them to mesh axes, so one module serves one device, data parallel, FSDP
and tensor parallel runs. The names:

  vocab      token vocabulary
  embed      model width, `d_model`
  heads      query heads
  kv_heads   key/value heads
  head_dim   width of one attention head
  mlp        SwiGLU hidden width, `d_ff`
  norm       RMSNorm scales (small; kept replicated)
  layers     the leading axis of the stacked block parameters when `scan_layers` is on

Activations are [batch, length, ...]; `sharding.DEFAULT_RULES` names those two axes as well.
`finch_jax.models.hf` maps the parameters (`embed`, `blocks[i].attn.q_proj`, ...) to and from
Hugging Face tensor names.

Generation (`finch_jax.models.generate`) runs the incremental form, `Llama.decode`: new tokens
attend to a key/value cache (`KVCache`, from `Llama.init_cache`) passed in and returned, so a
step costs one token per row rather than a pass over the whole sequence. Training never takes
that path.

How the model runs, apart from what it computes (`EXECUTION_FIELDS`; a Hugging Face or GGUF file
says nothing about them, so a config's `model` dict supplies them):

  attention      which `finch_jax.models.attention` implementation computes attention: "auto"
                 (splash on TPU, cuDNN's flash kernel on GPU where it applies, else the einsum
                 reference up to one block of tokens and the chunked kernel beyond), or one by name.
  remat          recompute each block's activations in the backward pass.
  remat_policy   which of JAX's `jax.checkpoint_policies` decides what remat saves.
  scan_layers    the blocks' parameters stacked on a leading `layers` axis and applied by
                 `nnx.scan`: the compiler sees one block instead of `num_layers` copies, so a deep
                 model compiles in a fraction of the time. Parameters are `blocks.attn.q_proj`
                 [layers, embed, heads, head_dim] instead of `blocks[i].attn.q_proj`; the
                 blocks' initial values are the unscanned model's, stacked.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from finch_jax.models import attention as attention_lib

MODEL_TYPES = ("llama", "qwen3")
# "normal": Hugging Face's normal(0, 0.02) everywhere; "scaled": see `LlamaConfig.init_stddevs`.
INITS = ("normal", "scaled")
# What sets the compact model apart from a Hugging Face Llama, beyond its sizes.
COMPACT_DEFAULTS = dict(tie_embeddings=True, init="scaled")
# Hugging Face initialises these models with normal(0, initializer_range=0.02) and zero biases.
_HF_STD = 0.02
# JAX's named checkpoint policies that `remat_policy` may name (the ones that take no arguments),
# from saving the least to saving the most. "nothing_saveable" is jax.checkpoint's default: only
# each block's input is kept; "dots_with_no_batch_dims_saveable" keeps the projections' outputs
# and recomputes attention and the elementwise work.
REMAT_POLICIES = (
  "nothing_saveable",
  "dots_with_no_batch_dims_saveable",
  "dots_saveable",
  "everything_saveable",
)
# Fields that say how the model runs, not what it computes: a pretrained model's file leaves them
# to the config (`finch_jax.configure.pretrained_model_config`). Only scan_layers changes the
# parameter tree.
EXECUTION_FIELDS = ("attention", "remat", "remat_policy", "scan_layers")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1's rotary frequency scaling (Hugging Face `rope_scaling` with rope_type "llama3").

  Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept, those
  longer than original_max_position_embeddings / low_freq_factor are divided by `factor`, and the
  band between is interpolated smoothly.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if not self.factor > 0 or not self.low_freq_factor > 0:
      raise ValueError(f"rope_scaling factors must be positive, got {self}.")
    if not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
        f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
        f"({self.low_freq_factor})."
      )
    if self.original_max_position_embeddings < 1:
      raise ValueError(
        "rope_scaling.original_max_position_embeddings must be positive, got "
        f"{self.original_max_position_embeddings}."
      )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and numerics of a `Llama` model; `finch_jax.models.config_from_dict` reads one from a
  config's `model` dict, `finch_jax.models.hf.config_from_hf` from a Hugging Face `config.json`."""

  vocab_size: int  # Rows of the embedding (may exceed the tokenizer's vocabulary).
  d_model: int  # Width of the residual stream (HF `hidden_size`).
  num_layers: int  # Decoder blocks (HF `num_hidden_layers`).
  num_heads: int  # Query heads (HF `num_attention_heads`).
  num_kv_heads: int  # Key/value heads (HF `num_key_value_heads`); must divide num_heads.
  d_ff: int  # Hidden width of the SwiGLU MLP (HF `intermediate_size`).
  head_dim: int | None = None  # Width of one head; None means d_model // num_heads.
  model_type: str = "llama"  # "llama" or "qwen3" (which adds per-head q/k RMSNorm).
  attention_bias: bool = False  # Biases on the q, k, v and output projections.
  mlp_bias: bool = False  # Biases on the gate, up and down projections (Llama only).
  tie_embeddings: bool = False  # Reuse the token embedding as the output projection.
  init: str = "normal"  # Initial weights: "normal" (Hugging Face's) or "scaled"; init_stddevs.
  rope_theta: float = 10_000.0  # Base period of the rotary embedding.
  rope_scaling: Llama3RopeScaling | None = None  # Llama 3.1 frequency scaling, or None.
  norm_eps: float = 1e-6  # Epsilon inside RMSNorm (HF `rms_norm_eps`).
  max_len: int = 8192  # Longest sequence the model accepts (HF `max_position_embeddings`).
  bos_token_id: int | None = None  # Carried into an exported config.json.
  eos_token_id: int | tuple[int, ...] | None = None  # Carried into an exported config.json.
  pad_token_id: int | None = None  # Carried into an exported config.json.
  dtype: str = "float32"  # Compute dtype, e.g. 'float32' or 'bfloat16'.
  param_dtype: str = "float32"  # Dtype the parameters are stored in.
  remat: bool = False  # Recompute each block's activations in the backward pass to save memory.
  remat_policy: str = "nothing_saveable"  # What remat keeps: one of REMAT_POLICIES.
  scan_layers: bool = False  # Stack the blocks on a `layers` axis and apply them with nnx.scan.
  attention: str = "auto"  # Attention implementation: one of attention.IMPLEMENTATIONS.

  def __post_init__(self):
    sizes = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "max_len")
    for name in sizes:
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"LlamaConfig.model_type={self.model_type!r}; supported: {MODEL_TYPES}.")
    if self.init not in INITS:
      raise ValueError(f"LlamaConfig.init={self.init!r}; supported: {INITS}.")
    if self.num_heads % self.num_kv_heads:
      divisors = [k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]
      raise ValueError(
        f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}): "
        f"use one of {divisors}."
      )
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads}): "
        "change one of them or set head_dim explicitly."
      )
    if self.resolved_head_dim < 2 or self.resolved_head_dim % 2:
      raise ValueError(
        f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}: "
        "set head_dim (or d_model / num_heads) to an even number."
      )
    if not self.rope_theta > 0 or not self.norm_eps > 0:
      raise ValueError(
        f"rope_theta ({self.rope_theta}) and norm_eps ({self.norm_eps}) must be positive."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"LlamaConfig.remat_policy={self.remat_policy!r} is not a policy remat takes: use one of "
        f"{REMAT_POLICIES} (jax.checkpoint_policies)."
      )
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(
        f"LlamaConfig.attention={self.attention!r}; supported: {attention_lib.IMPLEMENTATIONS}."
      )
    if self.mlp_bias and self.model_type != "llama":
      raise ValueError(f"mlp_bias is a Llama option; {self.model_type} has no MLP biases.")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(
          f"LlamaConfig.{name}={value!r} is not a floating dtype: use 'float32' or 'bfloat16'."
        )

  @classmethod
  def tiny(cls, **overrides: Any) -> LlamaConfig:
    """The compact model the embedded benchmarks train from scratch: about 432k parameters for a
    264-token (padded byte-level) vocabulary, tied embeddings and the scaled init; fast on a CPU."""
    sizes = dict(
      vocab_size=264, max_len=256, num_layers=4, d_model=96, num_heads=4, num_kv_heads=2, d_ff=256
    )
    return cls(**{**sizes, **COMPACT_DEFAULTS, **overrides})

  @property
  def resolved_head_dim(self) -> int:
    """`head_dim`, or `d_model // num_heads` when it is None."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def qk_norm(self) -> bool:
    """Whether each query and key head is RMS-normalised before the rotary embedding (Qwen3)."""
    return self.model_type == "qwen3"

  def replace(self, **changes: Any) -> LlamaConfig:
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  def init_stddevs(self) -> dict[str, float]:
    """Standard deviations of the initial weights, which are normal with mean 0; biases start at
    zero and RMSNorm scales at one.

    Keys: `embed` (the embedding, and `lm_head` when untied), `in` (q, k, v, gate and up
    projections), `attn_out` (o_proj) and `mlp_out` (down_proj). `init="normal"` gives 0.02 to
    all, as Hugging Face does; `init="scaled"` gives the inputs d_model ** -0.5 and each output
    projection fan_in ** -0.5 / sqrt(2 * num_layers), the embedding 0.02.
    """
    if self.init == "normal":
      return dict.fromkeys(("embed", "in", "attn_out", "mlp_out"), _HF_STD)
    # Output projections start small so each block begins near the identity (GPT-2's scaling);
    # 0.02 for the embedding (as GPT-2 and Llama) puts the first loss near log(vocab_size).
    depth = math.sqrt(2 * self.num_layers)
    return {
      "embed": _HF_STD,
      "in": self.d_model**-0.5,
      "attn_out": (self.num_heads * self.resolved_head_dim) ** -0.5 / depth,
      "mlp_out": self.d_ff**-0.5 / depth,
    }

  def num_params(self) -> int:
    """The number of parameters of `Llama(self)`, counted from the sizes alone."""
    hd = self.resolved_head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attention = self.d_model * (2 * q + 2 * kv)  # q, k, v and output projections
    if self.attention_bias:
      attention += q + 2 * kv + self.d_model
    if self.qk_norm:
      attention += 2 * hd
    mlp = 3 * self.d_model * self.d_ff + (2 * self.d_ff + self.d_model if self.mlp_bias else 0)
    block = attention + mlp + 2 * self.d_model  # + two norms
    embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return embeddings + self.num_layers * block + self.d_model  # + final norm


def rope_frequencies(
  head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
  """Inverse frequencies [head_dim // 2] (float32) of the rotary embedding.

  float32 throughout, as Hugging Face computes them; its `1 / theta ** (2i / head_dim)` rounds a
  few entries one ulp apart from `theta ** (-i / half)` used here (a float64 computation would
  too), far below the rounding of the float32 angles themselves. This form keeps the compact
  model's logits as they were when it was trained.
  """
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is not None:
    s = scaling
    old = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding of x [batch, length, heads, head_dim] at integer positions [batch, length].

  Uses the rotate-half layout of Llama/Qwen checkpoints (first half of each head paired with the
  second), so their weights load without permutation. Angles and rotation in float32 whatever the
  dtype of `x`, which is kept.
  """
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [batch, length, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _param(
  rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float, names: tuple[str, ...], dtype: str
) -> nnx.Param:
  """A normal(0, stddev) parameter (zeros when stddev is 0) labelled with logical axis names."""
  if stddev:
    value = stddev * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype))
  else:
    value = jnp.zeros(shape, jnp.dtype(dtype))
  # eager_sharding=False: the module stays mesh-agnostic (no mesh is needed to build it);
  # finch_jax.sharding places parameters by these names.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale; statistics in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.scale = nnx.Param(
      jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",), eager_sharding=False
    )
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises the last axis of `x`; the result has the dtype of `x`."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes along a row."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
  is_start = jnp.concatenate(
    [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
    axis=-1,
  )
  return index - jax.lax.cummax(jnp.where(is_start, index, 0), axis=segment_ids.ndim - 1)


def default_positions(
  tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None
) -> jax.Array:
  """The rotary positions: as given, else 0, 1, 2, ... restarting at each segment."""
  if positions is not None:
    return positions
  if segment_ids is not None:
    return segment_positions(segment_ids)
  return jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)


class LlamaAttention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings; q/k head norms for Qwen3."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c, hd, pd = config, config.resolved_head_dim, config.param_dtype
    std = c.init_stddevs()
    self.q_proj = _param(
      rngs, (c.d_model, c.num_heads, hd), std["in"], ("embed", "heads", "head_dim"), pd
    )
    self.k_proj = _param(
      rngs, (c.d_model, c.num_kv_heads, hd), std["in"], ("embed", "kv_heads", "head_dim"), pd
    )
    self.v_proj = _param(
      rngs, (c.d_model, c.num_kv_heads, hd), std["in"], ("embed", "kv_heads", "head_dim"), pd
    )
    self.o_proj = _param(
      rngs, (c.num_heads, hd, c.d_model), std["attn_out"], ("heads", "head_dim", "embed"), pd
    )
    if c.attention_bias:
      self.q_bias = _param(rngs, (c.num_heads, hd), 0.0, ("heads", "head_dim"), pd)
      self.k_bias = _param(rngs, (c.num_kv_heads, hd), 0.0, ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, (c.num_kv_heads, hd), 0.0, ("kv_heads", "head_dim"), pd)
      self.o_bias = _param(rngs, (c.d_model,), 0.0, ("embed",), pd)
    if c.qk_norm:
      self.q_norm = RMSNorm(hd, eps=c.norm_eps, param_dtype=pd)
      self.k_norm = RMSNorm(hd, eps=c.norm_eps, param_dtype=pd)
    self.config = config

  def __call__(
    self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
  ) -> jax.Array:
    """x [batch, length, embed] -> [batch, length, embed]; a token sees itself and the earlier
    tokens of its segment (`segment_ids` [batch, length], or the whole row when None)."""
    q, k, v = self._qkv(x, positions)
    # The mesh (for splash's shard_map) is the one the caller set, e.g. the trainer's steps.
    out = attention_lib.attend(
      q, k, v, segment_ids=segment_ids, implementation=self.config.attention
    )
    return self._output(out)

  def decode(
    self, x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of new tokens to a key/value cache, for decoding one row at a time.

    Args:
      x: the new tokens' inputs [batch, new, embed], at `positions` [batch, new].
      positions: int [batch, new]; cache slot s holds the key and value of position s, and a new
        token sees the slots up to and including its own position.
      cache_k, cache_v: [batch, cache_length, kv_heads, head_dim] in the compute dtype.

    Returns:
      ([batch, new, embed], (k, v)): the output, and the new tokens' keys and values [batch, new,
      kv_heads, head_dim] (rotary embedding applied), which the caller writes to the cache at
      `positions`.
    """
    q, k, v = self._qkv(x, positions)
    keys, values = _place(cache_k, k, positions), _place(cache_v, v, positions)
    slots = jnp.arange(cache_k.shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [batch, new, cache_length]
    out = attention_lib.reference_attention(q, keys, values, mask)
    return self._output(out), (k, v)

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of x [batch, length, embed], rotary embedding applied."""
    c, dtype = self.config, x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...].astype(dtype))
    k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...].astype(dtype))
    v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...].astype(dtype))
    if c.attention_bias:
      q = q + self.q_bias[...].astype(dtype)
      k = k + self.k_bias[...].astype(dtype)
      v = v + self.v_bias[...].astype(dtype)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_frequencies(c.resolved_head_dim, c.rope_theta, c.rope_scaling)
    return apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq), v

  def _output(self, out: jax.Array) -> jax.Array:
    """The output projection of the attended values [batch, length, heads, head_dim]."""
    dtype = out.dtype
    out = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(dtype))
    return out + self.o_bias[...].astype(dtype) if self.config.attention_bias else out


def _place(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """`cache` [batch, slots, ...] with new [batch, new, ...] written at slots `positions`."""
  if new.shape[1] == 1:
    # One token per row (each decoding step): a select the compiler fuses into the attention
    # that reads it, rather than a scatter into a copy of the cache.
    hit = jnp.arange(cache.shape[1])[None, :] == positions
    return jnp.where(hit.reshape(hit.shape + (1,) * (cache.ndim - 2)), new, cache)
  return cache.at[jnp.arange(cache.shape[0])[:, None], positions].set(new)


class LlamaMLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with optional biases."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c, pd = config, config.param_dtype
    std = c.init_stddevs()
    self.gate_proj = _param(rngs, (c.d_model, c.d_ff), std["in"], ("embed", "mlp"), pd)
    self.up_proj = _param(rngs, (c.d_model, c.d_ff), std["in"], ("embed", "mlp"), pd)
    self.down_proj = _param(rngs, (c.d_ff, c.d_model), std["mlp_out"], ("mlp", "embed"), pd)
    if c.mlp_bias:
      self.gate_bias = _param(rngs, (c.d_ff,), 0.0, ("mlp",), pd)
      self.up_bias = _param(rngs, (c.d_ff,), 0.0, ("mlp",), pd)
      self.down_bias = _param(rngs, (c.d_model,), 0.0, ("embed",), pd)
    self.mlp_bias = c.mlp_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., embed] -> [..., embed]."""
    dtype = x.dtype
    gate, up = x @ self.gate_proj[...].astype(dtype), x @ self.up_proj[...].astype(dtype)
    if self.mlp_bias:
      gate, up = gate + self.gate_bias[...].astype(dtype), up + self.up_bias[...].astype(dtype)
    out = (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dtype)
    return out + self.down_bias[...].astype(dtype) if self.mlp_bias else out


class LlamaBlock(nnx.Module):
  """One pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.norm_eps, param_dtype=config.param_dtype)
    self.attn_norm = RMSNorm(config.d_model, **norm)
    self.attn = LlamaAttention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, **norm)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(
    self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
  ) -> jax.Array:
    """Applies the block to the residual stream x [batch, length, embed]."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def decode(
    self, x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The block on new tokens that attend to a key/value cache (`LlamaAttention.decode`);
    returns the residual stream and the new tokens' keys and values."""
    out, kv = self.attn.decode(self.attn_norm(x), positions, cache_k, cache_v)
    x = x + out
    return x + self.mlp(self.mlp_norm(x)), kv


def stack_modules(modules: list[nnx.Module], axis_name: str = "layers") -> nnx.Module:
  """One module of the same structure whose parameters are the `modules`' stacked on a new
  leading axis, named `axis_name` in each parameter's logical axis names.

  What `nnx.scan` applies, one slice per step. Built from separately created modules (rather
  than by `nnx.vmap`), so a scanned model starts from exactly the unscanned model's weights.
  """
  graphdef, _ = nnx.split(modules[0])
  states = [nnx.state(m) for m in modules]

  def stack(*variables: nnx.Variable) -> nnx.Variable:
    names = variables[0].get_metadata().get("out_sharding") or ()
    value = jnp.stack([v.get_value() for v in variables])
    return variables[0].replace(value, out_sharding=(axis_name, *names))

  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


def _apply_blocks(
  config: LlamaConfig,
  blocks: nnx.Module,
  x: jax.Array,
  positions: jax.Array,
  segment_ids: jax.Array | None,
) -> jax.Array:
  """The residual stream after every block: a Python loop over `nnx.List` blocks, or `nnx.scan`
  over the stacked ones, with each block under `nnx.remat` when `config.remat` is on."""
  apply_block = LlamaBlock.__call__
  if config.remat:
    # Under scan the loop itself keeps the recomputation from being merged with the forward
    # pass, so common-subexpression prevention would only cost speed (as jax.checkpoint's
    # documentation advises for scan).
    apply_block = nnx.remat(
      apply_block,
      policy=getattr(jax.checkpoint_policies, config.remat_policy),
      prevent_cse=not config.scan_layers,
    )
  if not config.scan_layers:
    for block in blocks:
      x = apply_block(block, x, positions, segment_ids)
    return x

  @nnx.scan(
    in_axes=(0, nnx.Carry, None, None),
    out_axes=nnx.Carry,
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  def scan(block, x, positions, segment_ids):
    return apply_block(block, x, positions, segment_ids)

  return scan(blocks, x, positions, segment_ids)


class KVCache(NamedTuple):
  """Every layer's keys (rotary embedding applied) and values, for decoding with `Llama.decode`.

  k, v: [layers, batch, length, kv_heads, head_dim] in the model's compute dtype; slot s of a row
  holds the key and value of that row's position s. Built by `Llama.init_cache`, passed to
  `Llama.decode` and returned by it updated: a pytree, so it can be a `jax.lax` loop's carry.
  """

  k: jax.Array
  v: jax.Array


def _decode_blocks(
  config: LlamaConfig, blocks: nnx.Module, x: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
  """The residual stream after every block's `decode`, and each layer's new keys and values
  stacked [layers, batch, new, kv_heads, head_dim] (not yet in the cache)."""
  if not config.scan_layers:
    new_k, new_v = [], []
    for layer, block in enumerate(blocks):
      x, (k, v) = block.decode(x, positions, cache.k[layer], cache.v[layer])
      new_k.append(k)
      new_v.append(v)
    return x, KVCache(jnp.stack(new_k), jnp.stack(new_v))

  @nnx.scan(
    in_axes=(0, nnx.Carry, None, 0, 0),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  def scan(block, x, positions, cache_k, cache_v):
    x, (k, v) = block.decode(x, positions, cache_k, cache_v)
    return x, (k, v)

  x, (new_k, new_v) = scan(blocks, x, positions, cache.k, cache.v)
  return x, KVCache(new_k, new_v)


class Llama(nnx.Module):
  """Llama 3 / Qwen3 decoder: tokens [batch, length] -> float32 logits [batch, length, vocab].

  The trainer, evaluation, sharding, LoRA and generation all take it.

  Example:
    >>> Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))(jnp.ones((2, 16), jnp.int32)).shape
    (2, 16, 264)
    >>> config = LlamaConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4,
    ...                      num_kv_heads=2, d_ff=96, model_type="qwen3")
    >>> Llama(config, rngs=nnx.Rngs(0))(jnp.ones((2, 8), jnp.int32)).shape
    (2, 8, 128)
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    embed_std = c.init_stddevs()["embed"]
    self.embed = _param(
      rngs, (c.vocab_size, c.d_model), embed_std, ("vocab", "embed"), c.param_dtype
    )
    blocks = [LlamaBlock(c, rngs=rngs) for _ in range(c.num_layers)]
    self.blocks = stack_modules(blocks) if c.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = _param(
        rngs, (c.d_model, c.vocab_size), embed_std, ("embed", "vocab"), c.param_dtype
      )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: int [batch, length], length at most `config.max_len`.
      segment_ids: optional int [batch, length] for packed rows: a token attends only to earlier
        tokens of its own segment (0 marks padding, which forms a segment of its own).
      positions: optional int [batch, length] rotary positions. Defaults to 0, 1, 2, ... restarting
        at each new segment when `segment_ids` is given.

    Returns:
      float32 logits [batch, length, vocab_size].

    Raises:
      ValueError: when the sequence is longer than `config.max_len`.
    """
    x, head = self.hidden_and_head(tokens, segment_ids=segment_ids, positions=positions)
    # float32 accumulation: a bfloat16 logit loses the small differences the loss depends on.
    return jnp.einsum("btd,dv->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)

  def hidden_and_head(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """The final (normalised) hidden states and the output projection, without the logits.

    `__call__` is `hidden @ head` with float32 accumulation; `finch_jax.losses` takes the pair
    instead, to make the logits a chunk of the sequence at a time. Arguments as in `__call__`.

    Returns:
      (hidden [batch, length, d_model] in the compute dtype, head [d_model, vocab_size] in the
      parameter dtype: the embedding's transpose when tied, else `lm_head`).
    """
    c = self.config
    length = tokens.shape[-1]
    if length > c.max_len:
      raise ValueError(
        f"Sequence length {length} exceeds max_len={c.max_len}: shorten the input or raise "
        "LlamaConfig.max_len."
      )
    positions = default_positions(tokens, segment_ids, positions)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(c.dtype))
    x = _apply_blocks(c, self.blocks, x, positions, segment_ids)
    x = self.final_norm(x)
    head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    return x, head

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty key/value cache for `batch` rows of up to `length` positions (zeros: `decode`
    masks every slot past a token's position, so what they hold never matters)."""
    c = self.config
    if length > c.max_len:
      raise ValueError(
        f"Cache length {length} exceeds max_len={c.max_len}: shorten the prompts or the "
        "continuation, or raise LlamaConfig.max_len."
      )
    shape = (c.num_layers, batch, length, c.num_kv_heads, c.resolved_head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
    return KVCache(zeros, zeros)

  def decode(
    self, tokens: jax.Array, positions: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, KVCache]:
    """Next-token logits of new tokens that attend to a key/value cache, and the updated cache.

    The incremental form of `__call__` for generation: feed a prompt once (its tokens at
    positions 0, 1, ...), then one token per row and step at the next position; each call writes
    the new tokens' keys and values to the cache at their positions. A token sees the cache
    slots up to its own position (written earlier or in this call), so rows of different
    lengths decode side by side, and a right-padded prompt's padding is overwritten before
    anything sees it. Attention runs on the einsum reference (`attention.reference_attention`)
    whatever `config.attention` says; no segments, no remat. Not used for training.

    Args:
      tokens: int [batch, new].
      positions: int [batch, new], each below the cache's length.
      cache: from `init_cache` or an earlier `decode`.

    Returns:
      (float32 logits [batch, new, vocab_size], the cache with the new keys and values).
    """
    x, head, cache = self.decode_hidden_and_head(tokens, positions, cache)
    return jnp.einsum(
      "btd,dv->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32
    ), cache

  def decode_hidden_and_head(
    self, tokens: jax.Array, positions: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, jax.Array, KVCache]:
    """`decode` without the logits: (final hidden states [batch, new, d_model], the output
    projection [d_model, vocab_size], the updated cache), as `hidden_and_head` is to `__call__`;
    a prompt's logits are needed at its last position only."""
    c = self.config
    if tokens.shape != positions.shape or tokens.ndim != 2:
      raise ValueError(
        f"decode takes tokens and positions [batch, new] of one shape, got {tokens.shape} and "
        f"{positions.shape}."
      )
    x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(c.dtype))
    x, new = _decode_blocks(c, self.blocks, x, positions, cache)
    rows = jnp.arange(tokens.shape[0])[:, None]
    cache = KVCache(
      cache.k.at[:, rows, positions].set(new.k), cache.v.at[:, rows, positions].set(new.v)
    )
    head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    return self.final_norm(x), head, cache
