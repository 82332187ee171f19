"""From a config to a finished run: data, mesh, model, optimizer, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is the one entry `train.py` calls. By `config.mode`:

- `pretrain`: train a model from scratch on `config.data.train` (resumable from `workdir`).
- `finetune`: start from `config.base_checkpoint` (a finch_jax workdir or a Hugging Face model
  directory), measure the eval sets before, train on `config.data.train`, measure them again,
  write `report.json`/`report.md` (resumable); a Hugging Face base's fine-tuned model is
  exported to `workdir/hf` (safetensors, config.json, tokenizer).
- `compare`: pretrain a base (cached in `workdir/base`), then run each method's learning-rate
  sweep and report forgetting at matched task loss (`finch_jax.forgetting`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx

from finch_jax import data as data_lib
from finch_jax import lora as lora_lib
from finch_jax import models
from finch_jax import sharding as shd
from finch_jax.checkpoint import Checkpointer, CheckpointError, restore_params
from finch_jax.models import hf
from finch_jax.remedies import sample_replay_set
from finch_jax.trainer import MetricsWriter, Preempted, Trainer, TrainState, fit, make_optimizer
from finch_jax.validate import MODES, ConfigError, validate


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where datasets are built: `config.data.data_dir`, or `WORKDIR/data`."""
  return config.data.data_dir or os.path.join(workdir, "data")


def _dataset_options(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  options = config.data.get("options", {}) or {}
  return dict(options.get(data_lib.builders.options_key(name), {}) or {})


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
    lora=lora_config(config),
  )


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  """`config.lora` as a `LoraConfig`, or None when its rank is 0 (every weight trained)."""
  spec = config.get("lora")
  if not spec or not spec.rank:
    return None
  return lora_lib.LoraConfig(rank=int(spec.rank), alpha=float(spec.alpha), targets=spec.targets)


def replay_kl_weight(config: ml_collections.ConfigDict) -> float:
  """The KL-to-base weight on replay tokens (0 when replay is off or trains on cross-entropy)."""
  replay = config.get("replay")
  if not replay or not replay.share:
    return 0.0
  return float(replay.kl_weight)


def _spec_name(config: ml_collections.ConfigDict, spec: Mapping[str, str]) -> str:
  return spec.get("name") or config.data.name


def examples(
  config: ml_collections.ConfigDict,
  workdir: str,
  spec: Mapping[str, str],
  tokenizer: data_lib.Tokenizer,
  seed: int,
):
  """The repeating, shuffled example stream of a dataset spec: text, or instruction data
  (name `jsonl:PATH`, loss on the responses only)."""
  name = _spec_name(config, spec)
  if name.startswith(data_lib.builders.JSONL_PREFIX):
    return data_lib.sft_examples(
      name.removeprefix(data_lib.builders.JSONL_PREFIX),
      tokenizer=tokenizer,
      seed=seed,
      max_len=config.data.seq_len + 1,
    )
  return data_lib.lm_examples(source(config, workdir, spec), tokenizer=tokenizer, seed=seed)


def train_batches(
  config: ml_collections.ConfigDict,
  workdir: str,
  seed: int,
  replay_samples: Sequence[np.ndarray] | None = None,
):
  """The Grain dataset of this process's training batches, with replay mixed in when
  `config.replay.share > 0` (from `config.replay.data`, or `replay_samples` drawn from the base
  model when its name is "base_samples"); replay batches then carry the `replay` marker."""
  tokenizer = make_tokenizer(config)
  stream = examples(config, workdir, config.data.train, tokenizer, seed)
  features: tuple[str, ...] = ()
  replay = config.get("replay")
  if replay and replay.share:
    if replay.data.get("name") == BASE_SAMPLES:
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
    batch_size=_local_batch_size(config),
    pad_id=tokenizer.pad_id,
    packing=config.data.packing,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
    features=features,
  )


BASE_SAMPLES = data_lib.builders.BASE_SAMPLES  # replay.data / eval set: the base's samples


EVAL_SAMPLE_SEED_OFFSET = 10_007  # base samples for evaluation never repeat replay's


def replay_samples(
  config: ml_collections.ConfigDict, trainer: Trainer, base: Any, cache: str | None = None
) -> list[np.ndarray] | None:
  """The base model's samples for replay when the config asks for them, else None."""
  replay = config.get("replay")
  if not replay or not replay.share or replay.data.get("name") != BASE_SAMPLES:
    return None
  return base_model_samples(config, trainer, base, seed=config.seed, cache=cache)


def base_model_samples(
  config: ml_collections.ConfigDict,
  trainer: Trainer,
  base: Any,
  *,
  seed: int,
  cache: str | None = None,
) -> list[np.ndarray]:
  """`config.replay.num_samples` sequences sampled from the base model with `seed`.

  Drawn once (`finch_jax.remedies.sample_replay_set`, jitted on the mesh) and kept in `cache`
  (an .npz file) when given, so a resumed run or a sweep sees the same ones.
  """
  replay = config.replay
  if cache and os.path.exists(cache):
    with np.load(cache) as stored:
      return [stored[f"s{i}"] for i in range(len(stored.files))]
  tokenizer = make_tokenizer(config)
  samples = sample_replay_set(
    nnx.merge(trainer.graphdef, base),
    num_samples=replay.num_samples,
    length=replay.sample_len,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    seed=seed,
    temperature=replay.temperature,
  )
  if cache and jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, **{f"s{i}": s for i, s in enumerate(samples)})
    os.replace(tmp, cache)
  return samples


