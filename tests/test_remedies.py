"""The remedies beside FINCH: anchor pull and KL to the base, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finch_jax import finch
from finch_jax.remedies import AnchorState, anchor_to_init, token_kl_to_base


def test_anchor_pull_is_strength_times_distance_from_init():
  base = {"w": jnp.array([1.0, -2.0, 3.0])}
  tx = anchor_to_init(0.5)
  state = tx.init(base)
  moved = {"w": jnp.array([2.0, -2.0, 0.0])}
  updates, _ = tx.update({"w": jnp.zeros(3)}, state, moved)
  np.testing.assert_allclose(updates["w"], 0.5 * (moved["w"] - base["w"]))
  # The anchor is a copy: changing the parameters later does not move it.
  assert state.anchor["w"] is not base["w"]


def test_anchored_sgd_decays_back_to_the_base_geometrically():
  base = {"w": jnp.zeros(2)}
  lr, strength = 0.1, 2.0
  tx = optax.chain(anchor_to_init(strength), optax.scale_by_learning_rate(lr))
  state = tx.init(base)
  params = {"w": jnp.array([1.0, -4.0])}
  for _ in range(5):
    updates, state = tx.update({"w": jnp.zeros(2)}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(
    params["w"], np.array([1.0, -4.0]) * (1 - lr * strength) ** 5, rtol=1e-6
  )


def test_anchor_composes_with_finch_and_holds_one_parameter_copy():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  base = optax.chain(
    optax.scale_by_adam(), anchor_to_init(1e-2), optax.scale_by_learning_rate(1e-3)
  )
  tx = finch(base)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params, value=jnp.float32(2.0))
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  (anchor_state,) = [
    x
    for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AnchorState))
    if isinstance(x, AnchorState)
  ]
  np.testing.assert_array_equal(anchor_state.anchor["w"], params["w"])
  anchor_bytes = sum(x.nbytes for x in jax.tree.leaves(anchor_state))
  assert anchor_bytes == sum(x.nbytes for x in jax.tree.leaves(params))


def test_negative_strength_is_rejected():
  with pytest.raises(ValueError, match="strength"):
    anchor_to_init(-1.0)


def test_token_kl_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  base_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  total, count = token_kl_to_base(
    jnp.asarray(logits), jnp.asarray(base_logits), jnp.asarray(weights)
  )
  want = 0.0
  for b in range(2):
    for t in range(3):
      p = np.exp(base_logits[b, t]) / np.exp(base_logits[b, t]).sum()
      q = np.exp(logits[b, t]) / np.exp(logits[b, t]).sum()
      want += weights[b, t] * np.sum(p * (np.log(p) - np.log(q)))
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(count) == 4.0
  same, _ = token_kl_to_base(jnp.asarray(logits), jnp.asarray(logits), jnp.asarray(weights))
  assert abs(float(same)) < 1e-5


def test_token_kl_gradient_flows_only_into_the_fine_tuned_model():
  logits, base = jnp.ones((1, 2, 3)), jnp.zeros((1, 2, 3)).at[..., 0].set(2.0)
  g_model, g_base = jax.grad(
    lambda a, b: token_kl_to_base(a, b, jnp.ones((1, 2)))[0], argnums=(0, 1)
  )(logits, base)
  assert float(jnp.abs(g_model).sum()) > 0
  assert float(jnp.abs(g_base).sum()) == 0


# ----- in the trainer ------------------------------------------------------------------------

SMALL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64, max_len=64)


def _trainer(kl_weight=0.0, anchor=0.0, finch_enabled=False, lr=1e-2):
  from finch_jax import sharding as shd
  from finch_jax.models import LlamaConfig
  from finch_jax.optim import make_optimizer
  from finch_jax.trainer import Trainer

  tx, shape = make_optimizer(
    {"name": "adamw", "learning_rate": lr, "anchor_strength": anchor},
    {"enabled": finch_enabled},
    10,
  )
  mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
  return Trainer(LlamaConfig.tiny(**SMALL), tx, shape, mesh, kl_weight=kl_weight)


def _batch(seed=0, rows=4, length=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, (rows, length + 1)).astype(np.int32)
  replay = np.zeros((rows, length), np.float32)
  replay[1, 4:] = 1.0
  replay[3, :] = 1.0
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((rows, length), np.float32),
    "segment_ids": np.ones((rows, length), np.int32),
    "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    "replay": replay,
  }


def test_trainer_loss_is_task_cross_entropy_plus_weighted_kl_on_replay_tokens():
  from finch_jax import trainer as trainer_lib
  from finch_jax.trainer import token_cross_entropy

  trainer = _trainer(kl_weight=0.5)
  params = trainer.init_params(0)
  state = trainer.create_state(params)  # makes `params` the reference ...
  reference = trainer.init_params(1)
  trainer.set_reference(reference)  # ... replaced by another "base", so the KL is far from 0
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  _, metrics = trainer.train_step(state, trainer.global_batch(_batch()))

  logits = trainer_lib.logits(trainer.spec, params, batch)
  base_logits = trainer_lib.logits(trainer.spec, reference, batch)
  task = batch["weights"] * (1 - batch["replay"])
  ce, _ = token_cross_entropy(logits, batch["targets"], task)
  kl, count = token_kl_to_base(logits, base_logits, batch["replay"])
  total = float(jnp.sum(batch["weights"]))
  np.testing.assert_allclose(float(metrics["loss"]), (float(ce) + 0.5 * float(kl)) / total, 1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), float(kl) / float(count), rtol=1e-5)
  assert float(metrics["kl"]) > 0.01


def test_kl_is_zero_at_the_start_where_the_model_is_its_reference():
  trainer = _trainer(kl_weight=1.0)
  params = trainer.init_params(0)
  state = trainer.create_state(params)  # the starting point is the reference
  _, metrics = trainer.train_step(state, trainer.global_batch(_batch()))
  assert abs(float(metrics["kl"])) < 1e-6


def test_anchored_adamw_pulls_back_by_lr_times_strength():
  from finch_jax.optim import make_optimizer

  lr, strength = 0.1, 0.5
  tx, _ = make_optimizer(
    {"name": "adamw", "learning_rate": lr, "anchor_strength": strength}, None, 10
  )
  start = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(start)
  moved = {"w": jnp.array([3.0, 2.0])}
  # Zero gradients: Adam proposes nothing, only the anchor pulls.
  updates, _ = tx.update({"w": jnp.zeros(2)}, state, moved, value=jnp.float32(1.0))
  np.testing.assert_allclose(updates["w"], -lr * strength * (moved["w"] - start["w"]), rtol=1e-6)


def test_anchor_reduces_drift_from_the_base_in_training():
  drift = {}
  for strength in (0.0, 1.0):
    trainer = _trainer(anchor=strength, lr=3e-3)
    base = trainer.init_params(0)
    state = trainer.create_state(base)
    for step in range(8):
      state, _ = trainer.train_step(state, trainer.global_batch(_batch(seed=step)))
    drift[strength] = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, state.params, base)))
  assert drift[1.0] < drift[0.0]
