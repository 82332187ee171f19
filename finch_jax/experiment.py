"""From a config to a finished run: data, mesh, model, optimizer, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is the one entry `train.py` calls. By `config.mode`:

- `pretrain`: train a model from scratch on `config.data.train` (resumable from `workdir`).
- `finetune`: start from `config.base_checkpoint`, measure the eval sets before, train on
  `config.data.train`, measure them again, write `report.json`/`report.md` (resumable).
- `compare`: pretrain a base (cached in `workdir/base`), then run each method's learning-rate
  sweep and report forgetting at matched task loss (`finch_jax.forgetting`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

from finch_jax import data as data_lib
from finch_jax import models
from finch_jax import sharding as shd
from finch_jax.checkpoint import Checkpointer, CheckpointError, restore_params
from finch_jax.models import hf
from finch_jax.trainer import MetricsWriter, Preempted, Trainer, TrainState, fit, make_optimizer
from finch_jax.validate import MODES, ConfigError, validate


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where datasets are built: `config.data.data_dir`, or `WORKDIR/data`."""
  return config.data.data_dir or os.path.join(workdir, "data")


def _dataset_options(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  options = config.data.get("options", {}) or {}
  return dict(options.get(name.replace("/", "_"), {}) or {})


def source(config: ml_collections.ConfigDict, workdir: str, spec: Mapping[str, str]):
  """The random-access source named by a `{name, split}` spec (name '' means `data.name`)."""
  name = spec.get("name") or config.data.name
  return data_lib.data_source(
    name, spec["split"], data_dir(config, workdir), **_dataset_options(config, name)
  )


def is_hf_checkpoint(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory (config.json beside safetensors)."""
  return bool(path) and os.path.isfile(os.path.join(path, hf.CONFIG_FILE))


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The architecture: the base checkpoint's own when it is a Hugging Face directory (its
  config.json, with `config.model`'s `dtype` and `param_dtype`), else `config.model`."""
  if is_hf_checkpoint(config.get("base_checkpoint", "")):
    with open(os.path.join(config.base_checkpoint, hf.CONFIG_FILE)) as f:
      return hf.config_from_hf(
        json.load(f),
        dtype=config.model.get("dtype", "float32"),
        param_dtype=config.model.get("param_dtype", None),
      ).replace(remat=bool(config.model.get("remat", False)))
  return models.config_from_dict(config.model)


def make_tokenizer(config: ml_collections.ConfigDict) -> data_lib.Tokenizer:
  """`data.tokenizer` (a directory with tokenizer.json); "" means the base checkpoint's when it is
  a Hugging Face directory, else the byte-level tokenizer of the embedded benchmarks."""
  path = config.data.get("tokenizer", "")
  if not path and is_hf_checkpoint(config.get("base_checkpoint", "")):
    path = config.base_checkpoint
  if not path:
    return data_lib.ByteTokenizer()
  tokenizer = hf.load_tokenizer(path)
  if tokenizer is None:
    raise FileNotFoundError(
      f"No tokenizer.json in {path!r}: set --config.data.tokenizer to a directory that has one."
    )
  return tokenizer


def make_trainer(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> Trainer:
  """The trainer a config describes (model, optimizer with or without FINCH, mesh, remedies)."""
  tx, shape = make_optimizer(
    config.optimizer.to_dict(), config.finch.to_dict(), config.num_train_steps
  )
  mesh = mesh or shd.make_mesh(**config.mesh.to_dict())
  return Trainer(
    model_config(config),
    tx,
    shape,
    mesh,
    grad_accum_steps=config.grad_accum_steps,
    kl_weight=replay_kl_weight(config),
  )


def replay_kl_weight(config: ml_collections.ConfigDict) -> float:
  """The KL-to-base weight on replay tokens (0 when replay is off or trains on cross-entropy)."""
  replay = config.get("replay")
  if not replay or not replay.share:
    return 0.0
  return float(replay.kl_weight)


def train_batches(config: ml_collections.ConfigDict, workdir: str, seed: int):
  """The Grain dataset of this process's training batches (mixing in replay when configured)."""
  tokenizer = make_tokenizer(config)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  local_batch = _local_batch_size(config)
  return data_lib.lm_dataset(
    source(config, workdir, config.data.train),
    tokenizer=tokenizer,
    seq_len=config.data.seq_len,
    batch_size=local_batch,
    seed=seed,
    packing=config.data.packing,
    **shard,
  )


def _local_batch_size(config: ml_collections.ConfigDict) -> int:
  if config.data.batch_size % jax.process_count():
    raise ValueError(
      f"data.batch_size={config.data.batch_size} does not divide among "
      f"{jax.process_count()} processes: use a multiple of {jax.process_count()}."
    )
  return config.data.batch_size // jax.process_count()


class Evaluator:
  """Losses on the named eval sets and fact-recall accuracy on the named fact sets."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, trainer: Trainer):
    self.trainer = trainer
    tokenizer = make_tokenizer(config)
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    local_batch = _local_batch_size(config)
    self.loss_sets = {
      name: data_lib.eval_batches(
        source(config, workdir, spec),
        tokenizer=tokenizer,
        seq_len=config.data.seq_len,
        batch_size=local_batch,
        num_examples=config.data.eval_examples or None,
        packing=True,
        **shard,
      )
      for name, spec in config.data.eval_sets.items()
    }
    self.fact_sets = {
      name: data_lib.fact_batches(
        source(config, workdir, spec),
        tokenizer=tokenizer,
        max_prompt_len=config.data.max_prompt_len,
        answer_len=config.data.answer_len,
        batch_size=local_batch,
        num_examples=config.data.fact_examples or None,
        **shard,
      )
      for name, spec in config.data.get("fact_sets", {}).items()
    }

  def __call__(self, params: Any, *, facts: bool = True) -> dict[str, float]:
    """`{NAME_loss: ..., NAME_fact_accuracy: ...}` for every configured set."""
    out = {f"{name}_loss": self.trainer.evaluate(params, b) for name, b in self.loss_sets.items()}
    if facts:
      for name, batches in self.fact_sets.items():
        out[f"{name}_fact_accuracy"] = self.trainer.fact_accuracy(params, batches)
    return out


def run_training(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  trainer: Trainer | None = None,
  init_params: Any = None,
  learning_rate: float | None = None,
  seed: int | None = None,
  evaluator: Evaluator | None = None,
  progress: bool = True,
):
  """One training run in `workdir`, resumed from its newest readable checkpoint when it has one.

  Returns the `FitResult`. Parameters start from `init_params` (e.g. a base model), else from a
  fresh initialisation with `config.seed`. A resumed run continues the data stream, the logging
  window and the evaluations where the checkpoint left them, and drops the records of
  `metrics.jsonl` past the checkpoint's step, so that it ends as an uninterrupted run would, bit
  for bit, with one record per logged step.

  Raises:
    Preempted: SIGTERM or SIGINT arrived (see `finch_jax.trainer.fit`); the checkpoint of the
      step reached is written before this returns control, and rerunning resumes from it.
    CheckpointError: a checkpoint could not be written, or none in `workdir` can be read.
  """
  seed = config.seed if seed is None else seed
  trainer = trainer or make_trainer(config)
  primary = jax.process_index() == 0
  checkpointer = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=config.checkpoint_every,
    max_to_keep=config.keep_checkpoints,
    config=json.loads(config.to_json()),
  )
  writer = None
  try:
    dataset = train_batches(config, workdir, seed)
    iterator = iter(dataset)
    checkpointer.data_iterator = iterator
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(trainer.abstract_state())
      logging.info("Resumed %s at step %d.", workdir, int(state.step))
    else:
      params = trainer.init_params(seed) if init_params is None else init_params
      state = trainer.create_state(params, learning_rate=learning_rate)
    writer = MetricsWriter(workdir, enabled=primary, truncate_after=int(state.step))
    result = fit(
      trainer,
      state,
      iterator,
      num_train_steps=config.num_train_steps,
      log_every=config.log_every,
      eval_every=config.eval_every,
      evaluate=None if evaluator is None else _final_facts_only(evaluator, config),
      writer=writer,
      checkpointer=checkpointer,
      progress=progress,
      tokens_per_batch=config.data.batch_size * config.data.seq_len,
      resume=checkpointer.restored_extra,
    )
  finally:
    if writer is not None:
      writer.close()
    # Waits for the last checkpoint (the preemption one included); raises if it failed.
    checkpointer.close()
  return result


def _final_facts_only(evaluator: Evaluator, config: ml_collections.ConfigDict):
  """Losses at every evaluation; fact recall (greedy decoding, slower) at the last step only."""
  return lambda params, step: evaluator(params, facts=step == config.num_train_steps)


def base_params(config: ml_collections.ConfigDict, trainer: Trainer) -> Any:
  """The base model's parameters from `config.base_checkpoint` (a finch_jax workdir or a Hugging
  Face directory), laid out for `trainer`."""
  if not config.base_checkpoint:
    raise ValueError(
      "Fine-tuning needs a base model: set --config.base_checkpoint=WORKDIR of a pretraining "
      "run (e.g. one made with configs/pretrain_tiny.py)."
    )
  if is_hf_checkpoint(config.base_checkpoint):
    model, _ = hf.load_hf(
      config.base_checkpoint,
      mesh=trainer.mesh,
      dtype=trainer.model_config.dtype,
      param_dtype=trainer.model_config.param_dtype,
      rules=trainer.rules,
    )
    return nnx.as_pure(nnx.state(model))
  abstract = trainer.abstract_state().params
  return restore_params(config.base_checkpoint, abstract)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes the base checkpoint and reports forgetting of this single run."""
  from finch_jax import forgetting

  trainer = make_trainer(config)
  evaluator = Evaluator(config, workdir, trainer)
  params = base_params(config, trainer)
  before = evaluator(params)
  result = run_training(config, workdir, trainer=trainer, init_params=params, evaluator=evaluator)
  after = result.evals[-1] if result.evals else evaluator(result.state.params)
  name = "finch" if config.finch.enabled else "standard"
  report = forgetting.single_run_report(name, config, before, after)
  if jax.process_index() == 0:
    forgetting.write_report(workdir, report)
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs what `config.mode` asks for in `workdir`; see the module docstring."""
  validate(config, workdir)  # every check before any compilation, each naming its fix
  os.makedirs(workdir, exist_ok=True)
  if config.mode == "pretrain":
    trainer = make_trainer(config)
    evaluator = Evaluator(config, workdir, trainer) if config.data.eval_sets else None
    return run_training(config, workdir, trainer=trainer, evaluator=evaluator)
  if config.mode == "finetune":
    return finetune(config, workdir)
  from finch_jax import forgetting

  return forgetting.compare(config, workdir)


__all__ = [
  "CheckpointError",
  "Evaluator",
  "ConfigError",
  "MODES",
  "Preempted",
  "TrainState",
  "base_params",
  "data_dir",
  "finetune",
  "is_hf_checkpoint",
  "make_tokenizer",
  "make_trainer",
  "model_config",
  "run_training",
  "source",
  "train_and_evaluate",
  "train_batches",
]
