"""Configuration checks that run before any device work or compilation.

`validate(config, workdir)` reads a training config (`configs/*.py` plus command-line
overrides) and raises `ConfigError` listing every problem it finds, each naming the field, its
value and the fix, e.g.

    data.batch_size=12: does not split over the 8 devices the batch is sharded on
    (mesh.data=8 x mesh.fsdp=1): set --config.data.batch_size to a multiple of 8, e.g. 8 or 16.

A run that would fail only after minutes of dataset building, pretraining or compiling fails
here in well under a second instead. Nothing is built, downloaded or compiled: models are traced
abstractly (`nnx.eval_shape`), datasets are checked by name (embedded corpora by their
generator, local text by its files, TFDS catalog names by their registered builder class), and
checkpoints by their step directories. In `compare` mode the base-model run
(`compare.pretrain`) and every method's runs (`compare.methods`) are checked as the configs
they become, and a problem that comes from an override names the override.

The checks reuse the library's own validation where it exists (the model configs,
`scale_by_finch`, `make_optimizer`, `make_mesh`, the dataset builders), so a message here says
what the run itself would have said, with the config field in front.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from finch_jax import models
from finch_jax import sharding as shd
from finch_jax.data import builders, synthetic
from finch_jax.models import ModelConfig
from finch_jax.models.registry import FAMILIES
from finch_jax.trainer import make_optimizer, schedule_shape
from finch_jax.transform import scale_by_finch

# The modes `experiment.train_and_evaluate` runs. Defined here rather than imported from
# experiment, which calls `validate` (and can take MODES from here).
MODES = ("pretrain", "finetune", "compare")

# Which model field sets the size of each logical parameter axis (see sharding.DEFAULT_RULES).
_AXIS_FIELDS = {
  "vocab": "vocab_size",
  "embed": "d_model",
  "heads": "num_heads",
  "kv_heads": "num_kv_heads",
  "mlp": "d_ff",
  "head_dim": "head_dim",
}

# Parts of a checkpoint's config that decide the shapes of its arrays: resuming or fine-tuning
# with other values fails inside orbax with a shape or tree mismatch.
_STATE_FIELDS = ("model", "optimizer.name", "finch.enabled")


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
    workdir: the run's workdir; when given, a checkpoint already there must hold a model and
      optimizer state of the same shapes (the run would resume from it).
    device_count: devices of the whole job; default `jax.device_count()`. Pass the target's
      count to check a config for another machine (e.g. a pod) from a laptop.
    process_count: processes of the job; default `jax.process_count()`.

  Raises:
    ConfigError: (a `ValueError`) naming each bad field, its value and the fix.
  """
  faked = device_count is not None
  device_count = jax.device_count() if device_count is None else int(device_count)
  process_count = jax.process_count() if process_count is None else int(process_count)
  checker = _Checker(device_count, process_count, real_devices=not faked)
  checker.check(config, workdir)
  if checker.problems:
    raise ConfigError(checker.problems)


