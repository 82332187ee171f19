"""Causal grouped-query attention for packed rows, without a [length, length] score matrix.

`attend(q, k, v, segment_ids=..., implementation=...)` computes, for each query head n,

  softmax(q_n k_{n // g}^T * head_dim ** -0.5 + mask) v_{n // g},   g = heads // kv_heads

where the mask lets a token see itself and the earlier tokens of its own segment (packed rows;
segment id 0, padding, is a segment like any other). Rotary positions are applied by the caller.

Implementations (`IMPLEMENTATIONS`):

  reference  the einsum path the models used: float32 scores [batch, kv_heads, group, length,
             length] in memory. The ground truth of the tests.
  xla        `jax.nn.dot_product_attention(implementation="xla")`: also builds the whole float32
             score matrix; compiled, its temporaries are no smaller than the reference's.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's flash kernel on
             NVIDIA GPUs (bfloat16/float16, head_dim a multiple of 8, <= 128, or 256 from Hopper).
             Causality goes in as `is_causal` (the kernel skips the masked blocks); segments as a
             boolean [batch, 1, length, length] mask, which the kernel takes as an additive bias:
             one such array in the compute dtype, shared by all heads (and its gradient, which
             cuDNN always computes), but no per-head and no float32 square.
  splash     the Pallas splash-attention kernel on TPU (`jax.experimental.pallas.ops.tpu.
             splash_attention`): causal block sparsity, segment ids and grouped kv heads native,
             mapped over the batch, and over the mesh with `shard_map` when one is given (the
             compiler cannot partition a Pallas call: on a multi-device mesh pass `mesh`). Off
             TPU it runs in Pallas interpret mode (slow; for tests).
  chunked    blockwise attention in plain JAX with an online softmax and a hand-written backward
             (the FlashAttention-2 recurrences): memory linear in the length, key blocks past
             the diagonal skipped. Runs anywhere.
  auto       splash on TPU (given a mesh in context, or one device), cudnn on GPU where it
             applies; elsewhere reference while the length fits in one block (`block_size`),
             chunked beyond.

The platform "auto" resolves for is that of the mesh set with `jax.set_mesh` or
`jax.sharding.use_abstract_mesh` (the trainer's steps set theirs), else JAX's default backend:
a program compiled on a CPU for TPU devices gets splash.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "splash", "chunked")

# Default block (queries and keys) of the chunked and splash paths: [block, block] float32 scores
# per head are 1 MiB, big enough to keep matrix units busy, small next to the activations.
DEFAULT_BLOCK_SIZE = 512


def causal_segment_mask(length: int, segment_ids: jax.Array | None) -> jax.Array:
  """Boolean [batch or 1, query, key]: key <= query, and the same segment when ids are given."""
  mask = jnp.tril(jnp.ones((length, length), bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention through explicit scores; mask [batch or 1, query, key] is boolean.

  Scores and softmax in float32; the probabilities are cast to q's dtype before they weigh v.
  Shapes as in `attend`.
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  dtype = q.dtype
  # Query head n uses key/value head n // group, as Hugging Face's repeat_kv does.
  q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None], logits * head_dim**-0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(batch, length, num_heads, head_dim).astype(dtype)


def platform() -> str:
  """ "cpu", "gpu" or "tpu": the platform of the mesh in context (`jax.set_mesh`,
  `jax.sharding.use_abstract_mesh`), else of JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  name = getattr(device, "platform", None) or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def resolve_implementation(
  implementation: str,
  *,
  dtype: jnp.dtype,
  head_dim: int,
  length: int,
  segmented: bool,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> str:
  """The implementation `attend` runs for `implementation` ("auto" resolved for `platform()`)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {implementation!r}: use {IMPLEMENTATIONS}.")
  if implementation != "auto":
    return implementation
  where = platform()
  if where == "tpu":
    # The compiler cannot partition a Pallas call: on several devices splash runs per shard
    # under shard_map over the mesh in context, and without one the chunked kernel (plain JAX,
    # which the compiler partitions) is the safe choice.
    mapped = not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1
    return "splash" if mapped else "chunked"
  if where == "gpu" and _cudnn_applies(dtype, head_dim, length, segmented):
    return "cudnn"
  # Up to one block the chunked kernel is a single block: it holds the same [length, length]
  # scores as the reference and saves nothing, while its online softmax rounds differently.
  # The reference is the computation the models always ran, so short rows (the compact model
  # of the embedded benchmarks trains on 128 tokens) keep their numbers bit for bit.
  return "reference" if length <= block_size else "chunked"


def _cudnn_applies(dtype: jnp.dtype, head_dim: int, length: int, segmented: bool) -> bool:
  """Whether cuDNN's flash kernel takes these shapes (its own checks, asked before it raises)."""
  try:
    from jax.extend.backend import get_backend

    if "cuda" not in get_backend().platform_version.lower():
      return False  # ROCm: no cuDNN.
    major, minor = (int(x) for x in jax.devices()[0].compute_capability.split(".")[:2])
  except (AttributeError, ValueError, RuntimeError):
    return False
  max_head_dim = 256 if (major, minor) >= (9, 0) else 128
  return (
    jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    and head_dim % 8 == 0
    and head_dim <= max_head_dim
    # With a bias (the segment mask) its backward kernel needs an even length.
    and (not segmented or length % 2 == 0)
  )


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
  block_size: int = DEFAULT_BLOCK_SIZE,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
  batch_axes: Sequence[str] = ("data", "fsdp"),
  head_axis: str | None = "tensor",
  interpret: bool | None = None,
) -> jax.Array:
  """Causal grouped-query attention of packed rows.

  Args:
    q: queries [batch, length, heads, head_dim], rotary positions already applied.
    k: keys [batch, length, kv_heads, head_dim]; kv_heads divides heads, and query head n reads
      key/value head n // (heads // kv_heads).
    v: values, shaped like k.
    segment_ids: optional int [batch, length]; a token attends only to earlier tokens (and itself)
      with the same id. None: plain causal attention.
    implementation: one of `IMPLEMENTATIONS` (see the module docstring).
    block_size: query and key block of "chunked" and "splash" (splash rounds the length up to a
      multiple of 128 and shrinks the block to it when shorter).
    mesh: "splash" only: the mesh q, k and v are sharded over, batch over `batch_axes` and heads
      over `head_axis` (`finch_jax.sharding.DEFAULT_RULES`; axes of type Auto, as
      `finch_jax.sharding.make_mesh` makes them); the kernel then runs per shard under
      `shard_map`. None: the mesh set with `jax.set_mesh`, if any; else one device (or the
      caller maps it). The other implementations are partitioned by the compiler and ignore it.
    batch_axes, head_axis: mesh axes of the batch and head dimensions; names the mesh lacks are
      skipped.
    interpret: "splash" only: run the kernel in Pallas interpret mode. None: off TPU only
      (`platform()`).

  Returns:
    [batch, length, heads, head_dim] in q's dtype.
  """
  _check_shapes(q, k, v, segment_ids)
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  _, length, _, head_dim = q.shape
  impl = resolve_implementation(
    implementation,
    dtype=q.dtype,
    head_dim=head_dim,
    length=length,
    segmented=segment_ids is not None,
    block_size=block_size,
  )
  if impl == "reference":
    return reference_attention(q, k, v, causal_segment_mask(length, segment_ids))
  if impl == "cudnn" and platform() != "gpu":
    raise ValueError(
      f"implementation='cudnn' needs an NVIDIA GPU, but this backend is {platform()!r}: use "
      "'auto' (or 'chunked')."
    )
  if impl in ("xla", "cudnn"):
    # is_causal lets cuDNN skip the blocks above the diagonal; only the segment test needs a mask
    # (boolean [batch, 1, query, key], one for all heads).
    same_segment = None
    if segment_ids is not None:
      same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
      q, k, v, mask=same_segment, scale=head_dim**-0.5, is_causal=True, implementation=impl
    )
  if impl == "chunked":
    return chunked_attention(q, k, v, segment_ids=segment_ids, block_size=block_size)
  return splash_attention(
    q,
    k,
    v,
    segment_ids=segment_ids,
    block_size=block_size,
    mesh=mesh,
    batch_axes=batch_axes,
    head_axis=head_axis,
    interpret=interpret,
  )


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(
      f"attend takes q [batch, length, heads, head_dim] and k, v [batch, length, kv_heads, "
      f"head_dim] of one shape; got q {q.shape}, k {k.shape}, v {v.shape}."
    )
  batch, length, heads, head_dim = q.shape
  if k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
    raise ValueError(
      f"k and v {k.shape} must share batch, length and head_dim with q {q.shape} (self-attention)."
    )
  if heads % k.shape[2]:
    raise ValueError(f"kv_heads ({k.shape[2]}) must divide the query heads ({heads}).")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
      f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them to the "
      "compute dtype first."
    )
  if segment_ids is not None and segment_ids.shape != (batch, length):
    raise ValueError(
      f"segment_ids must be [batch, length] = {(batch, length)}, got {segment_ids.shape}."
    )


