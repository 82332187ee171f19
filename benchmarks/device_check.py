"""One prepared check for a machine with an accelerator, in about 8 minutes, into one JSON file.

Run: python benchmarks/device_check.py --out device_check.json              # on the GPU or TPU
     python benchmarks/device_check.py --out /tmp/dry.json --dry_run        # on CPU: every part
                                                                            # traced, tiny shapes

Parts, in this order, each in its own process (so each part's peak memory is its own, and a part
that runs out of time is stopped without losing the others); a part starts only while the time
left (`--budget_s`, default 480) covers its estimate:

- mfu_llama_1b: `benchmarks/mfu.py`'s measurement of the ~1.2B Llama shape, 8 x 4096 tokens,
  bfloat16, AdamW and FINCH(AdamW) timed alternately (MFU and FINCH's step-time ratio), with the
  pod configs' settings (attention "auto", chunked loss of 512, scanned layers, remat).
- attention_cudnn: cuDNN's flash attention against the float32 einsum reference at 2 x 4096
  tokens, 32 query and 8 key/value heads of 64, with two packed segments per row: the output
  and the gradients of q, k and v. It passes when its error is within 4 times that of the einsum
  reference computed in bfloat16 (or 2e-2 of the values' scale).
- memory_chunked: the chunked loss (512 tokens) against the whole logits (4 x 4096 tokens, the
  1B shape's 2048 x 128,256 head), and the chunked attention against the einsum reference (the
  attention shape above), forward and backward: XLA's buffer assignment for the device
  (`compiled.memory_analysis()`, temporaries and arguments) and, where the runtime reports it,
  the device's peak bytes in use after each; the chunked values must match the plain ones.
- mfu_qwen3_0_6b: the same as the first part for Qwen3-0.6B's shape.
- smollm2_knowledge: `configs/smollm2_knowledge.py` through `train.py` for the time that is left
  (it needs the Debian packages and the GGUF file named in the config's docstring); whatever
  finished is read from its workdir.

It prints what it could not run and why, and exits non-zero only when a value is wrong (a
mismatch above), never because no accelerator is present. `--dry_run` runs every part on tiny
shapes on the CPU (the cuDNN comparison through XLA's implementation, the SmolLM2 config
validated, not trained), so a change that breaks a part shows before a device is lent; the JSON
says which parts need a device (`needs_device`) and what each did (`status`: ran, traced,
not_run, failed, wrong).

JAX and finch_jax are imported inside the parts, not at the top: on a device run the driver
process must not start JAX, whose runtime would hold the accelerator's memory the parts need.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (name, needs a device, seconds it needs at least on a device)
PARTS = (
  ("mfu_llama_1b", True, 150),
  ("attention_cudnn", True, 40),
  ("memory_chunked", True, 60),
  ("mfu_qwen3_0_6b", True, 120),
  ("smollm2_knowledge", True, 60),
)
WRONG_VALUE_EXIT = 3  # a part's exit status when one of its values is wrong
NOT_RUNNABLE_EXIT = 4  # a part's exit status when its prerequisites are missing


class WrongValue(Exception):
  """A measured value disagrees with its reference beyond the part's tolerance."""


class NotRunnable(Exception):
  """A part's prerequisites are missing here (data, a model file); the message names them."""


# ----- the parts (each runs in its own process) ----------------------------------------------


def part_mfu(shape: str, dry: bool) -> dict[str, Any]:
  """`benchmarks/mfu.py`'s measurement of `shape` with AdamW and FINCH(AdamW) (dry: tiny)."""
  from benchmarks import mfu

  common = ["--compare_finch", "--attention", "auto", "--scan_layers", "--remat"]
  if dry:
    argv = ["--shape", "tiny", "--seq_len", "64", "--batch", "2", "--steps", "1", "--rounds", "1"]
    argv += ["--loss_chunk_size", "32"]
  else:
    argv = ["--shape", shape, "--seq_len", "4096", "--batch", "8", "--steps", "5", "--rounds"]
    argv += ["3", "--loss_chunk_size", "512"]
  out = mfu.measure(mfu.parse_args(argv + common))
  for name in ("adamw", "finch"):
    seconds = out[name]["step_seconds"]
    if not seconds > 0:
      raise WrongValue(f"{name} step time {seconds}")
  return out


def _relative_error(x, reference) -> float:
  import jax.numpy as jnp

  x, reference = jnp.asarray(x, jnp.float32), jnp.asarray(reference, jnp.float32)
  return float(jnp.max(jnp.abs(x - reference)) / jnp.maximum(jnp.max(jnp.abs(reference)), 1e-30))


