"""One run: pretrain or fine-tune from a config, with its data, evaluation and checkpoints.

- `pretrain(config, workdir)`: train a model from scratch on `config.data.train` (resumable).
- `finetune(config, workdir)`: start from `config.base_checkpoint` (a finch_jax workdir, a
  Hugging Face model directory or a GGUF file), measure the eval sets before, train on
  `config.data.train`, measure them again, write `report.json`/`report.md` (resumable); a
  pretrained base's fine-tuned model is exported to `workdir/hf` (safetensors, config.json,
  tokenizer).
- `run_training(config, workdir, ...)`: the training run both share, and that a comparison's
  sweep (`finch_jax.sweep`) runs once per learning rate and seed.

Its inputs come from `finch_jax.inputs`, its measures from `finch_jax.evaluate`. The workdir is
local or in a bucket (`gs://BUCKET/...`): every file under it is read and written through
`etils.epath.Path`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from finch_jax import configure, files, inputs
from finch_jax.checkpoint import Checkpointer, restore_params
from finch_jax.evaluate import Evaluator
from finch_jax.loop import FitResult, MetricsWriter, StopRequests, fit
from finch_jax.models import hf
from finch_jax.models.gguf import load_gguf
from finch_jax.report import single_run_report, write_report
from finch_jax.trainer import Trainer

HF_EXPORT_DIR = "hf"  # where `finetune` writes a pretrained base's fine-tuned model


def run_training(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  trainer: Trainer | None = None,
  init_params: Any = None,
  learning_rate: float | None = None,
  seed: int | None = None,
  evaluator: Evaluator | None = None,
  progress: bool = True,
  samples: Sequence[np.ndarray] | None = None,
  description: str = "",
  stop: StopRequests | None = None,
) -> FitResult:
  """One training run in `workdir`, resumed from its newest readable checkpoint when it has one.

  With `replay.data` "base_samples", `samples` are the base model's samples to replay; None
  draws them from `init_params` (kept in `workdir`, `inputs.sample_cache`).

  The checkpoints keep the run's fingerprint (`configure.fingerprint_record` of `config`, with
  `learning_rate` and `seed` when given); a workdir whose checkpoints were saved with another is
  refused before anything is built (`ResumeMismatch`, naming what changed).

  Returns the `FitResult`. Parameters start from `init_params` (e.g. a base model), else from a
  fresh initialisation with `config.seed`. A resumed run continues the data stream, the logging
  window and the evaluations where the checkpoint left them, and drops the records of
  `metrics.jsonl` past the checkpoint's step, so that it ends as an uninterrupted run would, bit
  for bit, with one record per logged step.

  Raises:
    Preempted: SIGTERM or SIGINT arrived (see `finch_jax.loop.fit`); the checkpoint of the
      step reached is written before this returns control, and rerunning resumes from it.
    ResumeMismatch: `workdir` holds the checkpoints of another config, other data or another
      base model.
    CheckpointError: a checkpoint could not be written, or none in `workdir` can be read.
  """
  given = {"learning_rate": learning_rate, "seed": seed}  # the run's key beyond its config
  fingerprint = configure.fingerprint_record(
    config, **{k: v for k, v in given.items() if v is not None}
  )
  seed = config.seed if seed is None else seed
  trainer = trainer or configure.make_trainer(config)
  if trainer.needs_reference and init_params is None:
    raise ValueError(
      "LoRA and the KL term train against a base model: pass init_params (the base), or set "
      "--config.base_checkpoint."
    )
  checkpointer = Checkpointer(
    epath.Path(workdir) / "checkpoints",
    save_every=config.checkpoint_every,
    max_to_keep=config.keep_checkpoints,
    config=json.loads(config.to_json()),
    fingerprint=fingerprint,
  )
  writer = None
  try:
    checkpointer.check_resume()  # before the samples, the data and the compiled step
    if samples is None and init_params is not None:
      samples = inputs.replay_samples(config, trainer, init_params, cache_dir=workdir)
    iterator = iter(inputs.train_batches(config, workdir, seed, samples))
    checkpointer.data_iterator = iterator
    state = _start_state(trainer, checkpointer, init_params, learning_rate, seed, workdir)
    writer = MetricsWriter(
      workdir, enabled=jax.process_index() == 0, truncate_after=int(state.step)
    )
    return fit(
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
      description=description,
      tokens_per_batch=config.data.batch_size * config.data.seq_len,
      resume=checkpointer.restored_extra,
      stop=stop,
    )
  finally:
    if writer is not None:
      writer.close()
    # Waits for the last checkpoint (the preemption one included); raises if it failed.
    checkpointer.close()


def _start_state(
  trainer: Trainer,
  checkpointer: Checkpointer,
  init_params: Any,
  learning_rate: float | None,
  seed: int,
  workdir: str | os.PathLike,
):
  """The newest readable checkpoint's state, else a step-0 state from `init_params` (or fresh
  parameters drawn with `seed`)."""
  if checkpointer.latest_step() is not None:
    if trainer.needs_reference:
      trainer.set_reference(init_params)
    state = checkpointer.restore(trainer.abstract_state())
    logging.info("Resumed %s at step %d.", workdir, int(state.step))
    return state
  params = trainer.init_params(seed) if init_params is None else init_params
  return trainer.create_state(params, learning_rate=learning_rate, seed=seed)


def _final_facts_only(evaluator: Evaluator, config: ml_collections.ConfigDict):
  """Losses at every evaluation; fact recall (greedy decoding, slower) at the last step only."""
  return lambda params, step: evaluator(params, facts=step == config.num_train_steps)


def base_params(config: ml_collections.ConfigDict, trainer: Trainer) -> Any:
  """The base model's parameters from `config.base_checkpoint` (a finch_jax workdir, a Hugging
  Face directory or a GGUF file), laid out for `trainer`."""
  if not config.base_checkpoint:
    raise ValueError(
      "Fine-tuning needs a base model: set --config.base_checkpoint=WORKDIR of a pretraining "
      "run (e.g. one made with configs/pretrain_tiny.py)."
    )
  if configure.is_pretrained(config.base_checkpoint):
    load = hf.load_hf if configure.is_hf_checkpoint(config.base_checkpoint) else load_gguf
    model, _ = load(
      config.base_checkpoint,
      mesh=trainer.mesh,
      dtype=trainer.model_config.dtype,
      param_dtype=trainer.model_config.param_dtype,
      rules=trainer.rules,
      scan_layers=trainer.model_config.scan_layers,
    )
    return nnx.as_pure(nnx.state(model))
  return restore_params(config.base_checkpoint, trainer.abstract_model_params())


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Fine-tunes the base checkpoint and reports forgetting of this single run."""
  trainer = configure.make_trainer(config)
  params = base_params(config, trainer)
  evaluator = Evaluator(config, workdir, trainer, base=params)
  before = evaluator(params)
  result = run_training(config, workdir, trainer=trainer, init_params=params, evaluator=evaluator)
  after = result.evals[-1] if result.evals else evaluator(trainer.full_params(result.state.params))
  name = "finch" if config.finch.enabled else "standard"
  report = single_run_report(name, config.optimizer.learning_rate, before, after)
  if jax.process_index() == 0:
    write_report(workdir, report)
  if configure.is_pretrained(config.base_checkpoint):
    # A pretrained base goes out as a Hugging Face checkpoint: the fine-tuned model (adapters
    # merged) with its tokenizer.
    model = nnx.merge(trainer.graphdef, trainer.full_params(result.state.params))
    _export_hf(
      model,
      epath.Path(workdir) / HF_EXPORT_DIR,
      tokenizer=configure.pretrained_tokenizer(config.base_checkpoint),
    )
  return report


def _export_hf(model: Any, path: epath.Path, *, tokenizer: Any) -> None:
  """`hf.save_hf` into `path`, local or in a bucket (every process calls it; process 0 writes).

  safetensors and tokenizers write local files only, so a bucket's export is written to a
  temporary local directory first, its files uploaded, and the directory deleted.
  """
  if not files.is_remote(path):
    hf.save_hf(model, path, tokenizer=tokenizer)
    return
  with tempfile.TemporaryDirectory(prefix="finch_jax_hf_") as local:
    hf.save_hf(model, local, tokenizer=tokenizer)
    if jax.process_index() == 0:
      for file in sorted(epath.Path(local).iterdir()):
        file.copy(path / file.name, overwrite=True)


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> FitResult:
  """Trains a model from scratch on `config.data.train`, evaluating the eval sets if any."""
  trainer = configure.make_trainer(config)
  evaluator = Evaluator(config, workdir, trainer) if config.data.eval_sets else None
  return run_training(config, workdir, trainer=trainer, evaluator=evaluator)


__all__ = ["HF_EXPORT_DIR", "base_params", "finetune", "pretrain", "run_training"]
