"""Real text and facts from installed Debian packages, offline: TFDS datasets `debian/<config>`.

Fine-tuning a real pretrained model needs real text that it was not fine-tuned on, text in a
language it handles poorly, and facts it demonstrably knows. Debian packages ship all three, with
licences that allow it, and install without a network beyond the package mirror. Each config
reads one package's files (pure Python: zlib, gzip, html.parser) and writes TFDS array_record
like the other builders (`finch_jax.data.builders`); a missing package is an error naming the
`apt-get install` line.

- `bible_web` (`sword-text-web`): the World English Bible, public domain, a SWORD zText module;
  splits train, validation.
- `handbook_<lang>` (`debian-handbook`): The Debian Administrator's Handbook (GPL-2+ or
  CC-BY-SA 3.0) in one of 26 languages (`HANDBOOK_LOCALES`); splits train, validation.
- `fortunes_<lang>` (`fortunes-<lang>`, `FORTUNES`): proverbs, quotations and jokes; splits
  train, validation.
- `elements` (`dict-elements`): element facts as knowledge probes (public domain); split facts,
  and known with the option `known`.
- `foldoc` (`dict-foldoc`): FOLDOC's definitions of computing terms (GFDL) as instruction data,
  `{"prompt": 'What is "TERM" in computing?', "response": DEFINITION}` (`foldoc_instructions`;
  a definition keeps its first paragraphs up to about `passage_chars` characters); splits train,
  validation.

Text configs have passages of consecutive verses (within one chapter) or paragraphs (within one
handbook page) joined until they reach `passage_chars` characters (default 500; a longer verse or
paragraph is cut at sentence ends), in `text`; the validation split is `validation_fraction` of
them, chosen by a hash of the text (`builders.split_local_text`). A handbook translation keeps
only the paragraphs that differ from the English edition: the package falls back to English for
paragraphs not yet translated (between 15% and 95% of them, depending on the language).

`elements` holds `prompt`/`answer` probes (`probes.element_probes`: symbol, atomic number, and
name from symbol of each element the dictionary gives both for) in the split `facts`. With the
option `known` (a file from `probes.known_probes`) it also has the split `known`: the probes a
given base model recalls, the set on which forgetting of knowledge is measurable.

`foldoc`'s records carry a `response`, which makes them instruction data wherever a run reads
them for training or loss (`finch_jax.data.sft`: the loss is on the responses). The same records
can be written as JSONL for other tools: `write_instructions(directory)`.

Naming, in a config (options keyed by `builders.options_key`, as for every dataset):

    config.data.train = {"name": "debian/handbook_fa", "split": "train"}
    config.data.eval_sets = {"retain": {"name": "debian/bible_web", "split": "validation"}}
    config.data.options = {"debian_bible_web": {"passage_chars": 400}}

Options of every config: `passage_chars` (not for fortunes, which stay whole),
`validation_fraction`, and `root` (the directory the package's `/usr/share/...` files are
under; "/" by default, a test's fixture directory in tests).
A build's name carries a hash of its options and of the size and modification time of the files
it reads, so an upgraded package is rebuilt rather than silently reused.

The builder is registered with TFDS under the name `debian` when `finch_jax.data` is imported,
so `builders.data_source("debian/bible_web", split, data_dir)` builds it and `finch_jax.validate`
accepts the name as a catalog name (it checks the config's name; a missing package shows when
the data is first built).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import html.parser
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from finch_jax.data import builders, probes
from finch_jax.formats import FileFormatError

PASSAGE_CHARS = 500  # "a few hundred characters": a paragraph, a handful of verses
VALIDATION_FRACTION = 0.05

# ----- where each package puts its files ------------------------------------------------------

SWORD_WEB_CONF = "usr/share/sword/mods.d/engWEB2015eb.conf"
HANDBOOK_DIR = "usr/share/doc/debian-handbook/html"
FORTUNES_DIR = "usr/share/games/fortunes"
DICTD_DIR = "usr/share/dictd"

# Config suffix -> locale directory of debian-handbook 11.20220922 (Debian 12). A bare language
# code where the package has one locale of it, the locale where it has several or a region.
HANDBOOK_LOCALES = {
  "ar": "ar-MA",
  "ca": "ca-ES",
  "cs": "cs-CZ",
  "da": "da-DK",
  "de": "de-DE",
  "el": "el-GR",
  "en": "en-US",
  "es": "es-ES",
  "fa": "fa-IR",
  "fr": "fr-FR",
  "hr": "hr-HR",
  "id": "id-ID",
  "it": "it-IT",
  "ja": "ja-JP",
  "ko": "ko-KR",
  "nb": "nb-NO",
  "nl": "nl-NL",
  "pl": "pl-PL",
  "pt_br": "pt-BR",
  "ro": "ro-RO",
  "ru": "ru-RU",
  "sv": "sv-SE",
  "tr": "tr-TR",
  "vi": "vi-VN",
  "zh_cn": "zh-CN",
  "zh_tw": "zh-TW",
}

# Config suffix -> (package, path under FORTUNES_DIR: a language directory or one file).
FORTUNES = {
  "bg": ("fortunes-bg", "bg"),
  "cs": ("fortunes-cs", "cs"),
  "eo": ("fortunes-eo", "eo"),
  "ga": ("fortunes-ga", "ga"),
  "pl": ("fortunes-pl", "pl"),
  "pt_br": ("fortunes-br", "brasil"),  # "br" is Brazil here, not Breton
  "ru": ("fortunes-ru", "ru"),
}

# Config name -> the Debian package whose files it reads.
PACKAGES = {
  "bible_web": "sword-text-web",
  **{f"handbook_{suffix}": "debian-handbook" for suffix in HANDBOOK_LOCALES},
  **{f"fortunes_{suffix}": package for suffix, (package, _) in FORTUNES.items()},
  "elements": "dict-elements",
  "foldoc": "dict-foldoc",
}
CONFIG_NAMES = tuple(PACKAGES)


def _installed(path: str, config: str) -> str:
  """`path` if it exists; else a FileNotFoundError naming the package that installs it."""
  if not os.path.exists(path):
    package = PACKAGES[config]
    reader = "debian.write_instructions" if config == "foldoc" else f"debian/{config}"
    raise FileNotFoundError(
      f"{reader} reads {path}, which is not there: install the package with "
      f"`apt-get install -y {package}` (Debian/Ubuntu, as root), or pass the option root=DIR "
      "of a directory holding its usr/share/... files."
    )
  return path


# ----- passages -------------------------------------------------------------------------------

# After Latin sentence ends a space follows; after CJK ones (no spaces between words) none does.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def _sentences(text: str, max_chars: int) -> list[str]:
  """`text` cut at sentence ends into pieces of at most about `max_chars` characters."""
  pieces: list[str] = []
  for sentence in _SENTENCE_END.split(text):
    if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
      pieces[-1] += " " + sentence
    else:
      pieces.append(sentence)
  return pieces


def passages(units: Iterable[str], passage_chars: int, separator: str = " ") -> list[str]:
  """Consecutive units of one document (verses, paragraphs) joined into passages.

  Units are added to a passage until it holds at least `passage_chars` characters; the last
  passage of a document may be shorter. A unit of more than twice `passage_chars` is first cut
  at sentence ends, so passages stay within about twice the target.

  Example:
    >>> passages(["One.", "Two.", "Three."], passage_chars=8)
    ['One. Two.', 'Three.']
  """
  if passage_chars < 1:
    raise ValueError(f"passage_chars must be a positive integer, got {passage_chars}.")
  out: list[str] = []
  current: list[str] = []
  for unit in units:
    unit = unit.strip()
    if not unit:
      continue
    pieces = _sentences(unit, 2 * passage_chars) if len(unit) > 2 * passage_chars else [unit]
    for piece in pieces:
      current.append(piece)
      if len(separator.join(current)) >= passage_chars:
        out.append(separator.join(current))
        current = []
  if current:
    out.append(separator.join(current))
  return out


# ----- SWORD zText modules (the World English Bible) ------------------------------------------


def read_sword_conf(path: str) -> dict[str, str]:
  """The `key=value` settings of a SWORD module's `.conf` file (the first value of a key)."""
  settings: dict[str, str] = {}
  with open(path, encoding="utf-8", errors="replace") as file:
    for line in file:
      key, sep, value = line.partition("=")
      if sep and not line.startswith(("#", "[")):
        settings.setdefault(key.strip(), value.strip())
  return settings


