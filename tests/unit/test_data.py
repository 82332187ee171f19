"""finch_jax.data: synthetic corpora, TFDS builders without TensorFlow, Grain pipelines."""

import collections
import doctest
import hashlib
import importlib.util
import json
import os
import re
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from finch_jax import data
from finch_jax.data import builders, pipeline, synthetic, tokenizer

TOK = data.ByteTokenizer()
SMALL = {"num_base_people": 24, "num_new_people": 8}
SMALL_LANGUAGE = {**SMALL, "num_finetune": 40, "num_task_eval": 10}


@pytest.fixture(scope="module")
def bios():
  return data.biographies(**SMALL)


@pytest.fixture(scope="module")
def language():
  return data.synthetic_language(num_finetune=200, num_task_eval=50)


def _texts(records):
  return [r["text"] for r in records]


def _person_facts(facts):
  """name -> {attribute: value}, read back from the fact records."""
  suffixes = {synthetic.fact_prompt(attribute, ""): attribute for attribute in synthetic.ATTRIBUTES}
  people = {}
  for fact in facts:
    (suffix,) = [s for s in suffixes if fact["prompt"].endswith(s)]
    name = fact["prompt"][: -len(suffix)]
    people.setdefault(name, {})[suffixes[suffix]] = fact["answer"][1:-1]
  assert all(len(attributes) == len(synthetic.ATTRIBUTES) for attributes in people.values())
  return people


def _renderings(people, template_ids):
  """name -> every sentence the given templates write about that person."""
  return {
    name: {
      synthetic.TEMPLATES[attribute][t].format(name=name, value=value)
      for attribute, value in facts.items()
      for t in template_ids
    }
    for name, facts in people.items()
  }


def _sentences(text):
  return [s if s.endswith(".") else s + "." for s in text.split(". ")]


# ---------------------------------------------------------------- synthetic corpora


def test_corpora_are_deterministic_per_seed():
  first = json.dumps(data.biographies(seed=5, **SMALL))
  assert json.dumps(data.biographies(seed=5, **SMALL)) == first
  assert json.dumps(data.biographies(seed=6, **SMALL)) != first
  language = json.dumps(data.synthetic_language(seed=5, num_finetune=30, num_task_eval=5))
  assert json.dumps(data.synthetic_language(seed=5, num_finetune=30, num_task_eval=5)) == language
  assert json.dumps(data.synthetic_language(seed=6, num_finetune=30, num_task_eval=5)) != language


def test_biography_split_sizes(bios):
  sizes = {split: len(records) for split, records in bios.items()}
  assert sizes == {
    "pretrain": 24 * 4,
    "finetune": 8 * 4,
    "retain_eval": 24,
    "task_eval": 8,
    "retain_facts": 24 * 5,
    "task_facts": 8 * 5,
    "retain_qa": 24 * 5,
    "task_qa": 8 * 5,
  }
  for split in ("pretrain", "finetune", "retain_eval", "task_eval"):
    assert all(text.isascii() for text in _texts(bios[split]))


def test_base_and_new_populations_are_disjoint(bios):
  base, new = _person_facts(bios["retain_facts"]), _person_facts(bios["task_facts"])
  assert len(base) == 24 and len(new) == 8
  assert not set(base) & set(new)
  for split, own, other in [
    ("pretrain", base, new),
    ("finetune", new, base),
    ("retain_eval", base, new),
    ("task_eval", new, base),
  ]:
    for text in _texts(bios[split]):
      # Whole words: "Ada Quell" must not count as found inside "Ada Quellmore".
      assert any(re.search(rf"\b{re.escape(name)}\b", text) for name in own), split
      assert not any(re.search(rf"\b{re.escape(name)}\b", text) for name in other), split


