"""FINCH for Flax Linen code bases: a `TrainState` whose `apply_gradients` passes the loss."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` that hands the batch loss to the optimizer.

  Linen's own `apply_gradients(grads=...)` calls ``tx.update(grads, opt_state,
  params)`` with no extra arguments, so a FINCH optimizer never sees the loss.
  This subclass takes it as ``value`` and otherwise behaves the same; a plain
  optax optimizer ignores ``value``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, finch_jax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> state = finch_jax.linen.TrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x),
    ...     tx=finch_jax.finch(optax.sgd(0.1)))
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn(params, x) - y) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, value=loss)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, value: jax.Array | None = None, **kwargs: Any):
    """One optimizer step with ``value`` (the batch loss) passed to ``tx.update``.

    Args:
      grads: gradients with the structure of ``params``.
      value: the mean batch loss, required by FINCH.
      **kwargs: other fields to replace in the returned state, as in Flax.

    Returns:
      The state after the step, with ``step`` incremented.
    """
    updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, value=value)
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)
