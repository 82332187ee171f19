"""What a config implies: its overrides, the configs of a comparison, and the objects a run builds
from a config (model config, tokenizer, trainer), plus the fingerprint that keys a cached run.

Everything here reads a config and builds; nothing trains. `validate`, `run` and `sweep` import
it, so each of them reads a config the same way. The checks of what is built here (`*_problems`:
the batch, the tokenizer, the datasets, the base checkpoint) return (config field, what is wrong
and the fix) pairs without building anything; `validate` names the fields.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from ml_collections import ConfigDict

from finch_jax import checkpoint, files, models
from finch_jax import data as data_lib
from finch_jax import lora as lora_lib
from finch_jax import sharding as shd
from finch_jax.models import gguf, hf
from finch_jax.models.gguf import is_gguf_file
from finch_jax.models.llama import EXECUTION_FIELDS
from finch_jax.optim import make_optimizer
from finch_jax.trainer import Trainer

BASE_SAMPLES = data_lib.builders.BASE_SAMPLES  # replay.data / eval set: the base's samples
DEBIAN_PREFIX = "debian/"  # the TFDS builder of Debian package data (`finch_jax.data.debian`)


# ----- overrides and the configs of a comparison -----------------------------------------------


def override(
  config: ml_collections.ConfigDict,
  changes: Mapping[str, Any],
  *,
  on_unknown: Callable[[str, Any, list[str]], None] | None = None,
) -> ml_collections.ConfigDict:
  """A copy of `config` with the nested `changes` applied.

  A key that is not a field of `config` raises KeyError, or, with `on_unknown`, is reported as
  `on_unknown(dotted_path, value, known_fields_there)` and skipped, so one typo does not hide
  other problems. A dict value for a dict-valued field is merged key by key; any other value
  replaces the field whole (e.g. `data.train: {...}`).
  """
  out = copy.deepcopy(config)

  def apply(node: Any, updates: Mapping[str, Any], prefix: str) -> None:
    for key, value in updates.items():
      if key not in node:
        if on_unknown is None:
          raise KeyError(f"Override {prefix}{key} is not a config field.")
        on_unknown(f"{prefix}{key}", value, sorted(node.keys()))
      elif isinstance(value, Mapping) and isinstance(node[key], Mapping | ConfigDict):
        apply(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value

  with out.unlocked():
    apply(out, changes, "")
  return out


def _as_dict(node: Any) -> dict[str, Any]:
  return node.to_dict() if hasattr(node, "to_dict") else dict(node or {})


def pretrain_config(config: ml_collections.ConfigDict, **override_options: Any):
  """The config that trains a comparison's base model (`compare.pretrain` applied)."""
  pre = override(config, _as_dict(config.compare.pretrain), **override_options)
  with pre.unlocked():
    pre.mode = "pretrain"
    pre.finch.enabled = False
  return pre


