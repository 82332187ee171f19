"""Trainer throughput against a minimal hand-written jitted loop of the same model and batch.

Run: python benchmarks/trainer_throughput.py [--steps 40] [--rounds 3]

The trainer side is the real thing: `finch_jax.loop.fit` fed by the Grain pipeline over the
embedded biographies (packing, prefetch), with metrics kept on device between log steps. The
baseline is the shortest correct loop: one `jax.jit` step (forward, backward, AdamW) over a batch
already on the device. Both train the default tiny model with the same batch shape and the same
optimizer (AdamW, no FINCH, so the ratio measures the trainer, not FINCH). Rounds alternate
between the two so machine noise falls on both. Prints one JSON object with tokens/s of each, the
ratio, and the trainer's share of time spent waiting for input.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from finch_jax import configure, inputs, models  # noqa: E402
from finch_jax.loop import MetricsWriter, fit  # noqa: E402


def minimal_loop(model_config, learning_rate):
  """The plainest jitted step and its initial (params, opt_state)."""
  model = models.Llama(model_config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optax.adamw(learning_rate, b1=0.9, b2=0.95)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(
        batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
      )
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, (params, tx.init(params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  config = default.full_size(default.get_config())
  config.mode = "pretrain"
  config.finch.enabled = False
  config.optimizer.grad_clip = 0.0
  config.data.train = {"name": "", "split": "pretrain"}
  config.log_every = args.steps
  config.eval_every = 0
  config.checkpoint_every = 0
  tokens = config.data.batch_size * config.data.seq_len
  model_config = models.config_from_dict(config.model)

  with tempfile.TemporaryDirectory() as workdir:
    trainer = configure.make_trainer(config)
    dataset = inputs.train_batches(config, workdir, seed=0)
    iterator = iter(dataset)
    state = trainer.create_state(trainer.init_params(0))
    batch = next(iter(dataset))
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step, (params, opt_state) = minimal_loop(model_config, config.optimizer.learning_rate)
    # Compile both before timing.
    params, opt_state, loss = step(params, opt_state, device_batch)
    loss.block_until_ready()
    state = fit(trainer, state, iterator, num_train_steps=1, log_every=1, progress=False).state

    trainer_tps, minimal_tps, waits = [], [], []
    for _ in range(args.rounds):
      start = time.perf_counter()
      for _ in range(args.steps):
        params, opt_state, loss = step(params, opt_state, device_batch)
      loss.block_until_ready()
      minimal_tps.append(tokens * args.steps / (time.perf_counter() - start))

      target = int(state.step) + args.steps
      writer = MetricsWriter(workdir)
      start = time.perf_counter()
      state = fit(
        trainer,
        state,
        iterator,
        num_train_steps=target,
        log_every=args.steps,
        writer=writer,
        progress=False,
        tokens_per_batch=tokens,
      ).state
      jax.block_until_ready(state.params)
      trainer_tps.append(tokens * args.steps / (time.perf_counter() - start))
      writer.close()
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        waits.append(json.loads(f.readlines()[-1])["input_wait_share"])

  result = {
    "benchmark": "trainer_throughput",
    "device": jax.devices()[0].device_kind,
    "model_params": model_config.num_params(),
    "batch": [config.data.batch_size, config.data.seq_len],
    "steps_per_round": args.steps,
    "rounds": args.rounds,
    "tokens_per_second": {
      "minimal_loop": round(statistics.median(minimal_tps)),
      "trainer": round(statistics.median(trainer_tps)),
    },
    "throughput_ratio": round(statistics.median(trainer_tps) / statistics.median(minimal_tps), 4),
    "input_wait_share": round(statistics.median(waits), 4),
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
