"""finch_jax.data.sft: JSONL conversations -> loss-masked batches in the lm_batches format."""

import json
import logging

import numpy as np
import pytest

from finch_jax import data
from finch_jax.data import pipeline, sft
from finch_jax.models.hf import HFTokenizer
from tests.unit.test_data import _take

TOK = data.ByteTokenizer()

QA = [
  {"prompt": f"Q: what is {i} + {i}?\nA:", "response": f" {2 * i}, since {i} + {i} = {2 * i}."}
  for i in range(24)
]

CHATML = (
  "{% for m in messages %}"
  "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Like Qwen3's template: the last assistant turn after the last user message gets an empty
# think block, earlier turns do not, so a prefix's rendering is not a prefix of the whole's.
QWEN3_LIKE = (
  "{%- set ns = namespace(last_query=-1) %}"
  "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
  "{%- endif %}{%- endfor %}"
  "{%- for m in messages %}"
  "{%- if m.role == 'assistant' %}"
  "{{- '<|im_start|>assistant\\n' }}"
  "{%- if loop.index0 > ns.last_query and loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}"
  "{%- endif %}"
  "{{- m.content + '<|im_end|>\\n' }}"
  "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHAT = [
  {"role": "system", "content": "Be kind."},
  {"role": "user", "content": "hello there"},
  {"role": "assistant", "content": "how are you"},
  {"role": "user", "content": "fine"},
  {"role": "assistant", "content": "thanks"},
]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _segments(batch):
  """(row, segment id, positions of that segment) of every packed example."""
  for row in range(batch["inputs"].shape[0]):
    ids = batch["segment_ids"][row]
    for segment in np.unique(ids[ids > 0]):
      yield row, segment, np.flatnonzero(ids == segment)


def make_bpe(corpus):
  """A tiny byte-level BPE tokenizer with ChatML special tokens, trained on `corpus`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(corpus, trainer)
  return tokenizer


@pytest.fixture(scope="module")
def bpe():
  return make_bpe(["user assistant system hello there how are you fine thanks"])


def _chat_tokenizer(bpe, template):
  return HFTokenizer(bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template)


def _loss_runs(tokenizer, example):
  """Texts of the maximal runs of loss tokens, special tokens kept."""
  mask = np.concatenate([[0], example["loss_mask"], [0]])
  edges = np.flatnonzero(np.diff(mask))
  return [
    tokenizer.tokenizer.decode(example["tokens"][a:b].tolist(), skip_special_tokens=False)
    for a, b in zip(edges[::2], edges[1::2], strict=True)
  ]


# ---------------------------------------------------------------- tokenizing


def test_prompt_response_weights_cover_exactly_the_response_and_eos(tmp_path):
  path = _write_jsonl(tmp_path / "qa.jsonl", QA[:6])
  examples = sft.tokenize_sft(path, tokenizer=TOK, max_len=None)
  first = examples[0]
  assert first["tokens"].dtype == first["loss_mask"].dtype == np.int32
  n_prompt, n_response = len(QA[0]["prompt"].encode()), len(QA[0]["response"].encode())
  np.testing.assert_array_equal(first["tokens"], TOK.encode(QA[0]["prompt"] + QA[0]["response"]))
  assert first["loss_mask"].tolist() == [0] * (1 + n_prompt) + [1] * (n_response + 1)
  assert examples.num_loss_tokens == sum(len(r["response"].encode()) + 1 for r in QA[:6])

  batches = list(sft.sft_eval_batches(path, tokenizer=TOK, seq_len=64, batch_size=4))
  assert len(batches) == 2
  for step, batch in enumerate(batches):
    for row, record in enumerate(QA[4 * step : min(4 * step + 4, 6)]):  # One per row, in order.
      weights, targets = batch["weights"][row], batch["targets"][row]
      weighted = targets[weights == 1]
      assert weighted[-1] == TOK.eos_id
      assert TOK.decode(weighted) == record["response"]
      assert weights.sum() == len(record["response"].encode()) + 1
  assert not batches[1]["weights"][2:].any()  # Padding rows of the last batch.
  assert sum(b["weights"].sum() for b in batches) == examples.num_loss_tokens

  # The separator belongs to the prompt.
  spaced = sft.tokenize_sft(QA[:1], tokenizer=TOK, max_len=None, separator="\n")[0]
  assert TOK.decode(spaced["tokens"]) == QA[0]["prompt"] + "\n" + QA[0]["response"]
  assert spaced["loss_mask"].sum() == n_response + 1


def test_messages_without_a_template_use_the_plain_format():
  records = [{"messages": CHAT}, {"messages": CHAT[:2] + [{"role": "assistant", "content": ""}]}]
  first, empty = sft.tokenize_sft(records, tokenizer=TOK, max_len=None)
  text = (
    "system: Be kind.\nuser: hello there\nassistant: how are you\nuser: fine\nassistant: thanks"
  )
  np.testing.assert_array_equal(first["tokens"], TOK.encode(text))
  weighted = first["tokens"][first["loss_mask"] == 1]
  assert TOK.decode(weighted) == "how are you\nthanks"  # The turn's "\n" and the final eos.
  assert weighted[-1] == TOK.eos_id and first["loss_mask"][-1] == 1
  # An empty final response still teaches the model to stop: its eos carries loss.
  assert empty["loss_mask"].sum() == 1 and empty["loss_mask"][-1] == 1


def test_chat_template_weights_only_assistant_turns_and_their_end_token(bpe):
  tokenizer = _chat_tokenizer(bpe, CHATML)
  examples = sft.tokenize_sft(
    [{"messages": CHAT}, {"prompt": "hello there", "response": "fine"}],
    tokenizer=tokenizer,
    max_len=None,
  )
  chat, single = examples
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
  # The whole rendering, tokenized as one text (no bos/eos added: the template has its own).
  assert chat["tokens"].tolist() == bpe.encode(text, add_special_tokens=False).ids
  assert _loss_runs(tokenizer, chat) == ["how are you<|im_end|>", "thanks<|im_end|>"]
  assert _loss_runs(tokenizer, single) == ["fine<|im_end|>"]
  assert tokenizer.decode(single["tokens"]) == "user\nhello there\nassistant\nfine\n"

  # Through batches: the weighted targets are the assistant tokens, in order.
  (batch,) = list(
    sft.sft_eval_batches([{"messages": CHAT}], tokenizer=tokenizer, seq_len=64, batch_size=1)
  )
  weighted = batch["targets"][0][batch["weights"][0] == 1]
  assert weighted.tolist() == chat["tokens"][chat["loss_mask"] == 1].tolist()
  assert np.all(batch["inputs"][batch["segment_ids"] == 0] == tokenizer.pad_id)


def test_template_that_rewrites_earlier_turns_masks_them_where_they_end(bpe):
  tokenizer = _chat_tokenizer(bpe, QWEN3_LIKE)
  (chat,) = sft.tokenize_sft([{"messages": CHAT}], tokenizer=tokenizer, max_len=None)
  text = bpe.decode(chat["tokens"].tolist(), skip_special_tokens=False)
  assert text == (
    "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
    "<|im_start|>assistant\nhow are you<|im_end|>\n<|im_start|>user\nfine<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nthanks<|im_end|>\n"
  )
  assert _loss_runs(tokenizer, chat) == [
    "how are you<|im_end|>",
    "<think>\n\n</think>\n\nthanks<|im_end|>",
  ]


def test_masks_match_transformers_generation_blocks(bpe):
  """Our prefix-rendering masks equal transformers' `{% generation %}` assistant masks."""
  transformers = pytest.importorskip("transformers")
  template = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
  )
  reference = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
  for messages in (CHAT, CHAT[1:3]):
    want = reference.apply_chat_template(
      messages,
      chat_template=template,
      tokenize=True,
      return_dict=True,
      return_assistant_tokens_mask=True,
    )
    (have,) = sft.tokenize_sft(
      [{"messages": messages}], tokenizer=_chat_tokenizer(bpe, template), max_len=None
    )
    assert have["tokens"].tolist() == list(want["input_ids"])
    assert have["loss_mask"].tolist() == list(want["assistant_masks"])