def method_overrides(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """Each method of `compare.methods` as its config overrides (its learning rates aside)."""
  return {
    name: {k: v for k, v in _as_dict(spec).items() if k != "learning_rates"}
    for name, spec in (config.compare.methods or {}).items()
  }


def method_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """One full config per method named in `compare.methods`."""
  return {name: override(config, changes) for name, changes in method_overrides(config).items()}


def compare_problems(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(config field, what is wrong and the fix) of a comparison's own settings: at least one
  method, each sweeping positive learning rates, the baseline and `only` among the methods,
  the seeds. (`compare.concurrent_runs` depends on the devices: `sharding.concurrent_runs`.)"""
  methods = config.compare.get("methods") or {}
  if not methods:
    return [("compare.methods", "name at least one method, e.g. {'standard': {...}}.")]
  problems = [
    (
      f"compare.methods.{name}.learning_rates",
      "each method sweeps a non-empty list of positive learning rates, e.g. (3e-4, 1e-3, "
      "3e-3); the report reads methods at matched task loss along these sweeps.",
    )
    for name, spec in methods.items()
    if not _positive_numbers(_as_dict(spec).get("learning_rates"))
  ]
  if config.compare.get("baseline") not in methods:
    problems.append(
      ("compare.baseline", f"the baseline must be one of compare.methods: {sorted(methods)}.")
    )
  only = config.compare.get("only", ()) or ()
  if isinstance(only, str):
    problems.append(("compare.only", f"give a list of method names, e.g. ({only!r},)."))
  elif unknown := [name for name in only if name not in methods]:
    problems.append(
      (
        "compare.only",
        f"names {unknown}, which compare.methods lacks; choose among {sorted(methods)}.",
      )
    )
  seeds = config.compare.get("seeds")
  if not isinstance(seeds, Sequence) or not seeds or not all(_is_seed(s) for s in seeds):
    problems.append(("compare.seeds", "give a non-empty list of seeds in [0, 2**32), e.g. (0, 1)."))
  return problems


def _positive_numbers(values: Any) -> bool:
  return (
    isinstance(values, Sequence)
    and bool(values)
    and all(
      isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
      for v in values
    )
  )


def _is_seed(value: Any) -> bool:
  return _is_int(value) and 0 <= value < 2**32


# ----- data ------------------------------------------------------------------------------------


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where datasets are built: `config.data.data_dir`, or `WORKDIR/data`."""
  return config.data.data_dir or os.path.join(workdir, "data")


def dataset_options(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """The builder options of dataset `name` (`config.data.options`, keyed by its options key)."""
  options = config.data.get("options", {}) or {}
  return dict(options.get(data_lib.builders.options_key(name), {}) or {})


def spec_name(config: ml_collections.ConfigDict, spec: Mapping[str, str]) -> str:
  """The dataset a `{name, split}` spec names ('' means `data.name`)."""
  return spec.get("name") or config.data.name


def dataset_specs(config: ml_collections.ConfigDict) -> dict[str, Mapping[str, Any]]:
  """Every dataset spec a run reads, by where it is set (`data.train`, `data.eval_sets.task`,
  ..., `replay.data` when replay is on)."""
  specs = {"data.train": config.data.train}
  for group in ("eval_sets", "fact_sets"):
    for name, spec in (config.data.get(group, {}) or {}).items():
      specs[f"data.{group}.{name}"] = spec
  replay = config.get("replay")
  if replay and replay.share:
    specs["replay.data"] = replay.data
  return specs


def cli_flag(path: str) -> str:
  """The command-line flag that sets config field `path`."""
  return f"--config.{path}"


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _multiples(value: int, step: int) -> str:
  """'8 or 16': the multiples of `step` around `value`."""
  low, high = (value // step) * step, (value // step + 1) * step
  return f"{low} or {high}" if low > 0 else f"{high}"


def batch_problems(
  batch_size: Any,
  process_count: int,
  mesh: Mapping[str, int] | None = None,
  grad_accum_steps: Any = 1,
  *,
  flag: Callable[[str], str] = cli_flag,
) -> list[tuple[str, str]]:
  """(config field, what is wrong and the fix) for each way the global batch `data.batch_size`
  does not split: among the processes (each feeds its own rows), then, given the resolved mesh
  sizes, over the devices its rows are sharded on (`sharding.batch_axes`) and per micro-batch of
  `grad_accum_steps`. `flag(path)` names the flag that sets a field in the fixes."""
  if not _is_int(batch_size) or batch_size < 1:
    return [("data.batch_size", "must be a positive integer: rows per global batch.")]
  problems = []
  if batch_size % process_count:
    problems.append(
      (
        "data.batch_size",
        f"the global batch is split among the {process_count} processes: set "
        f"{flag('data.batch_size')} to a multiple of {process_count}, e.g. "
        f"{_multiples(batch_size, process_count)}.",
      )
    )
  if mesh is None:
    return problems
  axes = shd.batch_axes()
  devices = math.prod(mesh[axis] for axis in axes)
  shown = " x ".join(f"mesh.{axis}={mesh[axis]}" for axis in axes)
  if devices % process_count:
    problems.append(
      (
        "mesh",
        f"the batch is sharded over {devices} devices ({shown}), which do not split among the "
        f"{process_count} processes that each feed their own rows: make "
        f"{' x '.join(f'mesh.{axis}' for axis in axes)} a multiple of {process_count} (keep "
        "mesh.tensor within one process's devices).",
      )
    )
  if batch_size % devices:
    problems.append(
      (
        "data.batch_size",
        f"does not split over the {devices} devices the batch is sharded on ({shown}): set "
        f"{flag('data.batch_size')} to a multiple of {devices}, e.g. "
        f"{_multiples(batch_size, devices)}.",
      )
    )
    return problems
  accum = grad_accum_steps
  if _is_int(accum) and accum > 1 and batch_size % (accum * devices):
    divisors = [k for k in range(1, accum + 1) if batch_size % (k * devices) == 0]
    problems.append(
      (
        "data.batch_size",
        f"with grad_accum_steps={accum} each micro-batch of batch_size / {accum} rows must split "
        f"over the {devices} batch devices ({shown}): set {flag('data.batch_size')} to a multiple "
        f"of {accum * devices}, e.g. {_multiples(batch_size, accum * devices)}, or "
        f"{flag('grad_accum_steps')} to one of {divisors}.",
      )
    )
  return problems


def dataset_problems(config: ml_collections.ConfigDict) -> tuple[list[tuple[str, str]], set[str]]:
  """(config field, what is wrong and the fix) for each dataset a run of `config` reads
  (`dataset_specs`) that it cannot read: a name no builder knows, missing files, a split the
  dataset lacks or one without the records the set reads (`builders.dataset_splits`,
  `builders.split_problem`), JSONL data as a fact set, base-model samples without a base model.
  Also the options keys of the datasets that exist. Builds and downloads nothing."""
  problems, read = [], set()
  for where, spec in dataset_specs(config).items():
    kind = "facts" if where.startswith("data.fact_sets.") else "text"
    name = spec.get("name") if isinstance(spec, Mapping | ConfigDict) else None
    if where == "replay.data" and name == BASE_SAMPLES:
      continue  # the base model's own samples: a remedy, which needs a base model
    if name == BASE_SAMPLES and (kind == "facts" or config.get("mode") == "pretrain"):
      problems.append(
        (
          f"{where}.name",
          "base-model samples are a loss set (or replay data) of a run with a base model "
          "(mode 'finetune' or 'compare'); name a dataset here.",
        )
      )
    elif isinstance(name, str) and name.startswith(data_lib.builders.JSONL_PREFIX):
      problems += _jsonl_problems(f"{where}.name", name, kind)
    elif name != BASE_SAMPLES:
      found = _dataset_problems(config, where, spec, kind)
      problems += found
      if not found or found[0][0].endswith(".split"):
        read.add(data_lib.builders.options_key(spec_name(config, spec)))
  return problems, read


def _jsonl_problems(field: str, name: str, kind: str) -> list[tuple[str, str]]:
  """Instruction data: files that exist, read as loss sets or training data (not as facts)."""
  if kind == "facts":
    return [
      (
        field,
        "fact sets read prompt/answer TFDS records; use JSONL data as a loss set "
        "(data.eval_sets) or for training.",
      )
    ]
  try:
    data_lib.sft.jsonl_files(name.removeprefix(data_lib.builders.JSONL_PREFIX))
  except FileNotFoundError as error:
    return [(field, " ".join(str(error).split()))]
  return []


def _dataset_problems(
  config: ml_collections.ConfigDict, where: str, spec: Any, kind: str
) -> list[tuple[str, str]]:
  """A `{name, split}` spec of a built dataset, set at `where`."""
  if not isinstance(spec, Mapping | ConfigDict) or not spec.get("split"):
    return [(where, "give {'name': DATASET or '' for data.name, 'split': SPLIT}.")]
  name = spec_name(config, spec)
  field = f"{where}.name" if spec.get("name") else "data.name"
  if not isinstance(name, str) or not name:
    return [(field, f"name a dataset; {data_lib.builders.VALID_NAMES_HELP}.")]
  try:
    splits = data_lib.builders.dataset_splits(name, **dataset_options(config, name))
  except Exception as error:  # the builders' own message names the fix
    return [(field, " ".join(str(error).split()))]
  # None: a catalog dataset, whose splits only a download would tell.
  problem = splits and data_lib.builders.split_problem(name, spec["split"], splits, kind)
  return [(f"{where}.split", problem)] if problem else []


def local_batch_size(config: ml_collections.ConfigDict) -> int:
  """This process's share of `data.batch_size` (`batch_problems` says when there is none)."""
  batch_size = config.data.batch_size
  if problems := batch_problems(batch_size, jax.process_count()):
    raise ValueError(f"data.batch_size={batch_size}: {problems[0][1]}")
  return batch_size // jax.process_count()


# ----- model, tokenizer, trainer ---------------------------------------------------------------


def is_hf_checkpoint(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory (config.json beside safetensors)."""
  return bool(path) and os.path.isfile(os.path.join(path, hf.CONFIG_FILE))


def is_pretrained(path: str) -> bool:
  """Whether `path` is a pretrained model from elsewhere: a Hugging Face directory or a
  llama.cpp GGUF file (else it is a finch_jax workdir)."""
  return is_hf_checkpoint(path) or (bool(path) and is_gguf_file(path))


def _execution_options(model: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of a `model` dict that say how a pretrained model runs (attention, remat, its
  policy, scanned layers: `models.llama.EXECUTION_FIELDS`), which its file leaves open."""
  return {k: model[k] for k in EXECUTION_FIELDS if k in model}


def hf_model_config(path: str, model: Mapping[str, Any]) -> models.ModelConfig:
  """The architecture of the Hugging Face model in `path`, with `model`'s `dtype`,
  `param_dtype` and execution options (`remat`, `remat_policy`, `scan_layers`, `attention`)."""
  with open(os.path.join(path, hf.CONFIG_FILE)) as f:
    values = json.load(f)
  config = hf.config_from_hf(
    values, dtype=model.get("dtype", "float32"), param_dtype=model.get("param_dtype", None)
  )
  return hf.with_execution_options(config, _execution_options(model))


def pretrained_model_config(path: str, model: Mapping[str, Any]) -> models.ModelConfig:
  """The architecture a pretrained model brings (its config.json, or a GGUF file's metadata),
  with `model`'s `dtype`, `param_dtype` and execution options (as `hf_model_config`)."""
  if is_hf_checkpoint(path):
    return hf_model_config(path, model)
  config = gguf.gguf_config(
    path, dtype=model.get("dtype", "float32"), param_dtype=model.get("param_dtype", None)
  )
  return hf.with_execution_options(config, _execution_options(model))


def pretrained_tokenizer(path: str) -> data_lib.Tokenizer | None:
  """The tokenizer that comes with a pretrained model (tokenizer.json, or the GGUF metadata)."""
  return hf.load_tokenizer(path) if is_hf_checkpoint(path) else gguf.gguf_tokenizer(path)


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The architecture: a pretrained base's own (with `config.model`'s `dtype`, `param_dtype`
  and `remat`), else `config.model`."""
  base = config.get("base_checkpoint", "")
  if is_pretrained(base):
    return pretrained_model_config(base, config.model)
  return models.config_from_dict(config.model)


def make_tokenizer(config: ml_collections.ConfigDict) -> data_lib.Tokenizer:
  """`data.tokenizer` (a directory with tokenizer.json); "" means a pretrained base's own, else
  the byte-level tokenizer of the embedded benchmarks."""
  path = config.data.get("tokenizer", "")
  base = config.get("base_checkpoint", "")
  tokenizer = None
  if path:
    tokenizer = hf.load_tokenizer(path)
  elif is_pretrained(base):
    tokenizer, path = pretrained_tokenizer(base), base
  else:
    return data_lib.ByteTokenizer()
  if tokenizer is None:
    raise FileNotFoundError(
      f"No tokenizer in {path!r}: set --config.data.tokenizer to a directory with a tokenizer.json."
    )
  return tokenizer


def tokenizer_problems(
  config: ml_collections.ConfigDict,
  model: models.ModelConfig,
  flag: Callable[[str], str] = cli_flag,
) -> list[tuple[str, str]]:
  """(config field, what is wrong and the fix) when the run's tokenizer (`make_tokenizer`)
  cannot be made, or has more tokens than `model`'s embedding has rows: an id at or past
  `vocab_size` reads none (`jnp.take` fills NaN), so every step's loss is NaN, every update is
  skipped, and the run ends having learned nothing. A pretrained base's own tokenizer comes with
  its embedding and is not read (from a GGUF file that takes seconds)."""
  field, base = "data.tokenizer", config.get("base_checkpoint", "")
  pretrained = isinstance(base, str) and is_pretrained(base)
  if pretrained and not config.data.get("tokenizer", ""):
    return []
  try:
    tokens, rows = make_tokenizer(config).vocab_size, model.vocab_size
  except (OSError, ValueError) as error:
    return [(field, " ".join(str(error).split()))]
  if tokens <= rows:
    return []
  too_many = f"the tokenizer has {tokens} tokens, the model's vocabulary {rows} embedding rows"
  if pretrained:
    return [
      (
        field,
        f"{too_many} ({base}): set {flag(field)}='' to use the base model's own tokenizer, or one "
        f"of at most {rows} tokens.",
      )
    ]
  return [
    (
      "model.vocab_size",
      f"{too_many}: set {flag('model.vocab_size')} to at least {tokens} (e.g. "
      f"{-(-tokens // 8) * 8}), or {flag(field)} to a tokenizer of at most {rows} tokens.",
    )
  ]


BASE_HINT = (
  "point --config.base_checkpoint at a Hugging Face model directory (config.json and "
  "safetensors), a llama.cpp .gguf file, or the workdir (or its checkpoints/ folder) of a "
  "pretraining run, e.g. one made with configs/pretrain_tiny.py"
)


def base_checkpoint_problems(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(config field, what is wrong and the fix) of the base model `config` starts from
  (`base_checkpoint`): a Hugging Face directory with a supported config.json and its weights,
  a GGUF file whose metadata gives a supported model, or a finch_jax workdir (or its
  checkpoints/ folder) holding a finished checkpoint of `config.model`'s architecture. Reads
  config files and checkpoint metadata, nothing more."""
  base = config.get("base_checkpoint")
  if not base or not isinstance(base, str):
    return [("base_checkpoint", f"fine-tuning needs a base model: {BASE_HINT}.")]
  if is_pretrained(base):
    what = "its config.json" if is_hf_checkpoint(base) else "this GGUF file"
    try:
      pretrained_model_config(base, {})
      if is_hf_checkpoint(base):
        what = ""  # the config is fine: the weights' message stands alone
        hf.weight_files(base)
    except (OSError, ValueError, KeyError, TypeError) as error:
      text = " ".join(str(error).split())
      return [("base_checkpoint", f"{what} cannot be used: {text}" if what else text)]
    return []
  found = checkpoint.saved_steps(base)
  if found is None:
    return [("base_checkpoint", f"does not exist: {BASE_HINT}.")]
  directory, steps = found
  if not steps:  # None: a store this machine cannot list; the run itself will tell
    problem = f"holds no finished checkpoint in {directory}: {BASE_HINT}."
    return [] if steps is None else [("base_checkpoint", problem)]
  saved = (checkpoint.saved_config(directory, max(steps)) or {}).get("model")
  return [
    (
      f"model.{field}",
      f"the base checkpoint {base!r} holds a model with {field}={was!r}; fine-tuning restores "
      f"its parameters, so set --config.model.{field}={was} (or use a base of this shape).",
    )
    for field, was in _model_differences(saved, config.get("model")).items()
  ]


def _model_differences(saved: Any, current: Any) -> dict[str, Any]:
  """{field: saved value} where two `model` dicts describe models of different parameters, each
  read as `models.config_from_dict` reads it (a field left out takes its default)."""
  try:
    was, now = models.config_from_dict(saved), models.config_from_dict(current)
  except (TypeError, ValueError, AttributeError):
    return {}  # none saved, or a current one that is named as wrong on its own
  # The attention implementation and the remat policy leave the parameters as they are
  # (scan_layers stacks them, so it must match).
  fields = [f.name for f in dataclasses.fields(was) if f.name not in ("attention", "remat_policy")]
  return {k: getattr(was, k) for k in fields if getattr(was, k) != getattr(now, k)}


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  """`config.lora` as a `LoraConfig`, or None when its rank is 0 (every weight trained)."""
  spec = config.get("lora")
  if problems := lora_lib.lora_problems(spec):
    field, message = problems[0]
    path = f"lora.{field}" if field else "lora"
    raise ValueError(f"{path}={spec.get(field) if field else spec.to_dict()!r}: {message}")
  if not spec or not spec.rank:
    return None
  return lora_lib.LoraConfig(rank=int(spec.rank), alpha=float(spec.alpha), targets=spec.targets)


def replay_kl_weight(config: ml_collections.ConfigDict) -> float:
  """The KL-to-base weight on replay tokens (0 when replay is off or trains on cross-entropy)."""
  replay = config.get("replay")
  if not replay or not replay.share:
    return 0.0
  return float(replay.kl_weight)


def make_trainer(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> Trainer:
  """The trainer a config describes (model, optimizer with or without FINCH, mesh, remedies)."""
  tx, shape = make_optimizer(
    config.optimizer.to_dict(), config.finch.to_dict(), config.num_train_steps
  )
  return Trainer(
    model_config(config),
    tx,
    shape,
    mesh or shd.make_mesh(**config.mesh.to_dict()),
    grad_accum_steps=config.grad_accum_steps,
    kl_weight=replay_kl_weight(config),
    lora=lora_config(config),
    loss_floor=float(config.finch.get("loss_floor", 0.0)) if config.finch.enabled else 0.0,
    loss_chunk_size=config.get("loss_chunk_size", 0),
  )


# ----- what determines a run -------------------------------------------------------------------

FINGERPRINT_FILE = "fingerprint.json"  # in a run directory: what its checkpoints were made from

# Fields that change where and how often a run writes, not what it computes.
_NOT_DETERMINING = ("checkpoint_every", "keep_checkpoints")
# Fields a run may change and still resume its own checkpoints: how long it trains (it goes on
# to the new last step) and how often it logs and evaluates.
RESUMABLE_FIELDS = ("num_train_steps", "log_every", "eval_every")


def _dataset_files(name: str, options: Mapping[str, Any]) -> list[str]:
  """The files dataset `name` reads, found as its reader finds them (recursively for a directory
  or a `**` glob); [] for data made from code or downloaded by TFDS."""
  if name.startswith(data_lib.builders.LOCAL_TEXT_PREFIX):
    path = os.path.abspath(
      os.path.expanduser(name.removeprefix(data_lib.builders.LOCAL_TEXT_PREFIX))
    )
    return [os.fspath(f) for f in data_lib.builders.local_text_files(path)]
  if name.startswith(data_lib.builders.JSONL_PREFIX):
    return data_lib.sft.jsonl_files(name.removeprefix(data_lib.builders.JSONL_PREFIX))
  if name.startswith(DEBIAN_PREFIX):
    source = name.removeprefix(DEBIAN_PREFIX).split(":")[0]
    return data_lib.debian.source_files(data_lib.debian.debian_config(source, **options))
  return []


def _base_files(base: str) -> list[str]:
  """The files of a base checkpoint: a pretrained model's (a Hugging Face directory, a GGUF file),
  or a finch_jax workdir's checkpoints (not its logs, which a rerun may touch); local or gs://."""
  if not base:
    return []
  checkpoints = epath.Path(base) / "checkpoints"
  return files.files_under(checkpoints if checkpoints.is_dir() else base)


def input_files(config: ml_collections.ConfigDict) -> list[str]:
  """Every file a run of `config` reads, sorted: the text of `local_text:` specs and the JSONL of
  `jsonl:` specs (as their readers find them: a directory's files recursively, `**` globs), the
  package files a `debian/` spec's builder reads, the `data.tokenizer` directory and the base
  checkpoint; local or in a bucket. A spec whose files cannot be found adds none: the run names
  what is missing when it reads them."""
  found: set[str] = set()
  for spec in dataset_specs(config).values():
    name = spec_name(config, spec)
    try:
      found.update(_dataset_files(name, dataset_options(config, name)))
    except (OSError, ValueError):
      continue
  tokenizer = config.data.get("tokenizer", "")
  found.update(files.files_under(tokenizer) if tokenizer else ())
  found.update(_base_files(config.get("base_checkpoint", "")))
  return sorted(found)


@functools.lru_cache(maxsize=256)
def _content_digest(path: str, size: int, mtime: float) -> str:
  """SHA-256 of a local file's content (read once per size and modification time)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def _file_stats(paths: list[str]) -> dict[str, list[Any]]:
  """{path: [size, content hash]} of each local file, {path: [size, modification time]} of each
  file in a bucket. The content, not the time, for local files: a package reinstalled in a new
  session (the SmolLM2 GGUF file) gets a new time, and a study's runs kept from an earlier
  session must still be recognised."""
  stats = {}
  for path in paths:
    size, mtime = files.stat(path)
    stats[path] = [size, mtime if files.is_remote(path) else _content_digest(path, size, mtime)]
  return stats


def _digest(inputs: Mapping[str, Any]) -> str:
  """The 16-hex-digit hash of fingerprint inputs (files as [path, size, hash or time] rows)."""
  rows = dict(inputs)
  if "files" in rows:
    rows["files"] = [[path, *stat] for path, stat in sorted(rows["files"].items())]
  text = json.dumps(rows, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_inputs(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
  """What `fingerprint` hashes, as JSON: `config` (the effective config without the other methods
  and sweeps of a comparison, where datasets are built and checkpoint cadence), `extra` (e.g. a
  sweep run's learning rate and seed) and `files` (`_file_stats` of every file in
  `input_files`). A checkpoint keeps it, so a refused resume can name what changed."""
  values = json.loads(config.to_json_best_effort(sort_keys=True))
  compare = values.pop("compare", None) or {}
  values["compare.pretrain"] = compare.get("pretrain")
  values["data"].pop("data_dir", None)  # where datasets are built, not what they hold
  for key in _NOT_DETERMINING:
    values.pop(key, None)
  return {"config": values, "extra": extra, "files": _file_stats(input_files(config))}


def fingerprint(config: ml_collections.ConfigDict, **extra: Any) -> str:
  """A hash of everything that determines a run (`fingerprint_inputs`). A cached run is reused,
  and a checkpoint resumed, only when this is unchanged."""
  return _digest(fingerprint_inputs(config, **extra))


def fingerprint_record(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
  """`{"fingerprint": key, "inputs": ...}`: what a checkpoint stores to refuse a resume under
  another config, other data or another base (`finch_jax.checkpoint.Checkpointer`): the
  `fingerprint_inputs` without `RESUMABLE_FIELDS`, and their hash."""
  inputs = fingerprint_inputs(config, **extra)
  for key in RESUMABLE_FIELDS:
    inputs["config"].pop(key, None)
  return {"fingerprint": _digest(inputs), "inputs": inputs}


def claimed_fingerprint(directory: str | os.PathLike) -> str | None:
  """The fingerprint a run directory was claimed for (its `FINGERPRINT_FILE`), or None when it
  has none: nothing there, made before runs were fingerprinted, or a file cut short."""
  stamp = files.read_json(epath.Path(directory) / FINGERPRINT_FILE)
  return stamp.get("fingerprint") if isinstance(stamp, dict) else None


def base_fingerprint(config: ml_collections.ConfigDict) -> str:
  """What identifies the base model `config` starts from: `base_checkpoint` with the size and
  time of each of its files, or, for a comparison that pretrains its own base, the fingerprint of
  that pretraining (`pretrain_config`)."""
  base = config.get("base_checkpoint", "")
  if base or config.get("compare") is None:
    return _digest({"base_checkpoint": base, "files": _file_stats(_base_files(base))})
  return fingerprint(pretrain_config(config))


def samples_fingerprint(config: ml_collections.ConfigDict, seed: int) -> str:
  """The key of the base model's samples a config draws with `seed` (`finch_jax.inputs`'s sample
  cache): the base (`base_fingerprint`), the model's settings and tokenizer, and how many
  sequences of what length at what temperature. One rule for every cache of samples, so none is
  reused for other samples than it holds."""
  replay, tokenizer = config.replay, config.data.get("tokenizer", "")
  inputs = {
    "base": base_fingerprint(config),
    "model": _as_dict(config.model),
    "tokenizer": [tokenizer, _file_stats(files.files_under(tokenizer) if tokenizer else [])],
    "num_samples": int(replay.num_samples),
    "length": int(replay.sample_len),
    "temperature": float(replay.temperature),
    "seed": int(seed),
  }
  return _digest(inputs)


__all__ = [
  "BASE_HINT",
  "BASE_SAMPLES",
  "FINGERPRINT_FILE",
  "RESUMABLE_FIELDS",
  "base_checkpoint_problems",
  "base_fingerprint",
  "batch_problems",
  "claimed_fingerprint",
  "cli_flag",
  "compare_problems",
  "data_dir",
  "dataset_options",
  "dataset_problems",
  "dataset_specs",
  "fingerprint",
  "fingerprint_inputs",
  "fingerprint_record",
  "hf_model_config",
  "input_files",
  "is_hf_checkpoint",
  "is_pretrained",
  "local_batch_size",
  "lora_config",
  "make_tokenizer",
  "make_trainer",
  "method_configs",
  "method_overrides",
  "model_config",
  "override",
  "pretrain_config",
  "pretrained_model_config",
  "pretrained_tokenizer",
  "replay_kl_weight",
  "samples_fingerprint",
  "spec_name",
  "tokenizer_problems",
]
