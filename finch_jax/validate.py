"""Configuration checks that run before any device work or compilation.

`validate(config, workdir)` reads a training config (`configs/*.py` plus command-line
overrides) and raises `ConfigError` listing every problem it finds, each naming the field, its
value and the fix, e.g.

    data.batch_size=12: does not split over the 8 devices the batch is sharded on
    (mesh.data=8 x mesh.fsdp=1): set --config.data.batch_size to a multiple of 8, e.g. 8 or 16.

A run that would fail only after minutes of dataset building, pretraining or compiling fails
here in well under a second instead. Nothing is built, downloaded or compiled: models are traced
abstractly (`nnx.eval_shape`), datasets are checked by name, a base checkpoint by its step
directories and saved config, and a checkpoint the run would resume by the arrays it holds
against the state the config builds. In `compare` mode the base-model run (`compare.pretrain`)
and every method's runs (`compare.methods`) are checked as the configs they become, and a
problem that comes from an override names the override.

Each rule lives once, with what it governs, and the builders that can check by the same
function before they build (`make_mesh`, `local_batch_size`, `make_optimizer`, `lora_config`,
`sweep.run_device_groups`, `builders.data_source`, `Checkpointer.restore`), so a message here
says what the run itself would have said, with the config field in front:

- the mesh, parameter layout and concurrent runs: `sharding.mesh_shape`, `indivisible_axes`,
  `concurrent_runs`;
- the batch, the tokenizer, the datasets, the base checkpoint and a comparison's settings:
  `configure.batch_problems`, `tokenizer_problems`, `dataset_problems`,
  `base_checkpoint_problems`, `compare_problems` (datasets through `data.builders`);
- the optimizer, FINCH and LoRA: `optim.optimizer_problems`, `finch_problems`,
  `lora.lora_problems`; the model: `configure.model_config`;
- resuming: `checkpoint.resume_problem`; the workdir: `files.workdir_problem`.

What stays here is what no builder owns: the problem collector and field naming, the configs of
a comparison and their overrides, counts and seeds, sequence lengths against the model, which
eval sets a mode reads, which remedies need a base model, and where a run would resume (a
comparison's base directory, the sweep's rule).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from finch_jax import checkpoint, configure, files, models, optim
from finch_jax import sharding as shd
from finch_jax.data import builders
from finch_jax.lora import lora_problems
from finch_jax.models import ModelConfig

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

  def report(self, run: _Run, found: Sequence[tuple[str, str]], block: str = "") -> None:
    """The problems a builder's check found in `run`, each (field of `block`, message),
    named as `run` names them, with the value the config holds."""
    for field, message in found:
      path = f"{block}.{field}" if block and field else block or field
      self.fail(run.name(path), _get(run.config, path), message)


class _Job(NamedTuple):
  """The job a config must fit. `real`: these are this machine's devices (and cores)."""

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
    return configure.cli_flag(self.name(path))


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
  runs = _compare_runs(config, job, p) if mode == "compare" else [_Run(config)]
  read: set[str] = set()
  for run in runs:
    read |= _check_run(run, job, p)
  _check_option_keys(config, read, p)
  if mode == "finetune" or (mode == "compare" and _get(config, "base_checkpoint")):
    p.report(_Run(config), configure.base_checkpoint_problems(config))  # compare may give one
  if not workdir:
    return
  if problem := files.workdir_problem(os.fspath(workdir)):
    p.fail("--workdir", workdir, problem)
    return  # the resume checks would read a workdir that cannot be used
  for run in runs:
    state_dir = _resumed_dir(run, mode, workdir)
    if state_dir and (problem := _resume_problem(run.config, state_dir)):
      p.fail("--workdir", state_dir, problem)


def _compare_runs(config: ml_collections.ConfigDict, job: _Job, p: _Problems) -> list[_Run]:
  """The runs of `compare`: the base model's, then each method's (with its overrides)."""
  if _get(config, "compare") is None:
    p.fail("compare", None, "mode 'compare' needs a compare section (see configs/default.py).")
    return []
  runs = [_pretrain_run(config, p), *_method_runs(config, p)]
  _check_compare_settings(config, job, p)
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
  runs = []
  for name, changes in configure.method_overrides(config).items():
    where = f"compare.methods.{name}"
    try:
      method = configure.override(config, changes, on_unknown=_unknown_override(where, p))
    except (KeyError, TypeError, ValueError) as error:  # e.g. a value of the wrong type
      p.fail(where, changes, _one_line(error))
      continue
    runs.append(_Run(method, where, changes))
  return runs


def _check_compare_settings(config: ml_collections.ConfigDict, job: _Job, p: _Problems) -> None:
  """The comparison's own settings (`configure.compare_problems`), and how many of its runs
  train at once on this job (`sharding.concurrent_runs`)."""
  p.report(_Run(config), configure.compare_problems(config))
  concurrent = _get(config, "compare.concurrent_runs", 0)
  if not _is_int(concurrent) or concurrent < 0:
    p.fail(
      "compare.concurrent_runs",
      concurrent,
      "give the number of runs to train at once, or 0 for one per device on a CPU machine.",
    )
    return
  mesh = _as_dict(_get(config, "mesh"))
  try:
    shd.mesh_shape(mesh, job.devices)  # a mesh that does not fit is named with the runs
  except ValueError:
    return
  try:
    cores = shd.cpu_cores() if job.real else None
    shd.concurrent_runs(concurrent, mesh, job.devices, process_count=job.processes, cpu_cores=cores)
  except ValueError as error:
    p.fail("compare.concurrent_runs", concurrent, str(error))


