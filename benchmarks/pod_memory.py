"""Per-device memory of a config's train step, compiled for its pod's mesh without the pod.

Run (one config per process, so that the peak-RAM figure is the config's own):

  python benchmarks/pod_memory.py --config configs/qwen3_4b_tpu_v5p.py
  python benchmarks/pod_memory.py --config configs/qwen3_4b_gpu8.py
  python benchmarks/pod_memory.py --config configs/qwen3_4b_gpu8.py --num_layers 2  # quick
  python benchmarks/pod_memory.py --config configs/qwen3_4b_tpu_v5p.py --backend tpu  # libtpu

The script sets `XLA_FLAGS=--xla_force_host_platform_device_count=N` (N from `--device_count`,
else the config's `TARGET["devices"]`) before JAX is imported, builds the config's `Trainer` on a
CPU mesh of the target's shape, lowers its jitted train step with abstract inputs
(`Trainer.abstract_state()` and `jax.ShapeDtypeStruct` batches with `Trainer.batch_sharding`:
nothing is allocated) and compiles it. XLA's memory analysis of the compiled per-device program
gives the argument (parameters, optimizer state, batch), output, alias (outputs written into the
donated state) and temporary bytes; the bytes of parameters and optimizer state are also
computed independently from their shapes and shardings. It prints a table per config and, with
`--json`, writes the numbers. With `--backend tpu` (libtpu installed: `pip install "jax[tpu]"`)
the TPU compiler itself compiles the step for the slice's topology (`TARGET["tpu_topology"]`),
on this machine's CPU.

What the CPU compile does and does not capture:
- Exact: the sharded arguments (parameters, Adam moments, batch) per device, since they follow
  from shapes and shardings alone; the script checks XLA's figure against its own count.
- Estimated: the temporaries (activations saved for the backward pass, one layer's
  recomputation, gradients, logits). They come from XLA:CPU's buffer assignment after SPMD
  partitioning, the partitioner every backend runs, but after CPU fusion and a sequential CPU
  schedule. The TPU and GPU compilers fuse differently, keep collectives in flight
  asynchronously (more buffers live at once), pad arrays to their tile layouts (TPU: the last
  two dimensions to multiples of 8 x 128) and may rematerialize on their own to fit. XLA:CPU
  keeps float32 copies of some bfloat16 values and transposes operands for its matmuls. The two
  disagree either way: for the Qwen3-4B configs XLA:CPU reported 23-34% more temporaries than
  the TPU compiler with unscanned layers, the einsum attention and the whole logits, and from
  12% less to 4.7x more with the configs' scanned layers, attention kernels and chunked loss
  (docs/pod.md).
- Not captured: the runtime's own reservations (TPU: a few hundred MB for programs and
  collectives; GPU: the CUDA context, cuBLAS workspaces and NCCL buffers, about 1-3 GB) and
  allocator fragmentation.
So the verdict asks for headroom: a config passes when the total stays within `--budget`
(default 0.75) of the memory the process may allocate, leaving 25% for the differences above.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("configs/qwen3_4b_tpu_v5p.py", "configs/qwen3_4b_gpu8.py")
GiB = 2**30


def load_config_module(path: str) -> Any:
  """The config module at `path` (a file under configs/, or any file with `get_config`)."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs import `configs.default`
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_pod_memory_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_target(path: str) -> dict[str, Any]:
  """The `TARGET` dict literal of a config file, read without importing it (nor JAX)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "TARGET" for t in node.targets
    ):
      return ast.literal_eval(node.value)
  raise ValueError(f"{path} defines no TARGET = {{...}} (devices, processes, hbm_gib, name).")


# XLA:CPU deletes the optimization barriers that `jax.checkpoint` (remat) places around each
# block's recomputation (its cse_barrier_expander pass), after which its scheduler computes every
# layer's recomputation early, in the forward pass, and keeps it alive until the backward pass:
# remat is undone and the estimate grows by a whole layer's activations per layer (4-13 GiB each
# for Qwen3-4B's layers, against 0.3-0.8 GiB with the barriers kept). The TPU and GPU compilers
# keep the barriers, so the estimate keeps them too.
CPU_FLAGS = ("--xla_disable_hlo_passes=cse_barrier_expander",)


def _force_host_devices(count: int, *, keep_remat: bool = True) -> None:
  """Asks XLA for `count` CPU devices, keeping remat by default; only before JAX is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("set the device count before importing jax")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags.append(f"--xla_force_host_platform_device_count={count}")
  if keep_remat:
    flags += [f for f in CPU_FLAGS if f not in flags]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = "cpu"


def tpu_devices(topology: str) -> list[Any]:
  """Compile-only devices of a TPU slice (e.g. "v5p:2x2x4"), for compiling without the hardware.

  Needs `libtpu` (`pip install "jax[tpu]"`); the TPU compiler then runs on this machine's CPU.
  """
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's start-up probe
  from jax.experimental import topologies

  return list(topologies.get_topology_desc(topology, "tpu").devices)