# ----- chunked: blockwise online softmax ---------------------------------------------------------


def chunked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
  """`attend(..., implementation="chunked")`: memory O(length * block), not O(length ** 2).

  Queries go block by block; each loops over the key blocks up to its diagonal with a running
  maximum and normaliser (float32), and keeps only its output and log-sum-exp. The backward
  recomputes each block's probabilities from that log-sum-exp, one pass for dq and one for dk and
  dv. A length that `block_size` does not divide is padded at the end (the causal mask keeps the
  padding out of every real token's view) and cut off again.
  """
  _check_shapes(q, k, v, segment_ids)
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  block = min(block_size, length)
  padded = -(-length // block) * block
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, length), jnp.int32)
  pad = padded - length
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  q = q.reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
  out = _flash(q, k, v, segment_ids.astype(jnp.int32), head_dim**-0.5, block)
  return out.reshape(batch, padded, heads, head_dim)[:, :length]


def _slice(x: jax.Array, index: jax.Array, block: int) -> jax.Array:
  """Block `index` of axis 1."""
  return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=1)


def _block_scores(qi, kj, seg_q, seg_k, i, j, scale, block):
  """Scaled float32 scores [batch, kv_heads, group, block_q, block_k] and their boolean mask."""
  s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  q_pos = i * block + jnp.arange(block)
  k_pos = j * block + jnp.arange(block)
  mask = (q_pos[:, None] >= k_pos[None, :])[None] & (seg_q[:, :, None] == seg_k[:, None, :])
  return s, mask[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segment_ids, scale, block):
  """q [b, t, kv_heads, group, h], k, v [b, t, kv_heads, h] (t a multiple of block) -> like q."""
  return _flash_forward(q, k, v, segment_ids, scale, block)[0]