def _check_run(run: _Run, job: _Job, p: _Problems) -> set[str]:
  """Every check of one run; returns the options keys of the datasets it reads."""
  _check_counts(run, p)
  model = _model_config(run, p)
  steps = _get(run.config, "num_train_steps")
  steps = steps if _is_int(steps) and steps > 0 else 1
  p.report(
    run, optim.optimizer_problems(_as_dict(_get(run.config, "optimizer")), steps), "optimizer"
  )
  _check_finch(run, p)
  sizes = _mesh_sizes(run, job, p)
  batch = configure.batch_problems(
    _get(run.config, "data.batch_size"),
    job.processes,
    sizes,
    _get(run.config, "grad_accum_steps"),
    flag=run.flag,
  )
  p.report(run, batch)
  if model is not None:
    if sizes is not None:
      _check_param_sharding(run, model, sizes, p)
    _check_lengths(run, model, p)
    p.report(run, configure.tokenizer_problems(run.config, model, flag=run.flag))
  found, read = configure.dataset_problems(run.config)
  p.report(run, found)
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


# ----- model, FINCH, mesh and parameter sharding -----------------------------------------------


def _model_config(run: _Run, p: _Problems) -> ModelConfig | None:
  """The run's architecture (`configure.model_config`), or None after reporting why there is
  none (a pretrained base's own config is named by `_check_base_checkpoint`)."""
  base = _get(run.config, "base_checkpoint")
  try:
    return configure.model_config(run.config)
  except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
    if not (isinstance(base, str) and configure.is_pretrained(base)):
      p.fail(run.name("model"), _get(run.config, "model"), str(error))
    return None


def _check_finch(run: _Run, p: _Problems) -> None:
  """With FINCH on, its options are among `optim.FINCH_OPTIONS`, and `optim.finch_problems`."""
  finch = _as_dict(_get(run.config, "finch"))
  if not finch.get("enabled", False):
    return
  for key in sorted(set(finch) - {"enabled", *optim.FINCH_OPTIONS}):
    p.fail(
      run.name(f"finch.{key}"),
      finch[key],
      f"not a FINCH option{_did_you_mean(key, optim.FINCH_OPTIONS)}; options: "
      f"{', '.join(optim.FINCH_OPTIONS)}.",
    )
  p.report(run, optim.finch_problems(finch, flag=run.flag), "finch")


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
  """The resolved mesh sizes (`sharding.mesh_shape`), or None after reporting why there are
  none."""
  mesh = _as_dict(_get(run.config, "mesh"))
  try:
    return shd.mesh_shape(mesh, job.devices, planned=not job.real)
  except ValueError as error:
    p.fail(run.name("mesh"), mesh, str(error))
    return None


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
  abstract = nnx.eval_shape(lambda: models.build(model, nnx.Rngs(0)))
  found: dict[tuple[str, tuple[str, ...]], tuple[str, Any, tuple[str, ...], int]] = {}
  for logical, dim, axes, divisor in shd.indivisible_axes(abstract, dict(sizes)):
    field = _AXIS_FIELDS.get(logical, logical)
    value = getattr(model, field, dim)
    found.setdefault((field, axes), (field, dim if value is None else value, axes, divisor))
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


# ----- datasets --------------------------------------------------------------------------------


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


# ----- remedies: replay, the KL term, LoRA ----------------------------------------------------


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
  rank = _get(c, "lora.rank", 0)
  p.report(run, lora_problems(_as_dict(_get(c, "lora"))), "lora")
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


# ----- resuming --------------------------------------------------------------------------------


def _resumed_dir(run: _Run, mode: str, workdir: str) -> str | None:
  """Where `run` would resume from a checkpoint: WORKDIR for 'pretrain' and 'finetune'.

  A comparison resumes only its base model, in WORKDIR/base, and only while that directory's
  fingerprint is this config's: otherwise `sweep.compare` sets it aside and pretrains anew.
  """
  if mode != "compare":
    return workdir
  if run.context != "compare.pretrain":
    return None
  base_dir = os.path.join(workdir, "base")
  kept = configure.claimed_fingerprint(base_dir)  # None: set aside as well
  return base_dir if kept is not None and kept == configure.fingerprint(run.config) else None


def _resume_problem(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Why the run `config` makes may not resume the newest checkpoint in `workdir`
  (`checkpoint.resume_problem`: saved by a run of another fingerprint, or holding other arrays
  than the state this config builds, traced abstractly)."""
  try:
    record = configure.fingerprint_record(config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    record = None  # a config rejected above, or files the run itself will name

  def abstract_state() -> Any:
    # Shapes and dtypes do not depend on the mesh: one device traces them for any job.
    mesh = shd.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    try:
      return configure.make_trainer(config, mesh).abstract_state()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return None  # the other checks name what is wrong with the config

  return checkpoint.resume_problem(
    workdir,
    fingerprint=record,
    config=json.loads(config.to_json_best_effort()),
    abstract_state=abstract_state,
  )


__all__ = ["MODES", "ConfigError", "validate"]
