"""LoRA runs as a user meets them: a resumed run ends as an uninterrupted one, and the exported
model carries the adapters merged in."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finch_jax import configure, run
from finch_jax.models import hf
from tests.integration.test_trainer import small_config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _lora_config(**changes):
  return small_config(**{"lora.rank": 4, "lora.alpha": 8.0, "eval_every": 0, **changes})


def test_lora_resume_matches_an_uninterrupted_run_exactly(tmp_path):
  config = _lora_config()
  base = configure.make_trainer(small_config()).init_params(0)
  straight = run.run_training(config, str(tmp_path / "straight"), init_params=base, progress=False)
  resumed_dir = str(tmp_path / "resumed")
  config.num_train_steps = 3
  run.run_training(config, resumed_dir, init_params=base, progress=False)
  config.num_train_steps = 6
  resumed = run.run_training(config, resumed_dir, init_params=base, progress=False)
  assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[-1], resumed.state.params))) >= {4}
  want, got = jax.device_get((straight.state.params, resumed.state.params))
  jax.tree.map(np.testing.assert_array_equal, want, got)
  assert _losses(resumed_dir) == _losses(tmp_path / "straight")


def test_export_merges_the_adapters(tmp_path):
  config = _lora_config(num_train_steps=4, **{"optimizer.learning_rate": 3e-2})
  trainer = configure.make_trainer(config)
  base = configure.make_trainer(small_config()).init_params(0)
  result = run.run_training(
    config, str(tmp_path / "run"), trainer=trainer, init_params=base, progress=False
  )
  # What `run.finetune` exports: the model with its adapters merged in.
  merged = nnx.merge(trainer.graphdef, trainer.full_params(result.state.params))
  hf.save_hf(merged, str(tmp_path / "hf"))
  loaded, _ = hf.load_hf(str(tmp_path / "hf"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 16)), jnp.int32)
  exported = np.asarray(loaded(tokens))
  np.testing.assert_allclose(exported, np.asarray(merged(tokens)), rtol=1e-5, atol=1e-5)
  base_logits = np.asarray(nnx.merge(trainer.graphdef, base)(tokens))
  assert np.abs(exported - base_logits).max() > 1e-3  # the adapters changed the model
