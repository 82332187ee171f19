"""Input files read defensively: one error for a malformed file, and JSON read within bounds.

Every loader of a file a user brings (a GGUF model, a Hugging Face `config.json`, JSONL
instruction data, a SWORD module) refuses a file it cannot read with `FileFormatError`, one line
that names the file, what is wrong and what to do:

    /data/chat.jsonl:12: not UTF-8 text (byte 0xff at column 9) (save the file as UTF-8).

A declared count or length is checked against the bytes that remain before anything is read or
allocated for it, so a crafted or damaged file is refused at once, never by a hang, an
exhausted memory or a raw traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any


class FileFormatError(ValueError):
  """A file that cannot be read as what it should be: `PATH: what is wrong (what to do).`

  Attributes:
    path: the file (with `:LINE` for a line of a text file).
  """

  def __init__(self, path: str | os.PathLike, problem: str, fix: str):
    self.path = os.fspath(path)
    super().__init__(" ".join(f"{self.path}: {problem} ({fix}).".split()))


def parse_json(text: bytes | str, where: str | os.PathLike, fix: str) -> Any:
  """The JSON value of `text` (UTF-8 bytes or a string); `FileFormatError` at `where` otherwise.

  Invalid UTF-8, invalid JSON, and nesting deeper than Python's recursion allows are each one
  line naming `where` and `fix`.
  """
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as error:
      raise FileFormatError(
        where, f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at {error.start})", fix
      ) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise FileFormatError(
      where, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})", fix
    ) from None
  except RecursionError:
    raise FileFormatError(where, "JSON nested too deeply to read", fix) from None


def read_json(path: str | os.PathLike, fix: str) -> Any:
  """The JSON value of the file `path`, read as `parse_json` reads it."""
  path = os.fspath(path)
  with open(path, "rb") as file:
    return parse_json(file.read(), path, fix)


__all__ = ["FileFormatError", "parse_json", "read_json"]
