"""The model-FLOPs count of benchmarks/mfu.py, checked against the model's own sizes."""

import os
import sys

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
)

from benchmarks import mfu  # noqa: E402


def test_parameters_in_matmuls_are_the_model_less_its_norms():
  for name, config in mfu.SHAPES.items():
    norms = config.num_layers * 2 * config.d_model + config.d_model
    qk_norms = config.num_layers * 2 * config.resolved_head_dim if config.qk_norm else 0
    # Tied: the embedding is counted once, as the output head's product.
    assert mfu.matmul_params(config) == config.num_params() - norms - qk_norms, name


def test_flops_per_token_of_the_1b_shape():
  config = mfu.SHAPES["llama_1b"]
  n = mfu.matmul_params(config)
  assert 1.2e9 < n < 1.3e9
  attention = 12 * 16 * 32 * 64 * 4096
  assert mfu.flops_per_token(config, 4096) == 6 * n + attention