def test_eval_texts_use_only_held_out_templates(bios):
  held_out = range(synthetic.NUM_TRAIN_TEMPLATES, len(synthetic.TEMPLATES["major"]))
  train_ids = range(synthetic.NUM_TRAIN_TEMPLATES)
  for facts, train_split, eval_split in [
    ("retain_facts", "pretrain", "retain_eval"),
    ("task_facts", "finetune", "task_eval"),
  ]:
    people = _person_facts(bios[facts])
    train, evaluation = _renderings(people, train_ids), _renderings(people, held_out)
    all_train = set().union(*train.values())
    all_eval = set().union(*evaluation.values())
    assert not all_train & all_eval
    seen_train = set()
    for text in _texts(bios[train_split]):
      sentences = _sentences(text)
      assert len(sentences) == len(synthetic.ATTRIBUTES)
      assert set(sentences) <= all_train
      seen_train.update(sentences)
    # Every person is written in every training template, the fact prompt's included.
    assert seen_train == all_train
    for text in _texts(bios[eval_split]):
      assert set(_sentences(text)) <= all_eval
      assert not any(sentence in all_train for sentence in _sentences(text))


def test_fact_prompts_complete_training_sentences(bios):
  pretrain = " ".join(_texts(bios["pretrain"]))
  for fact in bios["retain_facts"]:
    assert fact["prompt"] + fact["answer"] in pretrain
  assert bios["retain_facts"][1]["prompt"].endswith(" was born in")


def test_question_answer_splits_ask_each_fact_of_their_population(bios):
  for qa, facts in (("retain_qa", "retain_facts"), ("task_qa", "task_facts")):
    assert len(bios[qa]) == len(bios[facts])
    for question, fact in zip(bios[qa], bios[facts], strict=True):
      # The fact prompt "Ada Quell was born in" + " Marrowby." against the question's answer.
      assert fact["answer"] == f" {question['response']}."
      name = next(n for n in _person_facts(bios[facts]) if fact["prompt"].startswith(n))
      assert name in question["prompt"] and question["prompt"].endswith("?")
  # Asking draws no random numbers: the other splits are byte for byte those of version 1.0.0,
  # which had no question splits (the digest was taken from that version's output).
  earlier = {k: v for k, v in bios.items() if not k.endswith("_qa")}
  digest = hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]
  assert digest == "e596f1fbe4f85789"


def test_synthetic_language_uses_bytes_pretraining_never_showed(bios, language):
  pretrain_bytes = set("".join(_texts(bios["pretrain"])).encode())
  assert max(pretrain_bytes) < 128
  words = [w.strip(".") for t in _texts(language["finetune"]) for w in t.split()]
  assert all(w and not any(c.isascii() for c in w) for w in words)
  language_bytes = set("".join(_texts(language["finetune"])).encode())
  assert len(language_bytes - pretrain_bytes) >= 10
  assert language_bytes & pretrain_bytes == {ord(" "), ord(".")}
  assert not set(_texts(language["finetune"])) & set(_texts(language["task_eval"]))
  counts = [count for _, count in collections.Counter(w.lower() for w in words).most_common()]
  assert counts[0] > 10 * counts[99]  # Zipfian: a few words dominate.


def test_synthetic_language_carries_the_biographies_retain_sets():
  paired = data.embedded_corpus("synthetic_language", **SMALL_LANGUAGE)
  people = data.biographies(**SMALL)
  assert set(paired) == {"finetune", "task_eval", "pretrain", "retain_eval", "retain_facts"}
  for split in ("pretrain", "retain_eval", "retain_facts"):
    assert paired[split] == people[split]
  with pytest.raises(ValueError, match="num_finetune"):
    data.embedded_corpus("biographies", num_finetune=3)


# ---------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
  for text in ["", "Ada Quell was born in Marrowby.", "Σαβ γηλωδβηχ.", "emoji \U0001f600 ok"]:
    ids = TOK.encode(text)
    assert ids.dtype == np.int32
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert len(ids) == len(text.encode()) + 2
    assert TOK.decode(ids) == text
  assert TOK.encode("ab", add_bos=False, add_eos=False).tolist() == [ord("a") + 3, ord("b") + 3]
  assert TOK.vocab_size == 259 and TOK.encode(bytes([255]), add_eos=False)[-1] == 258
  assert TOK.decode([TOK.pad_id, ord("x") + 3, 300, TOK.eos_id]) == "x"
  assert TOK.decode([0xCE + 3]) == "\ufffd"  # A cut multi-byte letter is replaced, not fatal.
  assert isinstance(TOK, tokenizer.Tokenizer)
  assert doctest.testmod(tokenizer).failed == 0


