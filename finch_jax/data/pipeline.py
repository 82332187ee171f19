"""Grain pipelines for language modelling: training batches, exact evaluation, fact recall.

A source is anything with `len` and `source[i]`: a TFDS data source (`builders.data_source`), a
Grain source, or a plain list. A record is a dict with a `text` field (str or UTF-8 bytes) or,
for facts, `prompt` and `answer`; a bare string also works as a text record.

Training batch (`lm_dataset`, `lm_batches`, `eval_batches`), numpy arrays, B rows of length L:

    inputs       int32   [B, L]  token ids, `pad_id` where nothing is
    targets      int32   [B, L]  next token of `inputs` within the same example
    weights      float32 [B, L]  1 on target tokens that carry loss (all real ones for text; the
                                 response for SFT, `finch_jax.data.sft`), 0 on padding
    replay       float32 [B, L]  optional (`features=("replay",)`): 1 on targets of replay
                                 examples (`tag_examples`)
    segment_ids  int32   [B, L]  1..k: which window (packed example) a token belongs to; 0 = padding
    positions    int32   [B, L]  position within its window, restarting at 0 per segment

An example is `[bos] + ids + [eos]`, n tokens giving n - 1 (input, target) pairs; an example
with more than L pairs is cut into windows of L pairs, the next window starting where the last
one stopped, so every target is predicted once and nothing is truncated away. With packing
several windows share a row, and a model keeps them apart with `segment_ids` (attention mask)
and `positions`.

Order of a training pipeline, and why:
source -> shuffle(seed) -> repeat -> tokenize (Grain threads) -> [mixture of such streams] ->
windows -> first-fit packing -> global batch -> this process's rows -> thread prefetch.
Shuffling before repeating reshuffles each epoch without mixing epochs; mixing before packing
makes shares per batch. Every process walks the same global stream and keeps its own block of
rows of each global batch (`shard_index` of `shard_count` blocks), so the global batch, hence
the losses and the trained parameters, is the same whether 1 process or 8 feed the devices, the
process blocks are disjoint, and the iterator state is the same on every process (a checkpoint
written by N processes resumes with M). The price is that each process reads, tokenizes and
packs the whole global batch, of which it keeps 1/N; with byte tokenization that is cheap next
to a training step. (Sharding records per process before shuffling, as `lm_examples` can,
avoids that work but makes the global batch depend on the number of processes.)

Checkpointing: the iterator from `iter(dataset)` has `get_state()` / `set_state(state)` (a JSON-
able dict); restoring it resumes the exact stream. With orbax use Grain's handler through its
argument classes: save `grain.checkpoint.CheckpointSave(iterator)` and restore
`grain.checkpoint.CheckpointRestore(iterator)` inside `ocp.args.Composite(...)`; each process
writes its own `process_<i>-of-<n>.json`.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from finch_jax.data.builders import decode_text
from finch_jax.data.tokenizer import Tokenizer, starts_with_bos

Source = Sequence[Any]
Batch = dict[str, np.ndarray]

# Two cores: two reader/tokenizer threads and a modest buffer keep up with a small model
# without starving the training step of CPU.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)
PREFETCH_BATCHES = 2

# Packing fills this many rows at a time (at least a batch): with few bins, short windows find
# no gap to fill; 64 bins fill about 97% of tokens on the embedded corpora even at batch size 8.
MIN_PACKING_BINS = 64

# The mixture is shuffled in windows this long; see `mixture`.
MIXTURE_WINDOW = 1000


def _text(record: Any, feature: str) -> str:
  value = record[feature] if isinstance(record, Mapping) else record
  return decode_text(value)


class _Tokenize:
  """record -> token ids of `record[feature]`: bos where the model's format starts a document
  with it (`tokenizer.starts_with_bos`), the text, and eos, which separates documents.

  For training, a bare int32 vector (every target carries loss, eos included: the model learns
  where a document ends). For evaluation (`text_only`), `{"tokens", "loss_mask"}` whose mask is 0
  on the added eos: a measure of a text weighs only the text's own tokens, never a control token
  added around it (its first token is predicted from bos, or only read as context where the
  format has no bos)."""

  def __init__(self, tokenizer: Tokenizer, feature: str, text_only: bool = False):
    self._tokenizer = tokenizer
    self._feature = feature
    self._text_only = text_only
    self._add_bos = starts_with_bos(tokenizer)

  def __call__(self, record: Any) -> np.ndarray | dict[str, np.ndarray]:
    text = _text(record, self._feature)
    ids = self._tokenizer.encode(text, add_bos=self._add_bos, add_eos=True)
    ids = np.asarray(ids, dtype=np.int32)
    if not self._text_only:
      return ids
    loss_mask = np.ones_like(ids)
    loss_mask[-1] = 0  # the eos added after the text
    return {"tokens": ids, "loss_mask": loss_mask}


def _token_arrays(example: Any) -> dict[str, np.ndarray]:
  """An example as `{"tokens", "loss_mask", ...}`: a bare token vector has loss everywhere."""
  if isinstance(example, Mapping):
    out = dict(example)
    out["tokens"] = np.asarray(out["tokens"], np.int32)
    if "loss_mask" not in out:
      out["loss_mask"] = np.ones_like(out["tokens"])
    return out
  tokens = np.asarray(example, np.int32)
  return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def tag_examples(
  examples: grain.MapDataset | grain.IterDataset, *, replay: bool
) -> grain.MapDataset | grain.IterDataset:
  """Examples (token vectors or dicts) marked as replay data or not, for `mixture`.

  Each becomes `{"tokens", "loss_mask", "replay"}`; batches made with
  `features=("replay",)` then carry `replay` [B, L], 1 on targets of replay examples, which a
  KL-to-base loss reads (`finch_jax.trainer.Trainer`, `kl_weight`). Tag every component of a
  mixture, so all share one structure.
  """
  return examples.map(functools.partial(_tagged, replay=int(replay)))


def _tagged(example: Any, *, replay: int) -> dict[str, np.ndarray]:
  out = _token_arrays(example)
  out["replay"] = np.full_like(out["tokens"], replay)
  return out


class _Windows(grain.experimental.FlatMapTransform):
  """example -> (inputs, targets, weights, *features) windows of at most `seq_len` targets.

  Windows cover every target once. `weights` is the loss mask of each target (1 for plain text);
  each name in `features` is a per-token array of the example, taken at the targets.
  """

  max_fan_out = sys.maxsize  # Unused by the iterator flat map; any document length is fine.

  def __init__(self, seq_len: int, features: Sequence[str] = ()):
    self._seq_len = seq_len
    self._features = tuple(features)

  def flat_map(self, example: Any) -> list[dict[str, np.ndarray]]:
    arrays = _token_arrays(example)
    if missing := [f for f in self._features if f not in arrays]:
      raise ValueError(
        f"An example lacks the per-token features {missing} its batches carry: mark every "
        "component of the stream, e.g. with tag_examples."
      )
    tokens = arrays["tokens"]
    last = len(tokens) - 1  # The last token is a target only.
    windows = []
    for start in range(0, last, self._seq_len):
      end = min(start + self._seq_len, last)
      window = {
        "inputs": tokens[start:end],
        "targets": tokens[start + 1 : end + 1],
        "weights": arrays["loss_mask"][start + 1 : end + 1].astype(np.float32),
      }
      for name in self._features:
        window[name] = arrays[name][start + 1 : end + 1].astype(np.float32)
      windows.append(window)
    return windows


_FLOAT_KEYS = ("weights",)  # per-target floats of a window besides the features


def _padded_row(window: dict[str, np.ndarray], *, seq_len: int, pad_id: int) -> Batch:
  """One window alone in a row: segment 1, then padding (weight 0)."""
  length = len(window["inputs"])
  row = {
    "inputs": np.full(seq_len, pad_id, np.int32),
    "targets": np.full(seq_len, pad_id, np.int32),
    "segment_ids": np.zeros(seq_len, np.int32),
    "positions": np.zeros(seq_len, np.int32),
  }
  row["inputs"][:length] = window["inputs"]
  row["targets"][:length] = window["targets"]
  row["segment_ids"][:length] = 1
  row["positions"][:length] = np.arange(length)
  for key in window:
    if key not in ("inputs", "targets"):
      row[key] = np.zeros(seq_len, np.float32)
      row[key][:length] = window[key]
  return row


def _packed_row(row: dict[str, np.ndarray]) -> Batch:
  """Grain's packed row, renamed: inputs and targets share segment ids and positions."""
  out = {
    "inputs": row["inputs"],
    "targets": row["targets"],
    "segment_ids": row["inputs_segment_ids"],
    "positions": row["inputs_positions"],
  }
  for key, value in row.items():
    if key not in ("inputs", "targets") and not key.endswith(("_segment_ids", "_positions")):
      out[key] = value.astype(np.float32)
  return out