def test_truncation_is_counted_and_logged(caplog):
  records = [
    {"prompt": "p", "response": "r" * 30},  # Cut inside the response.
    {"prompt": "p" * 40, "response": "r"},  # Cut before the response: no loss left.
    {"prompt": "p", "response": "short"},
  ]
  examples = sft.tokenize_sft(records, tokenizer=TOK, max_len=16)
  assert (examples.num_truncated, examples.num_without_loss) == (2, 1)
  assert [len(e["tokens"]) for e in examples] == [16, 16, 1 + 1 + 5 + 1]
  assert examples[1]["loss_mask"].sum() == 0
  assert examples[0]["loss_mask"].sum() == 16 - 2  # bos and "p" carry none; no eos left.
  with caplog.at_level(logging.INFO):
    sft.sft_examples(records, tokenizer=TOK, seed=0, max_len=16)
  assert "2 truncated to max_len=16; 1 without loss" in caplog.text
  # sft_dataset truncates to seq_len + 1 tokens: each example fits one row whole.
  ds = sft.sft_dataset(
    records, tokenizer=TOK, seq_len=15, batch_size=3, seed=0, shuffle=False, packing=False
  )
  (batch,) = _take(ds, 1)
  assert batch["weights"].sum(axis=1).tolist() == [14, 0, 6]
  assert batch["segment_ids"].max(axis=1).tolist() == [1, 1, 1]