# ---------------------------------------------------------------- TFDS builders


def _records_of(source):
  return [
    {key: data.decode_text(value) for key, value in source[i].items()} for i in range(len(source))
  ]


def test_embedded_build_reads_back_generated_records_without_tensorflow(tmp_path):
  dataset = data.prepare("embedded/biographies", tmp_path, **SMALL)
  expected = data.embedded_corpus("biographies", **SMALL)
  assert set(dataset.info.splits) == set(expected)
  for split, records in expected.items():
    source = data.data_source("embedded/biographies", split, tmp_path, **SMALL)
    assert len(source) == len(records)
    padded = [
      {"text": "", "prompt": "", "answer": "", "response": "", **record} for record in records
    ]
    assert _records_of(source) == padded
  files = [f for _, _, names in os.walk(tmp_path) for f in names]
  assert any(".array_record-" in f for f in files)
  assert not any(".tfrecord" in f for f in files)
  assert importlib.util.find_spec("tensorflow") is None
  assert "tensorflow" not in sys.modules


def test_second_prepare_reuses_the_data_on_disk(tmp_path, monkeypatch):
  first = data.prepare("embedded/synthetic_language", tmp_path, **SMALL_LANGUAGE)
  shard = next(first.data_path.glob("*finetune.array_record*"))
  written = os.stat(shard).st_mtime_ns

  def must_not_generate(*args, **kwargs):
    raise AssertionError("prepare rebuilt a dataset that was already on disk")

  monkeypatch.setattr(builders.synthetic, "embedded_corpus", must_not_generate)
  second = data.prepare("embedded/synthetic_language", tmp_path, **SMALL_LANGUAGE)
  assert second.data_path == first.data_path
  assert os.stat(shard).st_mtime_ns == written
  source = data.data_source("embedded/synthetic_language", "task_eval", tmp_path, **SMALL_LANGUAGE)
  assert len(source) == SMALL_LANGUAGE["num_task_eval"]
  # Other options are another dataset, in their own directory.
  other = builders.builder("embedded/synthetic_language", tmp_path, seed=1, **SMALL_LANGUAGE)
  assert other.data_path != first.data_path and not other.is_prepared()


def test_prepare_survives_a_concurrent_build(tmp_path, monkeypatch):
  # Another process finishes the same dataset while this one is still generating it: this
  # one's rename then fails, and prepare must use the copy that won.
  generate = builders.EmbeddedCorpus._split_generators
  calls = []

  def generate_while_another_process_builds(self, dl_manager):
    calls.append(self.data_dir)
    if len(calls) == 1:
      data.prepare("embedded/biographies", tmp_path, **SMALL)
    return generate(self, dl_manager)

  monkeypatch.setattr(
    builders.EmbeddedCorpus, "_split_generators", generate_while_another_process_builds
  )
  dataset = data.prepare("embedded/biographies", tmp_path, **SMALL)
  assert len(calls) == 2 and dataset.is_prepared()
  assert dataset.info.splits["task_facts"].num_examples == SMALL["num_new_people"] * 5
  # Spelling out a default option is the same dataset as leaving it out.
  assert builders.builder("embedded/biographies", tmp_path, seed=0, **SMALL).is_prepared()


def _write(path, text, encoding="utf-8"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))


def test_local_text_paragraphs_and_lines(tmp_path):
  corpus = tmp_path / "corpus"
  paragraphs = [f"Paragraph {i} first line.\nsecond line of {i}." for i in range(12)]
  _write(corpus / "a.txt", "\n\n".join(paragraphs[:7]) + "\n")
  _write(corpus / "sub" / "b.txt", "\r\n  \r\n".join(paragraphs[7:]))
  _write(corpus / "ignored.md", "not a txt file")
  name = f"local_text:{corpus}"
  dataset = data.prepare(name, tmp_path / "tfds", validation_fraction=0.2)
  train = _records_of(data.data_source(name, "train", tmp_path / "tfds", validation_fraction=0.2))
  validation = _records_of(
    data.data_source(name, "validation", tmp_path / "tfds", validation_fraction=0.2)
  )
  texts = [r["text"] for r in train + validation]
  assert sorted(texts) == sorted(paragraphs)
  assert train and validation
  assert [r["text"] for r in train] == [p for p in paragraphs if p in {r["text"] for r in train}]
  assert dataset.info.splits["train"].num_examples == len(train)

  lines = data.prepare(name, tmp_path / "tfds", unit="line", validation_fraction=0.2)
  assert sum(s.num_examples for s in lines.info.splits.values()) == 24
  assert lines.data_path != dataset.data_path

  # The split of a text depends on the text alone, not on file order; duplicates stay together.
  forward = builders.split_local_text(paragraphs, 0.2)
  backward = builders.split_local_text(paragraphs[::-1], 0.2)
  assert {k: set(v) for k, v in forward.items()} == {k: set(v) for k, v in backward.items()}
  duplicates = builders.split_local_text(["same", "other", "same"], 0.5)
  assert sorted(len(v) for v in duplicates.values()) == [1, 2]