def _stack_rows(
  rows: Sequence[Batch], *, batch_size: int, seq_len: int, pad_id: int, features: Sequence[str]
) -> Batch:
  """Stacks rows into a batch of exactly `batch_size`, filling missing rows with padding.

  A short last batch keeps the batch shape, so a jitted step does not recompile, and its
  padding rows weigh 0, so means over tokens stay exact.
  """
  nothing = np.zeros(0, np.int32)
  empty_window = {"inputs": nothing, "targets": nothing, "weights": nothing.astype(np.float32)}
  empty_window.update({name: nothing.astype(np.float32) for name in features})
  empty = _padded_row(empty_window, seq_len=seq_len, pad_id=pad_id)
  rows = list(rows) + [empty] * (batch_size - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in empty}


def _shard_rows(batch: Batch, *, shard_index: int, batch_size: int) -> Batch:
  rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
  return {key: value[rows] for key, value in batch.items()}


def _check_shard(shard_index: int, shard_count: int) -> None:
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
      f"shard_count={shard_count}; pass jax.process_index() and jax.process_count()."
    )


def _check_sizes(**sizes: int) -> None:
  for name, value in sizes.items():
    if value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value}.")


def lm_examples(
  source: Source,
  *,
  tokenizer: Tokenizer,
  seed: int,
  shuffle: bool = True,
  repeat: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  feature: str = "text",
) -> grain.MapDataset:
  """Token ids per example (int32 vectors with bos and eos) of this process's shard.

  The example-level stream that `lm_batches` batches and `mixture` mixes.

  Args:
    source: random-access records (see the module docstring).
    tokenizer: turns `record[feature]` into ids.
    seed: shuffle seed, in [0, 2**32); each epoch is reshuffled from it.
    shuffle: shuffle globally within the shard; False keeps source order.
    repeat: repeat forever (epochs reshuffled); False gives one pass.
    shard_index: which shard of the records this stream reads.
    shard_count: number of shards. Shard i holds records i, i + shard_count, ...: shards are
      disjoint and together cover the source. `lm_dataset` leaves the stream whole (1 shard)
      and gives each process its rows of every global batch instead (`lm_batches`), so that
      batches do not depend on the number of processes; shard here only for per-process
      streams whose composition may depend on it.
    feature: the text field of a record.

  Returns:
    A `grain.MapDataset` of int32 token vectors, infinite when `repeat`.
  """
  _check_shard(shard_index, shard_count)
  examples = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(examples) == 0:
    raise ValueError(
      f"shard {shard_index} of {shard_count} is empty: the source has {len(source)} records."
    )
  if shuffle:
    examples = examples.shuffle(seed=seed)
  if repeat:
    examples = examples.repeat()
  return examples.map(_Tokenize(tokenizer, feature))