def test_malformed_data_names_the_file_line_and_the_fix(tmp_path):
  good = json.dumps(QA[0])
  cases = {
    "not JSON": (good + "\n{oops\n", r"bad\.jsonl:2: not valid JSON"),
    "missing response": (good + "\n\n" + json.dumps({"prompt": "x"}), r"bad\.jsonl:3: needs"),
    "unknown role": (
      json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
      r"bad\.jsonl:1: messages\[0\] has role 'tool' \(use one of system, user, assistant\)",
    ),
    "content not a string": (
      json.dumps({"messages": [{"role": "assistant", "content": ["x"]}]}),
      r"bad\.jsonl:1: messages\[0\] \(assistant\) needs a string content",
    ),
    "no assistant": (
      json.dumps({"messages": [{"role": "user", "content": "x"}]}),
      r"bad\.jsonl:1: the conversation has no assistant message",
    ),
    "not an object": ("[1, 2]", r"bad\.jsonl:1: got \[1, 2\] \(expected one JSON object per line"),
    "empty": ("\n \n", r"bad\.jsonl: holds no records"),
  }
  for text, message in cases.values():
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
      sft.read_sft(str(tmp_path / "bad.jsonl"))
  with pytest.raises(ValueError, match=r"record 1: needs string prompt and response"):
    sft.read_sft([QA[0], {"text": "x"}])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sft.read_sft(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="no files match"):
    sft.read_sft(str(tmp_path / "*.json"))
  with pytest.raises(ValueError, match="non-empty list"):
    sft.read_sft([])


def test_reads_globs_and_lists_of_files_in_order(tmp_path):
  for i in range(3):
    _write_jsonl(tmp_path / f"part{i}.jsonl", QA[4 * i : 4 * i + 4])
  assert sft.read_sft(str(tmp_path / "part*.jsonl")) == QA[:12]
  assert sft.read_sft([tmp_path / "part1.jsonl", tmp_path / "part0.jsonl"]) == QA[4:8] + QA[:4]


def test_template_errors_name_the_record(bpe):
  template = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(
    ValueError, match="record 0: the chat template refused .* roles must alternate"
  ):
    sft.tokenize_sft([{"messages": CHAT}], tokenizer=_chat_tokenizer(bpe, template), max_len=None)
  # Earlier assistant turns hidden from the whole conversation: they cannot be found.
  hiding = QWEN3_LIKE.replace("{{- m.content + ", "{{- (m.content if loop.last else 'x') + ")
  with pytest.raises(ValueError, match="record 0: .* renders assistant message 2 differently"):
    sft.tokenize_sft([{"messages": CHAT}], tokenizer=_chat_tokenizer(bpe, hiding), max_len=None)


# ---------------------------------------------------------------- batches


def test_batches_have_the_lm_batches_format_and_plain_vectors_count_fully():
  texts = [r["prompt"] + r["response"] for r in QA]
  lm = pipeline.lm_examples(texts, tokenizer=TOK, seed=0)
  for packing in (True, False):
    want = _take(pipeline.lm_batches(lm, seq_len=48, batch_size=4, packing=packing), 3)
    have = _take(sft.sft_batches(lm, seq_len=48, batch_size=4, packing=packing), 3)
    for a, b in zip(want, have, strict=True):
      assert list(a) == list(b)
      for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        np.testing.assert_array_equal(a[key], b[key])


