"""Every attention implementation against the einsum reference: values, gradients, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finch_jax import sharding as shd
from finch_jax.models import attention

B, T, HEADS, KV_HEADS, HEAD_DIM = 2, 200, 4, 2, 32
# Blocks that do not divide T = 200, so the padding of the blocked paths is exercised too.
BLOCK = {"chunked": 64, "splash": 128}


@pytest.fixture(scope="module")
def qkv():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, T, HEADS, HEAD_DIM))
  k = jax.random.normal(keys[1], (B, T, KV_HEADS, HEAD_DIM))
  v = jax.random.normal(keys[2], (B, T, KV_HEADS, HEAD_DIM))
  return q, k, v


def packed_segments():
  """Row 0: segments 1, 2, 3 then padding (0); row 1: one segment, then padding."""
  ids = np.zeros((B, T), np.int32)
  ids[0, :70], ids[0, 70:150], ids[0, 150:185] = 1, 2, 3
  ids[1, :190] = 1
  return jnp.asarray(ids)


def attend_and_grad(implementation, segment_ids, q, k, v):
  """The output, and the gradients of a sum that weighs every output coordinate differently."""

  def run(q, k, v):
    f = lambda q, k, v: attention.attend(
      q,
      k,
      v,
      segment_ids=segment_ids,
      implementation=implementation,
      block_size=BLOCK.get(implementation, attention.DEFAULT_BLOCK_SIZE),
    )
    out, vjp = jax.vjp(f, q, k, v)
    weights = jnp.cos(jnp.arange(HEAD_DIM) * 0.7).astype(out.dtype)
    return out, vjp(jnp.broadcast_to(weights, out.shape))

  # One compilation per case: the tests' time goes mostly to compiling.
  return jax.jit(run)(q, k, v)


_REFERENCE = {}


def reference(packed, qkv):
  """The float32 reference's output and gradients, computed once per segment layout."""
  if packed not in _REFERENCE:
    _REFERENCE[packed] = attend_and_grad("reference", packed_segments() if packed else None, *qkv)
  return _REFERENCE[packed]


