"""The remedies inside the trainer: the KL to the base in the train step, anchoring in training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finch_jax.remedies import token_kl_to_base

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
