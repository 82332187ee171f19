"""Knowledge probes: prompts whose greedy completion is a fact, and the ones a model recalls.

A probe is a fact record `{"prompt": ..., "answer": ...}`, the record `pipeline.fact_batches`
reads and a run scores (`finch_jax.measures`): the fact is recalled when greedy decoding after
the prompt writes the answer's tokens and then ends the word (" 2" is not " 26"). The answer
starts with the space that separates it from the prompt (" Fe"), so that a BPE tokenizer, which
glues a leading space to the word, gives the answer the tokens the model would write.

Forgetting of knowledge is measurable only on facts the base model knew: a probe it already
gets wrong cannot get worse, and a set where it is mostly wrong measures noise. `recalled`
gives the per-probe verdict of the run's fact accuracy (the same teacher-forced test on the
same `fact_batches`), and `known_probes` keeps the probes a model recalls, cached in a JSONL file
(under the run's workdir, not shipped: the set depends on the model). Such a file is what the
`known` option of `debian/elements` reads:

    model, tokenizer = load_gguf(smollm2_path())
    path = known_probes(element_probes(debian.elements()), model, tokenizer,
                        os.path.join(workdir, "probes", "elements.jsonl"))
    config.data.options["debian_elements"] = {"known": path}
    config.data.fact_sets = {"retain": {"name": "debian/elements", "split": "known"}}

A comparison does this itself with `known: "recalled"` (`KNOWN_RECALLED`): it finds the probes its
base model recalls before fine-tuning and keeps them beside the base (`KNOWN_PROBES_FILE`).

With SmolLM2's tokenizer the element probes need `data.max_prompt_len >= 41` (bos included)
and `data.answer_len >= 5`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from finch_jax import files, measures
from finch_jax.data.pipeline import fact_batches
from finch_jax.data.tokenizer import Tokenizer, starts_with_bos, word_continuations

# (prompt, answer) templates per kind of element fact; fields are those of an element record.
# Plain completions rather than questions: fact recall decodes right after the prompt, with no
# chat template around it, and a completion has one natural next word.
ELEMENT_TEMPLATES: dict[str, tuple[str, str]] = {
  "symbol": ("The chemical symbol of {name} is", " {symbol}"),
  "number": ("The atomic number of {name} is", " {number}"),
  "name": ("The chemical element with the symbol {symbol} is", " {name}"),
}
# Elements whose facts, written out, precede each probe as worked examples. A small model
# completes "The chemical symbol of iron is" with " iron." as often as with " Fe" until shown
# the form of the answer: with these three, SmolLM2-135M-Instruct recalls 66 of 116 symbols
# instead of 19 (numbers 21 instead of 10, names 31 instead of 6).
SHOTS = ("oxygen", "sodium", "gold")
# The value of debian/elements' option `known` that asks for the probes the base model of a run
# recalls, found before fine-tuning (`finch_jax.inputs.with_known_probes`) and kept in a file of
# this name beside the base model.
KNOWN_RECALLED = "recalled"
KNOWN_PROBES_FILE = "known_probes.jsonl"


def element_probes(
  elements: Iterable[Mapping[str, Any]],
  kinds: Sequence[str] = tuple(ELEMENT_TEMPLATES),
  shots: Sequence[str] = SHOTS,
) -> list[dict[str, str]]:
  """Probes of element facts: for each element and kind, `{"prompt", "answer", "kind"}`.

  A prompt is the kind's template filled in for each shot element, answer included and ended
  with ". ", then the template for the element asked about: "The chemical symbol of oxygen is
  O. ... The chemical symbol of iron is" -> " Fe". The shot elements are not asked about, as
  their answers are in every prompt.

  Args:
    elements: records with `name`, `symbol` and `number` (`debian.elements()`); a kind whose
      fields are empty for an element (no symbol given) is left out for it.
    kinds: which of `ELEMENT_TEMPLATES` to ask, in this order per element.
    shots: names of elements of `elements` written out before each prompt; () for none.

  Raises:
    ValueError: for an unknown kind, or a shot element that `elements` lacks.
  """
  if unknown := [kind for kind in kinds if kind not in ELEMENT_TEMPLATES]:
    raise ValueError(f"unknown probe kinds {unknown}; use some of {list(ELEMENT_TEMPLATES)}.")
  elements = list(elements)
  by_name = {element["name"]: element for element in elements}
  if missing := [name for name in shots if name not in by_name]:
    raise ValueError(
      f"shot elements {missing} are not among the elements; pass shots= with names that are "
      "(or shots=() for prompts without worked examples)."
    )

  def asks(element: Mapping[str, Any], kind: str) -> bool:
    fields = ("name", "number") if kind == "number" else ("name", "symbol")
    return all(str(element.get(field, "")).strip() for field in fields)

  probes = []
  for element in elements:
    if element["name"] in shots:
      continue
    for kind in kinds:
      prompt, answer = ELEMENT_TEMPLATES[kind]
      if not asks(element, kind):
        continue
      examples = "".join(
        f"{prompt.format(**by_name[n])}{answer.format(**by_name[n])}. "
        for n in shots
        if asks(by_name[n], kind)
      )
      probes.append(
        {
          "prompt": examples + prompt.format(**element),
          "answer": answer.format(**element),
          "kind": kind,
        }
      )
  return probes


def _widths(records: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> tuple[int, int]:
  """(max_prompt_len, answer_len) that fit every record, as `fact_batches` counts them."""
  bos = starts_with_bos(tokenizer)
  prompts = [len(tokenizer.encode(r["prompt"], add_bos=bos, add_eos=False)) for r in records]
  answers = [len(tokenizer.encode(r["answer"], add_bos=False, add_eos=False)) for r in records]
  if min(answers) == 0:
    raise ValueError("a probe has an empty answer; every probe needs one to recall.")
  return max(prompts), max(answers)


@nnx.jit
def _recalled_rows(model: nnx.Module, batch: dict[str, jax.Array], continues: jax.Array):
  """Per row, whether greedy decoding writes the answer and ends it (`measures.recalled_rows`,
  the test `Trainer.fact_sums` makes)."""
  tokens, _ = measures.fact_inputs(batch)
  return measures.recalled_rows(model(tokens), batch, continues)


def recalled(
  records: Sequence[Mapping[str, str]],
  model: nnx.Module,
  tokenizer: Tokenizer,
  *,
  batch_size: int = 32,
) -> np.ndarray:
  """Whether `model` recalls each probe: bool [len(records)].

  The verdict of the run's fact accuracy (`finch_jax.measures.recalled_rows`) for each record:
  greedy decoding after the prompt writes the answer's tokens exactly and then ends the word
  (tested with one teacher-forced pass, which gives the same verdict). Run it with the model as
  the run evaluates it (same weights and dtype): a probe the model barely gets right may flip
  under another precision.

  Args:
    records: probes, `{"prompt", "answer"}` (other keys are ignored).
    model: a language model called as `model(tokens) -> logits` (`finch_jax.models.Llama`).
    tokenizer: the model's tokenizer.
    batch_size: probes per forward pass.
  """
  if not records:
    return np.zeros(0, bool)
  max_prompt_len, answer_len = _widths(records, tokenizer)
  batches = fact_batches(
    records,
    tokenizer=tokenizer,
    max_prompt_len=max_prompt_len,
    answer_len=answer_len,
    batch_size=batch_size,
  )
  continues = jax.numpy.asarray(word_continuations(tokenizer, tokenizer.vocab_size))
  verdicts = []
  for batch in batches:
    arrays = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    matches = np.asarray(_recalled_rows(model, arrays, continues))
    verdicts.append(matches[batch["example_mask"] > 0])
  return np.concatenate(verdicts)


def _model_digest(model: nnx.Module) -> str:
  """A hash of the model's parameters: a cache made for other weights is never reused."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    array = np.asarray(leaf)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def _tokenizer_digest(tokenizer: Tokenizer, records: Sequence[Mapping[str, str]]) -> str:
  """A hash of how the tokenizer splits the probes, which decides what is recalled."""
  digest = hashlib.sha256(f"{type(tokenizer).__qualname__}{tokenizer.bos_id}".encode())
  for record in records:
    for field, bos in (("prompt", starts_with_bos(tokenizer)), ("answer", False)):
      ids = np.asarray(tokenizer.encode(record[field], add_bos=bos, add_eos=False), np.int64)
      digest.update(ids.tobytes() + b"|")
  return digest.hexdigest()[:16]