def test_local_text_reads_fortune_files(tmp_path):
  # The format of Debian's fortunes packages: records between lines holding only "%".
  _write(tmp_path / "f" / "wisdom.u8", "Look before\nyou leap.\n%\n%\nOne.\n%\n50% off: two.\n%\n")
  name = f"local_text:{tmp_path / 'f' / '*.u8'}"
  options = dict(unit="percent", validation_fraction=0.0)
  data.prepare(name, tmp_path / "tfds", **options)
  records = _records_of(data.data_source(name, "train", tmp_path / "tfds", **options))
  assert [r["text"] for r in records] == ["Look before\nyou leap.", "One.", "50% off: two."]


def test_local_text_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist.*local_text:<directory>"):
    data.prepare(f"local_text:{tmp_path / 'missing'}", tmp_path / "tfds")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no files .*\.txt"):
    data.prepare(f"local_text:{tmp_path / 'empty'}", tmp_path / "tfds")
  _write(tmp_path / "blank" / "a.txt", "\n  \n\n")
  with pytest.raises(Exception, match="contain no text"):
    data.prepare(f"local_text:{tmp_path / 'blank'}", tmp_path / "tfds")
  _write(tmp_path / "latin" / "a.txt", "caf\u00e9", encoding="latin-1")
  with pytest.raises(Exception, match="not valid UTF-8.*iconv"):
    data.prepare(f"local_text:{tmp_path / 'latin'}", tmp_path / "tfds")
  with pytest.raises(ValueError, match="unit must be one of"):
    data.prepare(f"local_text:{tmp_path / 'latin'}", tmp_path / "tfds", unit="word")


def test_unknown_dataset_names_list_the_valid_forms(tmp_path):
  for name in ["no_such_dataset_xyz", "embedded/nope", "local_text:", "Bad Name"]:
    with pytest.raises(ValueError, match=r"embedded/biographies.*local_text:.*catalog"):
      data.prepare(name, tmp_path)
  with pytest.raises(ValueError, match="no split 'tain'"):
    data.data_source("embedded/biographies", "tain", tmp_path, **SMALL)
  with pytest.raises(ValueError, match="valid options"):
    data.prepare("embedded/biographies", tmp_path, num_people=3)


# ---------------------------------------------------------------- pipelines


def _take(dataset, count):
  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


def _segments(batch):
  """(row, tokens) per segment: its inputs followed by its last target."""
  for row in range(batch["inputs"].shape[0]):
    for segment in np.unique(batch["segment_ids"][row]):
      if segment == 0:
        continue
      where = np.flatnonzero(batch["segment_ids"][row] == segment)
      yield row, np.append(batch["inputs"][row, where], batch["targets"][row, where[-1]])


