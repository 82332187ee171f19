"""Evaluation: every measure of a model on a config's eval sets and fact sets.

`Evaluator(config, workdir, trainer, base)` builds the batches of each set once (their inputs:
`finch_jax.inputs`); calling it with parameters sums the measures of each batch with the
trainer's jitted steps and returns them by name (`NAME_loss`, `NAME_fact_accuracy`, ...; the
list is `Evaluator.__call__`'s docstring).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from finch_jax import configure, inputs, measures
from finch_jax import data as data_lib
from finch_jax.trainer import Trainer

EVAL_SAMPLE_SEED_OFFSET = 10_007  # base samples for evaluation never repeat replay's


class Evaluator:
  """Losses on the named eval sets and fact-recall accuracy on the named fact sets.

  An eval set is a dataset spec, a `jsonl:` file of instruction data (loss on responses), or
  `{"name": "base_samples"}`: sequences the base model `base` samples itself (drawn once, with
  another seed than replay's, and kept in `workdir`: `inputs.sample_cache`), a retain set for when
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
        inputs.source(config, workdir, spec),
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
      samples = inputs.base_model_samples(
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
    records = inputs.instructions(config, workdir, spec)
    if records is not None:
      self.instruction_sets.add(name)
      return data_lib.sft_eval_batches(records, **sizes)
    return data_lib.eval_batches(inputs.source(config, workdir, spec), **sizes)

  def __call__(self, params: Any, *, facts: bool = True) -> dict[str, Any]:
    """Every configured measure of the model's `params` (`finch_jax.measures`):

    - per eval set: `NAME_loss`; with `data.token_accuracy`, `NAME_accuracy` (arg-max accuracy
      over the text's or answers' own tokens, end markers left out) and, for instruction data,
      `NAME_exact` (answers greedy decoding reproduces whole and ends where it should); for the
      sets of `data.kl_sets`, `NAME_kl` (KL(base || model) per token);
    - per fact set (with `facts`): `NAME_fact_accuracy` (exact recall), `NAME_answer_nll` (the
      answers' mean NLL per token); for the sets of `data.calibration_sets`, `NAME_ece` and
      `NAME_overconfidence` (mean confidence minus accuracy of the first answer token: above 0
      over-confident, below 0 under-confident), and `NAME_calibration`, the reliability
      diagram's bin sums (a list of 3 rows of `measures.CALIBRATION_BINS`: probes, summed
      confidence, summed correctness; `measures.reliability` reads it). Every other value is a
      float.
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

  def _fact_measures(self, name: str, params: Any, batches: Any) -> dict[str, Any]:
    sums = self.trainer.fact_sums(params, batches, self.continues)
    out = {
      f"{name}_fact_accuracy": float(sums["recalled"]) / max(float(sums["facts"]), 1.0),
      f"{name}_answer_nll": float(sums["answer_nll"]) / max(float(sums["answer_tokens"]), 1.0),
    }
    if name in self.calibration_sets:
      bins = np.asarray(sums["calibration"], np.float64)
      count, confidence, right = bins
      out[f"{name}_ece"] = measures.expected_calibration_error(bins)
      out[f"{name}_overconfidence"] = float((confidence.sum() - right.sum()) / max(count.sum(), 1))
      # The reliability diagram's data (`measures.reliability`): per confidence bin, the probes,
      # their summed confidence and their summed correctness.
      out[f"{name}_calibration"] = bins.tolist()
    return out


__all__ = ["EVAL_SAMPLE_SEED_OFFSET", "Evaluator"]
