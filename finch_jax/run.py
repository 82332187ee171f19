"""One run: pretrain or fine-tune from a config, with its data, evaluation and checkpoints.

- `pretrain(config, workdir)`: train a model from scratch on `config.data.train` (resumable).
- `finetune(config, workdir)`: start from `config.base_checkpoint` (a finch_jax workdir or a
  Hugging Face model directory), measure the eval sets before, train on `config.data.train`,
  measure them again, write `report.json`/`report.md` (resumable); a Hugging Face base's
  fine-tuned model is exported to `workdir/hf` (safetensors, config.json, tokenizer).
- `run_training(config, workdir, ...)`: the training run both share, and that a comparison's
  sweep (`finch_jax.sweep`) runs once per learning rate and seed.

The workdir is local or in a bucket (`gs://BUCKET/...`): every file under it is read and written
through `etils.epath.Path`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from finch_jax import configure, files, measures
from finch_jax import data as data_lib
from finch_jax.checkpoint import Checkpointer, restore_params
from finch_jax.loop import FitResult, MetricsWriter, StopRequests, fit
from finch_jax.models import hf
from finch_jax.models.gguf import load_gguf
from finch_jax.remedies import sample_replay_set
from finch_jax.report import single_run_report, write_report
from finch_jax.trainer import Trainer

HF_EXPORT_DIR = "hf"  # where `finetune` writes a Hugging Face base's fine-tuned model


def source(config: ml_collections.ConfigDict, workdir: str, spec: Mapping[str, str]):
  """The random-access source named by a `{name, split}` spec (name '' means `data.name`)."""
  name = configure.spec_name(config, spec)
  options = configure.dataset_options(config, name)
  return data_lib.data_source(name, spec["split"], configure.data_dir(config, workdir), **options)


def examples(
  config: ml_collections.ConfigDict,
  workdir: str,
  spec: Mapping[str, str],
  tokenizer: data_lib.Tokenizer,
  seed: int,
):
  """The repeating, shuffled example stream of a dataset spec: text, or instruction data
  (name `jsonl:PATH`, or a split of prompt/response records; loss on the responses only)."""
  records = instructions(config, workdir, spec)
  if records is not None:
    return data_lib.sft_examples(
      records, tokenizer=tokenizer, seed=seed, max_len=config.data.seq_len + 1
    )
  return data_lib.lm_examples(source(config, workdir, spec), tokenizer=tokenizer, seed=seed)


def instructions(config: ml_collections.ConfigDict, workdir: str, spec: Mapping[str, str]):
  """What `finch_jax.data.sft` reads for an instruction-data spec (the JSONL path of
  `jsonl:PATH`, or a built split's prompt/response records); None for text."""
  name = configure.spec_name(config, spec)
  if name.startswith(data_lib.builders.JSONL_PREFIX):
    return name.removeprefix(data_lib.builders.JSONL_PREFIX)
  return data_lib.instruction_records(source(config, workdir, spec))


def train_batches(
  config: ml_collections.ConfigDict,
  workdir: str,
  seed: int,
  replay_samples: Sequence[np.ndarray] | None = None,
):
  """The Grain dataset of this process's training batches, with replay mixed in when
  `config.replay.share > 0` (from `config.replay.data`, or `replay_samples` drawn from the base
  model when its name is "base_samples"); replay batches then carry the `replay` marker."""
  tokenizer = configure.make_tokenizer(config)
  stream = examples(config, workdir, config.data.train, tokenizer, seed)
  features: tuple[str, ...] = ()
  replay = config.get("replay")
  if replay and replay.share:
    if replay.data.get("name") == configure.BASE_SAMPLES:
      if replay_samples is None:
        raise ValueError("replay.data is base_samples: pass the samples (replay_samples).")
      replayed = grain.MapDataset.source(list(replay_samples)).shuffle(seed=seed).repeat()
    else:
      replayed = examples(config, workdir, replay.data, tokenizer, seed)
    stream = data_lib.mixture(
      [
        (data_lib.tag_examples(stream, replay=False), 1.0 - replay.share),
        (data_lib.tag_examples(replayed, replay=True), replay.share),
      ],
      seed,
    )
    features = ("replay",)
  return data_lib.lm_batches(
    stream,
    seq_len=config.data.seq_len,
    batch_size=configure.local_batch_size(config),
    pad_id=tokenizer.pad_id,
    packing=config.data.packing,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
    features=features,
  )


EVAL_SAMPLE_SEED_OFFSET = 10_007  # base samples for evaluation never repeat replay's


def replay_samples(
  config: ml_collections.ConfigDict,
  trainer: Trainer,
  base: Any,
  cache_dir: str | os.PathLike | None = None,
) -> list[np.ndarray] | None:
  """The base model's samples for replay when the config asks for them, else None."""
  replay = config.get("replay")
  if not replay or not replay.share or replay.data.get("name") != configure.BASE_SAMPLES:
    return None
  return base_model_samples(config, trainer, base, seed=config.seed, cache_dir=cache_dir)


def sample_cache(
  directory: str | os.PathLike, config: ml_collections.ConfigDict, seed: int
) -> epath.Path:
  """The file in `directory` that keeps the base model's samples `config` draws with `seed`,
  named by everything that made them (`configure.samples_fingerprint`: the base, the model,
  the tokenizer, count, length, temperature, seed), so no other samples are ever read from it."""
  key = configure.samples_fingerprint(config, seed)
  return epath.Path(directory) / f"base_samples-{key}.npz"


def base_model_samples(
  config: ml_collections.ConfigDict,
  trainer: Trainer,
  base: Any,
  *,
  seed: int,
  cache_dir: str | os.PathLike | None = None,
) -> list[np.ndarray]:
  """`config.replay.num_samples` sequences sampled from the base model with `seed`.

  Drawn once (`finch_jax.remedies.sample_replay_set`, jitted on the mesh) and kept in
  `cache_dir` (local or `gs://...`; `sample_cache` names the file) when given, so a resumed run
  or a sweep sees the same ones.
  """
  replay = config.replay
  cache = None if cache_dir is None else sample_cache(cache_dir, config, seed)
  stored = None if cache is None else files.read_arrays(cache)
  if stored is not None:
    return stored
  tokenizer = configure.make_tokenizer(config)
  samples = sample_replay_set(
    nnx.merge(trainer.graphdef, base),
    num_samples=replay.num_samples,
    length=replay.sample_len,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    seed=seed,
    temperature=replay.temperature,
  )
  if cache is not None and jax.process_index() == 0:
    files.write_arrays(cache, samples)
  return samples


class Evaluator:
  """Losses on the named eval sets and fact-recall accuracy on the named fact sets.

  An eval set is a dataset spec, a `jsonl:` file of instruction data (loss on responses), or
  `{"name": "base_samples"}`: sequences the base model `base` samples itself (drawn once, with
  another seed than replay's, and kept in `workdir`: `sample_cache`), a retain set for when
  the base's own training data is not at hand: the rise of the loss on them is forgetting of
  what the base model generates.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    trainer: Trainer,
    base: Any = None,
  ):
    # On the trainer's devices (a sweep's runs may each have their own), as the KL reads it.
    self.base = None if base is None else jax.device_put(base, trainer.param_shardings)
    self.token_accuracy = bool(config.data.token_accuracy)
    self.kl_sets = set(config.data.kl_sets or ())
    self.calibration_sets = set(config.data.calibration_sets or ())
    if self.kl_sets and base is None:
      raise ValueError("data.kl_sets measures KL to the base model: pass base= to Evaluator.")
    self.trainer = trainer
    tokenizer = configure.make_tokenizer(config)
    # Token accuracy counts an answer's own tokens, not the control tokens that close it.
    self.end_ids = sorted({tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id})
    self.continues = data_lib.word_continuations(tokenizer, trainer.model_config.vocab_size)
    self.instruction_sets = set()
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    local_batch = configure.local_batch_size(config)
    self.loss_sets = {
      name: self._loss_batches(config, workdir, name, spec, tokenizer, shard)
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

  def _loss_batches(self, config, workdir, name, spec, tokenizer, shard) -> Any:
    """The batches of the eval set `name`: base samples, instruction data or text."""
    local_batch = configure.local_batch_size(config)
    dataset = configure.spec_name(config, spec)
    if dataset == configure.BASE_SAMPLES:
      if self.base is None:
        raise ValueError(f"eval set {name!r} samples the base model: pass base= to Evaluator.")
      samples = base_model_samples(
        config,
        self.trainer,
        self.base,
        seed=config.seed + EVAL_SAMPLE_SEED_OFFSET,
        cache_dir=workdir,
      )
      return data_lib.lm_batches(
        grain.MapDataset.source(samples),
        seq_len=config.data.seq_len,
        batch_size=local_batch,
        pad_id=tokenizer.pad_id,
        **shard,
      )
    sizes = dict(
      tokenizer=tokenizer,
      seq_len=config.data.seq_len,
      batch_size=local_batch,
      num_examples=config.data.eval_examples or None,
      packing=True,
      **shard,
    )
    records = instructions(config, workdir, spec)
    if records is not None:
      self.instruction_sets.add(name)
      return data_lib.sft_eval_batches(records, **sizes)
    return data_lib.eval_batches(source(config, workdir, spec), **sizes)

  def __call__(self, params: Any, *, facts: bool = True) -> dict[str, float]:
    """Every configured measure of the model's `params` (`finch_jax.measures`):

    - per eval set: `NAME_loss`; with `data.token_accuracy`, `NAME_accuracy` (arg-max accuracy
      over the text's or answers' own tokens, end markers left out) and, for instruction data,
      `NAME_exact` (answers greedy decoding reproduces whole and ends where it should); for the
      sets of `data.kl_sets`, `NAME_kl` (KL(base || model) per token);
    - per fact set (with `facts`): `NAME_fact_accuracy` (exact recall), `NAME_answer_nll` (the
      answers' mean NLL per token); for the sets of `data.calibration_sets`, `NAME_ece` and
      `NAME_overconfidence` (mean confidence minus accuracy of the first answer token: above 0
      over-confident, below 0 under-confident).
    """
    out = {}
    for name, batches in self.loss_sets.items():
      reference = self.base if name in self.kl_sets else None
      sums = self.trainer.eval_sums(params, batches, reference, self.end_ids)
      out[f"{name}_loss"] = sums["loss"] / max(sums["tokens"], 1.0)
      if self.token_accuracy and "right" in sums:
        out[f"{name}_accuracy"] = sums["right"] / max(sums["scored"], 1.0)
        if name in self.instruction_sets:
          out[f"{name}_exact"] = sums["answers_right"] / max(sums["answers"], 1.0)
      if reference is not None:
        out[f"{name}_kl"] = sums["kl"] / max(sums["tokens"], 1.0)
    if facts:
      for name, batches in self.fact_sets.items():
        out.update(self._fact_measures(name, params, batches))
    return out

  def _fact_measures(self, name: str, params: Any, batches: Any) -> dict[str, float]:
    sums = self.trainer.fact_sums(params, batches, self.continues)
    out = {
      f"{name}_fact_accuracy": float(sums["recalled"]) / max(float(sums["facts"]), 1.0),
      f"{name}_answer_nll": float(sums["answer_nll"]) / max(float(sums["answer_tokens"]), 1.0),
    }
    if name in self.calibration_sets:
      count, confidence, right = np.asarray(sums["calibration"], np.float64)
      out[f"{name}_ece"] = measures.expected_calibration_error(sums["calibration"])
      out[f"{name}_overconfidence"] = float((confidence.sum() - right.sum()) / max(count.sum(), 1))
    return out


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
  draws them from `init_params` (kept in `workdir`, `sample_cache`).

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
      samples = replay_samples(config, trainer, init_params, cache_dir=workdir)
    iterator = iter(train_batches(config, workdir, seed, samples))
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


__all__ = [
  "Evaluator",
  "HF_EXPORT_DIR",
  "base_model_samples",
  "base_params",
  "examples",
  "finetune",
  "pretrain",
  "replay_samples",
  "run_training",
  "sample_cache",
  "source",
  "train_batches",
]
