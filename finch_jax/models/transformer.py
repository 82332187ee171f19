"""A decoder-only transformer language model in Flax NNX.

Pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query causal attention and a
SwiGLU MLP; embeddings optionally tied to the output projection. Parameters are kept in
`param_dtype` and cast to the compute `dtype` where they are used; logits are float32.

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

Activations are [batch, length, ...]; `sharding.DEFAULT_RULES` names those two axes as well.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and numerics of a `Transformer`; `TransformerConfig(**config_dict)` builds one."""

  vocab_size: int  # Tokens in the vocabulary; a multiple of 8 keeps matmuls aligned.
  max_len: int  # Longest sequence the model accepts.
  num_layers: int  # Transformer blocks.
  d_model: int  # Width of the residual stream.
  num_heads: int  # Query heads.
  num_kv_heads: int  # Key/value heads (grouped-query attention); must divide num_heads.
  d_ff: int  # Hidden width of the SwiGLU MLP.
  head_dim: int | None = None  # Width of one head; None means d_model // num_heads.
  tie_embeddings: bool = True  # Reuse the token embedding as the output projection.
  rope_theta: float = 10_000.0  # Base period of the rotary position embedding.
  norm_eps: float = 1e-6  # Epsilon inside RMSNorm.
  dtype: str = "float32"  # Compute dtype, e.g. 'float32' or 'bfloat16'.
  param_dtype: str = "float32"  # Dtype the parameters are stored in.
  remat: bool = False  # Recompute each block's activations in the backward pass to save memory.

  def __post_init__(self):
    for name in (
      "vocab_size",
      "max_len",
      "num_layers",
      "d_model",
      "num_heads",
      "num_kv_heads",
      "d_ff",
    ):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {value!r}.")
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
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(
          f"TransformerConfig.{name}={value!r} is not a floating dtype: "
          "use 'float32' or 'bfloat16'."
        )

  @property
  def resolved_head_dim(self) -> int:
    """`head_dim`, or `d_model // num_heads` when it is None."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> TransformerConfig:
    """Builds a config from a mapping or an `ml_collections.ConfigDict`, naming unknown keys."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {field.name for field in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - known):
      raise ValueError(f"Unknown TransformerConfig fields {unknown}; known: {sorted(known)}.")
    return cls(**values)

  @classmethod
  def tiny(cls, **overrides: Any) -> TransformerConfig:
    """About 432k parameters for a 264-token (padded byte-level) vocabulary; fast on a CPU."""
    values = dict(
      vocab_size=264, max_len=256, num_layers=4, d_model=96, num_heads=4, num_kv_heads=2, d_ff=256
    )
    return cls(**{**values, **overrides})

  def num_params(self) -> int:
    """The number of parameters of `Transformer(self)`, counted from the sizes alone."""
    heads_width = self.num_heads * self.resolved_head_dim
    kv_width = self.num_kv_heads * self.resolved_head_dim
    attention = self.d_model * (2 * heads_width + 2 * kv_width)  # q, k, v and output projections
    block = attention + 3 * self.d_model * self.d_ff + 2 * self.d_model  # + MLP + two norms
    embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return embeddings + self.num_layers * block + self.d_model  # + final norm


