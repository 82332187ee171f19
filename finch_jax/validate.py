"""Configuration checks that run before any device work or compilation.

`validate(config, workdir)` reads a training config (`configs/*.py` plus command-line
overrides) and raises `ConfigError` listing every problem it finds, each naming the field, its
value and the fix, e.g.

    data.batch_size=12: does not split over the 8 devices the batch is sharded on
    (mesh.data=8 x mesh.fsdp=1): set --config.data.batch_size to a multiple of 8, e.g. 8 or 16.

A run that would fail only after minutes of dataset building, pretraining or compiling fails
here in well under a second instead. Nothing is built, downloaded or compiled: models are traced
abstractly (`nnx.eval_shape`), datasets are checked by name (embedded corpora by their
generator, local text by its files, TFDS catalog names by their registered builder class), a
base checkpoint by its step directories and saved config, and a checkpoint the run would resume
by the arrays it holds (orbax's metadata: paths, shapes, dtypes) against the state the config
builds. In `compare` mode the base-model run (`compare.pretrain`) and every method's runs
(`compare.methods`) are checked as the configs they become, and a problem that comes from an
override names the override.

A config is read as the run reads it (`finch_jax.configure`), and the checks reuse the library's
own validation where it exists (the model configs, `scale_by_finch`, `make_optimizer`,
`make_mesh`, the dataset builders), so a message here says what the run itself would have said,
with the config field in front.

The module reads top to bottom: `validate`, the problem collector, the whole config, then one
section per concern (counts and seeds, model, optimizer and schedule, FINCH, mesh and batch,
sequence lengths, datasets, remedies, base checkpoint, the workdir, resume).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import json
import math
import numbers
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from etils import epath
from flax import nnx
from tensorflow_datasets.core import naming

from finch_jax import checkpoint, configure, files, models
from finch_jax import sharding as shd
from finch_jax.data import builders, sft, synthetic
from finch_jax.lora import LoraConfig
from finch_jax.models import ModelConfig, hf
from finch_jax.optim import READINGS, finch_keywords, make_optimizer, schedule_shape
from finch_jax.transform import scale_by_finch

# The modes `experiment.train_and_evaluate` runs. Defined here rather than imported from
# experiment, which calls `validate` (and can take MODES from here).
MODES = ("pretrain", "finetune", "compare")


class ConfigError(ValueError):
  """A configuration that cannot run.

  Attributes:
    problems: one line per problem, each naming the field, its value and the fix.
  """

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    count = len(self.problems)
    heading = "Invalid configuration" + (f" ({count} problems)" if count > 1 else "")
    super().__init__(heading + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def validate(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  device_count: int | None = None,
  process_count: int | None = None,
) -> None:
  """Raises `ConfigError` listing every problem of `config`; returns None when it can run.

  Call it first, before any device work: it builds, downloads and compiles nothing. It asks
  JAX for the device count, so with several processes call it after
  `sharding.initialize_distributed` (as `train.py` does before `train_and_evaluate`).

  Args:
    config: a training config (see `configs/default.py`).
    workdir: the run's workdir; when given, a checkpoint the run would resume from there must
      hold the arrays (paths, shapes, dtypes) of the state this config builds.
    device_count: devices of the whole job; default `jax.device_count()`. Pass the target's
      count to check a config for another machine (e.g. a pod) from a laptop.
    process_count: processes of the job; default `jax.process_count()`.

  Raises:
    ConfigError: (a `ValueError`) naming each bad field, its value and the fix.
  """
  job = _Job(
    devices=jax.device_count() if device_count is None else int(device_count),
    processes=jax.process_count() if process_count is None else int(process_count),
    real=device_count is None,
  )
  problems = _Problems()
  _check_config(config, workdir, job, problems)
  if problems.lines:
    raise ConfigError(problems.lines)


# ----- what the checks share -------------------------------------------------------------------


class _Problems:
  """The problems found so far, each `field=value: message`, in order and without repeats."""

  def __init__(self):
    self.lines: list[str] = []

  def fail(self, field: str, value: Any, message: str) -> None:
    line = f"{field}={_show(value)}: {message}"
    if line not in self.lines:  # runs of a comparison share most fields
      self.lines.append(line)


class _Job(NamedTuple):
  """The job a config must fit. `real`: these are this machine's devices, so the mesh is built."""

  devices: int
  processes: int
  real: bool


@dataclasses.dataclass
class _Run:
  """One training run's config and how to name its fields.

  `context` is '' for the config itself, or 'compare.pretrain' / 'compare.methods.NAME' for a
  config derived from it; `overrides` are that context's changes, so a field set there is
  named as the override (`compare.pretrain.data.batch_size`) and any other as itself.
  """

  config: ml_collections.ConfigDict
  context: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def name(self, path: str) -> str:
    node = self.overrides
    for part in path.split("."):
      if not isinstance(node, Mapping) or part not in node:
        return path
      node = node[part]
    return f"{self.context}.{path}"

  def flag(self, path: str) -> str:
    """The command-line flag that sets `path` in this run."""
    return f"--config.{self.name(path)}"