def _flash_forward(q, k, v, segment_ids, scale, block):
  batch, length, kv_heads, group, head_dim = q.shape
  num_blocks = length // block

  def query_block(i):
    qi, seg_q = _slice(q, i, block), _slice(segment_ids, i, block)

    def key_block(j, carry):
      m, norm, acc = carry
      s, mask = _block_scores(
        qi, _slice(k, j, block), seg_q, _slice(segment_ids, j, block), i, j, scale, block
      )
      m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
      # A row with nothing visible yet keeps m = -inf; shift by 0 there so no inf - inf appears.
      shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(mask, jnp.exp(s - shift[..., None]), 0.0)
      alpha = jnp.exp(m - shift)
      pv = jnp.einsum(
        "bkgqs,bskh->bkgqh",
        p.astype(v.dtype),
        _slice(v, j, block),
        preferred_element_type=jnp.float32,
      )
      return m_new, alpha * norm + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    stats = (batch, kv_heads, group, block)
    init = (
      jnp.full(stats, -jnp.inf, jnp.float32),
      jnp.zeros(stats, jnp.float32),
      jnp.zeros((*stats, head_dim), jnp.float32),
    )
    # Causal: key blocks past this query block's diagonal see nothing; skip them.
    m, norm, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    # Every token sees itself, so norm > 0 on every row (padding included).
    out = (acc / norm[..., None]).astype(q.dtype)
    return jnp.moveaxis(out, 3, 1), m + jnp.log(norm)  # [b, block, k, g, h], [b, k, g, block]

  out, lse = jax.lax.map(query_block, jnp.arange(num_blocks))
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kv_heads, group, length)
  return out, lse