_REINSTALL = "reinstall the module: apt-get install --reinstall sword-text-web"
# zlib expands at most about 1032-fold; a block declaring more is corrupt.
_MAX_INFLATION = 1100


def _records(path: str, code: str) -> list[tuple[int, ...]]:
  """The fixed-size records of a SWORD index file; `FileFormatError` if it is cut short."""
  size = struct.calcsize(code)
  try:
    with open(path, "rb") as file:
      data = file.read()
  except FileNotFoundError:
    raise FileFormatError(path, "is missing from the module", _REINSTALL) from None
  if len(data) % size:
    raise FileFormatError(
      path, f"is {len(data)} bytes, not a whole number of {size}-byte records", _REINSTALL
    )
  return list(struct.iter_unpack(code, data))


def _inflated(path: str, block: int, compressed: bytes, record: tuple[int, ...]) -> bytes:
  """Block `block` of the `.bzz` file `path`, as its `.bzs` record places and sizes it."""
  offset, length, size = record
  if offset + length > len(compressed) or size > _MAX_INFLATION * length + 64:
    raise FileFormatError(
      path,
      f"block {block} (bytes {offset} to {offset + length}, {size} uncompressed) does not fit "
      f"the {len(compressed)}-byte file",
      _REINSTALL,
    )
  inflater = zlib.decompressobj()
  try:
    data = inflater.decompress(compressed[offset : offset + length], size)
  except zlib.error as error:
    raise FileFormatError(path, f"block {block} is not zlib data ({error})", _REINSTALL) from None
  if inflater.unconsumed_tail:
    raise FileFormatError(
      path, f"block {block} inflates to more than the {size} bytes its index gives", _REINSTALL
    )
  return data