def _local_batch_size(config: ml_collections.ConfigDict) -> int:
  if config.data.batch_size % jax.process_count():
    raise ValueError(
      f"data.batch_size={config.data.batch_size} does not divide among "
      f"{jax.process_count()} processes: use a multiple of {jax.process_count()}."
    )
  return config.data.batch_size // jax.process_count()


class Evaluator:
  """Losses on the named eval sets and fact-recall accuracy on the named fact sets.

  An eval set is a dataset spec, a `jsonl:` file of instruction data (loss on responses), or
  `{"name": "base_samples"}`: sequences the base model `base` samples itself (drawn once, with
  another seed than replay's, and kept in `workdir/retain_samples.npz`), a retain set for when
  the base's own training data is not at hand: the rise of the loss on them is forgetting of
  what the base model generates.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    trainer: Trainer,
    base: Any = None,
  ):
    self.trainer = trainer
    tokenizer = make_tokenizer(config)
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    local_batch = _local_batch_size(config)
    self.loss_sets = {}
    for name, spec in config.data.eval_sets.items():
      dataset = _spec_name(config, spec)
      if dataset == BASE_SAMPLES:
        if base is None:
          raise ValueError(f"eval set {name!r} samples the base model: pass base= to Evaluator.")
        samples = base_model_samples(
          config,
          trainer,
          base,
          seed=config.seed + EVAL_SAMPLE_SEED_OFFSET,
          cache=os.path.join(workdir, "retain_samples.npz"),
        )
        self.loss_sets[name] = data_lib.lm_batches(
          grain.MapDataset.source(samples),
          seq_len=config.data.seq_len,
          batch_size=local_batch,
          pad_id=tokenizer.pad_id,
          **shard,
        )
        continue
      sizes = dict(
        tokenizer=tokenizer,
        seq_len=config.data.seq_len,
        batch_size=local_batch,
        num_examples=config.data.eval_examples or None,
        packing=True,
        **shard,
      )
      if dataset.startswith(data_lib.builders.JSONL_PREFIX):
        path = dataset.removeprefix(data_lib.builders.JSONL_PREFIX)
        self.loss_sets[name] = data_lib.sft_eval_batches(path, **sizes)
      else:
        self.loss_sets[name] = data_lib.eval_batches(source(config, workdir, spec), **sizes)
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
  samples: Sequence[np.ndarray] | None = None,
):
  """One training run in `workdir`, resumed from its newest readable checkpoint when it has one.

  With `replay.data` "base_samples", `samples` are the base model's samples to replay; None
  draws them from `init_params` (kept in `workdir/replay_samples.npz`).

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
    if samples is None and init_params is not None:
      cache = os.path.join(workdir, "replay_samples.npz")
      samples = replay_samples(config, trainer, init_params, cache=cache)
    dataset = train_batches(config, workdir, seed, samples)
    iterator = iter(dataset)
    checkpointer.data_iterator = iterator
    if trainer.needs_reference and init_params is None:
      raise ValueError(
        "LoRA and the KL term train against a base model: pass init_params (the base), or set "
        "--config.base_checkpoint."
      )
    if checkpointer.latest_step() is not None:
      if trainer.needs_reference:
        trainer.set_reference(init_params)
      state = checkpointer.restore(trainer.abstract_state())
      logging.info("Resumed %s at step %d.", workdir, int(state.step))
    else:
      params = trainer.init_params(seed) if init_params is None else init_params
      state = trainer.create_state(params, learning_rate=learning_rate, seed=seed)
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
  return restore_params(config.base_checkpoint, trainer.abstract_model_params())


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes the base checkpoint and reports forgetting of this single run."""
  from finch_jax import forgetting

  trainer = make_trainer(config)
  params = base_params(config, trainer)
  evaluator = Evaluator(config, workdir, trainer, base=params)
  before = evaluator(params)
  result = run_training(config, workdir, trainer=trainer, init_params=params, evaluator=evaluator)
  after = result.evals[-1] if result.evals else evaluator(trainer.full_params(result.state.params))
  name = "finch" if config.finch.enabled else "standard"
  report = forgetting.single_run_report(name, config, before, after)
  if jax.process_index() == 0:
    forgetting.write_report(workdir, report)
  if is_hf_checkpoint(config.base_checkpoint):
    # Checkpoints out as they came in: the fine-tuned model (adapters merged) with its tokenizer.
    model = nnx.merge(trainer.graphdef, trainer.full_params(result.state.params))
    hf.save_hf(
      model,
      os.path.join(workdir, HF_EXPORT_DIR),
      tokenizer=hf.load_tokenizer(config.base_checkpoint),
    )
  return report


HF_EXPORT_DIR = "hf"  # where `finetune` writes a Hugging Face base's fine-tuned model


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