def _attention_inputs(dry: bool):
  import jax
  import jax.numpy as jnp

  batch, length, heads, kv_heads, head_dim = (1, 64, 4, 2, 16) if dry else (2, 4096, 32, 8, 64)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
  k, v = (
    jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:3]
  )
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  # Two packed documents per row: the segment mask is part of what is checked.
  segments = jnp.where(jnp.arange(length) < length // 3, 1, 2)[None].repeat(batch, 0)
  shape = dict(batch=batch, length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
  return (q, k, v), cotangent, segments.astype(jnp.int32), shape


def _attention_value_and_grads(implementation: str, cotangent, segments, **options):
  import jax
  import jax.numpy as jnp

  from finch_jax.models import attention

  def objective(q, k, v):
    out = attention.attend(q, k, v, segment_ids=segments, implementation=implementation, **options)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))


def part_attention(dry: bool) -> dict[str, Any]:
  """cuDNN attention's output and gradients against the float32 reference (dry: XLA's)."""
  import jax
  import jax.numpy as jnp

  qkv, cotangent, segments, shape = _attention_inputs(dry)
  implementation = "xla" if dry else "cudnn"  # the same jax.nn.dot_product_attention call
  exact_inputs = [x.astype(jnp.float32) for x in qkv]
  (_, exact), exact_grads = _attention_value_and_grads("reference", cotangent, segments)(
    *exact_inputs
  )
  results = {}
  for name in ("reference", implementation):
    (_, out), grads = _attention_value_and_grads(name, cotangent, segments)(*qkv)
    errors = {"out": _relative_error(out, exact)}
    for n, g, e in zip("qkv", grads, exact_grads, strict=True):
      errors[f"d{n}"] = _relative_error(g, e)
    results[name] = errors
  jax.block_until_ready(results)
  tolerance = {k: max(4 * v, 2e-2) for k, v in results["reference"].items()}
  out = {
    "shape": shape,
    "dtype": "bfloat16",
    "implementation": implementation,
    "error_against_float32": results[implementation],
    "bfloat16_reference_error": results["reference"],
    "tolerance": tolerance,
  }
  bad = [k for k, v in results[implementation].items() if not v <= tolerance[k]]
  if bad:
    raise WrongValue(f"{implementation} attention differs from the reference in {bad}: {out}")
  return out


def _memory(fn, args) -> dict[str, Any]:
  """Compiles `fn` for `args`, runs it, and reads the memory it took."""
  import jax

  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  result = jax.block_until_ready(compiled(*args))
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
    "argument_bytes": getattr(analysis, "argument_size_in_bytes", None),
    "output_bytes": getattr(analysis, "output_size_in_bytes", None),
    "device_peak_bytes_in_use_after": stats.get("peak_bytes_in_use"),
  }, result


def part_memory(dry: bool) -> dict[str, Any]:
  """Memory of the chunked loss and attention against the plain ones, and their agreement."""
  import jax
  import jax.numpy as jnp

  from finch_jax import losses

  batch, length, width, vocab = (2, 64, 32, 256) if dry else (4, 4096, 2048, 128_256)
  chunk = 16 if dry else 512
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(keys[0], (batch, length, width), jnp.bfloat16)
  head = (jax.random.normal(keys[1], (width, vocab), jnp.float32) * width**-0.5).astype(
    jnp.bfloat16
  )
  targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
  weights = jnp.ones((batch, length), jnp.float32)

  def loss_grad(chunk_size):
    def loss(h, w):
      return losses.cross_entropy_sums(h, w, targets, weights, chunk_size=chunk_size)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))

  # Smaller first: the device's peak counter only rises, so each reading covers its part so far.
  out: dict[str, Any] = {"loss_shape": dict(batch=batch, length=length, width=width, vocab=vocab)}
  out["loss_chunked"], (chunked_value, chunked_grads) = _memory(loss_grad(chunk), (hidden, head))
  out["loss_plain"], (plain_value, plain_grads) = _memory(loss_grad(None), (hidden, head))
  out["loss_chunk_size"] = chunk
  errors = {"loss": _relative_error(chunked_value, plain_value)}
  errors.update(
    {
      f"d{n}": _relative_error(c, p)
      for n, c, p in zip(("hidden", "head"), chunked_grads, plain_grads, strict=True)
    }
  )

  qkv, cotangent, segments, shape = _attention_inputs(dry)
  block = 16 if dry else 512
  chunked = _attention_value_and_grads("chunked", cotangent, segments, block_size=block)
  out["attention_chunked"], ((_, chunked_out), chunked_attn) = _memory(chunked, qkv)
  reference = _attention_value_and_grads("reference", cotangent, segments)
  out["attention_reference"], ((_, reference_out), reference_attn) = _memory(reference, qkv)
  out["attention_shape"], out["attention_block"] = shape, block
  errors["attention_out"] = _relative_error(chunked_out, reference_out)
  errors.update(
    {
      f"attention_d{n}": _relative_error(c, r)
      for n, c, r in zip("qkv", chunked_attn, reference_attn, strict=True)
    }
  )
  out["chunked_against_plain_error"] = errors
  # The loss sums in float32 either way; bfloat16 inputs and a different blocking of the
  # softmax leave bfloat16-sized differences in the gradients and attention outputs.
  tolerance = {k: (1e-4 if k == "loss" else 2e-2) for k in errors}
  bad = [k for k, v in errors.items() if not v <= tolerance[k]]
  if bad:
    raise WrongValue(f"chunked and plain disagree in {bad}: {errors}")
  return out