def ztext_entries(directory: str) -> Iterator[str]:
  """Every entry of a SWORD zText module, Old then New Testament, in versification order.

  The format: per testament (`ot`, `nt`), `.bzz` holds zlib-compressed blocks one after the
  other, `.bzs` has 12 bytes per block (offset and size in `.bzz`, uncompressed size) and
  `.bzv` 10 bytes per entry (block number, offset and size within the uncompressed block:
  uint32, uint32, uint16, little-endian). An entry is the markup of one verse, or of a book or
  chapter heading; entries of places the text lacks are empty. A module of one testament has
  only its files. Every record is checked against the file it points into, so a damaged
  module is a `FileFormatError` naming the file and the block or entry.

  The reader is this project's own rather than `pysword`'s (PyPI, which reads this module too):
  pysword 0.2.8 (2022) joins words across a removed footnote ("Godcreated"), addresses verses
  through a versification table rather than the module's own chapter marks that
  `bible_chapters` splits at, and unpacks the same index records unchecked, so a damaged module
  fails there with `struct.error` as well.
  """
  for testament in ("ot", "nt"):
    prefix = os.path.join(directory, testament)
    if not os.path.exists(prefix + ".bzv"):
      continue
    blocks = _records(prefix + ".bzs", "<III")
    entries = _records(prefix + ".bzv", "<IIH")
    with open(prefix + ".bzz", "rb") as file:
      compressed = file.read()
    cache: dict[int, bytes] = {}  # Entries come in block order: each block is inflated once.
    for number, (block, start, size) in enumerate(entries):
      if size == 0:
        yield ""
        continue
      if block >= len(blocks):
        raise FileFormatError(
          prefix + ".bzv",
          f"entry {number} is in block {block}, but the module has {len(blocks)} blocks",
          _REINSTALL,
        )
      if block not in cache:
        cache.clear()
        cache[block] = _inflated(prefix + ".bzz", block, compressed, blocks[block])
      if start + size > len(cache[block]):
        raise FileFormatError(
          prefix + ".bzv",
          f"entry {number} (bytes {start} to {start + size}) runs past the end of block {block} "
          f"({len(cache[block])} bytes)",
          _REINSTALL,
        )
      yield cache[block][start : start + size].decode("utf-8", errors="replace")


class _OsisText(html.parser.HTMLParser):
  """The words of OSIS markup: notes and headings dropped, line and paragraph marks as spaces."""

  SKIPPED = frozenset({"note", "title"})  # footnotes, cross-references; section headings
  SPACES = frozenset({"l", "lb", "lg", "p", "div", "chapter", "milestone", "br"})

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skip = 0

  def handle_starttag(self, tag: str, attrs: list) -> None:
    if tag in self.SKIPPED:
      self._skip += 1
      self.parts.append(" ")  # A note sits between two words, in place of their space.
    elif tag in self.SPACES:
      self.parts.append(" ")

  def handle_startendtag(self, tag: str, attrs: list) -> None:
    if tag in self.SPACES:
      self.parts.append(" ")

  def handle_endtag(self, tag: str) -> None:
    if tag in self.SKIPPED:
      self._skip = max(self._skip - 1, 0)
    elif tag in self.SPACES:
      self.parts.append(" ")

  def handle_data(self, data: str) -> None:
    if not self._skip:
      self.parts.append(data)