def _param(
  rngs: nnx.Rngs, shape: tuple[int, ...], stddev: float, names: tuple[str, ...], dtype: str
) -> nnx.Param:
  """A normal(0, stddev) parameter labelled with logical axis names."""
  value = stddev * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype))
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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of x [batch, length, heads, head_dim] at integer positions [batch, length].

  Uses the rotate-half layout of Llama/Qwen checkpoints (first half of each head paired with the
  second), so their weights load without permutation.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [batch, length, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention: each key/value head serves num_heads // num_kv_heads."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c, head_dim = config, config.resolved_head_dim
    in_std = c.d_model**-0.5
    # Output projections start small so each block begins near the identity (GPT-2's scaling).
    out_std = (c.num_heads * head_dim) ** -0.5 / math.sqrt(2 * c.num_layers)
    self.q_proj = _param(
      rngs,
      (c.d_model, c.num_heads, head_dim),
      in_std,
      ("embed", "heads", "head_dim"),
      c.param_dtype,
    )
    self.k_proj = _param(
      rngs,
      (c.d_model, c.num_kv_heads, head_dim),
      in_std,
      ("embed", "kv_heads", "head_dim"),
      c.param_dtype,
    )
    self.v_proj = _param(
      rngs,
      (c.d_model, c.num_kv_heads, head_dim),
      in_std,
      ("embed", "kv_heads", "head_dim"),
      c.param_dtype,
    )
    self.o_proj = _param(
      rngs,
      (c.num_heads, head_dim, c.d_model),
      out_std,
      ("heads", "head_dim", "embed"),
      c.param_dtype,
    )
    self.rope_theta = c.rope_theta

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """x [batch, length, embed] -> [batch, length, embed]; mask [batch, query, key] is boolean."""
    dtype = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...].astype(dtype))
    k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...].astype(dtype))
    v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...].astype(dtype))
    q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    # Query head n uses key/value head n // group, as Hugging Face's repeat_kv does.
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits * head_dim**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(batch, length, num_heads, head_dim)
    return jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    out_std = c.d_ff**-0.5 / math.sqrt(2 * c.num_layers)
    self.gate_proj = _param(
      rngs, (c.d_model, c.d_ff), c.d_model**-0.5, ("embed", "mlp"), c.param_dtype
    )
    self.up_proj = _param(
      rngs, (c.d_model, c.d_ff), c.d_model**-0.5, ("embed", "mlp"), c.param_dtype
    )
    self.down_proj = _param(rngs, (c.d_ff, c.d_model), out_std, ("mlp", "embed"), c.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., embed] -> [..., embed]."""
    dtype = x.dtype
    gate = jax.nn.silu(x @ self.gate_proj[...].astype(dtype))
    return (gate * (x @ self.up_proj[...].astype(dtype))) @ self.down_proj[...].astype(dtype)


class Block(nnx.Module):
  """One pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.norm_eps, param_dtype=config.param_dtype)
    self.attn_norm = RMSNorm(config.d_model, **norm)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, **norm)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Applies the block to the residual stream x [batch, length, embed]."""
    x = x + self.attn(self.attn_norm(x), positions, mask)
    return x + self.mlp(self.mlp_norm(x))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes along a row."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
  is_start = jnp.concatenate(
    [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
    axis=-1,
  )
  return index - jax.lax.cummax(jnp.where(is_start, index, 0), axis=segment_ids.ndim - 1)


def attention_mask_and_positions(
  tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """The causal (and, for packed rows, same-segment) mask [batch or 1, query, key], and the
  rotary positions: as given, else 0, 1, 2, ... restarting at each segment."""
  length = tokens.shape[-1]
  mask = jnp.tril(jnp.ones((length, length), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if positions is None:
    positions = (
      segment_positions(segment_ids)
      if segment_ids is not None
      else jnp.broadcast_to(jnp.arange(length), tokens.shape)
    )
  return mask, positions


class Transformer(nnx.Module):
  """Decoder-only language model: tokens [batch, length] -> float32 logits [batch, length, vocab].

  Example:
    >>> model = Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 16), jnp.int32)).shape
    (2, 16, 264)
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    # 0.02 as in GPT-2 and Llama, so the first loss is close to log(vocab_size).
    self.embed = _param(
      rngs, (config.vocab_size, config.d_model), 0.02, ("vocab", "embed"), config.param_dtype
    )
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=config.param_dtype)
    if not config.tie_embeddings:
      self.lm_head = _param(
        rngs, (config.d_model, config.vocab_size), 0.02, ("embed", "vocab"), config.param_dtype
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
      tokens: int [batch, length].
      segment_ids: optional int [batch, length] for packed rows: a token attends only to earlier
        tokens of its own segment (0 marks padding, which forms a segment of its own).
      positions: optional int [batch, length] rotary positions. Defaults to 0, 1, 2, ... restarting
        at each new segment when `segment_ids` is given.

    Returns:
      float32 logits [batch, length, vocab_size].
    """
    c = self.config
    length = tokens.shape[-1]
    if length > c.max_len:
      raise ValueError(
        f"Sequence length {length} exceeds max_len={c.max_len}: shorten the input or raise "
        "TransformerConfig.max_len."
      )
    mask, positions = attention_mask_and_positions(tokens, segment_ids, positions)

    x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(c.dtype))
    apply_block = nnx.remat(Block.__call__) if c.remat else Block.__call__
    for block in self.blocks:
      x = apply_block(block, x, positions, mask)
    x = self.final_norm(x)
    head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    # float32 accumulation: a bfloat16 logit loses the small differences the loss depends on.
    return jnp.einsum("btd,dv->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