def mixture(
  datasets_and_weights: Sequence[tuple[grain.MapDataset, float]], seed: int
) -> grain.MapDataset:
  """Mixes example streams (from `lm_examples`) so each supplies `weight` of the examples.

  Use it for replay: `mixture([(task, 0.99), (pretrain, 0.01)], seed)`, then `lm_batches`.

  Where the mixing happens decides what the share means. Here it is per example, after each
  stream is sharded, shuffled, repeated and tokenized, and before windowing, packing and
  batching: every batch is filled from the one interleaved stream, so a component's share of
  each batch's examples is its weight in expectation. (Mixing whole batches would reach the
  share only averaged over many steps, through batches made wholly of replay data.) Grain
  interleaves deterministically and evenly, so any window of `MIXTURE_WINDOW` consecutive
  examples holds each component to within one example of its share; the mixed stream is then
  shuffled within such windows so a rare component does not sit at fixed positions. Every
  process mixes the same whole streams and keeps its rows of each global batch (`lm_batches`
  with `shard_index`, `shard_count`), so the global batch has the share.
  Shares count examples (documents), not tokens: a component with longer examples contributes
  proportionally more tokens.

  Args:
    datasets_and_weights: `(examples, weight)` pairs; the examples must repeat forever
      (`lm_examples(..., repeat=True)`), since a finite one would end the mixture when it runs
      out. Weights are normalized; components with weight 0 are left out.
    seed: seed of the window shuffle.

  Returns:
    A `grain.MapDataset` of examples; a single remaining component is returned unchanged.
  """
  weights = [float(weight) for _, weight in datasets_and_weights]
  if any(not np.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
    raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {weights}.")
  kept = [(ds, w) for (ds, _), w in zip(datasets_and_weights, weights, strict=True) if w > 0]
  for dataset, _ in kept:
    if not isinstance(dataset, grain.MapDataset) or len(dataset) < sys.maxsize:
      raise ValueError(
        "mixture needs repeating example datasets: build each with lm_examples(..., repeat=True)."
      )
  if len(kept) == 1:
    return kept[0][0]
  mixed = grain.MapDataset.mix([ds for ds, _ in kept], [w for _, w in kept])
  return grain.experimental.WindowShuffleMapDataset(mixed, window_size=MIXTURE_WINDOW, seed=seed)


def _rows(
  examples: grain.MapDataset | grain.IterDataset,
  *,
  seq_len: int,
  rows_per_pack: int,
  pad_id: int,
  packing: bool,
  read_options: grain.ReadOptions | None,
  features: Sequence[str] = (),
) -> grain.IterDataset:
  """Examples -> rows of one batch (windows, packed or one per row)."""
  if isinstance(examples, grain.MapDataset):
    examples = examples.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
  windows = grain.experimental.FlatMapIterDataset(examples, _Windows(seq_len, features))
  if not packing:
    return windows.map(functools.partial(_padded_row, seq_len=seq_len, pad_id=pad_id))
  floats = (*_FLOAT_KEYS, *features)
  packed = grain.experimental.FirstFitPackIterDataset(
    windows,
    length_struct={"inputs": seq_len, "targets": seq_len, **dict.fromkeys(floats, seq_len)},
    num_packing_bins=max(rows_per_pack, MIN_PACKING_BINS),
    shuffle_bins=False,  # Rows are batched in the order packed; shuffling them adds nothing.
    padding_struct={"inputs": pad_id, "targets": pad_id, **dict.fromkeys(floats, 0.0)},
  )
  return packed.map(_packed_row)


def _prefetched(batches: grain.IterDataset) -> grain.IterDataset:
  # A background thread assembles the next batches while the training step runs.
  return grain.experimental.ThreadPrefetchIterDataset(
    batches, prefetch_buffer_size=PREFETCH_BATCHES
  )


def _sharded_batches(
  rows: grain.IterDataset,
  *,
  batch_size: int,
  shard_index: int,
  shard_count: int,
  stack: Any,
) -> grain.IterDataset:
  """Global batches of `batch_size * shard_count` rows, of which this process keeps its part.

  Every process walks the same global sequence, so the global batch does not depend on the
  number of processes, all get the same number of batches (a multi-host step must run equally
  often everywhere) and the parts are disjoint.
  """
  global_batch = batch_size * shard_count
  batches = rows.batch(global_batch, batch_fn=functools.partial(stack, batch_size=global_batch))
  if shard_count > 1:
    batches = batches.map(
      functools.partial(_shard_rows, shard_index=shard_index, batch_size=batch_size)
    )
  return _prefetched(batches)


def lm_batches(
  examples: grain.MapDataset | grain.IterDataset,
  *,
  seq_len: int,
  batch_size: int,
  pad_id: int = 0,
  packing: bool = True,
  read_options: grain.ReadOptions | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  features: Sequence[str] = (),
) -> grain.IterDataset:
  """Batches of an example stream (`lm_examples`, `sft_examples`, `mixture`) in the module's
  batch format.

  With several processes, give every process the same (unsharded) example stream and its
  `shard_index`: each assembles the global batch of `B * shard_count` rows and keeps rows
  `shard_index * B` to `(shard_index + 1) * B`, so the global batch is the same for any number
  of processes (see the module docstring).

  Args:
    examples: int32 token vectors, bos and eos included, or dicts with `tokens` and per-token
      `loss_mask` (`finch_jax.data.sft`) and features; the same stream on every process.
    seq_len: L, tokens per row.
    batch_size: B, rows per batch per process.
    pad_id: token id of padding.
    packing: first-fit pack windows into rows (`max(B * shard_count, MIN_PACKING_BINS)` rows
      packed at a time); False puts each window in its own row.
    read_options: Grain reader threads and buffer; `DEFAULT_READ_OPTIONS` suits 2 cores.
    shard_index: this process's block of rows of each global batch, e.g. `jax.process_index()`.
    shard_count: number of processes, e.g. `jax.process_count()`.
    features: per-token example fields carried into the batch as float32 [B, L] at the
      targets, e.g. ("replay",) for a stream made with `tag_examples`.

  Returns:
    A `grain.IterDataset` of batches, prefetched by a background thread. A finite stream's
    last batch is filled with padding rows of weight 0.
  """
  _check_sizes(seq_len=seq_len, batch_size=batch_size)
  _check_shard(shard_index, shard_count)
  rows = _rows(
    examples,
    seq_len=seq_len,
    rows_per_pack=batch_size * shard_count,
    pad_id=pad_id,
    packing=packing,
    read_options=read_options,
    features=features,
  )
  stack = functools.partial(_stack_rows, seq_len=seq_len, pad_id=pad_id, features=features)
  return _sharded_batches(
    rows, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count, stack=stack
  )


def lm_dataset(
  source: Source,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  repeat: bool = True,
  packing: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  feature: str = "text",
  read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Training batches of one source: `lm_batches(lm_examples(...))`.

  Args are those of `lm_examples` and `lm_batches`; `batch_size` is per process. The same
  seed gives the same global batches, whatever `shard_count`: process `shard_index` gets
  its block of rows of each (see the module docstring). `iter(dataset)` has
  `get_state`/`set_state` for checkpoints; the state is the same on every process.

  Example::

    source = builders.data_source("embedded/biographies", "finetune", data_dir)
    ds = lm_dataset(source, tokenizer=ByteTokenizer(), seq_len=256, batch_size=32, seed=0)
    batch = next(iter(ds))  # {"inputs": int32[32, 256], "targets": ..., "weights": ...}
  """
  examples = lm_examples(
    source,
    tokenizer=tokenizer,
    seed=seed,
    shuffle=shuffle,
    repeat=repeat,
    feature=feature,
  )
  return lm_batches(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    pad_id=tokenizer.pad_id,
    packing=packing,
    read_options=read_options,
    shard_index=shard_index,
    shard_count=shard_count,
  )


def evaluation_rows(num_records: int, num_examples: int | None) -> np.ndarray:
  """The record indices an evaluation reads: all, or `num_examples` drawn uniformly over the
  whole source by a stable hash of each index (the same ones on every machine and run), in
  source order. Never the first N: 40 passages of the Bible in file order are Genesis."""
  if num_examples is None or num_examples >= num_records:
    return np.arange(num_records)
  keys = [
    hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, person=b"finch_eval").digest()
    for i in range(num_records)
  ]
  return np.sort(np.argsort(keys, kind="stable")[:num_examples])


class _Rows(Sequence):
  """The records of `source` at `indices`, as a random-access source."""

  def __init__(self, source: Source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> Any:
    return self._source[int(self._indices[i])]


def _limited(source: Source, num_examples: int | None) -> grain.MapDataset:
  indices = evaluation_rows(len(source), num_examples)
  if len(indices) == len(source):
    return grain.MapDataset.source(source)
  return grain.MapDataset.source(_Rows(source, indices))


def eval_batches(
  source: Source,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  num_examples: int | None = None,
  packing: bool = False,
  shard_index: int = 0,
  shard_count: int = 1,
  feature: str = "text",
) -> grain.IterDataset:
  """Every example of a split once, in order, for exact mean losses over tokens.

  No shuffling, no repetition; long examples are cut into windows (never truncated), and the
  last batch is filled with padding rows of weight 0, so `sum(loss * weights) / sum(weights)`
  over all batches is the exact mean over the split's target tokens.

  Args:
    source: random-access records.
    tokenizer: as for training.
    seq_len: L, tokens per row.
    batch_size: B, rows per batch per process.
    num_examples: `num_examples` records drawn uniformly by a stable hash
      (`evaluation_rows`); None for all.
    packing: pack windows into rows (fewer batches); False gives one window per row.
    shard_index: this process's part of each global batch of `B * shard_count` rows.
    shard_count: number of processes; all of them yield the same number of batches.
    feature: the text field of a record.

  Returns:
    A `grain.IterDataset` of batches in the module's format; iterate it again to re-evaluate.
  """
  _check_sizes(seq_len=seq_len, batch_size=batch_size)
  _check_shard(shard_index, shard_count)
  examples = _limited(source, num_examples).map(_Tokenize(tokenizer, feature, text_only=True))
  rows = _rows(
    examples,
    seq_len=seq_len,
    rows_per_pack=batch_size * shard_count,
    pad_id=tokenizer.pad_id,
    packing=packing,
    read_options=None,
  )
  stack = functools.partial(_stack_rows, seq_len=seq_len, pad_id=tokenizer.pad_id, features=())
  return _sharded_batches(
    rows, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count, stack=stack
  )


class _FactRow:
  """Fact record -> right-padded prompt ids (bos + prompt) and answer ids (no bos, no eos)."""

  def __init__(self, tokenizer: Tokenizer, max_prompt_len: int, answer_len: int):
    self._tokenizer = tokenizer
    self._max_prompt_len = max_prompt_len
    self._answer_len = answer_len

  def __call__(self, record: Mapping[str, Any]) -> Batch:
    tokenizer = self._tokenizer
    prompt = tokenizer.encode(
      _text(record, "prompt"), add_bos=starts_with_bos(tokenizer), add_eos=False
    )
    answer = tokenizer.encode(_text(record, "answer"), add_bos=False, add_eos=False)
    if len(prompt) > self._max_prompt_len:
      raise ValueError(
        f"fact prompt {_text(record, 'prompt')!r} has {len(prompt)} tokens (with bos); raise "
        f"max_prompt_len from {self._max_prompt_len}."
      )
    if len(answer) > self._answer_len:
      raise ValueError(
        f"fact answer {_text(record, 'answer')!r} has {len(answer)} tokens; raise answer_len "
        f"from {self._answer_len}."
      )
    return _fact_row(prompt, answer, self._max_prompt_len, self._answer_len, tokenizer.pad_id)


def _fact_row(
  prompt: np.ndarray, answer: np.ndarray, max_prompt_len: int, answer_len: int, pad_id: int
) -> Batch:
  row = {
    "prompts": np.full(max_prompt_len, pad_id, np.int32),
    "prompt_lengths": np.int32(len(prompt)),
    "answers": np.full(answer_len, pad_id, np.int32),
    "answer_mask": np.zeros(answer_len, np.float32),
    "example_mask": np.float32(1.0),
  }
  row["prompts"][: len(prompt)] = prompt
  row["answers"][: len(answer)] = answer
  row["answer_mask"][: len(answer)] = 1.0
  return row


def _stack_fact_rows(
  rows: Sequence[Batch],
  *,
  batch_size: int,
  tokenizer: Tokenizer,
  max_prompt_len: int,
  answer_len: int,
) -> Batch:
  # A padding row holds just bos, so a decoder can run on it; both of its masks are 0.
  empty = _fact_row(
    np.array([tokenizer.bos_id], np.int32),
    np.zeros(0, np.int32),
    max_prompt_len,
    answer_len,
    tokenizer.pad_id,
  )
  empty["example_mask"] = np.float32(0.0)
  rows = list(rows) + [empty] * (batch_size - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in empty}


def fact_batches(
  source: Source,
  *,
  tokenizer: Tokenizer,
  max_prompt_len: int,
  answer_len: int,
  batch_size: int,
  num_examples: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Fact-recall batches: complete each prompt greedily and compare with the answer.

  Batch, numpy arrays, B rows:

      prompts         int32   [B, max_prompt_len]  bos + prompt ids, right-padded with pad_id
      prompt_lengths  int32   [B]                  number of real prompt tokens (>= 1)
      answers         int32   [B, answer_len]      answer ids (no bos/eos), padded with pad_id
      answer_mask     float32 [B, answer_len]      1 on real answer tokens
      example_mask    float32 [B]                  1 for real facts, 0 for padding rows

  A fact is recalled when the `answer_len` greedily generated tokens after
  `prompts[i, :prompt_lengths[i]]` equal `answers[i]` wherever `answer_mask[i]` is 1.
  Every record comes once, in order; sharding works as in `eval_batches`.

  Raises:
    ValueError: (on iteration) for a prompt or answer longer than the given lengths.
  """
  _check_sizes(max_prompt_len=max_prompt_len, answer_len=answer_len, batch_size=batch_size)
  _check_shard(shard_index, shard_count)
  rows = _limited(source, num_examples).map(_FactRow(tokenizer, max_prompt_len, answer_len))
  stack = functools.partial(
    _stack_fact_rows, tokenizer=tokenizer, max_prompt_len=max_prompt_len, answer_len=answer_len
  )
  return _sharded_batches(
    rows.to_iter_dataset(DEFAULT_READ_OPTIONS),
    batch_size=batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    stack=stack,
  )