_SPACE_BEFORE_CLOSING = re.compile(r"\s+([,.;:!?’”)\]])")


def _tidy(text: str) -> str:
  """Whitespace runs as one space, none before closing punctuation (left where a note was)."""
  return _SPACE_BEFORE_CLOSING.sub(r"\1", re.sub(r"\s+", " ", text)).strip()


def osis_text(markup: str) -> str:
  """Plain text of an OSIS fragment (a verse of a SWORD module).

  Example:
    >>> osis_text('<w lemma="strong:H0430">God</w><note>A note.</note><w>created</w>.')
    'God created.'
  """
  parser = _OsisText()
  parser.feed(markup)
  parser.close()
  return _tidy("".join(parser.parts))


_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=")


def bible_chapters(root: str = "/", config: str = "bible_web") -> list[list[str]]:
  """The verses of the World English Bible (`sword-text-web`), as plain text, per chapter.

  Chapters start at the module's `<chapter sID=...>` marks; front matter before a book's first
  chapter (the preface) and entries left empty by the markup (book titles) are dropped.
  """
  conf = read_sword_conf(_installed(os.path.join(root, SWORD_WEB_CONF), config))
  driver, compression = conf.get("ModDrv", ""), conf.get("CompressType", "ZIP")
  if driver.lower() != "ztext" or compression.upper() != "ZIP":
    raise ValueError(
      f"{SWORD_WEB_CONF} describes a {driver} module compressed with {compression}; this reader "
      "handles zText with ZIP compression. Export its text with diatheke (`apt-get install -y "
      "diatheke`) and read it with local_text: instead."
    )
  if "DataPath" not in conf:
    raise FileFormatError(os.path.join(root, SWORD_WEB_CONF), "has no DataPath", _REINSTALL)
  directory = os.path.normpath(
    os.path.join(
      os.path.dirname(os.path.dirname(os.path.join(root, SWORD_WEB_CONF))), conf["DataPath"]
    )
  )
  chapters: list[list[str]] = []
  in_chapter = False
  for markup in ztext_entries(_installed(directory, config)):
    if _CHAPTER.search(markup):
      chapters.append([])
      in_chapter = True
      continue
    if 'type="book"' in markup:
      in_chapter = False  # A book's heading and introduction belong to no chapter.
    if in_chapter and (text := osis_text(markup)):
      chapters[-1].append(text)
  return [verses for verses in chapters if verses]


# ----- The Debian Administrator's Handbook ----------------------------------------------------


class _HandbookParagraphs(html.parser.HTMLParser):
  """The text of each `<div class="para">` of a handbook page, code blocks left out."""

  SKIPPED = frozenset({"pre", "script", "style"})

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: list[str] = []
    self._open: list[str] = []  # tags open inside the current paragraph
    self._text: list[str] | None = None
    self._skip = 0

  def handle_starttag(self, tag: str, attrs: list) -> None:
    classes = (dict(attrs).get("class") or "").split()
    if self._text is None:
      if tag == "div" and "para" in classes:
        self._text, self._open = [], []
      return
    self._open.append(tag)
    if tag in self.SKIPPED:
      self._skip += 1

  def handle_endtag(self, tag: str) -> None:
    if self._text is None:
      return
    if tag not in self._open:  # the paragraph's own </div> (or a stray end tag)
      if tag == "div":
        self.paragraphs.append(_tidy("".join(self._text)))
        self._text, self._open, self._skip = None, [], 0
      return
    while self._open:  # close the tag, and any left open inside it (<br> without a slash)
      opened = self._open.pop()
      if opened in self.SKIPPED:
        self._skip -= 1
      if opened == tag:
        break

  def handle_data(self, data: str) -> None:
    if self._text is not None and not self._skip:
      self._text.append(data)


def handbook_pages(
  root: str = "/", locale: str = "en-US", config: str = ""
) -> dict[str, list[str]]:
  """{page file name: its paragraphs} of one language of `debian-handbook`, pages sorted."""
  directory = _installed(os.path.join(root, HANDBOOK_DIR, locale), config or "handbook_en")
  pages = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".html"):
      parser = _HandbookParagraphs()
      with open(os.path.join(directory, name), encoding="utf-8") as file:
        parser.feed(file.read())
      parser.close()
      pages[name] = [p for p in parser.paragraphs if p]
  return pages


