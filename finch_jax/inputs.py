"""A run's inputs from its config: the dataset sources, the training batches (replay mixed in),
and the base model's own samples, kept in one cache keyed by everything that made them.

- `source(config, workdir, spec)`: the random-access source of a `{name, split}` spec.
- `examples(...)`: the repeating, shuffled example stream of a spec (text or instruction data).
- `train_batches(config, workdir, seed, replay_samples)`: this process's training batches.
- `base_model_samples(...)`: sequences the base model samples, drawn once and kept in a file
  named by `sample_cache`; `replay_samples` gives them when `replay.data` asks for them.
- `with_known_probes(config, base, directory)`: the config whose element probes are the ones the
  base model recalls (`finch_jax.data.probes`), for `known: "recalled"`.

These read the config through `finch_jax.configure` and build with `finch_jax.data`, so they sit
above both (the `data` package knows nothing of configs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from finch_jax import configure, files
from finch_jax import data as data_lib
from finch_jax.data import debian, probes
from finch_jax.remedies import sample_replay_set
from finch_jax.trainer import Trainer


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


def with_known_probes(
  config: ml_collections.ConfigDict, base: Any, directory: str | os.PathLike
) -> ml_collections.ConfigDict:
  """`config`, or, when `debian/elements` has `known: "recalled"` (`probes.KNOWN_RECALLED`), the
  config whose `known` names the file of the element probes the base model `base` recalls
  before fine-tuning (`probes.known_probes`, kept in `directory/probes.KNOWN_PROBES_FILE`, and
  computed again only for another model or tokenizer): forgetting of knowledge is measurable
  only on what the model knew."""
  if configure.dataset_options(config, "debian/elements").get("known") != probes.KNOWN_RECALLED:
    return config
  logging.info("Finding the element probes the base model recalls...")
  trainer = configure.make_trainer(config)
  path = probes.known_probes(
    probes.element_probes(debian.elements()),
    nnx.merge(trainer.graphdef, base),
    configure.make_tokenizer(config),
    os.fspath(epath.Path(directory) / probes.KNOWN_PROBES_FILE),
  )
  return configure.override(config, {"data": {"options": {"debian_elements": {"known": path}}}})


__all__ = [
  "base_model_samples",
  "examples",
  "instructions",
  "replay_samples",
  "sample_cache",
  "source",
  "train_batches",
  "with_known_probes",
]