def test_packing_keeps_examples_apart_and_weights_equal_unpacked():
  kwargs = dict(tokenizer=TOK, seq_len=128, batch_size=4)
  packed = list(sft.sft_eval_batches(QA, packing=True, **kwargs))
  unpacked = list(sft.sft_eval_batches(QA, packing=False, **kwargs))
  assert len(packed) < len(unpacked) == 6
  responses = {r["response"] for r in QA}
  for batch in packed:
    ids = batch["segment_ids"]
    assert np.all(batch["weights"][ids == 0] == 0)
    assert np.all(batch["inputs"][ids == 0] == TOK.pad_id)
    for row in range(4):
      k = ids[row].max()
      # Segments 1..k, contiguous, then padding.
      assert np.array_equal(np.unique(ids[row][ids[row] > 0]), np.arange(1, k + 1))
    for row, _, where in _segments(batch):
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))
      np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
      assert batch["inputs"][row, where[0]] == TOK.bos_id
      weighted = batch["targets"][row, where][batch["weights"][row, where] == 1]
      assert TOK.decode(weighted) in responses
  assert max(b["segment_ids"].max() for b in packed) >= 3
  total = sum(len(r["response"].encode()) + 1 for r in QA)
  assert sum(b["weights"].sum() for b in packed) == sum(b["weights"].sum() for b in unpacked)
  assert sum(b["weights"].sum() for b in packed) == total


def test_restored_iterator_state_continues_the_exact_stream():
  task = sft.sft_examples(QA, tokenizer=TOK, seed=3, max_len=65)
  replay = sft.as_sft_examples(pipeline.lm_examples(["x" * 50, "y" * 20], tokenizer=TOK, seed=4))
  ds = sft.sft_batches(
    pipeline.mixture([(task, 0.8), (replay, 0.2)], seed=5), seq_len=64, batch_size=3
  )
  iterator = iter(ds)
  for _ in range(5):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # As a checkpoint stores it.
  expected = [next(iterator) for _ in range(4)]
  iterator.close()

  restored = iter(ds)
  next(restored)
  restored.set_state(state)
  got = [next(restored) for _ in range(4)]
  restored.close()
  for want, have in zip(expected, got, strict=True):
    for key in want:
      np.testing.assert_array_equal(want[key], have[key])


@pytest.mark.parametrize("packing", [True, False])
def test_global_batch_does_not_depend_on_the_number_of_processes(packing):
  def run(shard_count, shard_index):
    ds = sft.sft_dataset(
      QA,
      tokenizer=TOK,
      seq_len=64,
      batch_size=4 // shard_count,
      seed=1,
      packing=packing,
      shard_index=shard_index,
      shard_count=shard_count,
    )
    iterator = iter(ds)
    batches = [next(iterator) for _ in range(3)]
    state = json.dumps(iterator.get_state(), sort_keys=True)
    iterator.close()
    return batches, state

  whole, whole_state = run(1, 0)
  (first, first_state), (second, second_state) = run(2, 0), run(2, 1)
  assert first_state == second_state == whole_state
  for batch, a, b in zip(whole, first, second, strict=True):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([a[key], b[key]]))


def test_mixing_plain_text_into_sft_examples():
  task = sft.sft_examples(QA, tokenizer=TOK, seed=0, max_len=65)
  replay = sft.as_sft_examples(pipeline.lm_examples(["z" * 30], tokenizer=TOK, seed=1))
  converted = replay[0]
  assert converted["loss_mask"].dtype == np.int32 and converted["loss_mask"].all()
  mixed = pipeline.mixture([(task, 0.75), (replay, 0.25)], seed=2)
  batches = _take(sft.sft_batches(mixed, seq_len=64, batch_size=8, packing=False), 10)
  kinds = []
  for batch in batches:
    for row in range(8):
      text_row = batch["inputs"][row, 1] == ord("z") + 3
      n = (batch["segment_ids"][row] > 0).sum()
      # Text: every target weighs 1; SFT: the prompt's do not.
      assert (batch["weights"][row].sum() == n) == text_row
      kinds.append(text_row)
  assert abs(np.mean(kinds) - 0.25) < 0.1


def test_pre_tokenized_examples_must_match_the_settings():
  examples = sft.tokenize_sft(QA, tokenizer=TOK, max_len=65)
  ds = sft.sft_examples(examples, tokenizer=TOK, seed=0, max_len=65, repeat=False, shuffle=False)
  np.testing.assert_array_equal(ds[3]["tokens"], examples[3]["tokens"])
  with pytest.raises(ValueError, match="pass the ones given to tokenize_sft"):
    sft.sft_examples(examples, tokenizer=TOK, seed=0, max_len=33)