def handbook_documents(root: str, suffix: str) -> list[list[str]]:
  """The paragraphs of each page of one handbook language; for a translation, only those that
  differ from every paragraph of the English edition (untranslated ones are English)."""
  config = f"handbook_{suffix}"
  pages = handbook_pages(root, HANDBOOK_LOCALES[suffix], config)
  if suffix == "en":
    return list(pages.values())
  english = {p for ps in handbook_pages(root, "en-US", config).values() for p in ps}
  return [[p for p in paragraphs if p not in english] for paragraphs in pages.values()]


# ----- fortune files --------------------------------------------------------------------------

_PERCENT = re.compile(r"^%[ \t]*$", re.MULTILINE)


def fortune_files(root: str, suffix: str) -> list[str]:
  """The fortune files of one language package: text files (not `.dat` indexes), each once
  (the `.u8` names are often links to, or empty twins of, the plain ones), sorted."""
  config = f"fortunes_{suffix}"
  path = _installed(os.path.join(root, FORTUNES_DIR, FORTUNES[suffix][1]), config)
  names = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*")))
  files, seen = [], set()
  for name in names:
    real = os.path.realpath(name)
    if name.endswith(".dat") or not os.path.isfile(real) or real in seen:
      continue
    if os.path.getsize(real) == 0:
      continue
    seen.add(real)
    files.append(real)
  return files


def fortunes(root: str, suffix: str) -> list[str]:
  """The fortunes of one language package: records between lines holding only `%`."""
  records = []
  for path in fortune_files(root, suffix):
    with open(path, encoding="utf-8", errors="replace") as file:
      text = file.read().replace("\r\n", "\n")
    records += [r.strip() for r in _PERCENT.split(text) if r.strip()]
  return records


# ----- dictd dictionaries (dict-elements, dict-foldoc) ----------------------------------------

_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
  """An offset or length of a dictd index: base 64, most significant digit first."""
  value = 0
  for digit in digits:
    value = value * 64 + _DICTD_DIGITS.index(digit)
  return value


def dictd_entries(index_path: str, dict_path: str) -> list[tuple[str, str]]:
  """(headword, entry text) of a dictd database, in index order, each entry once.

  The format: `NAME.index` has a line per headword, `headword TAB offset TAB length` with the
  numbers in dictd's base 64; `NAME.dict.dz` is the entries' text, gzip-compressed (dictzip adds
  a random-access table to the gzip header, which a plain gzip reader skips). Headwords that
  start with "00" are the database's own metadata. Several headwords may index one entry (its
  synonyms); the first one names it. Entries are UTF-8, or Latin-1 where a byte is not.
  """
  with gzip.open(dict_path) as file:
    data = file.read()
  entries, seen = [], set()
  with open(index_path, encoding="utf-8", errors="replace") as file:
    for line in file:
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 3 or fields[0].startswith("00"):
        continue
      offset, length = _dictd_number(fields[1]), _dictd_number(fields[2])
      if (offset, length) in seen:
        continue
      seen.add((offset, length))
      raw = data[offset : offset + length]
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older entries of dict-elements
      entries.append((fields[0], text))
  return entries


def _dictd(root: str, name: str, config: str) -> list[tuple[str, str]]:
  index = _installed(os.path.join(root, DICTD_DIR, f"{name}.index"), config)
  return dictd_entries(index, _installed(os.path.join(root, DICTD_DIR, f"{name}.dict.dz"), config))


def _field(text: str, name: str) -> str:
  match = re.search(rf"^{name}:[ \t]*(.*?)[ \t]*$", text, re.MULTILINE | re.IGNORECASE)
  return match.group(1) if match else ""


def elements(root: str = "/") -> list[dict[str, str]]:
  """The chemical elements of `dict-elements`: `{"name", "symbol", "number", "weight"}`.

  Only entries with an atomic number (the database also holds former and competing names, and
  cross-references). Where two entries give one atomic number (110: darmstadtium and its former
  placeholder name), the first in the index's alphabetical order is kept. `symbol` is "" where
  the entry leaves it blank (106, 107). Sorted by atomic number. The data are of 2000, with a
  few later additions: elements 104 to 109 carry their placeholder names of that time.
  """
  found: dict[int, dict[str, str]] = {}
  for _, text in _dictd(root, "elements", "elements"):
    name = text.split("\n", 1)[0].strip()
    number = _field(text, "Atomic number")
    if not number.isdigit() or int(number) in found:
      continue
    found[int(number)] = {
      "name": name,
      "symbol": _field(text, "Symbol"),
      "number": number,
      "weight": _field(text, "Atomic weight"),
    }
  return [found[number] for number in sorted(found)]


