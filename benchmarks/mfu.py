"""Model FLOPs utilisation of the real train step: tokens per second against the device's peak.

Run: python benchmarks/mfu.py --shape llama_1b --seq_len 4096 --batch 8 [--steps 10]
     python benchmarks/mfu.py --shape tiny --seq_len 128 --batch 16        # the CPU default

Model FLOPs per token, as in the PaLM paper's appendix (and MaxText's reports):

    6 * N  +  12 * layers * heads * head_dim * seq_len

where N counts the parameters that take part in matrix products: every projection of every
block and the output head (tied or not), not the input embedding lookup nor the norms. The first
term is the forward (2 N) and backward (4 N) matrix products; the second, the attention scores
and their product with the values, forward and backward, without halving for the causal mask.
Recomputation (remat) is not counted: it is the hardware's work, not the model's.

The step is the library's own (`finch_jax.trainer.Trainer.train_step`: forward, backward,
AdamW, and FINCH with `--finch`), on a batch of random tokens already on the device; compiled
before timing, then timed over `--steps` steps. Prints one JSON object: the shape, tokens per
second, achieved model TFLOP/s, the device's peak and the MFU (on a CPU there is no peak in the
table: achieved FLOP/s only). `--compare_finch` times AdamW and AdamW+FINCH alternately and adds
FINCH's step-time ratio.

Peaks are dense bfloat16 TFLOP/s per chip from the vendors' data sheets.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import sft  # noqa: E402
from finch_jax import sharding as shd  # noqa: E402
from finch_jax.models import LlamaConfig  # noqa: E402
from finch_jax.models.registry import config_from_dict  # noqa: E402
from finch_jax.optim import make_optimizer  # noqa: E402
from finch_jax.trainer import Trainer  # noqa: E402

PEAK_TFLOPS = {  # dense bfloat16, per chip
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,  # v5e
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v5": 459.0,
  "TPU v6 lite": 918.0,  # v6e (Trillium)
  "TPU v6e": 918.0,
  "NVIDIA A100": 312.0,
  "NVIDIA H100": 989.0,  # SXM
  "NVIDIA H200": 989.0,
}

SHAPES = {
  "tiny": LlamaConfig.tiny(max_len=8192),
  # A Llama-shaped model of about 1.2B parameters (Llama 3.2 1B's sizes).
  "llama_1b": LlamaConfig(
    vocab_size=128_256,
    d_model=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    d_ff=8192,
    tie_embeddings=True,
    rope_theta=500_000.0,
    max_len=8192,
  ),
  # Qwen3-0.6B's shape, from configs/sft.py (dtype and remat come from the flags).
  "qwen3_0_6b": config_from_dict(sft.get_config().model),
}


def matmul_params(c: LlamaConfig) -> int:
  """Parameters that take part in matrix products: the blocks' projections and the head."""
  hd = c.resolved_head_dim
  attention = c.d_model * (2 * c.num_heads * hd + 2 * c.num_kv_heads * hd)
  mlp = 3 * c.d_model * c.d_ff
  return c.num_layers * (attention + mlp) + c.d_model * c.vocab_size


def flops_per_token(c: LlamaConfig, seq_len: int) -> float:
  """6 N + 12 L H Q T (see the module docstring)."""
  return 6.0 * matmul_params(c) + 12.0 * c.num_layers * c.num_heads * c.resolved_head_dim * seq_len


def peak_tflops(device: jax.Device) -> float | None:
  """The device's dense bfloat16 peak from the table, None when it is not there (CPUs)."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), None)


def make_trainer(config: LlamaConfig, finch: bool, args) -> Trainer:
  tx, shape = make_optimizer(
    {"name": "adamw", "learning_rate": 1e-4, "grad_clip": 1.0}, {"enabled": finch}, 1000
  )
  mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1)
  return Trainer(config, tx, shape, mesh, loss_chunk_size=args.loss_chunk_size)


def random_batch(trainer: Trainer, config: LlamaConfig, args) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
  return trainer.global_batch(
    {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": np.ones((args.batch, args.seq_len), np.float32),
      "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
      "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
    }
  )


def time_steps(trainer: Trainer, state, batch, steps: int):
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics["loss"])
  return state, (time.perf_counter() - start) / steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line's options (`argv`: None reads sys.argv)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtype", default=None, help="compute dtype; default bfloat16 off CPU")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--loss_chunk_size", type=int, default=0)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--finch", action="store_true", help="time AdamW+FINCH (default AdamW)")
  parser.add_argument("--compare_finch", action="store_true")
  return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
  """Times the step as `args` asks; returns what `main` prints."""
  device = jax.devices()[0]
  dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
  config = SHAPES[args.shape].replace(
    dtype=dtype, attention=args.attention, remat=args.remat, scan_layers=args.scan_layers
  )
  variants = [False, True] if args.compare_finch else [args.finch]
  runs = {}
  for finch in variants:
    trainer = make_trainer(config, finch, args)
    state = trainer.create_state(trainer.init_params(0))
    batch = random_batch(trainer, config, args)
    state, _ = time_steps(trainer, state, batch, 1)  # compiles
    runs[finch] = [trainer, state, batch, []]
  for _ in range(args.rounds):  # alternate, so that machine noise falls on both
    for run in runs.values():
      run[1], seconds = time_steps(run[0], run[1], run[2], args.steps)
      run[3].append(seconds)
  tokens = args.batch * args.seq_len
  model_flops = flops_per_token(config, args.seq_len) * tokens
  peak = peak_tflops(device) if dtype == "bfloat16" else None
  out = {
    "device": getattr(device, "device_kind", device.platform),
    "devices": jax.device_count(),
    "shape": args.shape,
    "parameters_in_matmuls": matmul_params(config),
    "seq_len": args.seq_len,
    "batch": args.batch,
    "dtype": dtype,
    "model_flops_per_token": flops_per_token(config, args.seq_len),
  }
  for finch, (_, _, _, times) in runs.items():
    seconds = statistics.median(times)
    achieved = model_flops / seconds / 1e12 / jax.device_count()
    name = "finch" if finch else "adamw"
    out[name] = {
      "step_seconds": seconds,
      "tokens_per_second": tokens / seconds,
      "model_tflops_per_device": achieved,
      "mfu": achieved / peak if peak else None,
    }
  if args.compare_finch:
    out["finch_step_time_ratio"] = out["finch"]["step_seconds"] / out["adamw"]["step_seconds"]
  return out


def main():
  print(json.dumps(measure(parse_args()), indent=2))


if __name__ == "__main__":
  main()
