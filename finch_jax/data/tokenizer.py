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