_FOLDOC_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)\s*$")
# Paragraphs that point elsewhere rather than define: "See also", "Home:", newsgroups, mailing
# lists, citations in brackets, addresses.
_FOLDOC_POINTER = re.compile(
  r"^(See also|Home|Usenet|E-?mail|Mailing list|Latest version|FAQ|\[)|://|\bnews:|\S@\S",
  re.IGNORECASE,
)

_FOLDOC_CATEGORY = re.compile(r"<[a-z][a-z ,-]*>\s*")  # "<networking>" before one sense of a term


def _foldoc_body(text: str) -> tuple[str, str, list[str]]:
  """(term, categories, paragraphs) of a FOLDOC entry: headword lines, a blank line, then an
  indented body that starts with `<categories>` and ends with a `(YYYY-MM-DD)` date."""
  head, _, body = text.partition("\n\n")
  term = head.strip().split("\n")[-1].strip()
  body = _FOLDOC_DATE.sub("", body.strip("\n"))
  categories = ""
  if match := re.match(r"\s*<([^>]*)>\s*", body):
    categories, body = match.group(1).strip(), "   " + body[match.end() :]
  paragraphs = []
  for block in re.split(r"\n[ \t]*\n", body):
    if block.startswith("    "):
      continue  # indented deeper than the text (3 spaces): code, a table or a formula
    text = _FOLDOC_CATEGORY.sub("", block.replace("{", "").replace("}", ""))
    paragraph = re.sub(r"\s+", " ", text).strip()
    if paragraph and not _FOLDOC_POINTER.search(paragraph):
      paragraphs.append(paragraph)
  return term, categories, paragraphs


def foldoc_definitions(root: str = "/", max_chars: int = 600) -> list[dict[str, str]]:
  """FOLDOC's computing terms (`dict-foldoc`): `{"term", "categories", "definition"}`.

  The definition is the entry's first paragraphs up to about `max_chars` characters (at least
  one paragraph), with the dictionary's `{cross-reference}` braces removed; pointers ("See
  also"), citations, dates and indented code are left out. Entries with no such text (bare
  cross-references) are skipped.
  """
  out = []
  for _, text in _dictd(root, "foldoc", "foldoc"):
    term, categories, paragraphs = _foldoc_body(text)
    if not paragraphs or not term:
      continue
    definition = paragraphs[0]
    for paragraph in paragraphs[1:]:
      if len(definition) + 1 + len(paragraph) > max_chars:
        break
      definition += "\n" + paragraph
    out.append({"term": term, "categories": categories, "definition": definition})
  return out


def foldoc_instructions(root: str = "/", max_chars: int = 600) -> list[dict[str, str]]:
  """FOLDOC as instruction data: `{"prompt": 'What is "TERM" in computing?', "response":
  definition}` per term, in the dictionary's order (see `foldoc_definitions`)."""
  return [
    {"prompt": f'What is "{d["term"]}" in computing?', "response": d["definition"]}
    for d in foldoc_definitions(root, max_chars)
  ]


def instruction_splits(
  records: Sequence[Mapping[str, str]], validation_fraction: float
) -> dict[str, list[Mapping[str, str]]]:
  """`train` and `validation` (when `validation_fraction` > 0) of prompt/response records, by a
  hash of the prompt as for text (`builders.split_local_text`): a record's split does not change
  with the order or number of the others. Of records with one prompt the last is kept."""
  by_prompt = {r["prompt"]: r for r in records}
  splits = builders.split_local_text(list(by_prompt), validation_fraction)
  return {split: [by_prompt[p] for p in prompts] for split, prompts in splits.items()}


