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
