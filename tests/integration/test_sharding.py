"""Tests for meshes, logical-axis rules, sharded model creation and multi-process start."""

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from finch_jax import sharding
from finch_jax.models import Llama, LlamaConfig

CONFIG = LlamaConfig.tiny(num_layers=2)


def factory(config=CONFIG):
  return lambda: Llama(config, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens):
  return model(tokens)


@pytest.fixture(scope="module")
def reference_model():
  return factory()()


@pytest.mark.parametrize("data, fsdp, tensor", [(2, 2, 2), (4, 2, 1)])
def test_sharded_model_layout_and_forward(data, fsdp, tensor, reference_model):
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  model = sharding.create_sharded_model(factory(), mesh)
  attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
  expected = {
    "embed": (model.embed, P("tensor", "fsdp")),
    "q_proj": (attn.q_proj, P("fsdp", "tensor", None)),
    "k_proj": (attn.k_proj, P("fsdp", "tensor", None)),
    "o_proj": (attn.o_proj, P("tensor", None, "fsdp")),
    "gate_proj": (mlp.gate_proj, P("fsdp", "tensor")),
    "down_proj": (mlp.down_proj, P("tensor", "fsdp")),
    "norm": (model.final_norm.scale, P(None)),
  }
  for name, (param, spec) in expected.items():
    assert param[...].sharding.spec == spec, name
  # Each device holds only its shard: [vocab / tensor, embed / fsdp].
  shard = model.embed[...].addressable_shards[0].data
  assert shard.shape == (CONFIG.vocab_size // tensor, CONFIG.d_model // fsdp)

  # Same parameters as building on one device, and the same logits on a sharded batch.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
    nnx.state(model),
    nnx.state(reference_model),
  )
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 32), dtype=np.int32)
  batch = sharding.make_global_batch({"tokens": tokens}, mesh)["tokens"]
  assert batch.sharding == sharding.batch_sharding(mesh)
  np.testing.assert_allclose(forward(model, batch), forward(reference_model, tokens), atol=1e-5)


def test_untied_head_and_optimizer_state_follow_the_parameters():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = sharding.create_sharded_model(
    factory(dataclasses.replace(CONFIG, tie_embeddings=False)), mesh
  )
  assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")

  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  assert sharding.shard_state(optimizer, mesh) is optimizer
  adam = optimizer.opt_state[0]
  assert adam.mu["lm_head"][...].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["blocks"][1]["attn"]["o_proj"][...].sharding.spec == P("tensor", None, "fsdp")
  for scalar in (adam.count, optimizer.step):
    assert scalar[...].sharding == jax.NamedSharding(mesh, P())

  abstract = nnx.eval_shape(lambda: nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param))
  shardings = sharding.param_shardings(abstract, mesh)
  assert shardings["opt_state"][0]["mu"]["embed"].get_value().spec == P("tensor", "fsdp")
  assert shardings["step"].get_value().spec == P()


def test_make_mesh():
  mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh(fsdp=-1, data=1).shape)["fsdp"] == 8
  assert sharding.make_mesh(data=2, devices=jax.devices()[:2]).size == 2


@pytest.mark.parametrize(
  "sizes, message",
  [
    (
      dict(data=3),
      "mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, found 8: set --config.mesh.data=8 or -1",
    ),
    (dict(data=2, fsdp=3), "needs 6 devices, found 8: choose sizes whose product is 8"),
    (dict(data=-1, fsdp=3), "8 devices do not divide by 3"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
    (dict(data=0), "sizes must be positive"),
  ],
)
def test_make_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(**sizes)


def test_logical_to_mesh():
  assert sharding.logical_to_mesh(("batch", "length")) == P(("data", "fsdp"), None)
  assert sharding.logical_to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(("heads", "head_dim", None)) == P("tensor", None, None)
  assert sharding.logical_to_mesh(("norm",)) == P(None)
  # A mesh axis splits an array once; a later axis mapped to it stays whole.
  rules = (("embed", "fsdp"), ("mlp", ("fsdp", "tensor")))
  assert sharding.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # The first rule for a name wins.
  rules = (("embed", None),) + sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh(("embed",), rules) == P(None)
  with pytest.raises(ValueError, match="No sharding rule for logical axis 'experts'"):
    sharding.logical_to_mesh(("experts", "embed"))


def test_make_global_batch():
  mesh = sharding.make_mesh(data=4, fsdp=2)
  local = {"tokens": np.arange(48, dtype=np.int32).reshape(8, 6), "weights": np.ones(8, np.float32)}
  batch = sharding.make_global_batch(local, mesh)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert batch["weights"].sharding.spec == P(("data", "fsdp"))
  assert batch["tokens"].addressable_shards[0].data.shape == (1, 6)
  for name, array in local.items():
    np.testing.assert_array_equal(batch[name], array)


CLUSTER_VARIABLES = (
  "JAX_COORDINATOR_ADDRESS",
  "SLURM_JOB_ID",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "OMPI_MCA_orte_hnp_uri",
  "KUBERNETES_SERVICE_HOST",
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
)


def test_initialize_distributed_single_process(monkeypatch):
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
  "flags",
  [
    dict(coordinator_address="127.0.0.1:1234"),
    dict(coordinator_address="127.0.0.1:1234", num_processes=2),
    dict(process_id=0),
  ],
)
def test_initialize_distributed_partial_flags(flags):
  with pytest.raises(ValueError, match="pass all three, or none"):
    sharding.initialize_distributed(**flags)


_WORKER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from finch_jax import sharding
    assert sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = sharding.make_mesh(data=-1)
    rows = np.arange(4, dtype=np.float32).reshape(2, 2) + 4 * jax.process_index()
    batch = sharding.make_global_batch({"x": rows}, mesh)["x"]
    assert batch.shape == (4, 2)
    print("TOTAL", float(jax.jit(jnp.sum)(batch)))
""")


@pytest.mark.slow
def test_two_processes_feed_one_global_batch():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workers = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, address, str(process_id)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process_id in range(2)
  ]
  outputs = [worker.communicate(timeout=120)[0] for worker in workers]
  for worker, output in zip(workers, outputs, strict=True):
    assert worker.returncode == 0, output
    # Rows 0..3 from process 0 and 4..7 from process 1: the sum needs both.
    assert "TOTAL 28.0" in output, output