def part_smollm2(dry: bool, workdir: str) -> dict[str, Any]:
  """configs/smollm2_knowledge.py validated (dry) or run in `workdir` until it ends or is
  stopped."""
  from configs import smollm2_knowledge
  from finch_jax.experiment import train_and_evaluate
  from finch_jax.validate import ConfigError, validate

  config = smollm2_knowledge.get_config()
  try:
    validate(config, workdir)  # names what is missing (Debian packages, the GGUF file)
  except (ConfigError, FileNotFoundError, ImportError) as e:
    raise NotRunnable(str(e).strip().splitlines()[-1]) from e
  if dry:
    return {"validated": True}
  train_and_evaluate(config, workdir)
  return {"finished": True}


def run_part(name: str, dry: bool, workdir: str) -> dict[str, Any]:
  """The part called `name`'s result (raises WrongValue or NotRunnable)."""
  if name == "mfu_llama_1b":
    return part_mfu("llama_1b", dry)
  if name == "mfu_qwen3_0_6b":
    return part_mfu("qwen3_0_6b", dry)
  if name == "attention_cudnn":
    return part_attention(dry)
  if name == "memory_chunked":
    return part_memory(dry)
  return part_smollm2(dry, workdir)


def part_main(args) -> None:
  """One part, in this process: writes {"device", "result"} or the wrong value to --part_out."""
  import jax

  device = jax.devices()[0]
  record: dict[str, Any] = {
    "device": getattr(device, "device_kind", device.platform),
    "platform": device.platform,
    "device_count": jax.device_count(),
  }
  code = 0
  try:
    record["result"] = run_part(args.part, False, args.workdir)
  except WrongValue as e:
    record["wrong"], code = str(e), WRONG_VALUE_EXIT
  except NotRunnable as e:
    record["not_runnable"], code = str(e), NOT_RUNNABLE_EXIT
  with open(args.part_out, "w") as f:
    json.dump(record, f, indent=2, default=str)
  sys.exit(code)


# ----- the driver ----------------------------------------------------------------------------


def smollm2_progress(workdir: str) -> dict[str, Any]:
  """What a SmolLM2 run stopped early left in its workdir: the report, or each run's last
  logged metrics."""
  report = os.path.join(workdir, "report.json")
  if os.path.exists(report):
    with open(report) as f:
      return {"report": json.load(f)}
  runs = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**", "metrics.jsonl"), recursive=True)):
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    if lines:
      runs[os.path.relpath(os.path.dirname(path), workdir)] = json.loads(lines[-1])
  return {"runs_with_metrics": runs}


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1][:500] if lines else ""


def _no_accelerator() -> str | None:
  """Why the parts cannot run here (no accelerator, or JAX fails to start), or None. Asked in a
  process of its own, so that this one never holds the device the parts need."""
  probe = "import jax; d = jax.devices()[0]; print(d.platform, getattr(d, 'device_kind', ''))"
  done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
  if done.returncode:
    return f"JAX did not start: {_last_line(done.stderr)}"
  platform = done.stdout.split()[0] if done.stdout.split() else "unknown"
  return "no accelerator: JAX's backend is cpu" if platform == "cpu" else None


def _in_subprocess(name: str, workdir: str, seconds: float) -> tuple[int | None, dict, str]:
  """Runs one part in a fresh process, stopped after `seconds`: (exit status or None when it
  was stopped, what it wrote, the last line of its error output)."""
  part_out = os.path.join(workdir, "part.json")
  command = [sys.executable, os.path.abspath(__file__), "--part", name, "--part_out", part_out]
  command += ["--workdir", workdir]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(seconds, 1))
    code, error = done.returncode, _last_line(done.stderr)
  except subprocess.TimeoutExpired:
    code, error = None, ""
  record = {}
  if os.path.exists(part_out):
    with open(part_out) as f:
      record = json.load(f)
  return code, record, error


