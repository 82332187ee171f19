"""Supervised fine-tuning (SFT) data: JSONL conversations -> loss-masked Grain batches.

Input: JSONL files (a path, a glob, or a list of them) or a list of records. Each line is one
JSON object, either

    {"prompt": "What is 2 + 2?", "response": "4"}
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 2?"},
                  {"role": "assistant", "content": "4"}]}

Roles are "system", "user" and "assistant"; a conversation needs at least one assistant
message. Other keys of a record are ignored; other keys of a message (such as
`reasoning_content`) are passed on to a chat template. Blank lines are skipped.

An example is `{"tokens": int32[n], "loss_mask": int32[n]}`: the loss mask is 1 on the tokens a
model should learn to write, the response (every assistant turn) and the token that closes it,
and 0 on bos, prompt, system and user tokens. How the text is laid out:

- With a chat template (an `HFTokenizer` whose `chat_template` is set), the conversation is
  rendered as Hugging Face's `apply_chat_template(messages)` renders it (jinja2 sandbox with
  `trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, the tokenizer's
  `bos_token` / `eos_token` / `pad_token`; `{% generation %}` blocks render their body) and
  tokenized without added bos/eos: the template writes its own special tokens. A
  `{"prompt", "response"}` record is the conversation [user: prompt, assistant: response]
  (`separator` is not used).
  Assistant turn i is located by rendering prefixes: it starts where the rendering of
  `messages[:i]` with `add_generation_prompt=True` ends (so the turn header, e.g.
  "<|im_start|>assistant\\n", is prompt) and runs to the end of the turn as the rendering of
  `messages[:i + 1]` ends it. Whitespace a template writes after a turn's closing special token
  (ChatML's "\\n" after "<|im_end|>") is left out of the mask: a model never generates it. Some
  templates render earlier assistant turns differently from the last one (Qwen3 drops the empty
  `<think>` block from turns before the last user message); the text trained on is still the
  whole conversation's rendering, and such a turn's end is found as the longest end part of
  its last-turn rendering that the whole rendering repeats there.
- Without a template (`ByteTokenizer`, or an `HFTokenizer` without one), a prompt/response
  record is `bos + prompt + separator + response + eos` (`separator` belongs to the prompt;
  "" by default), and a conversation is its turns as "role: content" joined by "\\n", between
  bos and eos: `bos + "user: hi\\nassistant: hello" + eos`. An assistant turn's content and the
  "\\n" (or, for the last turn, the eos) that ends it carry loss; "assistant: " does not.

Text is tokenized segment by segment (runs of prompt text and of response text), and the
tokens concatenated, so the mask is exact by construction: no token straddles a boundary. That
is also how the response follows the prompt at inference, where the prompt is tokenized on its
own and the model writes on. Where a boundary falls inside what a tokenizer would merge
(e.g. "assistant: " + "hello" with a tokenizer that glues spaces to words) the tokens differ
from tokenizing the whole text at once; chat templates put their boundaries after special
tokens and newlines, where both ways agree.

Examples longer than `max_len` tokens keep their first `max_len` tokens. One whose response
starts after that carries no loss (all of its targets weigh 0) but still takes its place in the
stream; `SFTExamples.num_truncated` and `num_without_loss` count both, and `sft_examples` logs
them. Tokenization happens once, when the examples are built, not per epoch.

Batches (`sft_batches`, `sft_dataset`, `sft_eval_batches`) have exactly the keys, dtypes and
shapes of `pipeline.lm_batches` (see `finch_jax.data.pipeline`), with `weights[b, t]` the loss
mask of the target `targets[b, t]`: a mean loss over `weights` is the mean over response
tokens. Packing, sharding over processes (the global batch does not depend on their number)
and checkpointable iterators work as for text. Plain token vectors (`pipeline.lm_examples`)
count as all-loss examples, so pretraining text can be replayed into SFT::

    task = sft_examples("train.jsonl", tokenizer=tok, seed=0, max_len=1025)
    replay = as_sft_examples(lm_examples(pretrain_source, tokenizer=tok, seed=1))
    stream = mixture([(task, 0.95), (replay, 0.05)], seed=2)
    batches = sft_batches(stream, seq_len=1024, batch_size=8, pad_id=tok.pad_id)
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import grain
import numpy as np

from finch_jax.data.pipeline import (
  _check_shard,
  _check_sizes,
  _Rows,
  _token_arrays,
  evaluation_rows,
  lm_batches,
)
from finch_jax.data.tokenizer import Tokenizer
from finch_jax.formats import FileFormatError, parse_json

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]

ROLES = ("system", "user", "assistant")

EXPECTED = (
  'one JSON object per line: {"prompt": str, "response": str}, or {"messages": [{"role": '
  '"system"|"user"|"assistant", "content": str}, ...]} with at least one assistant message'
)


# ---------------------------------------------------------------- reading


def _shown(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked_message(message: Any, index: int, where: str) -> dict[str, Any]:
  if not isinstance(message, Mapping):
    raise FileFormatError(
      where,
      f"messages[{index}] must be an object with role and content, got {_shown(message)}",
      f"expected {EXPECTED}",
    )
  role, content = message.get("role"), message.get("content")
  if role not in ROLES:
    raise FileFormatError(
      where, f"messages[{index}] has role {_shown(role)}", f"use one of {', '.join(ROLES)}"
    )
  if not isinstance(content, str):
    raise FileFormatError(
      where,
      f"messages[{index}] ({role}) needs a string content, got {_shown(content)}",
      f"expected {EXPECTED}",
    )
  return dict(message)


def _checked(record: Any, where: str) -> dict[str, Any]:
  """A validated copy of one record: {"messages": [...]} or {"prompt", "response"}."""
  if not isinstance(record, Mapping):
    raise FileFormatError(where, f"got {_shown(record)}", f"expected {EXPECTED}")
  if "messages" in record:
    if "prompt" in record or "response" in record:
      raise FileFormatError(
        where, "has both messages and prompt/response", "keep one form per record"
      )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise FileFormatError(
        where, f"messages must be a non-empty list, got {_shown(messages)}", f"expected {EXPECTED}"
      )
    checked = [_checked_message(m, i, where) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in checked):
      raise FileFormatError(
        where,
        "the conversation has no assistant message, so nothing to learn",
        "add the assistant's reply or drop the line",
      )
    return {"messages": checked}
  fields = {name: record.get(name) for name in ("prompt", "response")}
  if not all(isinstance(value, str) for value in fields.values()):
    raise FileFormatError(
      where,
      f"needs string prompt and response (or messages), got keys {_shown(sorted(record))}",
      f"expected {EXPECTED}",
    )
  return fields


def jsonl_files(path: str | os.PathLike) -> list[str]:
  """The files a JSONL path or glob names, sorted; FileNotFoundError naming the fix if none."""
  path = os.fspath(path)
  if glob.has_magic(path):
    files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"no files match the glob {path!r}; check the pattern.")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SFT data file {path!r} does not exist; pass a JSONL file or glob.")
  return [path]


def _read_file(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """The records of one JSONL file. Lines are read as bytes and decoded one at a time, so
  invalid UTF-8, invalid JSON or nesting too deep to parse is named by its file and line."""
  records, wheres = [], []
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      record = parse_json(line, where, f"expected {EXPECTED}, as UTF-8 text")
      records.append(_checked(record, where))
      wheres.append(where)
  if not records:
    raise FileFormatError(path, "holds no records (it is empty or blank)", f"expected {EXPECTED}")
  return records, wheres


def _read(source: Any) -> tuple[list[dict[str, Any]], list[str]]:
  """Validated records and where each came from ("file:line" or "record i")."""
  if isinstance(source, str | os.PathLike):
    paths = [source]
  elif isinstance(source, Sequence) and source and all(isinstance(s, Mapping) for s in source):
    records = [_checked(record, f"record {i}") for i, record in enumerate(source)]
    return records, [f"record {i}" for i in range(len(records))]
  elif (
    isinstance(source, Sequence)
    and source
    and all(isinstance(s, str | os.PathLike) for s in source)
  ):
    paths = list(source)
  else:
    raise ValueError(
      f"SFT data must be a JSONL path, a glob, a list of paths, or a non-empty list of record "
      f"dicts; got {_shown(source)}."
    )
  records, wheres = [], []
  for path in paths:
    for file in jsonl_files(path):
      file_records, file_wheres = _read_file(file)
      records += file_records
      wheres += file_wheres
  return records, wheres


def read_sft(source: PathOrPaths | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Validated SFT records of JSONL files (a path, a glob, or a list of them) or of a list.

  Each record comes back as `{"prompt", "response"}` or `{"messages": [...]}` (see the module
  docstring); other top-level keys are dropped.

  Raises:
    FileNotFoundError: for a missing file, or a glob that matches none.
    ValueError: for a line that is not such a record, naming the file and line number, and for
      an empty file.
  """
  return _read(source)[0]