def assert_close(actual, expected, rtol):
  """Within rtol of the largest entry of `expected`."""
  expected = np.asarray(expected, np.float32)
  atol = rtol * float(np.max(np.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("implementation", ["xla", "chunked", "splash"])
def test_float32_matches_reference(qkv, implementation, packed):
  segment_ids = packed_segments() if packed else None
  out, grads = attend_and_grad(implementation, segment_ids, *qkv)
  ref_out, ref_grads = reference(packed, qkv)
  assert out.shape == (B, T, HEADS, HEAD_DIM) and out.dtype == jnp.float32
  # Measured max deviations relative to the largest entry: <= 3.1e-7 (values), <= 8.8e-7
  # (gradients); xla's are 0 and 1.1e-7.
  assert_close(out, ref_out, rtol=1e-5)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    assert_close(grad, ref_grad, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla", "chunked", "splash"])
def test_bfloat16_near_float32_reference(qkv, implementation):
  segment_ids = packed_segments()
  bf16 = [x.astype(jnp.bfloat16) for x in qkv]
  out, grads = attend_and_grad(implementation, segment_ids, *bf16)
  ref_out, ref_grads = reference(True, qkv)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  # bfloat16 inputs carry 8 bits of mantissa (relative step 4e-3); measured: <= 4.7e-3 (values),
  # <= 8.1e-3 (gradients), relative to the largest entry. The bfloat16 reference is no closer.
  assert_close(out, ref_out, rtol=2e-2)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    assert_close(grad, ref_grad, rtol=2e-2)


def test_auto_follows_the_platform_of_the_mesh_in_context(monkeypatch):
  """A TPU mesh in context gets splash even on a CPU host (compiling for TPU devices);
  elsewhere short rows get the reference and long ones chunked."""
  resolve = functools.partial(
    attention.resolve_implementation, "auto", dtype=jnp.bfloat16, head_dim=128, segmented=True
  )
  tpu = jax.sharding.AbstractMesh(
    (2, 2),
    ("data", "tensor"),
    abstract_device=jax.sharding.AbstractDevice("TPU v5p", num_cores=None, platform="tpu"),
  )
  with jax.sharding.use_abstract_mesh(tpu):
    assert attention.platform() == "tpu"
    assert resolve(length=128) == resolve(length=4096) == "splash"
  if jax.default_backend() == "cpu":
    assert attention.platform() == "cpu"
    # One block or less: chunked would hold the same scores; the reference keeps the numbers.
    assert resolve(length=attention.DEFAULT_BLOCK_SIZE) == "reference"
    assert resolve(length=attention.DEFAULT_BLOCK_SIZE + 1) == "chunked"
    assert resolve(length=300, block_size=256) == "chunked"
  # A TPU backend with several devices and no mesh to map splash over: the chunked kernel.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.platform() == "tpu" and jax.device_count() > 1
  assert resolve(length=4096) == "chunked"


@pytest.mark.parametrize("mesh_from", ["argument", "context"])
def test_splash_under_shard_map(qkv, mesh_from):
  """Batch over `data`, heads (and kv heads) over `tensor`: the kernel runs per shard, with the
  mesh passed or set by `jax.set_mesh`."""
  mesh = shd.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  segment_ids = packed_segments()
  run = jax.jit(
    lambda q, k, v: attention.attend(
      q,
      k,
      v,
      segment_ids=segment_ids,
      implementation="splash",
      block_size=128,
      mesh=mesh if mesh_from == "argument" else None,
    )
  )
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor"))
  inputs = [jax.device_put(x, sharding) for x in qkv]
  if mesh_from == "context":
    with jax.set_mesh(mesh):
      out = run(*inputs)
  else:
    out = run(*inputs)
  assert out.sharding.spec == jax.sharding.PartitionSpec("data", None, "tensor")
  assert_close(out, reference(True, qkv)[0], rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_cudnn_matches_reference_on_a_gpu_and_names_the_need_elsewhere(qkv, packed):
  segment_ids = packed_segments() if packed else None
  bf16 = [x.astype(jnp.bfloat16) for x in qkv]
  if jax.default_backend() != "gpu":  # what a user without an NVIDIA GPU meets
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attend_and_grad("cudnn", segment_ids, *bf16)
    return
  out, grads = attend_and_grad("cudnn", segment_ids, *bf16)
  ref_out, ref_grads = reference(packed, qkv)
  assert_close(out, ref_out, rtol=2e-2)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    assert_close(grad, ref_grad, rtol=2e-2)


def test_auto_and_errors(qkv):
  q, k, v = qkv
  if jax.default_backend() == "cpu":
    assert (
      attention.resolve_implementation(
        "auto", dtype=jnp.bfloat16, head_dim=128, length=4096, segmented=True
      )
      == "chunked"
    )
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attention.attend(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="Unknown attention implementation"):
    attention.attend(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="must divide"):
    attention.attend(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ValueError, match="cast them"):
    attention.attend(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="segment_ids must be"):
    attention.attend(q, k, v, segment_ids=jnp.zeros((B, T + 1), jnp.int32))


def test_chunked_memory_is_linear_in_length():
  """Compiled temporaries at length 4096 (batch 1, 8 heads, 2 kv heads, head_dim 64, float32;
  the scores are 512 MiB): forward and backward; XLA's path holds the square, chunked does not."""
  spec = jax.ShapeDtypeStruct
  q, kv = spec((1, 4096, 8, 64), jnp.float32), spec((1, 4096, 2, 64), jnp.float32)
  segment_ids = spec((1, 4096), jnp.int32)
  scores = 8 * 4096 * 4096 * 4

  def temp_bytes(implementation):
    def f(q, k, v, s):
      return jnp.sum(attention.attend(q, k, v, segment_ids=s, implementation=implementation))

    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, segment_ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  sizes = {name: temp_bytes(name) for name in ("reference", "xla", "chunked")}
  # Measured on CPU (jax 0.10.2): reference 1552 MiB, xla 2058 MiB, chunked 43 MiB.
  assert sizes["reference"] >= scores and sizes["xla"] >= scores, sizes
  assert sizes["chunked"] < scores / 8, sizes
