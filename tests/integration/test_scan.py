"""Scanned layers (`LlamaConfig.scan_layers`): the same model, its blocks stacked and scanned.

A scanned model starts from the unscanned model's weights (stacked), computes the same logits and
gradients, loads and saves Hugging Face checkpoints tensor for tensor as the unscanned one does,
and takes LoRA adapters with a leading layer axis whose merge is the unscanned merge, stacked.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors import safe_open

from configs import default
from finch_jax import configure, lora
from finch_jax import sharding as shd
from finch_jax.models import Llama, LlamaConfig, hf, load_hf, save_hf

# Qwen3 with biases and an untied head: every kind of parameter the Hugging Face layout maps.
CONFIG = LlamaConfig(
  vocab_size=128,
  d_model=64,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=24,
  d_ff=96,
  model_type="qwen3",
  attention_bias=True,
  max_len=64,
)
SCANNED = CONFIG.replace(scan_layers=True)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 24)))
SEGMENTS = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])


@nnx.jit
def forward(model, tokens, segment_ids=None):
  return model(tokens, segment_ids=segment_ids)


def stack_blocks(state):
  """An unscanned model's pure parameter state in the scanned layout: blocks stacked."""
  state = dict(nnx.to_pure_dict(state))
  blocks = [state["blocks"][i] for i in range(len(state["blocks"]))]
  return {**state, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def models():
  """(unscanned, scanned) models from one seed."""
  return Llama(CONFIG, rngs=nnx.Rngs(0)), Llama(SCANNED, rngs=nnx.Rngs(0))


def test_scanned_model_stacks_the_unscanned_weights_and_computes_the_same(models):
  plain, scanned = models
  q_proj = scanned.blocks.attn.q_proj
  assert q_proj[...].shape == (3, 64, 4, 24)
  assert q_proj.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  expected = stack_blocks(nnx.state(plain, nnx.Param))
  actual = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  assert flat(actual).keys() == flat(expected).keys()
  for key, value in flat(expected).items():
    np.testing.assert_array_equal(flat(actual)[key], value, err_msg=key)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(scanned, nnx.Param)))
  assert n == SCANNED.num_params() == CONFIG.num_params()
  for segment_ids in (None, SEGMENTS):
    # The same arithmetic, one block at a time: measured bit-identical on CPU.
    np.testing.assert_allclose(
      forward(scanned, TOKENS, segment_ids), forward(plain, TOKENS, segment_ids), atol=1e-6
    )


# The policy that saves nothing and one that saves the projections (the others are JAX's too;
# tests/unit/test_model.py checks each name is taken).
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_scanned_gradients_under_remat_policies(models, policy):
  plain, _ = models
  scanned = Llama(SCANNED.replace(remat=True, remat_policy=policy), rngs=nnx.Rngs(0))

  @nnx.jit
  def grads(model):
    return nnx.grad(lambda m: jnp.mean(m(TOKENS, segment_ids=SEGMENTS) ** 2))(model)

  expected = stack_blocks(nnx.state(grads(plain)))
  actual = nnx.to_pure_dict(nnx.state(grads(scanned)))
  for key, value in flat(expected).items():
    scale = float(np.abs(value).max()) or 1.0
    np.testing.assert_allclose(flat(actual)[key], value, atol=1e-5 * scale, rtol=0, err_msg=key)


def test_a_policy_remat_does_not_take_names_the_valid_ones():
  with pytest.raises(ValueError, match="dots_with_no_batch_dims_saveable"):
    CONFIG.replace(remat=True, remat_policy="save_only_these_names")
  with pytest.raises(ValueError, match="supported: .*'splash'"):
    CONFIG.replace(attention="flash")


def test_the_layer_axis_is_replicated_and_the_rest_sharded_as_before():
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  model = shd.create_sharded_model(lambda: Llama(SCANNED, rngs=nnx.Rngs(0)), mesh)
  spec = PartitionSpec(None, "fsdp", "tensor", None)
  assert model.blocks.attn.q_proj[...].sharding.spec == spec
  assert model.blocks.mlp.down_proj[...].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
  assert model.blocks.attn_norm.scale[...].sharding.is_fully_replicated
  assert shd.logical_to_mesh(("layers", "embed", "mlp")) == PartitionSpec(None, "fsdp", "tensor")


# ----- Hugging Face and LoRA -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, models):
  """An unscanned model saved as a Hugging Face checkpoint."""
  path = str(tmp_path_factory.mktemp("hf"))
  save_hf(models[0], path)
  return path


def test_scanned_load_gives_the_unscanned_logits(checkpoint, models):
  plain, _ = models
  scanned, _ = load_hf(checkpoint, scan_layers=True)
  assert scanned.config.scan_layers and scanned.blocks.mlp.up_proj[...].shape == (3, 64, 96)
  np.testing.assert_array_equal(
    forward(scanned, TOKENS, SEGMENTS), forward(load_hf(checkpoint)[0], TOKENS, SEGMENTS)
  )
  np.testing.assert_allclose(forward(scanned, TOKENS), forward(plain, TOKENS), atol=1e-6)
  # On a mesh each device reads its own block of every layer.
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded, _ = load_hf(checkpoint, mesh=mesh, scan_layers=True)
  q_proj = sharded.blocks.attn.q_proj[...]
  assert {shard.data.shape for shard in q_proj.addressable_shards} == {(3, 32, 2, 24)}
  np.testing.assert_array_equal(np.asarray(q_proj), np.asarray(scanned.blocks.attn.q_proj[...]))
  with pytest.raises(ValueError, match="cannot be set when loading"):
    load_hf(checkpoint, d_model=32)