def _check_lm_batch(batch, batch_size, seq_len, example_bytes, evaluation=False):
  shapes = {key: (value.shape, value.dtype.name) for key, value in batch.items()}
  assert shapes == {
    "inputs": ((batch_size, seq_len), "int32"),
    "targets": ((batch_size, seq_len), "int32"),
    "weights": ((batch_size, seq_len), "float32"),
    "segment_ids": ((batch_size, seq_len), "int32"),
    "positions": ((batch_size, seq_len), "int32"),
  }
  padding = batch["segment_ids"] == 0
  # Evaluation weighs the text's own tokens only: not the eos added after it.
  weighted = ~padding & (batch["targets"] != TOK.eos_id) if evaluation else ~padding
  np.testing.assert_array_equal(batch["weights"], weighted.astype(np.float32))
  assert np.all(batch["inputs"][padding] == TOK.pad_id)
  assert np.all(batch["targets"][padding] == TOK.pad_id)
  for row in range(batch_size):
    segments = batch["segment_ids"][row]
    for segment in set(segments.tolist()) - {0}:
      where = np.flatnonzero(segments == segment)
      assert np.all(np.diff(where) == 1)  # Contiguous...
      np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
      # ...and targets are the next inputs within the segment, never across a boundary.
      np.testing.assert_array_equal(
        batch["targets"][row, where[:-1]], batch["inputs"][row, where[1:]]
      )
  for _, tokens in _segments(batch):
    # A segment is one window of one example: a contiguous piece of its token sequence.
    assert any((tokens - 3).astype(np.uint8).tobytes() in example for example in example_bytes)


def _token_bytes(texts):
  # Tokens as bytes (id - 3), bos/eos as 0xFE/0xFF, so segments are found by substring search.
  encoded = []
  for text in texts:
    ids = TOK.encode(text) - 3
    ids[0], ids[-1] = TOK.bos_id - 3, TOK.eos_id - 3
    encoded.append(ids.astype(np.uint8).tobytes())
  return encoded


@pytest.mark.parametrize("packing", [True, False])
def test_lm_dataset_batch_format(bios, packing):
  source = bios["finetune"]
  ds = data.lm_dataset(source, tokenizer=TOK, seq_len=96, batch_size=4, seed=0, packing=packing)
  example_bytes = _token_bytes(_texts(source))
  batches = _take(ds, 8)
  for batch in batches:
    _check_lm_batch(batch, 4, 96, example_bytes)
  segments_per_row = np.concatenate([b["segment_ids"].max(axis=1) for b in batches])
  fill = np.mean([b["weights"].mean() for b in batches])
  if packing:
    assert segments_per_row.max() >= 2 and fill > 0.9
  else:
    assert set(segments_per_row.tolist()) == {1} and fill < 0.9


def test_lm_dataset_is_deterministic_per_seed(bios):
  def batches(seed):
    ds = data.lm_dataset(bios["pretrain"], tokenizer=TOK, seq_len=64, batch_size=4, seed=seed)
    return np.stack([b["inputs"] for b in _take(ds, 5)])

  np.testing.assert_array_equal(batches(1), batches(1))
  assert not np.array_equal(batches(1), batches(2))


def test_shards_are_disjoint_and_cover_the_data(bios):
  texts = _texts(bios["retain_eval"])
  seen = []
  for shard_index in range(2):
    ds = data.lm_dataset(
      texts,
      tokenizer=TOK,
      seq_len=512,
      batch_size=5,
      seed=0,
      repeat=False,
      packing=False,
      shard_index=shard_index,
      shard_count=2,
    )
    shard = [TOK.decode(tokens) for batch in ds for _, tokens in _segments(batch)]
    assert len(shard) == len(set(shard))
    seen.append(set(shard))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(texts)
  with pytest.raises(ValueError, match="jax.process_index"):
    data.lm_dataset(
      texts, tokenizer=TOK, seq_len=8, batch_size=1, seed=0, shard_index=2, shard_count=2
    )