def _tree_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s (the largest shard)."""
  import jax

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _tree_bytes(tree: Any) -> int:
  """Bytes of a tree of arrays or shape structs, unsharded."""
  import jax

  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_batch(trainer: Any, batch_size: int, seq_len: int) -> dict[str, Any]:
  """The train step's batch as `jax.ShapeDtypeStruct`s laid out like `Trainer.global_batch`."""
  import jax
  import jax.numpy as jnp

  def array(dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=trainer.batch_sharding)

  batch = {k: array(jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["weights"] = array(jnp.float32)
  if trainer.needs_reference:
    batch["replay"] = array(jnp.int32)
  return batch


def compiled_memory(
  config: Any, device_count: int, *, devices: Sequence[Any] | None = None
) -> dict[str, Any]:
  """Compiles `config`'s train step for a mesh of `device_count` CPU devices; memory per device.

  The process must have at least `device_count` CPU devices (`XLA_FLAGS=
  --xla_force_host_platform_device_count=N` set before JAX was imported). Nothing is allocated:
  the step is lowered with abstract inputs and compiled, never run.

  Args:
    config: a training config (`configs/*.py`); its `mesh` is resolved against `device_count`.
    device_count: devices of the target (e.g. 16 chips of a TPU v5p-32).
    devices: other devices to compile for, e.g. `tpu_devices("v5p:2x2x4")`; default the CPU's.

  Returns:
    A dict of per-device bytes: `argument`, `output`, `alias`, `temp` (XLA's memory analysis),
    `peak` (XLA's own peak of the buffer assignment), `total` (argument + output - alias +
    temp), `expected_params`, `expected_opt_state`, `expected_batch` (from shapes and
    shardings), `state_unsharded` (params + optimizer state of the whole model); and `mesh`,
    `num_params`, `rows_per_device` (of one micro-batch), `lower_seconds`, `compile_seconds`
    (wall clock) and `compile_cpu_seconds` (CPU time of the whole process, all threads: on a
    shared machine the wall clock measures the other processes too).
  """
  import jax

  from finch_jax import configure, models
  from finch_jax import sharding as shd

  devices = list(devices) if devices is not None else jax.devices("cpu")
  if len(devices) < device_count:
    raise RuntimeError(
      f"{device_count} devices asked for, this process has {len(devices)} CPU devices: set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={device_count} before importing jax."
    )
  mesh = shd.make_mesh(**config.mesh.to_dict(), devices=devices[:device_count])
  trainer = configure.make_trainer(config, mesh)
  state = trainer.abstract_state()
  batch = abstract_batch(trainer, config.data.batch_size, config.data.seq_len)
  reference = state.params if trainer.needs_reference else None

  start = time.perf_counter()
  lowered = trainer._train_step.lower(state, batch, reference)
  lower_seconds = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  compile_cpu_seconds = time.process_time() - cpu_start

  stats = compiled.memory_analysis()
  argument = int(stats.argument_size_in_bytes)
  output = int(stats.output_size_in_bytes)
  alias = int(stats.alias_size_in_bytes)
  temp = int(stats.temp_size_in_bytes)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return {
    "devices": device_count,
    "platform": devices[0].platform,
    "mesh": dict(mesh.shape),
    "num_params": models.config_from_dict(config.model).num_params(),
    "rows_per_device": config.data.batch_size // config.grad_accum_steps // batch_devices,
    "seq_len": config.data.seq_len,
    "argument": argument,
    "output": output,
    "alias": alias,
    "temp": temp,
    "peak": int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
    "total": argument + output - alias + temp,
    "expected_params": _tree_device_bytes(state.params),
    "expected_opt_state": _tree_device_bytes(state.opt_state),
    "expected_batch": _tree_device_bytes(batch),
    "expected_scalars": _tree_device_bytes((state.step, state.num_skipped)),
    "state_unsharded": _tree_bytes((state.params, state.opt_state)),
    "lower_seconds": lower_seconds,
    "compile_seconds": compile_seconds,
    "compile_cpu_seconds": compile_cpu_seconds,
  }


def apply_overrides(config: Any, overrides: Sequence[str]) -> None:
  """Sets `key.sub=value` pairs (values read as Python literals, else as strings) in place."""
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def report(name: str, target: Mapping[str, Any], result: Mapping[str, Any], budget: float) -> str:
  """The table of one config: per-device bytes against the target's HBM, and the verdict."""
  usable = target["hbm_gib"] * GiB * target.get("usable_fraction", 1.0)
  state = result["expected_params"] + result["expected_opt_state"]
  headroom = 1 - result["total"] / usable
  verdict = "fits" if result["total"] <= budget * usable else "DOES NOT FIT"
  mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
  hbm = f"{target['name']} HBM per device"
  if target.get("usable_fraction", 1.0) < 1.0:
    hbm += f" x {target['usable_fraction']:g} (what the process may allocate)"
  rows = [
    ("params + optimizer state (from shapes and shardings)", _gib(state)),
    ("arguments: params, optimizer state, batch (XLA)", _gib(result["argument"])),
    ("temporaries (XLA)", _gib(result["temp"])),
    ("outputs not aliased to the donated state (XLA)", _gib(result["output"] - result["alias"])),
    ("total: arguments + temporaries + unaliased outputs", _gib(result["total"])),
  ]
  if result["platform"] != "cpu":  # XLA:CPU reports no meaningful peak
    rows.append(("peak of the compiler's buffer assignment", _gib(result["peak"])))
  rows += [
    (hbm, _gib(usable)),
    ("headroom", f"{headroom:.0%} ({verdict} within the {budget:.0%} budget)"),
  ]
  width = max(len(label) for label, _ in rows)
  rows_per_group = result["rows_per_device"]
  return "\n".join(
    [
      f"{name}, compiled by XLA:{result['platform'].upper()} for {result['devices']} devices "
      f"({mesh}): {result['num_params'] / 1e9:.2f}B params, {rows_per_group} rows x "
      f"{result['seq_len']} tokens per micro-batch per data-parallel group; lowered in "
      f"{result['lower_seconds']:.0f} s, compiled in {result['compile_seconds']:.0f} s "
      f"({result['compile_cpu_seconds']:.0f} s of CPU time)",
      "",
      f"| {'per device':<{width}} | GiB |",
      f"| {'-' * width} | ---: |",
      *(f"| {label:<{width}} | {value.removesuffix(' GiB')} |" for label, value in rows),
    ]
  )


def _peak_rss_gib() -> float:
  """The process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: see the module docstring."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", help="config file (repeatable)")
  parser.add_argument("--device_count", type=int, default=None, help="default: the target's")
  parser.add_argument("--num_layers", type=int, default=None, help="fewer layers, for speed")
  parser.add_argument("--set", action="append", default=[], help="override, e.g. mesh.tensor=2")
  parser.add_argument("--budget", type=float, default=0.75, help="share of HBM allowed")
  parser.add_argument(
    "--backend",
    choices=("cpu", "tpu"),
    default="cpu",
    help="cpu: fake CPU devices; tpu: the TPU compiler for TARGET['tpu_topology'] (needs libtpu)",
  )
  parser.add_argument("--tpu_topology", default="", help="default: TARGET['tpu_topology']")
  parser.add_argument(
    "--cpu_expand_barriers",
    action="store_true",
    help="leave XLA:CPU's barrier expansion on (undoes remat; see CPU_FLAGS)",
  )
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args(argv)
  paths = args.config or [os.path.join(ROOT, p) for p in DEFAULT_CONFIGS]
  targets = {path: read_target(path) for path in paths}
  _force_host_devices(
    args.device_count or max(t["devices"] for t in targets.values()),
    keep_remat=args.backend == "cpu" and not args.cpu_expand_barriers,  # TPU needs the pass
  )

  results = {}
  for path, target in targets.items():
    name = os.path.splitext(os.path.basename(path))[0]
    config = load_config_module(path).get_config()
    apply_overrides(config, args.set)
    if args.num_layers:
      config.model["num_layers"] = args.num_layers
    count = args.device_count or target["devices"]
    devices = None
    if args.backend == "tpu":
      topology = args.tpu_topology or target.get("tpu_topology")
      if not topology:
        print(f"{name}: no TARGET['tpu_topology'] nor --tpu_topology; skipped.\n")
        continue
      devices = tpu_devices(topology)
    result = compiled_memory(config, count, devices=devices)
    result["peak_rss_gib"] = _peak_rss_gib()
    result["overrides"] = list(args.set) + (
      [f"model.num_layers={args.num_layers}"] if args.num_layers else []
    )
    results[name] = {"target": target, **result}
    print(report(name, target, result, args.budget))
    state_bytes = result["expected_params"] + result["expected_opt_state"]
    others = result["expected_batch"] + result["expected_scalars"]
    gap = result["argument"] - (state_bytes + others)
    padding = f" + {gap:,} B of tile padding (small arrays)" if gap else ""
    print(
      f"\nCheck: XLA's argument bytes {result['argument']:,} = params + optimizer state "
      f"{state_bytes:,} + batch and counters {others:,}{padding}. Unsharded params + "
      f"optimizer state: {_gib(result['state_unsharded'])}. Peak RAM of this process: "
      f"{result['peak_rss_gib']:.1f} GiB."
      + (f" Overrides: {', '.join(result['overrides'])}." if result["overrides"] else "")
      + "\n"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
