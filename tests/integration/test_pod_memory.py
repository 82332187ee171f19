"""benchmarks/pod_memory.py and the pod configs: compiled per-device memory, validation for the pod.

The full Qwen3-4B compiles take minutes (their output is in docs/pod.md); here a tiny Llama on
the 8 CPU devices of tests/conftest.py checks what the script's numbers rest on: the compiled
program's per-device arguments are the parameter and optimizer shards its shardings promise.
"""

import dataclasses
import importlib
import json
import math
import pathlib

import jax
import pytest

from benchmarks import pod_memory
from configs import default
from finch_jax import configure, models, sharding
from finch_jax.models import hf
from finch_jax.validate import ConfigError, validate

ROOT = pathlib.Path(__file__).parents[2]
POD_CONFIGS = ("qwen3_4b_tpu_v5p", "qwen3_4b_gpu8")

TINY_LLAMA = dict(
  family="llama",
  model_type="qwen3",
  vocab_size=256,
  d_model=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  d_ff=256,
  tie_embeddings=True,
  max_len=64,
)

# Qwen/Qwen3-4B's config.json (the fields the architecture depends on).
QWEN3_4B_HF = {
  "architectures": ["Qwen3ForCausalLM"],
  "model_type": "qwen3",
  "vocab_size": 151936,
  "hidden_size": 2560,
  "intermediate_size": 9728,
  "num_hidden_layers": 36,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "head_dim": 128,
  "hidden_act": "silu",
  "max_position_embeddings": 40960,
  "rms_norm_eps": 1e-6,
  "rope_theta": 1000000,
  "rope_scaling": None,
  "attention_bias": False,
  "tie_word_embeddings": True,
  "use_sliding_window": False,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
}


def tiny_config(data: int, fsdp: int):
  config = default.get_config()
  config.model = TINY_LLAMA
  config.data.seq_len = 32
  config.data.batch_size = 16
  config.grad_accum_steps = 2
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, 1
  return config


def replicated_state_bytes(config) -> int:
  """Bytes of parameters and optimizer state that every device holds whole (norm scales,
  scalars: Adam's count, the learning rate, FINCH's statistics)."""
  mesh = sharding.make_mesh(**config.mesh.to_dict(), devices=jax.devices()[:8])
  state = configure.make_trainer(config, mesh).abstract_state()
  leaves = jax.tree.leaves((state.params, state.opt_state))
  return sum(
    math.prod(x.shape) * x.dtype.itemsize for x in leaves if x.sharding.is_fully_replicated
  )


@pytest.fixture(scope="module")
def fsdp8():
  return pod_memory.compiled_memory(tiny_config(data=1, fsdp=8), 8)


@pytest.fixture(scope="module")
def fsdp1():
  return pod_memory.compiled_memory(tiny_config(data=8, fsdp=1), 8)


def test_arguments_are_the_promised_shards(fsdp8, fsdp1):
  # XLA's argument bytes of the per-device program are exactly the shards of the parameters,
  # the optimizer state, the batch and the two counters: nothing is silently replicated.
  for result in (fsdp8, fsdp1):
    expected = (
      result["expected_params"]
      + result["expected_opt_state"]
      + result["expected_batch"]
      + result["expected_scalars"]
    )
    assert result["argument"] == expected
    assert result["platform"] == "cpu" and result["devices"] == 8


def test_fsdp_splits_params_and_adam_state_eight_ways(fsdp8, fsdp1):
  state8 = fsdp8["expected_params"] + fsdp8["expected_opt_state"]
  state1 = fsdp1["expected_params"] + fsdp1["expected_opt_state"]
  whole = fsdp8["state_unsharded"]
  assert state1 == whole  # data parallel: every device holds everything
  # The tolerance is what stays whole on every device: norm scales and scalars. Each device
  # holds 1/8 of the rest, so state8 lies in [whole / 8, whole / 8 + replicated].
  replicated = replicated_state_bytes(tiny_config(data=1, fsdp=8))
  assert replicated < 0.02 * whole  # small enough that "about 1/8" means something
  assert whole / 8 <= state8 <= whole / 8 + replicated
  # Measured on the compiled programs too: the batch shard is the same in both meshes.
  args8 = fsdp8["argument"] - fsdp8["expected_batch"]
  args1 = fsdp1["argument"] - fsdp1["expected_batch"]
  assert 1 / 8 <= args8 / args1 <= 1 / 8 + replicated / whole