@pytest.mark.parametrize("packing", [True, False])
def test_global_batch_does_not_depend_on_the_number_of_processes(bios, packing):
  """1, 2 or 4 processes: their blocks of rows, stacked, are the one-process batch, row for row.

  That is what makes a run on 2 hosts x 4 devices train exactly like one on 1 host x 8, and
  lets a checkpoint's iterator state (the same on every process) resume with another count.
  """

  def source(mixed):
    if not mixed:
      return lambda **shard: data.lm_dataset(
        bios["pretrain"], tokenizer=TOK, seq_len=48, seed=1, packing=packing, **shard
      )
    tasks = data.lm_examples(bios["finetune"], tokenizer=TOK, seed=3)
    replay = data.lm_examples(bios["pretrain"], tokenizer=TOK, seed=4)
    stream = data.mixture([(tasks, 0.75), (replay, 0.25)], seed=5)
    return lambda **shard: data.lm_batches(stream, seq_len=48, packing=packing, **shard)

  def run(make, shard_count, shard_index, steps=4):
    ds = make(batch_size=8 // shard_count, shard_index=shard_index, shard_count=shard_count)
    iterator = iter(ds)
    batches = [next(iterator) for _ in range(steps)]
    state = json.dumps(iterator.get_state(), sort_keys=True)
    iterator.close()
    return batches, state

  for mixed in (False, True):  # One source, and a replay mixture through lm_batches.
    make = source(mixed)
    whole, whole_state = run(make, 1, 0)
    for shard_count in (2, 4):
      parts = [run(make, shard_count, i) for i in range(shard_count)]
      assert {state for _, state in parts} == {whole_state}
      for step, batch in enumerate(whole):
        for key in batch:
          stacked = np.concatenate([batches[step][key] for batches, _ in parts])
          np.testing.assert_array_equal(batch[key], stacked)


def test_restored_iterator_state_continues_the_exact_stream(bios):
  tasks = data.lm_examples(bios["finetune"], tokenizer=TOK, seed=3)
  replay = data.lm_examples(bios["pretrain"], tokenizer=TOK, seed=4)
  mixed = data.mixture([(tasks, 0.8), (replay, 0.2)], seed=5)
  ds = data.lm_batches(mixed, seq_len=80, batch_size=3)

  iterator = iter(ds)
  for _ in range(7):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # As a checkpoint stores it.
  expected = [next(iterator) for _ in range(6)]
  iterator.close()

  restored = iter(ds)
  next(restored)  # A fresh iterator somewhere else in the stream...
  restored.set_state(state)
  got = [next(restored) for _ in range(6)]
  restored.close()
  for want, have in zip(expected, got, strict=True):
    for key in want:
      np.testing.assert_array_equal(want[key], have[key])


def test_iterator_round_trips_through_orbax(bios, tmp_path):
  ds = data.lm_dataset(bios["pretrain"], tokenizer=TOK, seq_len=64, batch_size=2, seed=0)
  iterator = iter(ds)
  for _ in range(4):
    next(iterator)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  expected = [next(iterator)["inputs"] for _ in range(3)]
  iterator.close()

  fresh = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(expected, [next(fresh)["inputs"] for _ in range(3)])
  fresh.close()
  assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "4" / "data")


def _source_of(tokens):
  """0 for an 'a...' example, 1 for a 'b...' one (the byte after bos)."""
  return int(tokens[1] == ord("b") + 3)


def test_mixture_share_matches_the_weight():
  task = data.lm_examples([f"a{i}" for i in range(50)], tokenizer=TOK, seed=0)
  replay = data.lm_examples([f"b{i}" for i in range(30)], tokenizer=TOK, seed=1)
  for weight in (0.01, 0.25):
    mixed = data.mixture([(task, 1 - weight), (replay, weight)], seed=7)
    sources = np.array([_source_of(mixed[i]) for i in range(3000)])
    windows = sources.reshape(-1, pipeline.MIXTURE_WINDOW).sum(axis=1)
    assert np.all(np.abs(windows - weight * pipeline.MIXTURE_WINDOW) <= 1), windows
    # The window shuffle moves a rare component off a fixed stride.
    assert len(set(np.diff(np.flatnonzero(sources[:1000])).tolist())) > 1
  # Through batching: the replay share of the rows' examples holds per batch on average.
  mixed = data.mixture([(task, 0.75), (replay, 0.25)], seed=7)
  batches = _take(data.lm_batches(mixed, seq_len=16, batch_size=8, packing=False), 100)
  shares = [np.mean([_source_of(t) for _, t in _segments(b)]) for b in batches]
  assert abs(np.mean(shares) - 0.25) < 0.03
  assert data.mixture([(task, 1.0), (replay, 0.0)], seed=0) is task
  with pytest.raises(ValueError, match="repeat=True"):
    data.mixture(
      [(task, 0.5), (data.lm_examples(["x"], tokenizer=TOK, seed=0, repeat=False), 0.5)], seed=0
    )
  with pytest.raises(ValueError, match="not all 0"):
    data.mixture([(task, 0.0)], seed=0)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_batches_cover_each_example_once(bios, packing):
  texts = _texts(bios["retain_eval"])[:10] + ["x" * 150, ""]  # One long, one empty.
  ds = data.eval_batches(texts, tokenizer=TOK, seq_len=40, batch_size=4, packing=packing)
  batches = list(ds)
  assert batches and all(b["inputs"].shape == (4, 40) for b in batches)
  for batch in batches:
    _check_lm_batch(batch, 4, 40, _token_bytes(texts), evaluation=True)
  # Every text token of every example is weighted exactly once (the added eos is not).
  assert sum(b["weights"].sum() for b in batches) == sum(len(t.encode()) for t in texts)
  if not packing:
    # In order: windows concatenated give back each example.
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    decoded = TOK.decode(np.where(inputs == TOK.bos_id, ord("|") + 3, inputs))
    assert decoded.split("|")[1:] == texts
    assert batches[-1]["weights"][-1].sum() == 0  # The last batch is padded with weight 0.
  assert len(list(ds)) == len(batches)  # Iterable again, same length.
  limited = list(
    data.eval_batches(
      texts, tokenizer=TOK, seq_len=40, batch_size=4, num_examples=2, packing=packing
    )
  )
  picked = [texts[i] for i in data.evaluation_rows(len(texts), 2)]
  assert sum(b["weights"].sum() for b in limited) == sum(len(t.encode()) for t in picked)