def _in_process(name: str, workdir: str, seconds: float) -> tuple[int, dict, str]:
  """A dry part, in this process (tiny shapes: a fresh process would cost more than the part)."""
  del seconds
  import jax

  device = jax.devices()[0]
  record: dict[str, Any] = {"device": device.device_kind, "platform": device.platform}
  try:
    record["result"] = run_part(name, True, workdir)
    return 0, record, ""
  except WrongValue as e:
    record["wrong"] = str(e)
    return WRONG_VALUE_EXIT, record, ""
  except NotRunnable as e:
    record["not_runnable"] = str(e)
    return NOT_RUNNABLE_EXIT, record, ""
  except Exception as e:  # noqa: BLE001 - reported in the JSON, as a part run apart would be
    return 1, record, f"{type(e).__name__}: {e}".splitlines()[0][:500]


def check(out_path: str, dry: bool, budget_s: float, workdir: str | None) -> int:
  """Runs every part that fits in `budget_s`, writes the JSON to `out_path`; the exit status."""
  start = time.monotonic()
  workdir = workdir or tempfile.mkdtemp(prefix="device_check_")
  report: dict[str, Any] = {"dry_run": dry, "budget_s": budget_s, "parts": {}}
  no_device = None if dry else _no_accelerator()
  for name, needs_device, estimate in PARTS:
    left = budget_s - (time.monotonic() - start)
    entry: dict[str, Any] = {"needs_device": needs_device}
    report["parts"][name] = entry
    if no_device and needs_device:
      entry.update(status="not_run", reason=no_device)
      continue
    if dry and name == "mfu_qwen3_0_6b":
      # On the tiny shape it is the first part's code again: traced there.
      entry.update(status="traced", reason="dry run: the same code as mfu_llama_1b on CPU")
      continue
    if not dry and left < estimate:
      entry.update(status="not_run", reason=f"{left:.0f} s left, it needs about {estimate} s")
      continue
    part_workdir = os.path.join(workdir, name)
    os.makedirs(part_workdir, exist_ok=True)
    began = time.monotonic()
    code, record, error = (_in_process if dry else _in_subprocess)(name, part_workdir, left)
    entry["seconds"] = round(time.monotonic() - began, 1)
    report.setdefault("device", record.get("device"))
    report.setdefault("platform", record.get("platform"))
    if code is None:
      entry.update(status="not_run", reason=f"stopped when the budget ran out ({left:.0f} s)")
    elif code == WRONG_VALUE_EXIT:
      entry.update(status="wrong", reason=record.get("wrong"))
    elif code == NOT_RUNNABLE_EXIT:
      entry.update(status="not_run", reason=record.get("not_runnable"))
    elif code != 0:
      entry.update(status="failed", reason=error or f"exit status {code}")
    elif dry:
      entry.update(status="traced", result=record["result"])
    else:
      entry.update(status="ran", result=record["result"])
    if name == "smollm2_knowledge" and not dry and entry["status"] in ("not_run", "ran"):
      entry["progress"] = smollm2_progress(part_workdir)
  report["elapsed_s"] = round(time.monotonic() - start, 1)
  report["not_run"] = {
    n: p["reason"] for n, p in report["parts"].items() if p["status"] in ("not_run", "failed")
  }
  report["wrong"] = {n: p["reason"] for n, p in report["parts"].items() if p["status"] == "wrong"}
  if dry:
    report["needs_device"] = [n for n, p in report["parts"].items() if p["needs_device"]]
  with open(out_path, "w") as f:
    json.dump(report, f, indent=2, default=str)
  for name, reason in report["not_run"].items():
    print(f"not run: {name}: {reason}")
  for name, reason in report["wrong"].items():
    print(f"WRONG: {name}: {reason}")
  print(f"wrote {out_path} ({report['elapsed_s']} s)")
  return 1 if report["wrong"] else 0


def main(argv: list[str] | None = None) -> None:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="where the JSON goes")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes on the CPU")
  parser.add_argument("--budget_s", type=float, default=480.0, help="seconds for all parts")
  parser.add_argument("--workdir", default=None, help="scratch (default: a temporary folder)")
  parser.add_argument("--part", choices=[name for name, _, _ in PARTS], help=argparse.SUPPRESS)
  parser.add_argument("--part_out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.part:
    return part_main(args)
  if not args.out:
    parser.error("--out PATH is required: where the JSON goes.")
  if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is first imported (by a part)
  sys.exit(check(args.out, args.dry_run, args.budget_s, args.workdir))


if __name__ == "__main__":
  main()