def _show(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def _get(node: Any, path: str, default: Any = None) -> Any:
  """`node.a.b` for path 'a.b', or `default` where a part is missing."""
  for part in path.split("."):
    if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
      return default
    node = node[part]
  return node


def _as_dict(node: Any) -> dict[str, Any]:
  return node.to_dict() if hasattr(node, "to_dict") else dict(node or {})


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_seed(value: Any) -> bool:
  return _is_int(value) and 0 <= value < 2**32


def _multiples(value: int, step: int) -> str:
  """'8 or 16': the multiples of `step` around `value`."""
  low, high = (value // step) * step, (value // step + 1) * step
  return f"{low} or {high}" if low > 0 else f"{high}"


def _did_you_mean(key: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


# ----- the whole config ------------------------------------------------------------------------


def _check_config(
  config: ml_collections.ConfigDict, workdir: str | None, job: _Job, p: _Problems
) -> None:
  """Each run the config makes, what they share, and the checkpoints they start from."""
  mode = _get(config, "mode")
  if mode not in MODES:
    p.fail("mode", mode, f"unknown mode; use one of {', '.join(MODES)}.")
    return
  runs = _compare_runs(config, p) if mode == "compare" else [_Run(config)]
  read: set[str] = set()
  for run in runs:
    read |= _check_run(run, job, p)
  _check_option_keys(config, read, p)
  if mode == "finetune" or (mode == "compare" and _get(config, "base_checkpoint")):
    _check_base_checkpoint(config, p)  # a comparison may start from a given base too
  if not workdir:
    return
  if not _check_workdir(os.fspath(workdir), p):
    return  # the resume checks would read a workdir that cannot be used
  for run in runs:
    state_dir = _resumed_dir(run, mode, workdir)
    if state_dir:
      _check_resume(run.config, state_dir, p)


def _compare_runs(config: ml_collections.ConfigDict, p: _Problems) -> list[_Run]:
  """The runs of `compare`: the base model's, then each method's (with its overrides)."""
  if _get(config, "compare") is None:
    p.fail("compare", None, "mode 'compare' needs a compare section (see configs/default.py).")
    return []
  runs = [_pretrain_run(config, p), *_method_runs(config, p)]
  _check_compare_settings(config, p)
  return [run for run in runs if run is not None]


def _unknown_override(where: str, p: _Problems) -> Callable[[str, Any, list[str]], None]:
  """Reports an override that names no config field; `configure.override` then skips it, so
  the rest is still applied and checked and one typo does not hide the other problems."""

  def report(path: str, value: Any, known: list[str]) -> None:
    key = path.rsplit(".", 1)[-1]
    p.fail(
      f"{where}.{path}",
      value,
      f"not a config field{_did_you_mean(key, known)}; fields here: {', '.join(known)}.",
    )

  return report


def _pretrain_run(config: ml_collections.ConfigDict, p: _Problems) -> _Run | None:
  changes = _as_dict(_get(config, "compare.pretrain", {}))
  try:
    pre = configure.pretrain_config(config, on_unknown=_unknown_override("compare.pretrain", p))
  except (KeyError, TypeError, ValueError, AttributeError) as error:  # e.g. a value's type
    p.fail("compare.pretrain", changes, _one_line(error))
    return None
  return _Run(pre, "compare.pretrain", changes)


def _method_runs(config: ml_collections.ConfigDict, p: _Problems) -> list[_Run]:
  methods = _get(config, "compare.methods", {}) or {}
  if not methods:
    p.fail("compare.methods", methods, "name at least one method, e.g. {'standard': {...}}.")
    return []
  runs = []
  for name, changes in configure.method_overrides(config).items():
    where = f"compare.methods.{name}"
    rates = _get(methods[name], "learning_rates")
    if (
      not isinstance(rates, Sequence)
      or not rates
      or not all(_is_number(r) and r > 0 for r in rates)
    ):
      p.fail(
        f"{where}.learning_rates",
        rates,
        "each method sweeps a non-empty list of positive learning rates, e.g. (3e-4, 1e-3, "
        "3e-3); the report reads methods at matched task loss along these sweeps.",
      )
    try:
      method = configure.override(config, changes, on_unknown=_unknown_override(where, p))
    except (KeyError, TypeError, ValueError) as error:  # e.g. a value of the wrong type
      p.fail(where, changes, _one_line(error))
      continue
    runs.append(_Run(method, where, changes))
  return runs


def _check_compare_settings(config: ml_collections.ConfigDict, p: _Problems) -> None:
  methods = _get(config, "compare.methods", {}) or {}
  baseline = _get(config, "compare.baseline")
  if methods and baseline not in methods:
    p.fail(
      "compare.baseline",
      baseline,
      f"the baseline must be one of compare.methods: {sorted(methods)}.",
    )
  only = _get(config, "compare.only", ()) or ()
  if isinstance(only, str) or not all(name in methods for name in only):
    p.fail(
      "compare.only",
      only,
      f"name methods of compare.methods to sweep now, e.g. ('finch',): {sorted(methods)}.",
    )
  seeds = _get(config, "compare.seeds")
  if not isinstance(seeds, Sequence) or not seeds or not all(map(_is_seed, seeds)):
    p.fail("compare.seeds", seeds, "give a non-empty list of seeds in [0, 2**32), e.g. (0, 1).")
  concurrent = _get(config, "compare.concurrent_runs", 0)
  if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 0:
    p.fail(
      "compare.concurrent_runs",
      concurrent,
      "give the number of runs to train at once, or 0 for one per device on a CPU machine.",
    )


def _check_run(run: _Run, job: _Job, p: _Problems) -> set[str]:
  """Every check of one run; returns the options keys of the datasets it reads."""
  _check_counts(run, p)
  model = _model_config(run, p)
  _check_optimizer(run, p)
  _check_finch(run, p)
  sizes = _mesh_sizes(run, job, p)
  _check_batch(run, job, sizes, p)
  if model is not None:
    if sizes is not None:
      _check_param_sharding(run, model, sizes, p)
    _check_lengths(run, model, p)
    _check_tokenizer(run, model, p)
  read = _check_datasets(run, p)
  _check_remedies(run, p)
  _check_forgetting_sets(run, p)
  return read


# ----- counts and seeds ------------------------------------------------------------------------

# (field, smallest value, what it means) of the run's integer counts and intervals.
_COUNTS = (
  ("num_train_steps", 1, "the number of optimizer steps, e.g. 1000"),
  ("grad_accum_steps", 1, "1 for no accumulation"),
  ("log_every", 1, "1 logs every step"),
  ("eval_every", 0, "0 evaluates only at the end"),
  ("checkpoint_every", 0, "0 checkpoints only at the end"),
  ("keep_checkpoints", 1, "how many recent checkpoints to keep, e.g. 2"),
)


def _check_counts(run: _Run, p: _Problems) -> None:
  c = run.config
  for path, minimum, hint in _COUNTS:
    value = _get(c, path)
    if not _is_int(value) or value < minimum:
      sign = "positive" if minimum == 1 else "non-negative"
      p.fail(run.name(path), value, f"must be a {sign} integer ({hint}).")
  if not _is_seed(_get(c, "seed")):
    p.fail(run.name("seed"), _get(c, "seed"), "use an integer in [0, 2**32).")
  chunk = _get(c, "loss_chunk_size", 0)
  if not _is_int(chunk) or chunk < 0:
    p.fail(
      run.name("loss_chunk_size"),
      chunk,
      "must be a non-negative integer: tokens per row whose logits the loss makes at once "
      "(0: the whole row), e.g. 512.",
    )
  for path in ("data.eval_examples", "data.fact_examples"):
    value = _get(c, path, 0)
    if not _is_int(value) or value < 0:
      p.fail(run.name(path), value, "must be a non-negative integer (0 means all).")


# ----- model -----------------------------------------------------------------------------------


def _model_config(run: _Run, p: _Problems) -> ModelConfig | None:
  """The run's architecture, or None after reporting why there is none."""
  values = _get(run.config, "model")
  base = _get(run.config, "base_checkpoint")
  pretrained = isinstance(base, str) and configure.is_pretrained(base)
  if pretrained and _pretrained_config_error(base):
    return None  # _check_base_checkpoint names what is wrong with its config
  try:
    if pretrained:  # a pretrained base brings its architecture; `model` gives its numerics
      return configure.pretrained_model_config(base, _as_dict(values))
    return models.config_from_dict(values)
  except (TypeError, ValueError, AttributeError) as error:
    p.fail(run.name("model"), values, str(error))
    return None


def _pretrained_config_error(path: str) -> str | None:
  """Why the architecture of the pretrained model `path` (its config.json, or its GGUF metadata)
  cannot be used, if it cannot."""
  try:
    configure.pretrained_model_config(path, {})
  except (OSError, ValueError, KeyError, TypeError) as error:
    return _one_line(error)
  return None


# ----- optimizer and schedule ------------------------------------------------------------------

# (optimizer field, whether a value is valid, what is valid) of the optimizer's numbers.
_OPTIMIZER_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
  ("learning_rate", lambda v: v > 0, "a positive peak rate, e.g. 1e-3"),
  ("final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("weight_decay", lambda v: v >= 0, ">= 0"),
  ("b1", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
  ("b2", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.95"),
  ("eps", lambda v: v > 0, "> 0, e.g. 1e-8"),
  ("momentum", lambda v: 0 <= v < 1, "in [0, 1); 0 for none"),
  ("grad_clip", lambda v: v >= 0, ">= 0; 0 disables clipping"),
)


def _check_optimizer(run: _Run, p: _Problems) -> None:
  """Its numbers in range, then its schedule and name as `make_optimizer` reads them."""
  o = _as_dict(_get(run.config, "optimizer"))
  steps = _get(run.config, "num_train_steps")
  steps = steps if _is_int(steps) and steps > 0 else 1
  numbers_ok = True
  for key, ok, requirement in _OPTIMIZER_RANGES:
    if key in o and not (_is_number(o[key]) and ok(o[key])):
      p.fail(run.name(f"optimizer.{key}"), o[key], f"must be {requirement}.")
      numbers_ok = False
  warmup = o.get("warmup_steps", 0)
  if not _is_int(warmup) or warmup < 0:
    p.fail(run.name("optimizer.warmup_steps"), warmup, "must be an integer >= 0.")
    return
  try:
    schedule_shape(o.get("schedule", "constant"), steps, warmup, o.get("final_lr_fraction", 0.0))
  except ValueError as error:
    p.fail(run.name("optimizer.schedule"), o.get("schedule"), str(error))
    return
  if not numbers_ok:  # make_optimizer would only repeat them, less precisely
    return
  try:
    make_optimizer(o, None, steps)  # names the optimizers it knows
  except (ValueError, TypeError, KeyError) as error:
    field = "optimizer.name" if "optimizer" in str(error).lower() else "optimizer"
    p.fail(run.name(field), o.get("name") if field.endswith("name") else o, str(error))


# ----- FINCH -----------------------------------------------------------------------------------


def _check_finch(run: _Run, p: _Problems) -> None:
  """With FINCH on, its options are its reading (`optim.finch_keywords`) and those of
  `scale_by_finch`, in their ranges and consistent with the reading."""
  finch = _as_dict(_get(run.config, "finch"))
  if not finch.get("enabled", False):
    return
  options = {k: v for k, v in finch.items() if k != "enabled"}
  parameters = inspect.signature(scale_by_finch).parameters
  accepted = sorted({*parameters, "reading"})
  for key in sorted(set(options) - set(accepted)):
    p.fail(
      run.name(f"finch.{key}"),
      options[key],
      f"not a FINCH option{_did_you_mean(key, accepted)}; options: {', '.join(accepted)}.",
    )
  try:
    keywords = finch_keywords({k: v for k, v in options.items() if k in accepted})
  except ValueError as error:  # messages start with the field to change
    field = str(error).split()[0]
    if options.get(field) is None:  # a reading's field left unset: name the reading
      field = "reading"
    p.fail(run.name(f"finch.{field}"), options.get(field, "first"), str(error))
    return
  try:
    scale_by_finch(**keywords)
  except (TypeError, ValueError) as error:  # scale_by_finch's own range checks
    first = str(error).split()[0]  # they start with the option's name
    if first not in options:
      p.fail(run.name("finch"), finch, str(error))
      return
    # A reading's own field has no default: its reading needs it set.
    default = "" if first in READINGS.values() else f" (default: {parameters[first].default!r})"
    p.fail(
      run.name(f"finch.{first}"),
      options[first],
      f"{error} Set {run.flag(f'finch.{first}')} accordingly{default}.",
    )


# ----- mesh, batch and parameter sharding ------------------------------------------------------

# Which model field sets the size of each logical parameter axis (see sharding.DEFAULT_RULES).
_AXIS_FIELDS = {
  "vocab": "vocab_size",
  "embed": "d_model",
  "heads": "num_heads",
  "kv_heads": "num_kv_heads",
  "mlp": "d_ff",
  "head_dim": "head_dim",
}


def _mesh_sizes(run: _Run, job: _Job, p: _Problems) -> dict[str, int] | None:
  """The resolved mesh sizes, or None after reporting why the mesh cannot be built."""
  mesh = _as_dict(_get(run.config, "mesh"))
  field = run.name("mesh")
  unknown = sorted(set(mesh) - set(shd.MESH_AXES))
  if unknown:
    p.fail(field, mesh, f"unknown mesh axes {unknown}; the axes are {shd.MESH_AXES}.")
    return None
  sizes = {axis: mesh.get(axis, 1) for axis in shd.MESH_AXES}
  if not all(_is_int(size) for size in sizes.values()):
    p.fail(field, mesh, "mesh sizes must be integers (-1 for the devices left over).")
    return None
  if not job.real:
    return _resolve_mesh(field, mesh, sizes, job.devices, p)
  try:  # make_mesh's own checks; building the Mesh object compiles nothing
    return dict(shd.make_mesh(**sizes).shape)
  except ValueError as error:
    p.fail(field, mesh, str(error))
    return None


def _resolve_mesh(
  field: str, mesh: Mapping[str, int], sizes: dict[str, int], count: int, p: _Problems
) -> dict[str, int] | None:
  """make_mesh's rules, for a device count other than this machine's."""
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
    p.fail(field, mesh, "sizes must be positive, with at most one -1 (the rest).")
    return None
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest and count % fixed:
    message = f"{count} devices do not divide by {fixed}: choose sizes whose product divides"
    p.fail(field, mesh, f"{message} {count}.")
    return None
  if rest:
    return {**sizes, rest[0]: count // fixed}
  if fixed != count:
    fix = f"set --config.mesh.data=-1 or choose sizes whose product is {count}"
    p.fail(field, mesh, f"needs {fixed} devices, the job has {count}: {fix}.")
    return None
  return sizes


def _check_batch(run: _Run, job: _Job, sizes: Mapping[str, int] | None, p: _Problems) -> None:
  """The global batch splits among the processes, then over the devices it is sharded on."""
  batch = _get(run.config, "data.batch_size")
  field = run.name("data.batch_size")
  if not _is_int(batch) or batch < 1:
    p.fail(field, batch, "must be a positive integer: rows per global batch.")
    return
  if batch % job.processes:
    p.fail(
      field,
      batch,
      f"the global batch is split among the {job.processes} processes: set "
      f"{run.flag('data.batch_size')} to a multiple of {job.processes}, e.g. "
      f"{_multiples(batch, job.processes)}.",
    )
  if sizes is not None:
    _check_batch_devices(run, job, batch, sizes, p)


def _check_batch_devices(
  run: _Run, job: _Job, batch: int, sizes: Mapping[str, int], p: _Problems
) -> None:
  rows_devices = sizes["data"] * sizes["fsdp"]
  shown = f"mesh.data={sizes['data']} x mesh.fsdp={sizes['fsdp']}"
  flag = run.flag("data.batch_size")
  if rows_devices % job.processes:
    p.fail(
      run.name("mesh"),
      _get(run.config, "mesh"),
      f"the batch is sharded over {rows_devices} devices ({shown}), which do not split among "
      f"the {job.processes} processes that each feed their own rows: make mesh.data x "
      f"mesh.fsdp a multiple of {job.processes} (keep mesh.tensor within one process's devices).",
    )
  if batch % rows_devices:
    p.fail(
      run.name("data.batch_size"),
      batch,
      f"does not split over the {rows_devices} devices the batch is sharded on ({shown}): set "
      f"{flag} to a multiple of {rows_devices}, e.g. {_multiples(batch, rows_devices)}.",
    )
    return
  accum = _get(run.config, "grad_accum_steps")
  if _is_int(accum) and accum > 1 and batch % (accum * rows_devices):
    divisors = [k for k in range(1, accum + 1) if batch % (k * rows_devices) == 0]
    p.fail(
      run.name("data.batch_size"),
      batch,
      f"with grad_accum_steps={accum} each micro-batch of batch_size / {accum} rows must split "
      f"over the {rows_devices} batch devices ({shown}): set {flag} to a multiple of "
      f"{accum * rows_devices}, e.g. {_multiples(batch, accum * rows_devices)}, or "
      f"{run.flag('grad_accum_steps')} to one of {divisors}.",
    )


def _check_param_sharding(
  run: _Run, model: ModelConfig, sizes: Mapping[str, int], p: _Problems
) -> None:
  """Every parameter axis divides by the mesh axes it is sharded over (jit would refuse)."""
  for field, value, axes, divisor in _indivisible_axes(model, tuple(sorted(sizes.items()))):
    shown = " x ".join(f"mesh.{axis}={sizes[axis]}" for axis in axes)
    p.fail(
      run.name(f"model.{field}"),
      value,
      f"parameters are sharded over {shown} along this axis, which needs a multiple of "
      f"{divisor}: change model.{field}, or set "
      + " / ".join(run.flag(f"mesh.{axis}") for axis in axes)
      + f" to a divisor of {value}.",
    )


@functools.lru_cache(maxsize=16)
def _indivisible_axes(
  model: ModelConfig, sizes: tuple[tuple[str, int], ...]
) -> list[tuple[str, Any, tuple[str, ...], int]]:
  """(model field, its value, mesh axes, their product) for parameter axes that do not divide."""
  mesh_sizes = dict(sizes)
  abstract = nnx.eval_shape(lambda: models.build(model, nnx.Rngs(0)))
  found: dict[tuple[str, tuple[str, ...]], tuple[str, Any, tuple[str, ...], int]] = {}
  for _, variable in nnx.iter_graph(abstract):
    if not isinstance(variable, nnx.Variable):
      continue
    names = variable.get_metadata().get("out_sharding")
    shape = getattr(variable.get_value(), "shape", ())
    if not names or len(names) != len(shape):
      continue
    for logical, dim, axes in zip(names, shape, shd.logical_to_mesh(names), strict=True):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      divisor = math.prod(mesh_sizes[a] for a in axes)
      if divisor > 1 and dim % divisor:
        field = _AXIS_FIELDS.get(logical, logical)
        value = getattr(model, field, dim)
        value = dim if value is None else value
        found.setdefault((field, axes), (field, value, axes, divisor))
  return list(found.values())


# ----- sequence lengths ------------------------------------------------------------------------


def _check_lengths(run: _Run, model: ModelConfig, p: _Problems) -> None:
  """Training rows and fact batches fit in the model's `max_len`."""
  c = run.config
  seq_len = _get(c, "data.seq_len")
  if not _is_int(seq_len) or seq_len < 1:
    p.fail(run.name("data.seq_len"), seq_len, "must be a positive integer.")
  elif seq_len > model.max_len:
    p.fail(
      run.name("data.seq_len"),
      seq_len,
      f"longer than the model's max_len={model.max_len}: set {run.flag('data.seq_len')} <= "
      f"{model.max_len} or raise {run.flag('model.max_len')}.",
    )
  if not (_get(c, "data.fact_sets", {}) or {}):
    return  # the fact widths are unused
  prompt, answer = _get(c, "data.max_prompt_len"), _get(c, "data.answer_len")
  for path, value in (("data.max_prompt_len", prompt), ("data.answer_len", answer)):
    if not _is_int(value) or value < 1:
      p.fail(run.name(path), value, "must be a positive integer when fact sets are set.")
      return
  if prompt + answer > model.max_len:
    p.fail(
      run.name("data.max_prompt_len"),
      prompt,
      f"fact recall reads max_prompt_len + answer_len = {prompt} + {answer} = "
      f"{prompt + answer} tokens, beyond the model's max_len={model.max_len}: lower "
      f"{run.flag('data.max_prompt_len')} or {run.flag('data.answer_len')}, or raise "
      f"{run.flag('model.max_len')}.",
    )


def _check_tokenizer(run: _Run, model: ModelConfig, p: _Problems) -> None:
  """Every token id has an embedding row: an id at or past the model's `vocab_size` reads none
  (`jnp.take` fills NaN), so every step's loss is NaN, every update is skipped, and the run
  ends having learned nothing. A pretrained base's own tokenizer comes with its embedding and
  is not read here (from a GGUF file that takes seconds)."""
  field, base = "data.tokenizer", _get(run.config, "base_checkpoint")
  pretrained = isinstance(base, str) and configure.is_pretrained(base)
  if pretrained and not _get(run.config, field):
    return
  try:
    tokenizer = configure.make_tokenizer(run.config)
  except (OSError, ValueError) as error:
    p.fail(run.name(field), _get(run.config, field, ""), _one_line(error))
    return
  tokens, rows = tokenizer.vocab_size, model.vocab_size
  if tokens <= rows:
    return
  too_many = f"the tokenizer has {tokens} tokens, the model's vocabulary {rows} embedding rows"
  if pretrained:
    p.fail(
      run.name(field),
      _get(run.config, field),
      f"{too_many} ({base}): set {run.flag(field)}='' to use the base model's own tokenizer, "
      f"or one of at most {rows} tokens.",
    )
  else:
    p.fail(
      run.name("model.vocab_size"),
      rows,
      f"{too_many}: set {run.flag('model.vocab_size')} to at least {tokens} (e.g. "
      f"{-(-tokens // 8) * 8}), or {run.flag(field)} to a tokenizer of at most {rows} tokens.",
    )


# ----- datasets --------------------------------------------------------------------------------


def _check_datasets(run: _Run, p: _Problems) -> set[str]:
  """Every dataset the run reads exists and has its split with the records it is read for;
  returns the options keys of those that exist."""
  read = set()
  for where, spec in configure.dataset_specs(run.config).items():
    kind = "facts" if where.startswith("data.fact_sets.") else "text"
    name = spec.get("name") if isinstance(spec, Mapping | ml_collections.ConfigDict) else None
    if where == "replay.data" and name == builders.BASE_SAMPLES:
      continue  # the base model's own samples: _check_remedies asks for a base model
    if isinstance(name, str) and name.startswith(builders.JSONL_PREFIX):
      _check_jsonl(run, f"{where}.name", name, kind, p)
    elif name == builders.BASE_SAMPLES:
      if kind == "facts" or _get(run.config, "mode") == "pretrain":
        p.fail(
          run.name(f"{where}.name"),
          name,
          "base-model samples are a loss set (or replay data) of a run with a base model "
          "(mode 'finetune' or 'compare'); name a dataset here.",
        )
    elif key := _check_dataset(run, where, spec, kind, p):
      read.add(key)
  return read


def _check_jsonl(run: _Run, field: str, name: str, kind: str, p: _Problems) -> None:
  """Instruction data: files that exist, read as loss sets or training data (not as facts)."""
  if kind == "facts":
    p.fail(
      run.name(field),
      name,
      "fact sets read prompt/answer TFDS records; use JSONL data as a loss set "
      "(data.eval_sets) or for training.",
    )
    return
  try:
    sft.jsonl_files(name.removeprefix(builders.JSONL_PREFIX))
  except FileNotFoundError as error:
    p.fail(run.name(field), name, _one_line(error))


def _check_dataset(run: _Run, where: str, spec: Any, kind: str, p: _Problems) -> str | None:
  """A `{name, split}` spec of a built dataset; its options key when the dataset exists."""
  if not isinstance(spec, Mapping | ml_collections.ConfigDict) or not spec.get("split"):
    p.fail(run.name(where), spec, "give {'name': DATASET or '' for data.name, 'split': SPLIT}.")
    return None
  name = configure.spec_name(run.config, spec)
  name_field = run.name(f"{where}.name") if spec.get("name") else run.name("data.name")
  if not isinstance(name, str) or not name:
    p.fail(name_field, name, f"name a dataset; {builders.VALID_NAMES_HELP}.")
    return None
  try:
    splits = _dataset_splits(name, configure.dataset_options(run.config, name))
  except Exception as error:  # the builders' own message names the fix
    p.fail(name_field, name, _one_line(error))
    return None
  if splits is not None:  # None: a catalog dataset, whose splits only a download would tell
    _check_split(run, f"{where}.split", name, spec["split"], splits, kind, p)
  return builders.options_key(name)


def _check_split(
  run: _Run,
  field: str,
  name: str,
  split: str,
  splits: Mapping[str, set[str]],
  kind: str,
  p: _Problems,
) -> None:
  base_split = split.split("[")[0]  # 'train[:10%]' reads split 'train'
  if base_split not in splits:
    p.fail(
      run.name(field),
      split,
      f"dataset {name!r} has no split {base_split!r}; it has {sorted(splits)}.",
    )
    return
  # A loss set or training data reads text, or instruction data (prompt/response records).
  accepted = [{"prompt", "answer"}] if kind == "facts" else [{"text"}, {"prompt", "response"}]
  if not any(needed <= splits[base_split] for needed in accepted):
    usable = sorted(s for s, f in splits.items() if any(needed <= f for needed in accepted))
    what = (
      "fact sets read prompt/answer records"
      if kind == "facts"
      else "text sets read text or prompt/response records"
    )
    p.fail(
      run.name(field),
      split,
      f"{what}, and split {base_split!r} of {name!r} has none; use one of {usable}.",
    )


def _dataset_splits(name: str, options: Mapping[str, Any]) -> dict[str, set[str]] | None:
  """{split: record fields} of dataset `name`, or None when only a download would tell.

  Raises the builders' own errors (unknown name, bad options, missing local files). Not
  cached: local files may appear or go between two calls.
  """
  if name.startswith(builders.EMBEDDED_PREFIX):
    corpus = name.removeprefix(builders.EMBEDDED_PREFIX)
    builders.embedded_config(corpus, **options)  # unknown corpus or options
    return _embedded_splits(corpus)
  if name.startswith(builders.LOCAL_TEXT_PREFIX):
    config = builders.local_text_config(name.removeprefix(builders.LOCAL_TEXT_PREFIX), **options)
    splits = ["train"] + (["validation"] if config.validation_fraction > 0 else [])
    return {split: {"text"} for split in splits}
  _check_catalog_name(name)
  return None


@functools.lru_cache(maxsize=8)
def _embedded_splits(corpus: str) -> dict[str, set[str]]:
  """The splits of an embedded corpus and their fields, from a one-person build in memory."""
  accepted = synthetic.corpus_options(corpus)
  tiny = {
    key: 1
    for key in ("num_base_people", "num_new_people", "num_finetune", "num_task_eval")
    if key in accepted
  }
  records = synthetic.embedded_corpus(corpus, **tiny)
  return {split: {k for k, v in rows[0].items() if v} for split, rows in records.items() if rows}


def _check_catalog_name(name: str) -> None:
  """Raises ValueError unless `name` is a registered TFDS builder (and config), offline."""
  try:
    dataset, kwargs = naming.parse_builder_name_kwargs(name)
    cls = tfds.builder_cls(str(dataset))
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(
      f"unknown dataset {name!r} ({str(error).splitlines()[0]}); {builders.VALID_NAMES_HELP}."
    ) from None
  except Exception as error:  # TFDS raises several kinds for a malformed or remote name
    raise ValueError(
      f"cannot use dataset {name!r} ({_one_line(error)}); {builders.VALID_NAMES_HELP}."
    ) from None
  config = kwargs.get("config")
  known = [c.name for c in (getattr(cls, "BUILDER_CONFIGS", None) or [])]
  if config and config not in known:
    listed = (
      f"its configs: {known[:20]}{' ...' if len(known) > 20 else ''}"
      if known
      else f"it has no configs: name it {str(dataset)!r}"
    )
    raise ValueError(
      f"TFDS dataset {dataset!s} has no config {config!r}{_did_you_mean(config, known)}; {listed}."
    )


def _check_option_keys(config: ml_collections.ConfigDict, read: set[str], p: _Problems) -> None:
  """A misspelled `data.options` key, which would leave its dataset at default sizes.

  `read` holds the options keys of the datasets the config reads. Options of datasets it does
  not read are fine (configs/default.py keeps the biographies' sizes when data.name points
  elsewhere); a key that reads no dataset but is close to the key of one that has no options
  of its own is a typo.
  """
  options = _get(config, "data.options", {}) or {}
  bare = sorted(read - set(options))
  for key in options:
    if key in read or not difflib.get_close_matches(key, bare, n=1):
      continue
    p.fail(
      f"data.options.{key}",
      options[key],
      f"no dataset read by this config has that key{_did_you_mean(key, bare)}, so these "
      "options are ignored; options are keyed by the dataset name with each run of "
      "characters other than letters and digits written as '_'.",
    )


def _check_forgetting_sets(run: _Run, p: _Problems) -> None:
  """Forgetting is read from the eval sets 'task' and 'retain' of a run with a base model."""
  mode = _get(run.config, "mode")
  if mode not in ("finetune", "compare"):
    return
  eval_sets = _get(run.config, "data.eval_sets", {}) or {}
  missing = [name for name in ("task", "retain") if name not in eval_sets]
  if missing:
    p.fail(
      run.name("data.eval_sets"),
      eval_sets,
      f"mode {mode!r} reads forgetting from the eval sets 'task' and 'retain'; add "
      f"{', '.join(repr(m) for m in missing)} (a {{'name': ..., 'split': ...}} each).",
    )


# ----- remedies: replay, the KL term, anchoring, LoRA ------------------------------------------


def _check_remedies(run: _Run, p: _Problems) -> None:
  """Values in range, and a base model where a remedy needs one."""
  c = run.config
  share = _get(c, "replay.share", 0.0)
  if not _is_number(share) or not 0.0 <= share < 1.0:
    p.fail(run.name("replay.share"), share, "must be in [0, 1) (0 turns replay off).")
    share = 0.0
  kl = _get(c, "replay.kl_weight", 0.0)
  if not _is_number(kl) or kl < 0:
    p.fail(run.name("replay.kl_weight"), kl, "must be >= 0 (0: replay by cross-entropy).")
  anchor = _get(c, "optimizer.anchor_strength", 0.0)
  if not _is_number(anchor) or anchor < 0:
    p.fail(run.name("optimizer.anchor_strength"), anchor, "must be >= 0 (0: off).")
  rank = _check_lora(run, p)
  needs_base = rank or (share and _is_number(kl) and kl > 0)
  needs_base = needs_base or (share and _get(c, "replay.data.name") == builders.BASE_SAMPLES)
  if needs_base and _get(c, "mode") == "pretrain":
    p.fail(
      run.name("mode"),
      "pretrain",
      "LoRA, the KL term and base-model samples need a base model: use mode 'finetune' "
      "(with --config.base_checkpoint) or 'compare'.",
    )
  samples = _get(c, "replay.num_samples")
  if share and _is_int(samples) and samples < 1:
    p.fail(run.name("replay.num_samples"), samples, "must be >= 1.")


def _check_lora(run: _Run, p: _Problems) -> Any:
  """`lora` as `LoraConfig` reads it; returns the rank asked for (0: off)."""
  c = run.config
  rank = _get(c, "lora.rank", 0)
  if not _is_int(rank) or rank < 0:
    p.fail(run.name("lora.rank"), rank, "must be an integer >= 0 (0: LoRA off).")
  elif rank:
    try:
      LoraConfig(rank=rank, alpha=_get(c, "lora.alpha"), targets=_get(c, "lora.targets"))
    except (TypeError, ValueError) as error:
      p.fail(run.name("lora"), _get(c, "lora"), _one_line(error))
  return rank


# ----- the base checkpoint ---------------------------------------------------------------------

_BASE_HINT = (
  "point --config.base_checkpoint at a Hugging Face model directory (config.json and "
  "safetensors), a llama.cpp .gguf file, or the workdir (or its checkpoints/ folder) of a "
  "pretraining run, e.g. one made with configs/pretrain_tiny.py"
)


def _check_base_checkpoint(config: ml_collections.ConfigDict, p: _Problems) -> None:
  """Fine-tuning's base exists, holds a finished checkpoint, and of this config's model."""
  base = _get(config, "base_checkpoint")
  if not base or not isinstance(base, str):
    p.fail("base_checkpoint", base, f"fine-tuning needs a base model: {_BASE_HINT}.")
    return
  if configure.is_hf_checkpoint(base):
    _check_hf_checkpoint(base, p)
    return
  if configure.is_pretrained(base):  # a GGUF file
    if error := _pretrained_config_error(base):
      p.fail("base_checkpoint", base, f"this GGUF file cannot be used: {error}")
    return
  found = _checkpoint_steps(base)
  if found is None:
    p.fail("base_checkpoint", base, f"does not exist: {_BASE_HINT}.")
    return
  directory, steps = found
  if steps is None:  # a store this machine cannot list; the run itself will tell
    return
  if not steps:
    p.fail("base_checkpoint", base, f"holds no finished checkpoint in {directory}: {_BASE_HINT}.")
    return
  saved = _saved_config(directory, max(steps))
  saved_model, model = _get(saved, "model"), _get(config, "model")
  if saved_model is None or model is None:
    return
  diff = _model_differences(saved_model, model)
  if diff:
    p.fail(
      "model",
      {k: now for k, (_, now) in diff.items()},
      f"the base checkpoint {base!r} holds a model with "
      + ", ".join(f"{k}={was!r}" for k, (was, _) in diff.items())
      + "; fine-tuning restores its parameters, so set "
      + " ".join(f"--config.model.{k}={was}" for k, (was, _) in diff.items())
      + " (or use a base of this shape).",
    )


def _check_hf_checkpoint(path: str, p: _Problems) -> None:
  """A Hugging Face directory: a supported config.json, and weights beside it."""
  error = _pretrained_config_error(path)
  if error:
    p.fail("base_checkpoint", path, f"its config.json cannot be used: {error}")
    return
  try:
    hf.weight_files(path)
  except (OSError, ValueError) as error:
    p.fail("base_checkpoint", path, _one_line(error))


def _model_differences(saved: Any, current: Any) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, current value)} where two `model` dicts describe different models,
  each read as `models.config_from_dict` reads it (a field left out takes its default)."""
  try:
    was, now = models.config_from_dict(saved), models.config_from_dict(current)
  except (TypeError, ValueError, AttributeError):
    return {}  # _model_config names what is wrong with the current one
  # The attention implementation and the remat policy leave the parameters as they are
  # (scan_layers stacks them, so it must match).
  runtime = ("attention", "remat_policy")
  fields = [f.name for f in dataclasses.fields(was) if f.name not in runtime]
  return {
    k: (getattr(was, k), getattr(now, k)) for k in fields if getattr(was, k) != getattr(now, k)
  }


def _checkpoint_steps(path: str) -> tuple[str, list[int] | None] | None:
  """(checkpoints folder, its finished steps) of a workdir or checkpoints/ folder.

  None when nothing exists at `path`; steps None when the store cannot be listed from here.
  """
  root = epath.Path(path)
  try:
    if not root.exists():
      return None
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not directory.is_dir():
      return str(directory), []
    return str(directory), sorted(ocp.utils.checkpoint_steps(directory))
  except (OSError, ValueError, ImportError):  # e.g. gs:// without its file-system package
    return str(root), None


def _saved_config(directory: str, step: int) -> dict[str, Any] | None:
  """The config JSON saved beside checkpoint `step` (finch_jax.checkpoint), if readable."""
  path = epath.Path(directory) / str(step) / "config" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


# ----- the workdir -----------------------------------------------------------------------------

_GCS_ROLE = "roles/storage.objectUser"  # create, read, list and delete objects: what a run does


def _check_workdir(workdir: str, p: _Problems) -> bool:
  """The run can write into `workdir`: a local directory (or one it can make), or a bucket
  (`gs://BUCKET/...`) that exists and that these credentials may write to. Returns whether it
  can; the resume checks read the workdir only then."""
  if workdir.startswith("gs://"):
    return _check_bucket(workdir, p)
  if files.is_remote(workdir):
    return True  # another store of epath's (s3://, ...): the run itself says what is wrong
  return _check_local_dir(workdir, p)


def _check_local_dir(workdir: str, p: _Problems) -> bool:
  """A local workdir is a directory, or can be made as one, where this user may write."""
  path = epath.Path(os.path.abspath(workdir))
  existing = path
  while not existing.exists():  # where making the directories would start
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
    p.fail("--workdir", workdir, f"{where}, not a directory: move it or use another --workdir.")
    return False
  # os.access has no counterpart in epath; it answers for local paths, which these are.
  if not os.access(existing, os.W_OK | os.X_OK):
    p.fail(
      "--workdir",
      workdir,
      f"is read-only: this user cannot write in {existing}; make it writable (chmod, or a "
      "writable mount) or use another --workdir.",
    )
    return False
  return True


def _check_bucket(workdir: str, p: _Problems) -> bool:
  """A `gs://` workdir: the package that reaches it, credentials, the bucket, write access.

  The bucket is checked by writing and deleting one empty object in the workdir, which needs
  only the object permissions the run needs anyway (not the bucket's metadata), and tells a
  missing bucket (404) from one these credentials may not write to (403).
  """
  bucket = workdir.removeprefix("gs://").split("/", 1)[0]
  if importlib.util.find_spec("gcsfs") is None:
    p.fail(
      "--workdir",
      workdir,
      'a gs:// workdir needs the gcs extra: pip install -e ".[gcs]" (gcsfs, google-cloud-storage).',
    )
    return False
  # An emulator (STORAGE_EMULATOR_HOST, as in the tests) takes requests without credentials.
  if not os.environ.get("STORAGE_EMULATOR_HOST"):
    import google.auth  # with the gcs extra; needed for a bucket only
    import google.auth.exceptions

    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
      p.fail(
        "--workdir",
        workdir,
        "no Google Cloud credentials found: run `gcloud auth application-default login`, or "
        "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on a Cloud TPU or "
        "Compute Engine VM, give the VM a service account).",
      )
      return False
  probe = epath.Path(workdir) / f".finch_jax_write_check.{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except FileNotFoundError:
    p.fail(
      "--workdir",
      workdir,
      f"the bucket gs://{bucket} does not exist: create it (gcloud storage buckets create "
      f"gs://{bucket} --location=REGION, the region of the machines) or fix its name.",
    )
    return False
  except Exception as error:  # gcsfs: OSError("Forbidden ...") for 403, HttpError(code) else
    _bucket_refused(workdir, bucket, error, p)
    return False
  return True


def _bucket_refused(workdir: str, bucket: str, error: Exception, p: _Problems) -> None:
  """Names why writing into the bucket failed: rejected credentials, no write permission, or
  no connection."""
  text, code = _one_line(error)[:200], getattr(error, "code", None)
  if code == 401:
    p.fail(
      "--workdir",
      workdir,
      f"these Google Cloud credentials are rejected ({text}): run `gcloud auth "
      "application-default login` again, or point GOOGLE_APPLICATION_CREDENTIALS at a valid "
      "key file.",
    )
  elif code == 403 or text.startswith("Forbidden"):
    p.fail(
      "--workdir",
      workdir,
      f"is read-only for these credentials ({text}): grant them {_GCS_ROLE} on "
      f"gs://{bucket} (gcloud storage buckets add-iam-policy-binding gs://{bucket} "
      f"--member=ACCOUNT --role={_GCS_ROLE}), or use another --workdir.",
    )
  else:
    p.fail(
      "--workdir",
      workdir,
      f"cannot be reached ({text}): check the network and the bucket's name, or use a local "
      "--workdir.",
    )


# ----- resuming --------------------------------------------------------------------------------

# The checkpoint items that hold the train state's arrays (see finch_jax.checkpoint).
_STATE_ITEMS = ("params", "opt_state")
_SHOWN_PATHS = 3  # differing arrays a problem names
_SHOWN_FIELDS = 5  # changed config fields it names


def _resumed_dir(run: _Run, mode: str, workdir: str) -> str | None:
  """Where `run` would resume from a checkpoint: WORKDIR for 'pretrain' and 'finetune'.

  A comparison resumes only its base model, in WORKDIR/base, and only while that directory's
  fingerprint is this config's: otherwise `sweep.compare` sets it aside and pretrains anew.
  """
  if mode != "compare":
    return workdir
  if run.context != "compare.pretrain":
    return None
  base_dir = epath.Path(workdir) / "base"
  try:
    kept = json.loads((base_dir / configure.FINGERPRINT_FILE).read_text())["fingerprint"]
  except (OSError, ValueError, KeyError, TypeError):
    return None  # nothing there, or made before fingerprints: set aside as well
  return str(base_dir) if kept == configure.fingerprint(run.config) else None


def _check_resume(config: ml_collections.ConfigDict, workdir: str, p: _Problems) -> None:
  """The newest checkpoint in `workdir` holds the arrays of the state `config` builds.

  Orbax restores a state only into the same tree of arrays, and casts one of other dtypes; a
  change that alters the tree (the model, LoRA, the optimizer and its clipping or anchoring,
  FINCH) would fail at the restore, after the datasets were built and the step compiled. Other
  changes (intervals, rates) resume fine.
  """
  found = _checkpoint_steps(workdir)
  if not found or not found[1]:
    return
  directory, step = found[0], max(found[1])
  mismatch = _fingerprint_mismatch(config, directory, step)
  if mismatch:
    p.fail("--workdir", workdir, mismatch)
    return
  saved = _saved_arrays(directory, step)
  built = _built_arrays(config)
  if saved is None or built is None:
    return  # unreadable here (the run tries the older steps), or a config rejected above
  # The parameters first: they say most about what changed.
  paths = sorted(saved.keys() | built.keys(), key=lambda k: (not k.startswith("params."), k))
  paths = [path for path in paths if saved.get(path) != built.get(path)]
  if not paths:
    return
  cast = all(path in saved and path in built and saved[path][0] == built[path][0] for path in paths)
  outcome = (
    "cast it to the new dtypes, continuing in another precision" if cast else "fail to restore it"
  )
  changes = _config_changes(_saved_config(directory, step), config)
  changed = f"; changed since it was written: {', '.join(changes)}" if changes else ""
  p.fail(
    "--workdir",
    workdir,
    f"already holds a checkpoint (step {step}) of a different training state: "
    f"{_shown_arrays(paths, saved, built)}{changed}. The run would resume from it and {outcome}"
    ": rerun with the config that wrote it, or use a new --workdir.",
  )


def _fingerprint_mismatch(config: ml_collections.ConfigDict, directory: str, step: int) -> str:
  """Why the run `config` makes may not resume checkpoint `step` (saved by a run of another
  config, other data or another base: `checkpoint.resume_mismatch`), or ''."""
  try:
    record = configure.fingerprint_record(config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return ""  # a config rejected above, or files the run itself will name
  error = checkpoint.resume_mismatch(directory, step, record)
  return "" if error is None else str(error)


def _saved_arrays(directory: str, step: int) -> dict[str, tuple[Any, ...]] | None:
  """{'params.PATH' or 'opt_state.PATH': (shape, dtype)} of checkpoint `step`, from the
  metadata orbax writes beside the arrays (nothing is read into memory)."""
  arrays = {}
  handler = ocp.StandardCheckpointHandler()
  try:
    for item in _STATE_ITEMS:
      tree = handler.metadata(epath.Path(directory) / str(step) / item).tree
      for key, leaf in ocp.tree.to_flat_dict(tree, sep=".").items():
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # empty nodes are None
          arrays[f"{item}.{key}"] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  except (OSError, ValueError, KeyError, TypeError):
    return None
  finally:
    handler.close()
  return arrays


def _built_arrays(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, ...]] | None:
  """The same for the state `config` builds, traced abstractly, or None when it cannot be."""
  # Shapes and dtypes do not depend on the mesh: one device traces them for any job.
  mesh = shd.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
  try:
    state = configure.make_trainer(config, mesh).abstract_state()
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None  # the other checks name what is wrong with the config
  return {
    f"{item}.{key}": (tuple(leaf.shape), np.dtype(leaf.dtype))
    for item in _STATE_ITEMS
    for key, leaf in ocp.tree.to_flat_dict(getattr(state, item), sep=".").items()
  }


def _shown_arrays(
  paths: Sequence[str],
  saved: Mapping[str, tuple[Any, ...]],
  built: Mapping[str, tuple[Any, ...]],
) -> str:
  """'N arrays differ ... (PATH: saved float32[96, 64], new none; ...)', the first few named."""

  def shown(leaf: tuple[Any, ...] | None) -> str:
    return "none" if leaf is None else f"{leaf[1]}{list(leaf[0])}"

  named = [f"{k}: saved {shown(saved.get(k))}, new {shown(built.get(k))}" for k in paths]
  more = len(named) - _SHOWN_PATHS
  listed = "; ".join(named[:_SHOWN_PATHS]) + (f"; and {more} more" if more > 0 else "")
  return f"{len(named)} arrays differ from the state this config builds ({listed})"


def _config_changes(saved: Any, config: ml_collections.ConfigDict) -> list[str]:
  """'lora.rank 0 -> 4' for the first config fields that differ from the `saved` config JSON:
  what the user changed, which the array paths alone leave to guesswork."""
  if not isinstance(saved, Mapping):
    return []
  was, now = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
  return [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in keys[:_SHOWN_FIELDS]]


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} of a nested mapping."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


__all__ = ["MODES", "ConfigError", "validate"]