def test_sharded_eval_batches_split_each_global_batch(bios):
  texts = _texts(bios["retain_eval"])[:11]
  whole = list(data.eval_batches(texts, tokenizer=TOK, seq_len=64, batch_size=6))
  parts = [
    list(
      data.eval_batches(
        texts, tokenizer=TOK, seq_len=64, batch_size=3, shard_index=i, shard_count=2
      )
    )
    for i in range(2)
  ]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for batch, first, second in zip(whole, *parts, strict=True):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))


def test_eval_batches_read_a_tfds_source_like_a_list(tmp_path):
  source = data.data_source("embedded/biographies", "task_eval", tmp_path, **SMALL)
  texts = _texts(data.biographies(**SMALL)["task_eval"])
  from_tfds = list(data.eval_batches(source, tokenizer=TOK, seq_len=64, batch_size=4))
  from_list = list(data.eval_batches(texts, tokenizer=TOK, seq_len=64, batch_size=4))
  assert len(from_tfds) == len(from_list) > 0
  for a, b in zip(from_tfds, from_list, strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_fact_batches_align_prompts_and_answers(bios):
  facts = bios["task_facts"][:7]
  batches = list(
    data.fact_batches(facts, tokenizer=TOK, max_prompt_len=48, answer_len=32, batch_size=3)
  )
  assert len(batches) == 3
  assert {k: v.shape for k, v in batches[0].items()} == {
    "prompts": (3, 48),
    "prompt_lengths": (3,),
    "answers": (3, 32),
    "answer_mask": (3, 32),
    "example_mask": (3,),
  }
  rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
  assert [r["example_mask"] for r in rows] == [1.0] * 7 + [0.0] * 2
  for fact, row in zip(facts, rows, strict=False):
    length = row["prompt_lengths"]
    assert TOK.decode(row["prompts"][:length]) == fact["prompt"]
    assert row["prompts"][0] == TOK.bos_id and row["prompts"][length - 1] != TOK.eos_id
    assert np.all(row["prompts"][length:] == TOK.pad_id)
    answer = row["answers"][row["answer_mask"] > 0]
    np.testing.assert_array_equal(answer, TOK.encode(fact["answer"], False, False))
    assert np.all(row["answer_mask"][: len(answer)] == 1)
    assert np.all(row["answers"][len(answer) :] == TOK.pad_id)
    # The answer continues the prompt as in the training text.
    assert TOK.decode(np.append(row["prompts"][:length], answer)) == fact["prompt"] + fact["answer"]
  for row in rows[7:]:
    assert row["prompt_lengths"] == 1 and row["answer_mask"].sum() == 0
  with pytest.raises(ValueError, match="raise max_prompt_len"):
    list(data.fact_batches(facts, tokenizer=TOK, max_prompt_len=8, answer_len=32, batch_size=3))