def write_instructions(
  directory: str | os.PathLike,
  *,
  root: str = "/",
  max_chars: int = 600,
  validation_fraction: float = VALIDATION_FRACTION,
) -> dict[str, str]:
  """Writes FOLDOC's instruction data as `foldoc-train.jsonl` and `foldoc-validation.jsonl`.

  The split is by a hash of the prompt, as for text (`builders.split_local_text`), so it does not
  change with the dictionary's order. A file whose content would not change is not rewritten
  (its modification time, part of a run's fingerprint, stays). Returns {split: path}, for data
  specs `{"name": "jsonl:PATH"}` (`finch_jax.data.sft`).
  """
  splits = instruction_splits(foldoc_instructions(root, max_chars), validation_fraction)
  os.makedirs(directory, exist_ok=True)
  paths = {}
  for split, rows in splits.items():
    path = os.path.join(os.fspath(directory), f"foldoc-{split}.jsonl")
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not os.path.isfile(path) or open(path, encoding="utf-8").read() != content:
      partial = f"{path}.tmp{os.getpid()}"
      with open(partial, "w", encoding="utf-8") as file:
        file.write(content)
      os.replace(partial, path)
    paths[split] = path
  return paths


# ----- the TFDS builder -----------------------------------------------------------------------


@dataclasses.dataclass
class DebianConfig(tfds.core.BuilderConfig):
  """Which package data a `Debian` build reads, and how.

  Attributes:
    source: the config's base name (`bible_web`, `handbook_fa`, `elements`, ...).
    root: the directory the package files' `usr/share/...` paths are under.
    passage_chars: passage length target of text configs (see `passages`).
    validation_fraction: share of passages in `validation`, chosen by a hash of the text.
    known: for `elements`, a JSONL file of known probes (`probes.known_probes`); "" for none.
  """

  source: str = ""
  root: str = "/"
  passage_chars: int = PASSAGE_CHARS
  validation_fraction: float = VALIDATION_FRACTION
  known: str = ""


_OPTIONS = ("root", "passage_chars", "validation_fraction", "known")
_FEATURES = builders.FEATURE_NAMES
_TFDS_ARGUMENTS = frozenset({"config", "data_dir", "version", "file_format"})


def source_files(config: DebianConfig) -> list[str]:
  """The files a build reads, whose size and modification time go into its name (and into the
  fingerprint of a run that reads it, `finch_jax.configure.fingerprint`).

  Raises:
    FileNotFoundError: when the package is not installed, naming the `apt-get install` line.
  """
  root, source = config.root, config.source
  if source == "bible_web":
    conf = _installed(os.path.join(root, SWORD_WEB_CONF), source)
    data = os.path.join(root, "usr/share/sword/modules/texts/ztext/engWEB2015eb")
    return [conf, *sorted(glob.glob(os.path.join(_installed(data, source), "*")))]
  if source.startswith("handbook_"):
    locales = sorted({"en-US", HANDBOOK_LOCALES[source.removeprefix("handbook_")]})
    directories = [_installed(os.path.join(root, HANDBOOK_DIR, x), source) for x in locales]
    return sorted(f for d in directories for f in glob.glob(os.path.join(d, "*.html")))
  if source.startswith("fortunes_"):
    return fortune_files(root, source.removeprefix("fortunes_"))
  files = [os.path.join(root, DICTD_DIR, f"{source}.{ext}") for ext in ("index", "dict.dz")]
  return [_installed(f, source) for f in files] + ([config.known] if config.known else [])


def debian_config(source: str, **options: Any) -> DebianConfig:
  """The config for `debian/<source>` with builder `options`, named by their hash and the files.

  Raises:
    ValueError: for an unknown config or option, naming the known ones.
    FileNotFoundError: when the package is not installed, naming the `apt-get install` line.
  """
  if source not in CONFIG_NAMES:
    raise ValueError(f"unknown dataset 'debian/{source}'; the debian configs are {CONFIG_NAMES}.")
  if unknown := sorted(set(options) - set(_OPTIONS)):
    raise ValueError(f"debian/{source}: unknown options {unknown}; the options are {_OPTIONS}.")
  if options.get("known") and source != "elements":
    raise ValueError(f"debian/{source}: the option 'known' is for debian/elements only.")
  config = DebianConfig(name=source, source=source, **options)
  config.root = os.path.abspath(os.path.expanduser(config.root))
  if config.known:
    config.known = os.path.abspath(os.path.expanduser(config.known))
    if not os.path.isfile(config.known):
      raise FileNotFoundError(
        f"debian/elements: the option known={config.known!r} names no file; write it with "
        "finch_jax.data.probes.known_probes(...) first."
      )
  if not 0.0 <= config.validation_fraction < 1.0:
    raise ValueError(
      f"debian/{source}: validation_fraction must be in [0, 1), got {config.validation_fraction}."
    )
  if not isinstance(config.passage_chars, int) or config.passage_chars < 1:
    raise ValueError(
      f"debian/{source}: passage_chars must be a positive integer, got {config.passage_chars!r}."
    )
  files = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in source_files(config)]
  settings = [getattr(config, option) for option in _OPTIONS]
  config.name = f"{source}-{builders._digest([settings, files])}"
  config.description = f"{PACKAGES[source]}: {source}"
  return config