def test_save_hf_of_a_scanned_model_round_trips(tmp_path, checkpoint, models):
  _, scanned = models
  save_hf(scanned, str(tmp_path))
  # The same file as the unscanned model's: one tensor per layer, torch's names and layout.
  with safe_open(f"{tmp_path}/model.safetensors", "numpy") as new:
    with safe_open(f"{checkpoint}/model.safetensors", "numpy") as old:
      assert set(new.keys()) == set(old.keys())
      for name in old.keys():
        np.testing.assert_array_equal(new.get_tensor(name), old.get_tensor(name), err_msg=name)
  loaded, _ = load_hf(str(tmp_path), scan_layers=True)
  for key, value in flat(nnx.state(scanned, nnx.Param)).items():
    np.testing.assert_array_equal(flat(nnx.state(loaded, nnx.Param))[key], value, err_msg=key)


def test_lora_on_stacked_kernels_merges_as_the_unscanned_model(models):
  plain, scanned = models
  config = lora.LoraConfig(rank=4, alpha=8.0)
  base = nnx.as_pure(nnx.state(plain))
  stacked_base = nnx.as_pure(nnx.state(scanned))
  adapters = lora.init_lora(nnx.state(scanned), config, jax.random.key(0))
  q = adapters["blocks"]["attn"]["q_proj"]
  assert q["a"].shape == (3, 64, 4) and q["b"].shape == (3, 4, 4, 24)
  assert q["a"].get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert q["b"].get_metadata()["out_sharding"] == ("layers", None, "heads", "head_dim")
  assert lora.num_params(adapters) == lora.expected_num_params(CONFIG, config)
  # Trained-looking adapters (B is zero at init): the same per layer in both layouts.
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(
    lambda x: rng.normal(size=x.shape).astype(np.float32), nnx.to_pure_dict(adapters)
  )
  per_layer = {
    "blocks": {i: jax.tree.map(lambda x, i=i: x[i], adapters["blocks"]) for i in range(3)}
  }
  merge = jax.jit(lora.merge, static_argnums=2)
  merged_plain = merge(base, per_layer, config)
  merged_scanned = merge(stacked_base, adapters, config)
  for key, value in flat(stack_blocks(merged_plain)).items():
    np.testing.assert_array_equal(flat(nnx.to_pure_dict(merged_scanned))[key], value, err_msg=key)
  deltas, stacked_deltas = (
    lora.delta_matrices(per_layer, config),
    lora.delta_matrices(adapters, config),
  )
  assert deltas.keys() == stacked_deltas.keys()
  for key, value in deltas.items():
    np.testing.assert_array_equal(stacked_deltas[key], value, err_msg=key)
  # Sharded: the layer axis keeps the kernel's (replicated) spec on A and B.
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = nnx.as_pure(shd.param_shardings(nnx.state(scanned), mesh))
  placed = lora.lora_shardings(adapters, shardings)
  assert placed["blocks"]["attn"]["q_proj"]["a"].spec == PartitionSpec(None, "fsdp", None)
  assert placed["blocks"]["attn"]["q_proj"]["b"].spec == PartitionSpec(None, None, "tensor", None)


def test_a_scanned_lora_run_trains_and_pretrained_configs_carry_the_options(checkpoint):
  config = default.get_config()
  config.mode = "finetune"
  config.base_checkpoint = checkpoint
  config.model = dict(scan_layers=True, remat=True, remat_policy="dots_saveable")
  config.lora.rank = 4
  config.mesh.data = 1
  config.data.seq_len = 24
  model_config = configure.model_config(config)
  assert (model_config.scan_layers, model_config.remat, model_config.remat_policy) == (
    True,
    True,
    "dots_saveable",
  )
  with open(f"{checkpoint}/config.json") as f:
    architecture = hf.config_from_hf(json.load(f))
  assert model_config == dataclasses.replace(
    architecture, scan_layers=True, remat=True, remat_policy="dots_saveable"
  )
  mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
  trainer = configure.make_trainer(config, mesh)
  base, _ = load_hf(checkpoint, scan_layers=True)
  state = trainer.create_state(nnx.as_pure(nnx.state(base)), learning_rate=1e-2)
  batch = trainer.global_batch(
    {
      "inputs": np.asarray(TOKENS),
      "targets": np.roll(np.asarray(TOKENS), -1, axis=1),
      "segment_ids": np.asarray(SEGMENTS),
      "positions": np.asarray(jnp.broadcast_to(jnp.arange(24), (2, 24))),
      "weights": np.ones((2, 24), np.float32),
    }
  )
  losses = []
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  assert state.params["blocks"]["mlp"]["up_proj"]["a"].shape == (3, 64, 4)
