"""Every shipped config loads, names num_train_steps, and describes a model that builds."""

import importlib
import pathlib

import jax
import pytest
from flax import nnx

from finch_jax import configure, models

CONFIGS = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[2] / "configs").glob("*.py")
  if p.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.num_train_steps > 0
  assert config.mode in ("pretrain", "finetune", "compare")
  model = configure.model_config(config)  # a pretrained base brings its own architecture
  abstract = nnx.eval_shape(lambda: models.build(model, nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  assert count == model.num_params()
  assert config.data.max_prompt_len + config.data.answer_len <= model.max_len


def test_large_config_is_about_one_billion_parameters():
  config = importlib.import_module("configs.large_pod").get_config()
  assert 0.9e9 < models.config_from_dict(config.model).num_params() < 1.1e9