def text_passages(config: DebianConfig) -> list[str]:
  """All passages of a text config, in document order (see the module docstring)."""
  source = config.source
  if source.startswith("fortunes_"):
    # A fortune is a whole, and unrelated to the next: fortunes are neither cut nor joined.
    out = fortunes(config.root, source.removeprefix("fortunes_"))
  elif source == "bible_web":
    chapters = bible_chapters(config.root, source)
    out = [p for verses in chapters for p in passages(verses, config.passage_chars)]
  else:
    pages = handbook_documents(config.root, source.removeprefix("handbook_"))
    out = [p for paragraphs in pages for p in passages(paragraphs, config.passage_chars, "\n")]
  if not out:
    raise ValueError(f"debian/{source}: the package's files hold no text.")
  return out


def _probe_splits(config: DebianConfig) -> dict[str, list[dict[str, str]]]:
  """`facts` (every element probe) and, with the option `known`, `known`."""
  facts = probes.element_probes(elements(config.root))
  splits = {"facts": facts}
  if config.known:
    known = probes.read_probes(config.known)
    pairs = {(p["prompt"], p["answer"]) for p in facts}
    if stray := [p for p in known if (p["prompt"], p["answer"]) not in pairs]:
      raise ValueError(
        f"debian/elements: {len(stray)} probes of {config.known} (e.g. {stray[0]['prompt']!r}) "
        "are not among this package's probes; recompute the file with "
        "finch_jax.data.probes.known_probes(element_probes(elements()), model, tokenizer, path)."
      )
    splits["known"] = known
  return splits


class Debian(builders._PackagedBuilder):
  """Text and knowledge probes from installed Debian packages (see the module docstring).

  Every example has the string features `text`, `prompt`, `answer` and `response`, empty where
  unused: `text` in the text configs' splits, `prompt`/`answer` in `elements`' (probes),
  `prompt`/`response` in `foldoc`'s (instruction data, `builders.instruction_records`).
  Examples keep the source's order (shuffling belongs to the input pipeline).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "WEB Bible, handbook, fortunes passages; element probes.",
    "1.1.0": "foldoc: FOLDOC's definitions as instruction data (feature `response`).",
  }
  BUILDER_CONFIGS = [
    DebianConfig(name=name, source=name, description=f"{PACKAGES[name]}: {name}")
    for name in CONFIG_NAMES
  ]

  def __init__(self, *, config: str | DebianConfig | None = None, **kwargs: Any):
    # Options arrive as keyword arguments (`builders.builder` passes `data.options` on); they
    # become part of the config, whose name then says which build this is.
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _TFDS_ARGUMENTS}
    if isinstance(config, str) or config is None:
      config = debian_config(config or "bible_web", **options)
    elif options:
      raise ValueError(f"pass options in the DebianConfig, or a config name; got {options}.")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict({key: tfds.features.Text() for key in _FEATURES}),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The files are installed.
    config = self.builder_config
    if config.source == "elements":
      splits = _probe_splits(config)
      return {split: self._generate_examples(rows) for split, rows in splits.items()}
    if config.source == "foldoc":
      splits = instruction_splits(
        foldoc_instructions(config.root, config.passage_chars), config.validation_fraction
      )
      return {split: self._generate_examples(rows) for split, rows in splits.items()}
    texts = builders.split_local_text(text_passages(config), config.validation_fraction)
    return {
      split: self._generate_examples([{"text": t} for t in rows]) for split, rows in texts.items()
    }

  def _generate_examples(self, rows: Sequence[Mapping[str, str]]) -> Iterator[tuple[int, dict]]:
    for index, row in enumerate(rows):
      yield index, {key: row.get(key, "") for key in _FEATURES}


__all__ = [
  "CONFIG_NAMES",
  "Debian",
  "DebianConfig",
  "FORTUNES",
  "HANDBOOK_LOCALES",
  "PACKAGES",
  "bible_chapters",
  "debian_config",
  "dictd_entries",
  "elements",
  "foldoc_definitions",
  "foldoc_instructions",
  "fortunes",
  "instruction_splits",
  "handbook_documents",
  "osis_text",
  "passages",
  "source_files",
  "text_passages",
  "write_instructions",
]