# ---------------------------------------------------------------- chat templates


@functools.cache
def _environment() -> Any:
  """The jinja2 sandbox chat templates are rendered in, set up as Hugging Face sets it up."""
  try:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
  except ImportError as error:
    raise ImportError(
      "chat templates need jinja2: pip install 'finch_jax[hf]' (or pip install jinja2)."
    ) from error

  class GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training templates) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
      next(parser.stream)
      return parser.parse_statements(("name:endgeneration",), drop_needle=True)

  def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)

  def tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
  ) -> str:
    return json.dumps(
      value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols]
  )
  environment.filters["tojson"] = tojson
  environment.globals["raise_exception"] = raise_exception
  environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return environment


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
  return _environment().from_string(template)


class _ChatTemplate:
  """A tokenizer's chat template, rendered as Hugging Face renders it."""

  def __init__(self, tokenizer: Tokenizer, template: str):
    self._template = _compiled(template)  # First: it explains a missing jinja2.
    import jinja2

    self._errors = jinja2.TemplateError
    names = ("bos_token", "eos_token", "pad_token")
    # A token the tokenizer lacks stays undefined in the template (renders as ""), not "None".
    self._specials = {n: getattr(tokenizer, n) for n in names if getattr(tokenizer, n, None)}
    self.end_tokens = _special_tokens(tokenizer)

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, where: str) -> str:
    try:
      return self._template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        tools=None,
        documents=None,
        **self._specials,
      )
    except self._errors as error:
      raise ValueError(f"{where}: the chat template refused the conversation: {error}") from None


