"""Cost of FINCH on top of AdamW: step time and optimizer-state bytes.

Run: python benchmarks/optimizer_overhead.py [--params_millions 10] [--repeats 30]

Times one jitted training step (forward, backward, optimizer update, parameter
update) of the same ~10M-parameter MLP with `optax.adamw` and with
`finch_jax.finch(optax.adamw)`, interleaving the two so that machine noise falls on
both alike, and reports the median step-time ratio and the optimizer-state bytes of
each. Prints one JSON object.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import finch_jax


def make_model(key, width, depth):
  keys = jax.random.split(key, depth)
  return [
    {"w": jax.random.normal(k, (width, width)) / width**0.5, "b": jnp.zeros(width)} for k in keys
  ]


def loss_fn(params, x):
  h = x
  for layer in params:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return jnp.mean((h - x) ** 2)


def make_step(tx):
  def step(params, state, x):
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params_millions", type=float, default=10.0)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()

  depth = max(1, round(args.params_millions * 1e6 / (args.width * (args.width + 1))))
  x = jax.random.normal(jax.random.key(1), (args.batch, args.width))
  runs = {"adamw": optax.adamw(1e-4), "finch(adamw)": finch_jax.finch(optax.adamw(1e-4))}
  steps, carries = {}, {}
  for name, tx in runs.items():
    params = make_model(jax.random.key(0), args.width, depth)
    steps[name] = make_step(tx)
    carries[name] = (params, tx.init(params))
  state_bytes = {name: tree_bytes(carry[1]) for name, carry in carries.items()}
  n_params = tree_bytes(carries["adamw"][0]) // 4

  times = {name: [] for name in runs}
  for i in range(args.repeats + 3):
    for name in runs:
      params, state = carries[name]
      start = time.perf_counter()
      params, state, loss = steps[name](params, state, x)
      loss.block_until_ready()
      if i >= 3:  # the first calls compile and warm caches
        times[name].append(time.perf_counter() - start)
      carries[name] = (params, state)

  med = {name: statistics.median(t) for name, t in times.items()}
  ratios = [f / a for f, a in zip(times["finch(adamw)"], times["adamw"], strict=True)]
  print(
    json.dumps(
      {
        "benchmark": "optimizer_overhead",
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "params": n_params,
        "batch": args.batch,
        "repeats": args.repeats,
        "median_step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "step_time_ratio_of_medians": round(med["finch(adamw)"] / med["adamw"], 4),
        "median_paired_ratio": round(statistics.median(ratios), 4),
        "optimizer_state_bytes": state_bytes,
        "extra_state_bytes": state_bytes["finch(adamw)"] - state_bytes["adamw"],
      },
      indent=2,
    )
  )


if __name__ == "__main__":
  main()