# ----- helpers ---------------------------------------------------------------------------------


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


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _multiples(value: int, step: int) -> str:
  """'8 or 16': the multiples of `step` around `value`."""
  low, high = (value // step) * step, (value // step + 1) * step
  return f"{low} or {high}" if low > 0 else f"{high}"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _did_you_mean(key: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


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
    parts = path.split(".")
    node = self.overrides
    for part in parts:
      if not isinstance(node, Mapping) or part not in node:
        return path
      node = node[part]
    return f"{self.context}.{path}"

  def flag(self, path: str) -> str:
    """The command-line flag that sets `path` in this run."""
    return f"--config.{self.name(path)}"


class _Checker:
  """Collects problems; `check` runs every check on a config."""

  def __init__(self, device_count: int, process_count: int, *, real_devices: bool):
    self.device_count = device_count
    self.process_count = process_count
    self.real_devices = real_devices
    self.problems: list[str] = []
    self._valid_datasets: set[str] = set()  # names that passed, as options keys

  def fail(self, field: str, value: Any, message: str) -> None:
    problem = f"{field}={_show(value)}: {message}"
    if problem not in self.problems:  # runs of a comparison share most fields
      self.problems.append(problem)

  # ----- the whole config ----------------------------------------------------------------------

  def check(self, config: ml_collections.ConfigDict, workdir: str | None) -> None:
    mode = _get(config, "mode")
    if mode not in MODES:
      self.fail("mode", mode, f"unknown mode; use one of {', '.join(MODES)}.")
      return
    if mode == "compare":
      runs = self._compare_runs(config)
    else:
      runs = [_Run(config)]
    for run in runs:
      self._check_run(run)
    self._check_options(config)
    if mode == "finetune":
      self._check_base_checkpoint(config)
    if workdir:
      # A compare run resumes its base model in WORKDIR/base; the others resume in WORKDIR.
      context = "compare.pretrain" if mode == "compare" else ""
      state_dir = os.path.join(workdir, "base") if mode == "compare" else workdir
      for run in runs:
        if run.context == context:
          self._check_resume(run, state_dir)

  def _compare_runs(self, config: ml_collections.ConfigDict) -> list[_Run]:
    """The runs of `compare`: the base model's, then each method's (with its overrides)."""
    from finch_jax import forgetting

    runs = []
    compare = _get(config, "compare")
    if compare is None:
      self.fail("compare", None, "mode 'compare' needs a compare section (see configs/default.py).")
      return runs
    pretrain = _get(compare, "pretrain", {})
    pretrain = pretrain.to_dict() if hasattr(pretrain, "to_dict") else dict(pretrain)
    known = self._known_overrides(config, pretrain, "compare.pretrain")
    source = config
    if known != pretrain:
      source = copy.deepcopy(config)
      source.compare.pretrain = known
    try:
      runs.append(_Run(forgetting.pretrain_config(source), "compare.pretrain", known))
    except (KeyError, TypeError, ValueError) as error:  # e.g. a value of the wrong type
      self.fail("compare.pretrain", pretrain, _one_line(error))
    methods = _get(compare, "methods", {}) or {}
    if not methods:
      self.fail("compare.methods", methods, "name at least one method, e.g. {'standard': {...}}.")
    for name, spec in methods.items():
      spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
      where = f"compare.methods.{name}"
      rates = spec.pop("learning_rates", None)
      if (
        not isinstance(rates, Sequence)
        or not rates
        or not all(_is_number(r) and r > 0 for r in rates)
      ):
        self.fail(
          f"{where}.learning_rates",
          rates,
          "each method sweeps a non-empty list of positive learning rates, e.g. (3e-4, 1e-3, "
          "3e-3); the report reads methods at matched task loss along these sweeps.",
        )
      known = self._known_overrides(config, spec, where)
      try:
        runs.append(_Run(forgetting.override(config, known), where, known))
      except (KeyError, TypeError, ValueError) as error:  # e.g. a value of the wrong type
        self.fail(where, spec, _one_line(error))
    baseline = _get(compare, "baseline")
    if methods and baseline not in methods:
      self.fail(
        "compare.baseline",
        baseline,
        f"the baseline must be one of compare.methods: {sorted(methods)}.",
      )
    seeds = _get(compare, "seeds")
    if not isinstance(seeds, Sequence) or not seeds or not all(map(self._is_seed, seeds)):
      self.fail(
        "compare.seeds", seeds, "give a non-empty list of seeds in [0, 2**32), e.g. (0, 1)."
      )
    return runs

  def _known_overrides(
    self, config: ml_collections.ConfigDict, changes: Mapping[str, Any], where: str
  ) -> dict[str, Any]:
    """`changes` without the keys that are not fields of `config`, each of those reported.

    The rest is still applied and checked, so one typo does not hide the other problems.
    """

    def keep(node: Any, updates: Mapping[str, Any], prefix: str) -> dict[str, Any]:
      kept = {}
      for key, value in updates.items():
        if key not in node:
          known = sorted(node.keys())
          self.fail(
            f"{where}.{prefix}{key}",
            value,
            f"not a config field{_did_you_mean(key, known)}; fields here: {', '.join(known)}.",
          )
        elif isinstance(value, Mapping) and isinstance(
          node[key], Mapping | ml_collections.ConfigDict
        ):
          kept[key] = keep(node[key], value, f"{prefix}{key}.")
        else:  # a value, or a dict-valued field set whole (e.g. data.train: {...})
          kept[key] = value
      return kept

    return keep(config, changes, "")

  # ----- one run -------------------------------------------------------------------------------

  def _check_run(self, run: _Run) -> None:
    c = run.config
    self._check_counts(run)
    model = self._check_model(run)
    self._check_optimizer(run)
    self._check_finch(run)
    sizes = self._check_mesh(run)
    self._check_batch(run, sizes)
    if model is not None:
      if sizes is not None:
        self._check_param_sharding(run, model, sizes)
      self._check_lengths(run, model)
    self._check_datasets(run)
    self._check_remedies(run)
    mode = _get(c, "mode")
    if mode in ("finetune", "compare"):
      eval_sets = _get(c, "data.eval_sets", {}) or {}
      missing = [name for name in ("task", "retain") if name not in eval_sets]
      if missing:
        self.fail(
          run.name("data.eval_sets"),
          eval_sets,
          f"mode {mode!r} reads forgetting from the eval sets 'task' and 'retain'; add "
          f"{', '.join(repr(m) for m in missing)} (a {{'name': ..., 'split': ...}} each).",
        )

  def _is_seed(self, value: Any) -> bool:
    return _is_int(value) and 0 <= value < 2**32

  def _check_counts(self, run: _Run) -> None:
    c = run.config
    rules = [
      ("num_train_steps", 1, "the number of optimizer steps, e.g. 1000"),
      ("grad_accum_steps", 1, "1 for no accumulation"),
      ("log_every", 1, "1 logs every step"),
      ("eval_every", 0, "0 evaluates only at the end"),
      ("checkpoint_every", 0, "0 checkpoints only at the end"),
      ("keep_checkpoints", 1, "how many recent checkpoints to keep, e.g. 2"),
    ]
    for path, minimum, hint in rules:
      value = _get(c, path)
      if not _is_int(value) or value < minimum:
        sign = "positive" if minimum == 1 else "non-negative"
        self.fail(run.name(path), value, f"must be a {sign} integer ({hint}).")
    if not self._is_seed(_get(c, "seed")):
      self.fail(run.name("seed"), _get(c, "seed"), "use an integer in [0, 2**32).")
    for path in ("data.eval_examples", "data.fact_examples"):
      value = _get(c, path, 0)
      if not _is_int(value) or value < 0:
        self.fail(run.name(path), value, "must be a non-negative integer (0 means all).")

  def _check_model(self, run: _Run) -> ModelConfig | None:
    values = _get(run.config, "model")
    base = _get(run.config, "base_checkpoint")
    if isinstance(base, str) and os.path.isfile(os.path.join(base, "config.json")):
      from finch_jax.models import hf

      try:  # a Hugging Face base brings its own architecture (see experiment.model_config)
        with open(os.path.join(base, hf.CONFIG_FILE)) as f:
          return hf.config_from_hf(json.load(f))
      except (OSError, ValueError, KeyError, TypeError):
        return None  # _check_base_checkpoint names the problem
    try:
      return models.config_from_dict(values)
    except (TypeError, ValueError, AttributeError) as error:
      self.fail(run.name("model"), values, str(error))
      return None

  def _check_optimizer(self, run: _Run) -> None:
    c = run.config
    o = _get(c, "optimizer")
    o = o.to_dict() if hasattr(o, "to_dict") else dict(o or {})
    steps = _get(c, "num_train_steps")
    steps = steps if _is_int(steps) and steps > 0 else 1
    numbers_ok = True
    ranges: list[tuple[str, Callable[[float], bool], str]] = [
      ("learning_rate", lambda v: v > 0, "a positive peak rate, e.g. 1e-3"),
      ("final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
      ("weight_decay", lambda v: v >= 0, ">= 0"),
      ("b1", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
      ("b2", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.95"),
      ("eps", lambda v: v > 0, "> 0, e.g. 1e-8"),
      ("momentum", lambda v: 0 <= v < 1, "in [0, 1); 0 for none"),
      ("grad_clip", lambda v: v >= 0, ">= 0; 0 disables clipping"),
    ]
    for key, ok, requirement in ranges:
      if key in o and not (_is_number(o[key]) and ok(o[key])):
        self.fail(run.name(f"optimizer.{key}"), o[key], f"must be {requirement}.")
        numbers_ok = False
    warmup = o.get("warmup_steps", 0)
    if not _is_int(warmup) or warmup < 0:
      self.fail(run.name("optimizer.warmup_steps"), warmup, "must be an integer >= 0.")
      return
    try:
      schedule_shape(o.get("schedule", "constant"), steps, warmup, o.get("final_lr_fraction", 0.0))
    except ValueError as error:
      self.fail(run.name("optimizer.schedule"), o.get("schedule"), str(error))
      return
    if not numbers_ok:
      return
    try:
      make_optimizer(o, None, steps)  # names the optimizers it knows
    except (ValueError, TypeError, KeyError) as error:
      field = "optimizer.name" if "optimizer" in str(error).lower() else "optimizer"
      self.fail(run.name(field), o.get("name") if field.endswith("name") else o, str(error))

  def _check_finch(self, run: _Run) -> None:
    finch = _get(run.config, "finch")
    finch = finch.to_dict() if hasattr(finch, "to_dict") else dict(finch or {})
    if not finch.get("enabled", False):
      return
    options = {k: v for k, v in finch.items() if k != "enabled"}
    parameters = inspect.signature(scale_by_finch).parameters
    accepted = set(parameters)
    for key in sorted(set(options) - accepted):
      self.fail(
        run.name(f"finch.{key}"),
        options[key],
        f"not an option of scale_by_finch{_did_you_mean(key, sorted(accepted))}; "
        f"options: {', '.join(sorted(accepted))}.",
      )
    try:
      scale_by_finch(**{k: v for k, v in options.items() if k in accepted})
    except (TypeError, ValueError) as error:  # scale_by_finch's own range checks
      first = str(error).split()[0]
      if first not in options:
        self.fail(run.name("finch"), finch, str(error))
        return
      default = parameters[first].default
      self.fail(
        run.name(f"finch.{first}"),
        options[first],
        f"{error} Set {run.flag(f'finch.{first}')} accordingly (default: {default!r}).",
      )

  def _check_mesh(self, run: _Run) -> dict[str, int] | None:
    """The resolved mesh sizes, or None after reporting why the mesh cannot be built."""
    mesh = _get(run.config, "mesh")
    mesh = mesh.to_dict() if hasattr(mesh, "to_dict") else dict(mesh or {})
    field = run.name("mesh")
    unknown = sorted(set(mesh) - set(shd.MESH_AXES))
    if unknown:
      self.fail(field, mesh, f"unknown mesh axes {unknown}; the axes are {shd.MESH_AXES}.")
      return None
    sizes = {axis: mesh.get(axis, 1) for axis in shd.MESH_AXES}
    if not all(_is_int(size) for size in sizes.values()):
      self.fail(field, mesh, "mesh sizes must be integers (-1 for the devices left over).")
      return None
    if self.real_devices:
      try:  # make_mesh's own checks; building the Mesh object compiles nothing
        return dict(shd.make_mesh(**sizes).shape)
      except ValueError as error:
        self.fail(field, mesh, str(error))
        return None
    return self._resolve_mesh(field, mesh, sizes)

  def _resolve_mesh(
    self, field: str, mesh: Mapping[str, int], sizes: dict[str, int]
  ) -> dict[str, int] | None:
    """make_mesh's rules, for a device count other than this machine's."""
    count = self.device_count
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
      self.fail(field, mesh, "sizes must be positive, with at most one -1 (the rest).")
      return None
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if rest:
      if count % fixed:
        message = f"{count} devices do not divide by {fixed}: choose sizes whose product divides"
        self.fail(field, mesh, f"{message} {count}.")
        return None
      sizes[rest[0]] = count // fixed
    elif fixed != count:
      fix = f"set --config.mesh.data=-1 or choose sizes whose product is {count}"
      self.fail(field, mesh, f"needs {fixed} devices, the job has {count}: {fix}.")
      return None
    return sizes

  def _check_batch(self, run: _Run, sizes: dict[str, int] | None) -> None:
    c = run.config
    batch = _get(c, "data.batch_size")
    field = run.name("data.batch_size")
    if not _is_int(batch) or batch < 1:
      self.fail(field, batch, "must be a positive integer: rows per global batch.")
      return
    if batch % self.process_count:
      self.fail(
        field,
        batch,
        f"the global batch is split among the {self.process_count} processes: set "
        f"{run.flag('data.batch_size')} to a multiple of {self.process_count}, e.g. "
        f"{_multiples(batch, self.process_count)}.",
      )
    if sizes is None:
      return
    rows_devices = sizes["data"] * sizes["fsdp"]
    shown = f"mesh.data={sizes['data']} x mesh.fsdp={sizes['fsdp']}"
    if rows_devices % self.process_count:
      self.fail(
        run.name("mesh"),
        _get(c, "mesh"),
        f"the batch is sharded over {rows_devices} devices ({shown}), which do not split among "
        f"the {self.process_count} processes that each feed their own rows: make "
        f"mesh.data x mesh.fsdp a multiple of {self.process_count} (keep mesh.tensor within "
        "one process's devices).",
      )
    if batch % rows_devices:
      self.fail(
        field,
        batch,
        f"does not split over the {rows_devices} devices the batch is sharded on ({shown}): "
        f"set {run.flag('data.batch_size')} to a multiple of {rows_devices}, e.g. "
        f"{_multiples(batch, rows_devices)}.",
      )
      return
    accum = _get(c, "grad_accum_steps")
    if _is_int(accum) and accum > 1 and batch % (accum * rows_devices):
      divisors = [k for k in range(1, accum + 1) if batch % (k * rows_devices) == 0]
      self.fail(
        field,
        batch,
        f"with grad_accum_steps={accum} each micro-batch of batch_size / {accum} rows must "
        f"split over the {rows_devices} batch devices ({shown}): set {run.flag('data.batch_size')} "
        f"to a multiple of {accum * rows_devices}, e.g. {_multiples(batch, accum * rows_devices)}"
        f", or {run.flag('grad_accum_steps')} to one of {divisors}.",
      )

  def _check_param_sharding(self, run: _Run, model: ModelConfig, sizes: Mapping[str, int]) -> None:
    """Every parameter axis divides by the mesh axes it is sharded over (jit would refuse)."""
    for field, value, axes, divisor in _indivisible_axes(model, tuple(sorted(sizes.items()))):
      shown = " x ".join(f"mesh.{axis}={sizes[axis]}" for axis in axes)
      self.fail(
        run.name(f"model.{field}"),
        value,
        f"parameters are sharded over {shown} along this axis, which needs a multiple of "
        f"{divisor}: change model.{field}, or set "
        + " / ".join(run.flag(f"mesh.{axis}") for axis in axes)
        + f" to a divisor of {value}.",
      )

  def _check_lengths(self, run: _Run, model: ModelConfig) -> None:
    c = run.config
    seq_len = _get(c, "data.seq_len")
    if not _is_int(seq_len) or seq_len < 1:
      self.fail(run.name("data.seq_len"), seq_len, "must be a positive integer.")
    elif seq_len > model.max_len:
      self.fail(
        run.name("data.seq_len"),
        seq_len,
        f"longer than the model's max_len={model.max_len}: set {run.flag('data.seq_len')} <= "
        f"{model.max_len} or raise {run.flag('model.max_len')}.",
      )
    if not (_get(c, "data.fact_sets", {}) or {}):
      return
    prompt, answer = _get(c, "data.max_prompt_len"), _get(c, "data.answer_len")
    for path, value in (("data.max_prompt_len", prompt), ("data.answer_len", answer)):
      if not _is_int(value) or value < 1:
        self.fail(run.name(path), value, "must be a positive integer when fact sets are set.")
        return
    if prompt + answer > model.max_len:
      self.fail(
        run.name("data.max_prompt_len"),
        prompt,
        f"fact recall reads max_prompt_len + answer_len = {prompt} + {answer} = "
        f"{prompt + answer} tokens, beyond the model's max_len={model.max_len}: lower "
        f"{run.flag('data.max_prompt_len')} or {run.flag('data.answer_len')}, or raise "
        f"{run.flag('model.max_len')}.",
      )

  # ----- datasets ------------------------------------------------------------------------------

  def _dataset_specs(self, run: _Run) -> Iterator[tuple[str, Any, str]]:
    """(field of the spec, spec, kind) for every dataset the run reads."""
    c = run.config
    yield "data.train", _get(c, "data.train"), "text"
    for name, spec in (_get(c, "data.eval_sets", {}) or {}).items():
      yield f"data.eval_sets.{name}", spec, "text"
    for name, spec in (_get(c, "data.fact_sets", {}) or {}).items():
      yield f"data.fact_sets.{name}", spec, "facts"
    replay = _get(c, "replay.data")
    if _get(c, "replay.share", 0) and replay and replay.get("name") != builders.BASE_SAMPLES:
      yield "replay.data", replay, "text"

  def _check_remedies(self, run: _Run) -> None:
    """Replay, the KL term, anchoring and LoRA: values in range, a base model where needed."""
    c = run.config
    share = _get(c, "replay.share", 0.0)
    if not _is_number(share) or not 0.0 <= share < 1.0:
      self.fail(run.name("replay.share"), share, "must be in [0, 1) (0 turns replay off).")
      share = 0.0
    kl = _get(c, "replay.kl_weight", 0.0)
    if not _is_number(kl) or kl < 0:
      self.fail(run.name("replay.kl_weight"), kl, "must be >= 0 (0: replay by cross-entropy).")
    anchor = _get(c, "optimizer.anchor_strength", 0.0)
    if not _is_number(anchor) or anchor < 0:
      self.fail(run.name("optimizer.anchor_strength"), anchor, "must be >= 0 (0: off).")
    rank = _get(c, "lora.rank", 0)
    if not _is_int(rank) or rank < 0:
      self.fail(run.name("lora.rank"), rank, "must be an integer >= 0 (0: LoRA off).")
    elif rank:
      from finch_jax.lora import LoraConfig

      try:
        LoraConfig(rank=rank, alpha=_get(c, "lora.alpha"), targets=_get(c, "lora.targets"))
      except (TypeError, ValueError) as error:
        self.fail(run.name("lora"), _get(c, "lora"), _one_line(error))
    needs_base = rank or (share and _is_number(kl) and kl > 0)
    needs_base = needs_base or (share and _get(c, "replay.data.name") == builders.BASE_SAMPLES)
    if needs_base and _get(c, "mode") == "pretrain":
      self.fail(
        run.name("mode"),
        "pretrain",
        "LoRA, the KL term and base-model samples need a base model: use mode 'finetune' "
        "(with --config.base_checkpoint) or 'compare'.",
      )
    if share and _is_int(_get(c, "replay.num_samples")) and _get(c, "replay.num_samples") < 1:
      self.fail(run.name("replay.num_samples"), _get(c, "replay.num_samples"), "must be >= 1.")

  def _check_datasets(self, run: _Run) -> None:
    c = run.config
    default_name = _get(c, "data.name")
    for where, spec, kind in self._dataset_specs(run):
      name = spec.get("name") if isinstance(spec, Mapping | ml_collections.ConfigDict) else None
      if isinstance(name, str) and name.startswith(builders.JSONL_PREFIX):
        self._check_jsonl(run, f"{where}.name", name, kind)
        continue
      if name == builders.BASE_SAMPLES:  # sequences the base model samples itself
        if kind == "facts" or _get(c, "mode") == "pretrain":
          self.fail(
            run.name(f"{where}.name"),
            name,
            "base-model samples are a loss set (or replay data) of a run with a base model "
            "(mode 'finetune' or 'compare'); name a dataset here.",
          )
        continue
      if not isinstance(spec, Mapping | ml_collections.ConfigDict) or not spec.get("split"):
        self.fail(
          run.name(where), spec, "give {'name': DATASET or '' for data.name, 'split': SPLIT}."
        )
        continue
      name = spec.get("name") or default_name
      name_field = run.name(f"{where}.name") if spec.get("name") else run.name("data.name")
      if not isinstance(name, str) or not name:
        self.fail(name_field, name, f"name a dataset; {builders.VALID_NAMES_HELP}.")
        continue
      options = _dataset_options(c, name)
      try:
        splits = _dataset_splits(name, options)
      except Exception as error:  # the builders' own message names the fix
        self.fail(name_field, name, _one_line(error))
        continue
      self._valid_datasets.add(_options_key(name))
      split = spec["split"]
      base_split = split.split("[")[0]
      if splits is None:  # a catalog dataset: its splits are known once it is downloaded
        continue
      if base_split not in splits:
        self.fail(
          run.name(f"{where}.split"),
          split,
          f"dataset {name!r} has no split {base_split!r}; it has {sorted(splits)}.",
        )
        continue
      features = splits[base_split]
      needed = {"prompt", "answer"} if kind == "facts" else {"text"}
      if not needed <= features:
        usable = sorted(s for s, f in splits.items() if needed <= f)
        what = "fact sets read prompt/answer records" if kind == "facts" else "text sets read text"
        self.fail(
          run.name(f"{where}.split"),
          split,
          f"{what}, and split {base_split!r} of {name!r} has none; use one of {usable}.",
        )

  def _check_jsonl(self, run: _Run, where: str, name: str, kind: str) -> None:
    """Instruction data: files that exist, read as loss sets or training data (not as facts)."""
    from finch_jax.data import sft

    if kind == "facts":
      self.fail(
        run.name(where),
        name,
        "fact sets read prompt/answer TFDS records; use JSONL data as a loss set "
        "(data.eval_sets) or for training.",
      )
      return
    try:
      sft.jsonl_files(name.removeprefix(builders.JSONL_PREFIX))
    except FileNotFoundError as error:
      self.fail(run.name(where), name, _one_line(error))

  def _check_options(self, config: ml_collections.ConfigDict) -> None:
    """A misspelled `data.options` key, which would leave its dataset at default sizes.

    Options of datasets the config does not read are fine (configs/default.py keeps the
    biographies' sizes when data.name points elsewhere); a key that reads no dataset but is
    close to the name of one that has no options of its own is a typo.
    """
    options = _get(config, "data.options", {}) or {}
    bare = sorted(self._valid_datasets - set(options))
    for key in options:
      if key in self._valid_datasets or not difflib.get_close_matches(key, bare, n=1):
        continue
      self.fail(
        f"data.options.{key}",
        options[key],
        f"no dataset read by this config has that key{_did_you_mean(key, bare)}, so these "
        "options are ignored; options are keyed by the dataset name with each run of "
        "characters other than letters and digits written as '_'.",
      )

  # ----- checkpoints ---------------------------------------------------------------------------

  def _check_base_checkpoint(self, config: ml_collections.ConfigDict) -> None:
    base = _get(config, "base_checkpoint")
    hint = (
      "point --config.base_checkpoint at a Hugging Face model directory (config.json and "
      "safetensors), or the workdir (or its checkpoints/ folder) of a pretraining run, e.g. "
      "one made with configs/pretrain_tiny.py"
    )
    if not base or not isinstance(base, str):
      self.fail("base_checkpoint", base, f"fine-tuning needs a base model: {hint}.")
      return
    if os.path.isfile(os.path.join(base, "config.json")):  # a Hugging Face model directory
      self._check_hf_checkpoint(base)
      return
    found = _checkpoint_steps(base)
    if found is None:
      self.fail("base_checkpoint", base, f"does not exist: {hint}.")
      return
    directory, steps = found
    if steps is None:  # a store this machine cannot list; the run itself will tell
      return
    if not steps:
      self.fail("base_checkpoint", base, f"holds no finished checkpoint in {directory}: {hint}.")
      return
    saved = _saved_config(directory, max(steps))
    model = _get(config, "model")
    saved_model = None if saved is None else saved.get("model")
    if saved_model is not None and model is not None:
      model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
      diff = _differences(saved_model, model)
      if diff:
        self.fail(
          "model",
          {k: model.get(k) for k in diff},
          f"the base checkpoint {base!r} holds a model with {_fmt_fields(saved_model, diff)}; "
          "fine-tuning restores its parameters, so set "
          + " ".join(f"--config.model.{k}={saved_model.get(k)}" for k in diff)
          + " (or use a base of this shape).",
        )

  def _check_hf_checkpoint(self, path: str) -> None:
    """A Hugging Face directory: a supported config.json, weights and a tokenizer beside it."""
    from finch_jax.models import hf

    try:
      with open(os.path.join(path, hf.CONFIG_FILE)) as f:
        hf.config_from_hf(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as error:
      self.fail("base_checkpoint", path, f"its config.json cannot be used: {_one_line(error)}")
      return
    try:
      hf.weight_files(path)
    except (OSError, ValueError) as error:
      self.fail("base_checkpoint", path, _one_line(error))

  def _check_resume(self, run: _Run, workdir: str) -> None:
    """A checkpoint already in `workdir` must restore into the state this config builds."""
    found = _checkpoint_steps(workdir)
    if not found or not found[1]:
      return
    directory, steps = found
    saved = _saved_config(directory, max(steps))
    if saved is None:
      return
    current = json.loads(run.config.to_json()) if hasattr(run.config, "to_json") else {}
    diff = []
    for path in _STATE_FIELDS:
      was, now = _get(saved, path), _get(current, path)
      if path == "model" and isinstance(was, Mapping) and isinstance(now, Mapping):
        diff += [f"model.{k}" for k in _differences(was, now)]
      elif was != now:
        diff.append(path)
    if diff:
      changes = ", ".join(f"{p}: {_get(saved, p)!r} there, {_get(current, p)!r} now" for p in diff)
      self.fail(
        "--workdir",
        workdir,
        f"already holds a checkpoint (step {max(steps)}) of a different training state "
        f"({changes}); the run would resume from it and fail to restore: use a new "
        "--workdir, or the config that wrote it.",
      )


# ----- cached, side-effect-free lookups --------------------------------------------------------


def _options_key(name: str) -> str:
  return builders.options_key(name)


def _dataset_options(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """The builder options of dataset `name`, as `experiment` passes them."""
  options = _get(config, "data.options", {}) or {}
  entry = options.get(_options_key(name), {}) or {}
  return entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


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
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming

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
      else (f"it has no configs: name it {str(dataset)!r}")
    )
    raise ValueError(
      f"TFDS dataset {dataset!s} has no config {config!r}{_did_you_mean(config, known)}; {listed}."
    )


@functools.lru_cache(maxsize=16)
def _indivisible_axes(
  model: ModelConfig, sizes: tuple[tuple[str, int], ...]
) -> list[tuple[str, Any, tuple[str, ...], int]]:
  """(model field, its value, mesh axes, their product) for parameter axes that do not divide."""
  from flax import nnx

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
    spec = shd.logical_to_mesh(names)
    for logical, dim, axes in zip(names, shape, spec, strict=True):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      divisor = math.prod(mesh_sizes[a] for a in axes)
      if divisor > 1 and dim % divisor:
        field = _AXIS_FIELDS.get(logical, logical)
        value = getattr(model, field, dim)
        value = dim if value is None else value
        found.setdefault((field, axes), (field, value, axes, divisor))
  return list(found.values())


def _checkpoint_steps(path: str) -> tuple[str, list[int] | None] | None:
  """(checkpoints folder, its finished steps) of a workdir or checkpoints/ folder.

  None when nothing exists at `path`; steps None when the store cannot be listed from here.
  """
  import orbax.checkpoint as ocp
  from etils import epath

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
  from etils import epath

  path = epath.Path(directory) / str(step) / "config" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Fields of two model dicts that differ (a field left out takes its config class's default)."""
  family = current.get("family", saved.get("family", "transformer"))
  cls = FAMILIES.get(family, FAMILIES["transformer"])[0]
  defaults = {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }
  defaults["family"] = "transformer"
  keys = sorted(set(saved) | set(current))
  return [k for k in keys if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))]


def _fmt_fields(values: Mapping[str, Any], keys: Sequence[str]) -> str:
  return ", ".join(f"{k}={values.get(k)!r}" for k in keys)


__all__ = ["MODES", "ConfigError", "validate"]
