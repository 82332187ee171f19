"""Tokenizers the data pipelines accept, and the byte-level one the embedded demos use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  """What `finch_jax.data.pipeline` needs from a tokenizer.

  `encode` returns int32 ids; `pad_id` fills padding (whose loss weight is 0), `bos_id` starts
  and `eos_id` ends every example. A Hugging Face tokenizer fits behind a thin adapter.
  An optional `adds_bos` (default True) says whether the model's own text format starts a
  document with `bos_id` (`starts_with_bos`).
  """

  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """Token ids of `text` as an int32 vector."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`, special tokens dropped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: byte b is id b + 3, after pad (0), bos (1) and eos (2).

  No vocabulary file and nothing to download, so every script and test can run offline; any
  text round-trips (`decode(encode(t)) == t`), including scripts the model never saw.

  Example:
    >>> tok = ByteTokenizer()
    >>> tok.encode("hi").tolist()
    [1, 107, 108, 2]
    >>> tok.decode(tok.encode("hi"))
    'hi'
  """

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  num_special: int = 3
  vocab_size: int = 256 + 3
  adds_bos: bool = True  # the embedded models are trained with bos before every document

  def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """Ids of `text` (a str, or bytes already UTF-8 encoded) as an int32 vector."""
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    body = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.num_special
    bos = [self.bos_id] if add_bos else []
    eos = [self.eos_id] if add_eos else []
    return np.concatenate([np.asarray(bos, np.int32), body, np.asarray(eos, np.int32)])

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; specials and ids past the byte range are dropped, bad UTF-8 is replaced.

    Ids past the byte range come from models whose embedding is padded beyond `vocab_size`.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.num_special) & (ids < self.vocab_size)]
    return (ids - self.num_special).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def starts_with_bos(tokenizer: Tokenizer) -> bool:
  """Whether the model's text format puts bos before a document (`adds_bos`, default True).

  SmolLM2-Instruct's file says no (`tokenizer.ggml.add_bos_token = false`): its "bos" is the
  chat token `<|im_start|>`, after which the model expects a role name, so a plain text led by
  it would be measured partly as chat format."""
  return bool(getattr(tokenizer, "adds_bos", True))


def word_continuations(tokenizer: Tokenizer, size: int) -> np.ndarray:
  """bool [size]: whether each token id continues the word before it (starts with a letter or
  digit, or is a non-ASCII byte of the byte tokenizer); special and unused ids do not.

  A fact's answer ends where it should when the token after it does not continue its last word:
  " 2" followed by "6" is " 26", not " 2"."""
  table = np.zeros(size, bool)
  if isinstance(tokenizer, ByteTokenizer):
    byte = np.arange(256)
    ascii_word = np.array([chr(b).isalnum() for b in range(128)] + [True] * 128)
    ids = byte + tokenizer.num_special
    keep = ids < size
    table[ids[keep]] = ascii_word[keep]
    return table
  for token_id in range(min(size, tokenizer.vocab_size)):
    text = tokenizer.decode([token_id])
    table[token_id] = bool(text) and text[0].isalnum()
  return table