def test_scanned_layers_chunked_loss_and_attention_hold_the_same_shards(fsdp8):
  """Stacked blocks (the layer axis whole, the rest sharded as before), the chunked loss and
  the attention kernels change what a step computes in, not what each device holds."""
  config = tiny_config(data=1, fsdp=8)
  config.model = {**TINY_LLAMA, "scan_layers": True, "remat": True, "attention": "chunked"}
  config.loss_chunk_size = 12
  scanned = pod_memory.compiled_memory(config, 8)
  assert scanned["argument"] == fsdp8["argument"]
  assert scanned["expected_params"] == fsdp8["expected_params"]


def test_the_new_state_is_written_over_the_donated_one(fsdp8):
  assert fsdp8["alias"] >= fsdp8["expected_params"] + fsdp8["expected_opt_state"]


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_config_is_valid_on_its_target_but_for_the_base_checkpoint(name, tmp_path):
  """Every check of `validate` passes for the target's devices and processes, except the one
  only the user can satisfy: the base model, a Hugging Face directory of Qwen3-4B.

  Pointing base_checkpoint at a tiny export made with `save_hf` would make validate pass, but
  validate checks such a directory's format, not that its architecture is the config's, so the
  pass would certify nothing about Qwen3-4B. The honest check is that the missing checkpoint is
  the only problem. The data paths are examples, so they are pointed at files made here.
  """
  module = importlib.import_module(f"configs.{name}")
  target = module.TARGET
  config = module.get_config()
  assert config.base_checkpoint == ""
  pair = json.dumps({"prompt": "What is 2 + 2?", "response": "4."})
  (tmp_path / "train.jsonl").write_text(pair + "\n")
  (tmp_path / "eval.jsonl").write_text(pair + "\n")
  (tmp_path / "retain").mkdir()  # the command line's example: local text as the retain set
  (tmp_path / "retain" / "a.txt").write_text("Some text the model should keep.\n\nMore text.\n")
  config.data.train.name = f"jsonl:{tmp_path / 'train.jsonl'}"
  config.data.eval_sets.task.name = f"jsonl:{tmp_path / 'eval.jsonl'}"
  config.data.eval_sets.retain.name = f"local_text:{tmp_path / 'retain'}"
  config.data.eval_sets.retain.split = "validation"
  with pytest.raises(ConfigError) as error:
    validate(config, device_count=target["devices"], process_count=target["processes"])
  assert len(error.value.problems) == 1, error.value.problems
  assert error.value.problems[0].startswith("base_checkpoint='': fine-tuning needs a base model")


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_config_fails_on_a_machine_it_was_not_written_for(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  with pytest.raises(ConfigError, match="mesh"):
    validate(config, device_count=6, process_count=1)  # tensor=4 does not divide 6 devices


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_config_describes_qwen3_4b(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  ours = models.config_from_dict(config.model)
  theirs = hf.config_from_hf(QWEN3_4B_HF, dtype="bfloat16", param_dtype="float32")
  assert dataclasses.replace(ours, remat=False, scan_layers=False) == theirs
  assert ours.remat and ours.num_params() == 4_022_468_096
  # What keeps the step within memory and its compile short (docs/pod.md, "Memory per device").
  assert ours.scan_layers and ours.attention == "auto" and config.loss_chunk_size == 512
  assert config.mode == "finetune" and config.finch.enabled


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_the_script_reads_the_target_without_importing_the_config(name):
  path = ROOT / "configs" / f"{name}.py"
  assert pod_memory.read_target(str(path)) == importlib.import_module(f"configs.{name}").TARGET