def _flash_fwd(q, k, v, segment_ids, scale, block):
  out, lse = _flash_forward(q, k, v, segment_ids, scale, block)
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, block, residuals, dout):
  q, k, v, segment_ids, out, lse = residuals
  length = q.shape[1]
  num_blocks = length // block
  # D_i = sum_h dout * out: the softmax backward's row term, [b, k, g, t].
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def probs_and_dscores(i, j):
    """Probabilities and score gradients of block (i, j), both float32 [b, k, g, bq, bk]."""
    qi, doi = _slice(q, i, block), _slice(dout, i, block)
    kj, vj = _slice(k, j, block), _slice(v, j, block)
    s, mask = _block_scores(
      qi, kj, _slice(segment_ids, i, block), _slice(segment_ids, j, block), i, j, scale, block
    )
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)
    p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
    return p, p * (dp - delta_i[..., None]) * scale

  def dq_block(i):
    def step(j, dq):
      _, ds = probs_and_dscores(i, j)
      kj = _slice(k, j, block)
      return dq + jnp.einsum(
        "bkgqs,bskh->bqkgh", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32
      )

    zeros = jnp.zeros((q.shape[0], block, *q.shape[2:]), jnp.float32)
    return jax.lax.fori_loop(0, i + 1, step, zeros).astype(q.dtype)

  def dkv_block(j):
    def step(i, carry):
      dk, dv = carry
      p, ds = probs_and_dscores(i, j)
      qi, doi = _slice(q, i, block), _slice(dout, i, block)
      dv = dv + jnp.einsum(
        "bkgqs,bqkgh->bskh", p.astype(v.dtype), doi, preferred_element_type=jnp.float32
      )
      dk = dk + jnp.einsum(
        "bkgqs,bqkgh->bskh", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32
      )
      return dk, dv

    zeros = jnp.zeros((k.shape[0], block, *k.shape[2:]), jnp.float32)
    # Causal: query blocks before this key block's diagonal see none of it.
    dk, dv = jax.lax.fori_loop(j, num_blocks, step, (zeros, zeros))
    return dk.astype(k.dtype), dv.astype(v.dtype)

  dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(num_blocks)), 0, 1).reshape(q.shape)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(num_blocks))
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----- splash (TPU) -----------------------------------------------------------------------------


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
  batch_axes: Sequence[str] = ("data", "fsdp"),
  head_axis: str | None = "tensor",
  interpret: bool | None = None,
) -> jax.Array:
  """`attend(..., implementation="splash")`; arguments as there.

  The kernel takes one row, [heads, length, head_dim]; it is vmapped over the batch, and under
  `shard_map` over `mesh` each device runs it on its own rows and heads (a Pallas call cannot be
  partitioned by the compiler). The length is padded at the end to a multiple of the block, itself
  a multiple of 128 (TPU tiles); the causal mask keeps the padding out of every real token's view.
  """
  _check_shapes(q, k, v, segment_ids)
  if interpret is None:
    interpret = platform() != "tpu"
  _, length, _, head_dim = q.shape
  block = min(block_size, -(-length // 128) * 128)
  if block % 128:
    raise ValueError(f"splash needs block_size a multiple of 128, got {block_size}.")
  padded = -(-length // block) * block
  pad = padded - length
  # The kernel does not scale the scores: fold head_dim ** -0.5 into q (in float32, then back).
  q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))

  def run(q, k, v, segment_ids):
    kernel = _splash_kernel(q.shape[2], padded, block, bool(interpret))
    # [batch, length, heads, head_dim] -> per row [heads, length, head_dim].
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    if segment_ids is None:
      out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
    else:
      from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

      out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q, k, v, segment_ids
      )
    return jnp.swapaxes(out, 1, 2)

  if mesh is None:
    # A mesh set with `jax.set_mesh` (or `jax.sharding.use_mesh`) serves when none is passed.
    context = jax.sharding.get_abstract_mesh()
    mesh = None if context.empty or context.size == 1 else context
  if mesh is not None:
    present = [a for a in batch_axes if a in mesh.axis_names]
    batch_spec = tuple(present) if present else None
    head_spec = head_axis if head_axis in mesh.axis_names else None
    qkv = jax.sharding.PartitionSpec(batch_spec, None, head_spec, None)
    rows = jax.sharding.PartitionSpec(batch_spec, None)
    run = jax.shard_map(
      run,
      mesh=mesh,
      in_specs=(qkv, qkv, qkv, None if segment_ids is None else rows),
      out_specs=qkv,
      check_vma=False,
    )
  return run(q, k, v, segment_ids)[:, :length]


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
  """A splash MHA kernel for one row of `heads` query heads (kv heads grouped by the kernel)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


__all__ = [
  "DEFAULT_BLOCK_SIZE",
  "IMPLEMENTATIONS",
  "attend",
  "causal_segment_mask",
  "chunked_attention",
  "platform",
  "reference_attention",
  "resolve_implementation",
  "splash_attention",
]
