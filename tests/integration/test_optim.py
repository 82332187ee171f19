"""The optimizer a config describes: schedule values, the logged learning rate, SGD, and FINCH's
logged bound with a loss floor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from finch_jax import finch_stats, scale_by_finch
from finch_jax import sharding as shd
from finch_jax.models import LlamaConfig
from finch_jax.optim import finch_keywords, make_optimizer, schedule_shape
from finch_jax.remedies import anchor_to_init
from finch_jax.trainer import Trainer, loss_sums

MODEL = LlamaConfig.tiny(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64)


def _batch(seed=0, batch=8, length=16):
  tokens = np.random.default_rng(seed).integers(3, 259, (batch, length + 1)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((batch, length), np.float32),
    "segment_ids": np.ones((batch, length), np.int32),
    "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
  }


def test_warmup_then_cosine_values():
  shape = schedule_shape("cosine", num_train_steps=110, warmup_steps=10, final_fraction=0.1)
  assert float(shape(0)) == 0.0
  assert float(shape(5)) == pytest.approx(0.5)
  assert float(shape(10)) == pytest.approx(1.0)
  # Half-way through the decay: alpha + (1 - alpha) * (1 + cos(pi / 2)) / 2 = 0.55.
  assert float(shape(60)) == pytest.approx(0.55)
  assert float(shape(110)) == pytest.approx(0.1)
  constant = schedule_shape("constant", num_train_steps=10, warmup_steps=4)
  assert [float(constant(t)) for t in (0, 2, 4, 9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
  with pytest.raises(ValueError, match="use 'constant' or 'cosine'"):
    schedule_shape("linear", 10)


def _trainer(optimizer, finch_options=None, steps=20, **kwargs):
  tx, shape = make_optimizer(optimizer, finch_options, steps)
  return Trainer(MODEL, tx, shape, shd.make_mesh(data=-1), **kwargs)


def test_logged_learning_rate_follows_the_schedule_and_finch():
  trainer = _trainer(
    {"name": "adamw", "learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 4},
    {"enabled": True, "max_scale": 4.0},
  )
  state = trainer.create_state(trainer.init_params(0))
  shape = schedule_shape("cosine", 20, 4)
  for step in range(6):
    state, metrics = trainer.train_step(state, trainer.global_batch(_batch(step)))
    assert float(metrics["learning_rate"]) == pytest.approx(2e-3 * float(shape(step)), rel=1e-6)
    assert float(metrics["effective_learning_rate"]) == pytest.approx(
      float(metrics["learning_rate"]) * float(metrics["finch_scale"]), rel=1e-6
    )


def test_sgd_with_momentum_matches_optax():
  trainer = _trainer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9})
  params = trainer.init_params(0)
  state = trainer.create_state(params)
  batch = trainer.global_batch(_batch())
  reference = optax.sgd(0.1, momentum=0.9)
  expected, opt_state = params, reference.init(params)
  for _ in range(2):
    grads = jax.grad(lambda p: _mean_loss(trainer, p, batch))(expected)
    updates, opt_state = reference.update(grads, opt_state, expected)
    expected = optax.apply_updates(expected, updates)
    state, _ = trainer.train_step(state, batch)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), state.params, expected
  )
  with pytest.raises(ValueError, match="use 'adamw' or 'sgd'"):
    make_optimizer({"name": "lion", "learning_rate": 1e-3}, None, 10)


def _mean_loss(trainer, params, batch):
  loss_sum, _ = loss_sums(trainer.spec, params, batch, None)
  return loss_sum / batch["weights"].sum()


def test_logged_forgetting_bound_honours_the_loss_floor():
  floor = 4.0  # below the first loss of a byte-level model (about log 264 = 5.6)
  trainer = _trainer(
    {"name": "adamw", "learning_rate": 1e-3},
    {"enabled": True, "loss_floor": floor},
    loss_floor=floor,
  )
  state = trainer.create_state(trainer.init_params(0))
  for step in range(3):
    state, metrics = trainer.train_step(state, trainer.global_batch(_batch(step)))
  stats = finch_stats(state.opt_state, loss_floor=floor)
  smoothed = float(stats["smoothed_loss"])
  assert float(metrics["forgetting_bound"]) == pytest.approx(
    float(stats["scale"]) * np.sqrt(smoothed - floor), rel=1e-6
  )
  assert float(metrics["forgetting_bound"]) < float(stats["scale"]) * np.sqrt(smoothed) * 0.9


def _grad_sequence(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4))}
    for _ in range(steps)
  ]


def _run(tx, grads, losses=None):
  """The parameters after one update per gradient, jitted (`losses` as FINCH's `value`)."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  state = tx.init(params)
  extra = (lambda i: {"value": jnp.float32(losses[i])}) if losses else (lambda i: {})

  @jax.jit
  def step(params, state, g, extra):
    updates, state = tx.update(g, state, params, **extra)
    return optax.apply_updates(params, updates), state

  for i, g in enumerate(grads):
    params, state = step(params, state, g, extra(i))
  return params


def test_plain_sgd_momentum_path_is_optax_sgd_bit_for_bit():
  grads = _grad_sequence(8)
  tx, _ = make_optimizer({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, None, 8)
  want = _run(optax.sgd(0.05, momentum=0.9), grads)
  jax.tree.map(np.testing.assert_array_equal, _run(tx, grads), want)
  # FINCH over it scales the momentum's step, as a learning rate does.
  losses = [4.0, 3.0, 5.0, 1.0, 0.5, 2.0, 1.0, 0.25]
  tx, _ = make_optimizer(
    {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, {"enabled": True}, 8
  )
  want = _run(optax.chain(optax.sgd(0.05, momentum=0.9), scale_by_finch()), grads, losses)
  # Equal to float32 rounding (one ulp at most): the two chains compile to different programs.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, _run(tx, grads, losses), want)


@pytest.mark.parametrize("finch_options", [None, {"enabled": True, "max_scale": 2.0}])
def test_anchored_sgd_with_momentum_is_momentum_then_pull_to_the_start(finch_options):
  grads = _grad_sequence(5)
  losses = [4.0, 2.0, 1.0, 3.0, 0.5]
  optimizer = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "anchor_strength": 0.5}
  tx, _ = make_optimizer(optimizer, finch_options, 5)
  want = optax.chain(optax.trace(decay=0.9), anchor_to_init(0.5), optax.scale_by_learning_rate(0.1))
  if finch_options:
    want = optax.chain(want, scale_by_finch(max_scale=2.0))
  got = _run(tx, grads, losses if finch_options else None)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, got, _run(want, grads, losses if finch_options else None))


def test_config_readings_become_the_transform_keywords():
  config = default.get_config().finch.to_dict()
  bounds = {"loss_floor": 0.0, "min_scale": 0.1, "max_scale": 4.0, "ema_decay": 0.0}
  # The default reading passes nothing of its own: scale_by_finch's first-loss reference.
  assert finch_keywords(config) == bounds
  assert finch_keywords({"enabled": True}) == {}
  assert finch_keywords({**config, "reading": "first_k", "reference_steps": 8}) == {
    **bounds,
    "reference_steps": 8,
  }
  assert finch_keywords({**config, "reading": "running", "reference_decay": 0.99}) == {
    **bounds,
    "reference_decay": 0.99,
  }
  target = {**config, "reading": "target", "reference_loss": 1.5, "max_scale": 1.0}
  assert finch_keywords(target) == {**bounds, "max_scale": 1.0, "reference_loss": 1.5}
  for wrong, match in [
    ({"reading": "last"}, "^reading 'last' is not one of"),
    ({"reading": "running"}, "^reference_decay must be set"),
    ({"reading": "target", "reference_loss": 1.5}, "^max_scale .* set finch.max_scale=1"),
    ({"reading": "first_k", "reference_steps": 4, "reference_loss": 1.5}, "^reference_loss"),
  ]:
    with pytest.raises(ValueError, match=match):
      finch_keywords({**config, **wrong})


def test_a_configured_reading_is_the_transform_with_its_keyword():
  grads, losses = _grad_sequence(6), [4.0, 3.0, 6.0, 1.0, 2.0, 0.5]
  sgd = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
  options = {"enabled": True, "reading": "running", "reference_decay": 0.8, "reference_steps": None}
  tx, _ = make_optimizer(sgd, options, 6)
  want = optax.chain(optax.sgd(0.05, momentum=0.9), scale_by_finch(reference_decay=0.8))
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, _run(tx, grads, losses), _run(want, grads, losses))
  # ... and not the default reading, on these losses.
  first = _run(optax.chain(optax.sgd(0.05, momentum=0.9), scale_by_finch()), grads, losses)
  assert not np.allclose(_run(tx, grads, losses)["w"], first["w"], rtol=1e-3)
