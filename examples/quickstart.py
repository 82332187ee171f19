"""FINCH in thirty lines: fine-tune a small pretrained network on a new task, with and without it.

Run: python examples/quickstart.py

A two-layer network is trained on task A (the "pretraining"), then fine-tuned on
task B with Adam and with FINCH wrapped around the same Adam. It prints the task-B
loss, how much the task-A loss rose (forgetting) and FINCH's scale. This is a
demonstration of the API on a toy problem, not a benchmark: fair comparisons put
methods at matched task loss (docs/design.md, "Comparing fairly").
"""

import jax
import jax.numpy as jnp
import optax

import finch_jax


def make_task(key, n=512):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, 8))
  return x, jnp.tanh(x @ jax.random.normal(kw, (8, 1)))


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - y) ** 2)


def fit(params, tx, x, y, steps):
  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)  # the loss goes in as `value`
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def main():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  task_a, task_b = make_task(k1), make_task(k2)
  params = {
    "w1": jax.random.normal(k3, (8, 64)) / 8**0.5,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(k4, (64, 1)) / 8,
  }
  base, _ = fit(params, optax.adam(1e-2), *task_a, steps=500)
  before = loss_fn(base, *task_a)
  print(f"pretrained: task-A loss {before:.4f}")
  for name, tx in [
    ("adam", optax.adam(1e-3)),
    ("finch(adam)", finch_jax.finch(optax.adam(1e-3))),
  ]:
    tuned, state = fit(base, tx, *task_b, steps=200)
    line = (
      f"{name:12s} task-B loss {loss_fn(tuned, *task_b):.4f}  "
      f"forgetting {loss_fn(tuned, *task_a) - before:+.4f}"
    )
    if finch_jax.find_finch_states(state):
      line += f"  final scale {float(finch_jax.finch_stats(state)['scale']):.2f}"
    print(line)


if __name__ == "__main__":
  main()
