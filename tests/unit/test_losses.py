"""Losses from hidden states: chunked equals plain; the chunked backward never holds the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finch_jax import losses
from finch_jax import sharding as shd

B, T, D, V = 2, 100, 16, 96


def reference_cross_entropy(logits, targets, weights):
  """The trainer's whole-logits loss."""
  token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(token * weights), jnp.sum(weights)


def reference_kl_to_base(logits, base_logits, weights):
  """The replay remedy's KL(base || model) on whole logits."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(base_logits).astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  weights = weights.astype(jnp.float32)
  return jnp.sum(kl * weights), jnp.sum(weights)


@pytest.fixture(scope="module")
def data():
  keys = jax.random.split(jax.random.key(0), 6)
  return dict(
    hidden=jax.random.normal(keys[0], (B, T, D)),
    head=0.5 * jax.random.normal(keys[1], (D, V)),
    base_hidden=jax.random.normal(keys[2], (B, T, D)),
    base_head=0.5 * jax.random.normal(keys[3], (D, V)),
    targets=jax.random.randint(keys[4], (B, T), 0, V),
    weights=(jax.random.uniform(keys[5], (B, T)) > 0.3).astype(jnp.float32),
  )


def assert_close(actual, expected, rtol=1e-6):
  """Elementwise within rtol, and within rtol of the largest entry (for entries near zero)."""
  expected = np.asarray(expected)
  atol = rtol * float(np.max(np.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


# 7 leaves a remainder of 100 tokens; 1000 is longer than the rows (one chunk).
@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_cross_entropy_matches_whole_logits(data, chunk_size):
  d = data

  def chunked(hidden, head):
    return losses.cross_entropy_sums(
      hidden, head, d["targets"], d["weights"], chunk_size=chunk_size
    )[0]

  def reference(hidden, head):
    logits = losses.logits_from_hidden(hidden, head)
    return reference_cross_entropy(logits, d["targets"], d["weights"])[0]

  value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(d["hidden"], d["head"])
  ref_value, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(
    d["hidden"], d["head"]
  )
  assert_close(value, ref_value)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("chunk_size", [None, 32])
def test_kl_to_base_matches_whole_logits(data, chunk_size):
  d = data
  args = (d["hidden"], d["head"], d["base_hidden"], d["base_head"])

  def chunked(*args):
    return losses.kl_to_base_sums(*args, d["weights"], chunk_size=chunk_size)[0]

  def reference(hidden, head, base_hidden, base_head):
    logits = losses.logits_from_hidden(hidden, head)
    base_logits = losses.logits_from_hidden(base_hidden, base_head)
    return reference_kl_to_base(logits, base_logits, d["weights"])[0]

  value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(*args)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3)))(*args)
  assert_close(value, ref_value)
  assert_close(grads[0], ref_grads[0])
  assert_close(grads[1], ref_grads[1])
  # No gradient reaches the base model.
  assert not np.any(grads[2]) and not np.any(grads[3])


def test_cross_entropy_and_kl_equals_the_two_losses(data):
  d = data
  replay = d["weights"] * (jnp.arange(T) % 3 == 0)
  ce_weights = d["weights"] - replay
  ce, ce_w, kl, kl_w = losses.cross_entropy_and_kl_sums(
    d["hidden"],
    d["head"],
    d["targets"],
    ce_weights,
    d["base_hidden"],
    d["base_head"],
    replay,
    chunk_size=32,
  )
  ref_ce, ref_ce_w = losses.cross_entropy_sums(
    d["hidden"], d["head"], d["targets"], ce_weights, chunk_size=None
  )
  ref_kl, ref_kl_w = losses.kl_to_base_sums(
    d["hidden"], d["head"], d["base_hidden"], d["base_head"], replay, chunk_size=None
  )
  assert_close(ce, ref_ce)
  assert_close(kl, ref_kl)
  assert float(ce_w) == float(ref_ce_w) and float(kl_w) == float(ref_kl_w)


def test_chunked_and_whole_agree_in_bfloat16(data):
  d = data
  hidden = d["hidden"].astype(jnp.bfloat16)
  args = (hidden, d["head"], d["targets"], d["weights"])
  plain = losses.cross_entropy_sums(*args, chunk_size=None)
  chunked = losses.cross_entropy_sums(*args, chunk_size=16)
  # Same bfloat16 products with float32 accumulation per token; only summation order differs.
  assert_close(chunked[0], plain[0], rtol=1e-5)
  kl_args = (hidden, d["head"], d["base_hidden"].astype(jnp.bfloat16), d["base_head"])
  assert_close(
    losses.kl_to_base_sums(*kl_args, d["weights"], chunk_size=16)[0],
    losses.kl_to_base_sums(*kl_args, d["weights"], chunk_size=None)[0],
    rtol=1e-5,
  )


def test_sharded_batch_and_logits(data):
  """Under a data x tensor mesh, with the logits laid out like the trainer's, nothing changes."""
  d = data
  mesh = shd.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  logits_sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec("data", None, "tensor")
  )

  @jax.jit
  def run(hidden, targets, weights):
    return losses.cross_entropy_sums(
      hidden, d["head"], targets, weights, chunk_size=32, logits_sharding=logits_sharding
    )

  sharded = [jax.device_put(d[k], rows) for k in ("hidden", "targets", "weights")]
  value, _ = run(*sharded)
  whole = losses.cross_entropy_sums(
    d["hidden"], d["head"], d["targets"], d["weights"], chunk_size=None
  )
  assert_close(value, whole[0])


def test_bad_arguments_name_the_fix(data):
  d = data
  with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
    losses.cross_entropy_sums(d["hidden"], d["head"], d["targets"], d["weights"], chunk_size=0)
  with pytest.raises(ValueError, match=r"goes in as \.T"):
    losses.cross_entropy_sums(d["hidden"], d["head"].T, d["targets"], d["weights"])
  with pytest.raises(ValueError, match="weights must be"):
    losses.cross_entropy_sums(d["hidden"], d["head"], d["targets"], d["weights"][:, :5])
  with pytest.raises(ValueError, match="same"):
    losses.kl_to_base_sums(
      d["hidden"], d["head"], d["base_hidden"][:1], d["base_head"], d["weights"]
    )


def test_chunked_backward_never_holds_the_logits():
  """Compiled temporaries of value_and_grad: whole logits vs 64-token chunks (b=2, t=1024,
  d=64, vocab=32768; the float32 logits are 256 MiB)."""
  b, t, d, vocab = 2, 1024, 64, 32768
  spec = jax.ShapeDtypeStruct
  args = (
    spec((b, t, d), jnp.float32),
    spec((d, vocab), jnp.float32),
    spec((b, t), jnp.int32),
    spec((b, t), jnp.float32),
  )
  logits_bytes = b * t * vocab * 4

  def temp_bytes(chunk_size):
    loss = lambda h, w, tg, wt: losses.cross_entropy_sums(h, w, tg, wt, chunk_size=chunk_size)[0]
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, chunked = temp_bytes(None), temp_bytes(64)
  # Measured on CPU (jax 0.10.2): plain 512 MiB (logits and their gradient), chunked 41 MiB.
  assert plain >= logits_bytes
  assert chunked < logits_bytes / 4, (plain, chunked)