def read_probes(path: str | os.PathLike) -> list[dict[str, str]]:
  """The probes of a JSONL file written by `known_probes` (its header line skipped)."""
  text = epath.Path(path).read_text(encoding="utf-8")  # local or gs://, as `known_probes` writes
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return [row for row in rows if "prompt" in row and "answer" in row]


def known_probes(
  records: Sequence[Mapping[str, str]],
  model: nnx.Module,
  tokenizer: Tokenizer,
  path: str | os.PathLike,
  *,
  model_key: str | None = None,
  batch_size: int = 32,
) -> str:
  """Writes the probes `model` recalls (`recalled`) to the JSONL file `path`; returns the path.

  The first line of the file records what the set was computed from: a hash of the probes as
  the tokenizer splits them and of the model (its parameters, or `model_key`), and the counts.
  When the file already holds a set computed from the same, it is reused as it is; otherwise it
  is recomputed and replaced. The file is what `debian/elements`' option `known` reads.

  Args:
    records: all probes, e.g. `element_probes(debian.elements())`.
    model: the base model, as the run evaluates it (see `recalled`).
    tokenizer: its tokenizer.
    path: where to keep the set, local or in a bucket (`gs://...`), e.g.
      `WORKDIR/probes/elements.jsonl`.
    model_key: a string that identifies the model (e.g. its file and version), to skip hashing
      its parameters; None hashes them (about a second for 135M parameters).
    batch_size: probes per forward pass.
  """
  path = os.fspath(path)
  file = epath.Path(path)  # local or in a bucket (gs://...), as every workdir file
  source = {
    "probes": _tokenizer_digest(tokenizer, records),
    "model": model_key if model_key is not None else _model_digest(model),
  }
  if file.is_file():
    header = json.loads(file.read_text(encoding="utf-8").partition("\n")[0] or "{}")
    if header.get("source") == source:
      return path
  keep = recalled(records, model, tokenizer, batch_size=batch_size)
  kept = [
    {"prompt": r["prompt"], "answer": r["answer"]} for r, k in zip(records, keep, strict=True) if k
  ]
  header = {"source": source, "num_probes": len(records), "num_known": len(kept)}
  text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [header, *kept])
  files.write_text(path, text)  # whole or not at all, local or in a bucket
  return path


__all__ = [
  "ELEMENT_TEMPLATES",
  "KNOWN_PROBES_FILE",
  "KNOWN_RECALLED",
  "element_probes",
  "known_probes",
  "read_probes",
  "recalled",
]