def _special_tokens(tokenizer: Tokenizer) -> tuple[str, ...]:
  """Texts of the special tokens that may close a turn (all of an HF tokenizer's specials)."""
  specials = {getattr(tokenizer, "eos_token", None)}
  inner = getattr(tokenizer, "tokenizer", None)
  if hasattr(inner, "get_added_tokens_decoder"):
    specials |= {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
  return tuple(sorted(s for s in specials if s))


def _turn_end(whole: str, start: int, turn: str, content: str, where: str, index: int) -> int:
  """Where the assistant turn starting at `whole[start]` ends, `turn` being it rendered last."""
  if whole.startswith(turn, start):
    return start + len(turn)
  # The template renders this turn differently when more messages follow (Qwen3 drops the
  # think block): keep the common start, then the longest end part of `turn` that `whole`
  # continues with. The end of the content's last line must be in what was found.
  common = len(os.path.commonprefix([turn, whole[start : start + len(turn)]]))
  cut = next(c for c in range(common, len(turn) + 1) if whole.startswith(turn[c:], start + common))
  end = start + common + len(turn) - cut
  if content.strip().rsplit("\n", 1)[-1][-32:] not in whole[start:end]:
    raise ValueError(
      f"{where}: the chat template renders assistant message {index} differently when more "
      "messages follow, so its tokens cannot be found; use a template whose rendering of a "
      "conversation starts with its renderings of the conversation's beginnings."
    )
  return end


def _template_segments(
  template: _ChatTemplate, messages: list[dict[str, Any]], where: str
) -> list[tuple[str, bool]]:
  """(text, carries loss) runs of a conversation rendered with a chat template."""
  whole = template.render(messages, False, where)
  segments, done = [], 0
  for index, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt = template.render(messages[:index], True, where)
    alone = template.render(messages[: index + 1], False, where)
    if not whole.startswith(prompt) or not alone.startswith(prompt) or len(prompt) < done:
      raise ValueError(
        f"{where}: the chat template's rendering up to assistant message {index} (with "
        "add_generation_prompt=True) does not begin its rendering of the conversation, so the "
        "response cannot be located; use a template that renders conversations prefix by prefix."
      )
    end = _turn_end(whole, len(prompt), alone[len(prompt) :], message["content"], where, index)
    trimmed = whole[len(prompt) : end].rstrip()
    if any(trimmed.endswith(token) for token in template.end_tokens):
      end = len(prompt) + len(trimmed)  # Whitespace after the closing token is never generated.
    segments += [(whole[done : len(prompt)], False), (whole[len(prompt) : end], True)]
    done = end
  return segments + [(whole[done:], False)]


def _plain_segments(record: dict[str, Any], separator: str) -> list[tuple[str, bool]]:
  """(text, carries loss) runs in the template-free format; the caller adds bos and eos."""
  if "messages" not in record:
    return [(record["prompt"] + separator, False), (record["response"], True)]
  segments = []
  for index, message in enumerate(record["messages"]):
    assistant = message["role"] == "assistant"
    segments.append((f"{message['role']}: ", False))
    end = "\n" if index < len(record["messages"]) - 1 else ""  # The last turn ends with eos.
    segments.append((message["content"] + end, assistant))
  return segments


def _merged(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
  """Neighbouring runs of the same kind joined, empty ones dropped."""
  merged: list[tuple[str, bool]] = []
  for text, loss in segments:
    if merged and merged[-1][1] == loss:
      merged[-1] = (merged[-1][0] + text, loss)
    elif text:
      merged.append((text, loss))
  return merged


# ---------------------------------------------------------------- tokenizing


def _tokenizer_key(tokenizer: Tokenizer) -> tuple[Any, ...]:
  return (
    type(tokenizer).__qualname__,
    tokenizer.vocab_size,
    tokenizer.bos_id,
    tokenizer.eos_id,
    tokenizer.pad_id,
    getattr(tokenizer, "chat_template", None),
  )


class SFTExamples(Sequence):
  """Tokenized SFT examples: `examples[i]` is `{"tokens": int32[n], "loss_mask": int32[n]}`.

  Built by `tokenize_sft`; a random-access source for `sft_examples`. Stored as one flat array,
  so a large dataset costs 5 bytes per token.

  Attributes:
    num_truncated: examples longer than `max_len` tokens, cut to their first `max_len`.
    num_without_loss: examples with no loss token left (their response was cut off).
    num_tokens: tokens of all examples, after truncation.
    num_loss_tokens: tokens with loss mask 1, after truncation.
    max_len: the truncation length (None: none).
    pad_id: the tokenizer's padding id, for `sft_batches`.
  """

  def __init__(
    self,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    offsets: np.ndarray,
    *,
    num_truncated: int,
    max_len: int | None,
    separator: str,
    tokenizer: Tokenizer,
  ):
    self._tokens, self._loss_mask, self._offsets = tokens, loss_mask, offsets
    cumulative = np.concatenate([[0], np.cumsum(loss_mask, dtype=np.int64)])
    loss_per_example = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    self.num_truncated = num_truncated
    self.num_without_loss = int(np.sum(loss_per_example == 0))
    self.num_tokens = int(len(tokens))
    self.num_loss_tokens = int(loss_mask.sum())
    self.max_len = max_len
    self.separator = separator
    self.pad_id = tokenizer.pad_id
    self.tokenizer_key = _tokenizer_key(tokenizer)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"example {index} of {len(self)}")
    start, end = self._offsets[index % len(self)], self._offsets[index % len(self) + 1]
    return {
      "tokens": self._tokens[start:end].copy(),
      "loss_mask": self._loss_mask[start:end].astype(np.int32),
    }

  def summary(self) -> str:
    """One line with the counts, for a log."""
    cut = f"; {self.num_truncated} truncated to max_len={self.max_len}" if self.max_len else ""
    return (
      f"{len(self)} SFT examples, {self.num_tokens} tokens of which {self.num_loss_tokens} carry "
      f"loss{cut}; {self.num_without_loss} without loss."
    )


class _Encoder:
  """record -> (int32 tokens, int8 loss mask), by the chat template or the plain format."""

  def __init__(self, tokenizer: Tokenizer, separator: str):
    self._tokenizer, self._separator = tokenizer, separator
    template = getattr(tokenizer, "chat_template", None)
    self._template = _ChatTemplate(tokenizer, template) if template else None
    if self._template is None:
      self._bos = tokenizer.encode("", add_bos=True, add_eos=False)
      self._eos = tokenizer.encode("", add_bos=False, add_eos=True)

  def _parts(self, record: dict[str, Any], where: str) -> list[tuple[np.ndarray, bool]]:
    """(token ids, carry loss) runs of a record."""
    encode = functools.partial(self._tokenizer.encode, add_bos=False, add_eos=False)
    if self._template is None:
      segments = _plain_segments(record, self._separator)
      ends_in_loss = segments[-1][1]  # The eos closes the last turn: a response's, or not.
      runs = [(encode(text), loss) for text, loss in _merged(segments)]
      return [(self._bos, False), *runs, (self._eos, ends_in_loss)]
    messages = record.get("messages") or [
      {"role": "user", "content": record["prompt"]},
      {"role": "assistant", "content": record["response"]},
    ]
    # No bos or eos added: the template writes its own special tokens.
    segments = _template_segments(self._template, messages, where)
    return [(encode(text), loss) for text, loss in _merged(segments)]

  def __call__(self, record: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    parts = self._parts(record, where)
    tokens = [np.zeros(0, np.int32)] + [np.asarray(ids, np.int32) for ids, _ in parts]
    mask = [np.zeros(0, np.int8)] + [np.full(len(ids), loss, np.int8) for ids, loss in parts]
    return np.concatenate(tokens), np.concatenate(mask)


def _tokenized(
  records: Sequence[dict[str, Any]],
  wheres: Sequence[str],
  *,
  tokenizer: Tokenizer,
  max_len: int | None,
  separator: str,
) -> SFTExamples:
  if max_len is not None:
    _check_sizes(max_len=max_len)
  encoder = _Encoder(tokenizer, separator)
  tokens, masks, offsets, truncated = [], [], [0], 0
  for record, where in zip(records, wheres, strict=True):
    ids, mask = encoder(record, where)
    if max_len is not None and len(ids) > max_len:
      ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
    tokens.append(ids)
    masks.append(mask)
    offsets.append(offsets[-1] + len(ids))
  return SFTExamples(
    np.concatenate(tokens),
    np.concatenate(masks),
    np.asarray(offsets, np.int64),
    num_truncated=truncated,
    max_len=max_len,
    separator=separator,
    tokenizer=tokenizer,
  )


def tokenize_sft(
  source: PathOrPaths | Sequence[Mapping[str, Any]],
  *,
  tokenizer: Tokenizer,
  max_len: int | None,
  separator: str = "",
) -> SFTExamples:
  """Reads and tokenizes SFT records once: loss-masked examples with truncation counts.

  Args:
    source: JSONL path, glob, list of them, or a list of records (see `read_sft`).
    tokenizer: a `ByteTokenizer`, or an `HFTokenizer`, whose `chat_template` (when set) lays
      out the conversation (see the module docstring).
    max_len: keep at most this many tokens per example (the first ones); None keeps all. Use
      `seq_len + 1` to keep every example whole within one batch row.
    separator: text between prompt and response in the template-free format.

  Returns:
    `SFTExamples`, with `num_truncated` and `num_without_loss`.
  """
  records, wheres = _read(source)
  return _tokenized(records, wheres, tokenizer=tokenizer, max_len=max_len, separator=separator)


def _example_source(
  source: Any,
  *,
  tokenizer: Tokenizer,
  max_len: int | None,
  separator: str,
  rows: slice | None = None,
  num_examples: int | None = None,
  selection: tuple[str, str] = ("selected", "select at least one record"),
) -> grain.MapDataset:
  """The selected `rows` of the records (or the `evaluation_rows` of `num_examples`),
  tokenized, as a MapDataset of example dicts. `selection` says which rows these are and how to
  select some, for the `FileFormatError` naming the source when there are none."""
  if isinstance(source, SFTExamples):
    if (source.tokenizer_key, source.max_len, source.separator) != (
      _tokenizer_key(tokenizer),
      max_len,
      separator,
    ):
      raise ValueError(
        "these SFTExamples were tokenized with another tokenizer, max_len or separator; pass "
        "the ones given to tokenize_sft."
      )
    examples = grain.MapDataset.source(source)
    if num_examples is None:
      return examples if rows is None else examples[rows]
    picked = _picked(list(range(len(source))), rows, num_examples)
    return grain.MapDataset.source(_Rows(source, np.asarray(picked, np.int64)))
  records, wheres = _read(source)
  picked = _picked(list(range(len(records))), rows, num_examples)
  if picked is not None:
    if not picked:
      named = os.fspath(source) if isinstance(source, str | os.PathLike) else "the SFT data"
      which, fix = selection
      raise FileFormatError(named, f"holds {len(records)} records, none of them {which}", fix)
    records, wheres = [records[i] for i in picked], [wheres[i] for i in picked]
  examples = _tokenized(records, wheres, tokenizer=tokenizer, max_len=max_len, separator=separator)
  log = logging.warning if examples.num_truncated or examples.num_without_loss else logging.info
  log("%s", examples.summary())
  return grain.MapDataset.source(examples)


def _picked(indices: list[int], rows: slice | None, num_examples: int | None) -> list[int] | None:
  """The indices `rows` selects, then the `evaluation_rows` of those; None: all of them."""
  if rows is None and num_examples is None:
    return None
  selected = indices if rows is None else indices[rows]
  return [selected[i] for i in evaluation_rows(len(selected), num_examples)]


# ---------------------------------------------------------------- pipelines


def sft_examples(
  source: PathOrPaths | Sequence[Mapping[str, Any]] | SFTExamples,
  *,
  tokenizer: Tokenizer,
  seed: int,
  max_len: int | None,
  shuffle: bool = True,
  repeat: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  separator: str = "",
) -> grain.MapDataset:
  """Loss-masked SFT examples of this process's shard, the stream `sft_batches` batches.

  Counterpart of `pipeline.lm_examples`: records are sharded (record i goes to shard
  `i % shard_count`), tokenized once, then shuffled (reshuffled each epoch) and repeated.

  Args:
    source: JSONL path, glob, list of them, a list of records (see `read_sft`), or
      `SFTExamples` from `tokenize_sft` (then `tokenizer`, `max_len` and `separator` must be
      the ones it was made with).
    tokenizer: see `tokenize_sft`.
    seed: shuffle seed, in [0, 2**32).
    max_len: tokens kept per example (see `tokenize_sft`); `seq_len + 1` keeps each example
      whole within one row. The truncation counts are logged.
    shuffle: shuffle within the shard; False keeps file order.
    repeat: repeat forever (needed by `pipeline.mixture`); False gives one pass.
    shard_index: which shard of the records this stream reads.
    shard_count: number of shards; as in `lm_examples`, leave 1 and shard rows in
      `sft_batches` for batches that do not depend on the number of processes.
    separator: text between prompt and response in the template-free format.

  Returns:
    A `grain.MapDataset` of `{"tokens": int32[n], "loss_mask": int32[n]}`, infinite when
    `repeat`.
  """
  _check_shard(shard_index, shard_count)
  examples = _example_source(
    source,
    tokenizer=tokenizer,
    max_len=max_len,
    separator=separator,
    rows=slice(shard_index, None, shard_count),
    selection=(
      f"in shard {shard_index} of {shard_count}",
      "use fewer shards than records (or leave shard_count 1 and shard rows in sft_batches)",
    ),
  )
  if len(examples) == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} is empty: use fewer shards.")
  if shuffle:
    examples = examples.shuffle(seed=seed)
  if repeat:
    examples = examples.repeat()
  return examples


def as_sft_examples(
  examples: grain.MapDataset | grain.IterDataset,
) -> grain.MapDataset | grain.IterDataset:
  """Plain token vectors (`pipeline.lm_examples`) as all-loss SFT examples.

  Makes a text stream the same structure as `sft_examples`, as `pipeline.mixture` needs:
  `mixture([(sft, 0.95), (as_sft_examples(lm_examples(...)), 0.05)], seed)`. Example dicts
  pass through unchanged.
  """
  return examples.map(_token_arrays)


# SFT examples batch exactly as text does: `lm_batches` weights each target by its loss mask.
sft_batches = lm_batches


def sft_dataset(
  source: PathOrPaths | Sequence[Mapping[str, Any]] | SFTExamples,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  max_len: int | None = None,
  shuffle: bool = True,
  repeat: bool = True,
  packing: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  separator: str = "",
  read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """SFT training batches of one source: `sft_batches(sft_examples(...))`.

  Args are those of `sft_examples` and `sft_batches`; `max_len` defaults to `seq_len + 1`, so
  every example fits one row whole and longer ones are truncated (and counted). As for
  `pipeline.lm_dataset`, the same seed gives the same global batches for any `shard_count`.

  Example::

    tok = load_tokenizer("/path/to/Qwen3-0.6B")  # Its chat template lays out the turns.
    ds = sft_dataset("chats/*.jsonl", tokenizer=tok, seq_len=1024, batch_size=8, seed=0)
    batch = next(iter(ds))  # weights: 1 on assistant tokens, 0 elsewhere
  """
  examples = sft_examples(
    source,
    tokenizer=tokenizer,
    seed=seed,
    max_len=seq_len + 1 if max_len is None else max_len,
    shuffle=shuffle,
    repeat=repeat,
    separator=separator,
  )
  return sft_batches(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    pad_id=tokenizer.pad_id,
    packing=packing,
    shard_index=shard_index,
    shard_count=shard_count,
    read_options=read_options,
  )


def sft_eval_batches(
  source: PathOrPaths | Sequence[Mapping[str, Any]] | SFTExamples,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  max_len: int | None = None,
  num_examples: int | None = None,
  packing: bool = False,
  shard_index: int = 0,
  shard_count: int = 1,
  separator: str = "",
) -> grain.IterDataset:
  """Every SFT example once, in order, for the exact mean loss over response tokens.

  As `pipeline.eval_batches` for text: no shuffling or repetition, a last batch padded with
  rows of weight 0, so `sum(loss * weights) / sum(weights)` over all batches is the mean over
  every response token kept (examples are truncated to `max_len`, `seq_len + 1` by default, as
  in training).

  Args:
    source: as for `sft_examples`.
    tokenizer: as for training.
    seq_len: L, tokens per row.
    batch_size: B, rows per batch per process.
    max_len: tokens kept per example; None: `seq_len + 1`.
    num_examples: `num_examples` records drawn uniformly by a stable hash
      (`pipeline.evaluation_rows`); None for all.
    packing: pack examples into rows (fewer batches); False gives one per row.
    shard_index: this process's part of each global batch of `B * shard_count` rows.
    shard_count: number of processes; all of them yield the same number of batches.
    separator: as for training.

  Returns:
    A `grain.IterDataset` of batches in `sft_batches`' format; iterate it again to re-evaluate.
  """
  _check_sizes(seq_len=seq_len, batch_size=batch_size)
  _check_shard(shard_index, shard_count)
  examples = _example_source(
    source,
    tokenizer=tokenizer,
    max_len=seq_len + 1 if max_len is None else max_len,
    separator=separator,
    num_examples=num_examples,
    selection=(f"among the {num_examples} drawn", "set num_examples to None or a positive number"),
  )
  return sft_batches(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    pad_id=tokenizer.pad_id,
    packing=packing,
    shard_index=shard_index,
    shard_count=shard_count,
  )


__all__ = [
  "SFTExamples",
  "as_sft_examples",
  "read_sft",
  "sft_batches",
  "sft_dataset",
  "sft_eval_batches",
  "sft_examples",
  "tokenize_sft",
]
