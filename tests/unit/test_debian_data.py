"""finch_jax.data.debian and probes: Debian package data read from fixtures in the packages'
own formats, so no package is needed; and one check per package on the real files where it is
installed (CI installs them: see `REAL_PACKAGES`)."""

import doctest
import gzip
import itertools
import json
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from finch_jax import data
from finch_jax.data import builders, debian, probes, sft

# The packages the real-file checks read; CI installs them (`.ci/run`).
REAL_PACKAGES = ("sword-text-web", "debian-handbook", "dict-elements", "dict-foldoc", "fortunes-ga")


def _installed(package: str, path: str):
  if not os.path.exists(path):
    pytest.skip(f"{package} is not installed: apt-get install -y {package}")


def _write(path, content: str | bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mode = "wb" if isinstance(content, bytes) else "w"
  with open(path, mode, **({} if isinstance(content, bytes) else {"encoding": "utf-8"})) as file:
    file.write(content)
  return str(path)


# ----- fixtures in each package's format --------------------------------------------------------

GENESIS_1 = [
  '<w lemma="strong:H0430">In</w> <w>the</w> <w>beginning</w>, <w>God</w><note placement="foot">'
  '<reference type="annotateRef">1:1 </reference>The Hebrew word is “Elohim”.</note><w>created'
  "</w> <w>the</w> <w>heavens</w> <w>and</w> <w>the</w> <w>earth</w>.",
  '<div type="x-milestone" subType="x-preverse" sID="pv1"/><div sID="gen26" type="x-p"/>'
  "<w>God</w> <w>said</w>, “<w>Let</w> <w>there</w> <w>be</w> <w>light</w>,” and there was "
  "light<note>A note.</note>.",
]


def _ztext(root, entries_by_testament: dict[str, list[str]], block_size: int = 3):
  """A SWORD zText module under `root` in sword-text-web's layout: a .conf, then per testament
  zlib blocks of `block_size` entries (.bzz), the block table (.bzs) and the entry table
  (.bzv)."""
  _write(
    os.path.join(root, debian.SWORD_WEB_CONF),
    "[engWEB2015eb]\nDataPath=./modules/texts/ztext/engWEB2015eb/\nModDrv=zText\n"
    "CompressType=ZIP\nBlockType=BOOK\n",
  )
  directory = os.path.join(root, "usr/share/sword/modules/texts/ztext/engWEB2015eb")
  for testament, entries in entries_by_testament.items():
    bzz, bzs, bzv = b"", b"", b""
    for first in range(0, len(entries), block_size):
      block, offsets = b"", []
      for entry in entries[first : first + block_size]:
        raw = entry.encode("utf-8")
        offsets.append((len(block), len(raw)))
        block += raw
      packed = zlib.compress(block)
      bzs += struct.pack("<III", len(bzz), len(packed), len(block))
      bzz += packed
      for start, size in offsets:
        bzv += struct.pack("<IIH", first // block_size, start if size else 0, size)
    for ext, content in (("bzz", bzz), ("bzs", bzs), ("bzv", bzv)):
      _write(os.path.join(directory, f"{testament}.{ext}"), content)


@pytest.fixture
def bible(tmp_path):
  _ztext(
    tmp_path,
    {
      "ot": [
        "",
        '<milestone type="x-importer"/>',
        '<div sID="gen2" type="front"/><title>Preface</title> The preface is not scripture.',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
        *GENESIS_1,
        '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
        "The heavens, the earth, and all their vast array were finished.",
        "",
      ],
      "nt": [
        "",
        '<div canonical="true" osisID="Matt" sID="gen1" type="book"/><title level="1">Matthew'
        "</title>",
        '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
        "The book of the genealogy of <transChange>Jesus</transChange> Christ.",
      ],
    },
  )
  return str(tmp_path)


def _page(paragraphs: list[str]) -> str:
  """A handbook page as publican writes it: XHTML, paragraphs as <div class="para">."""
  body = "".join(f'<div class="para">\n\t\t\t{p}\n\t\t</div>' for p in paragraphs)
  return (
    '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<!DOCTYPE html PUBLIC '
    '"-//W3C//DTD XHTML 1.0 Strict//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">'
    '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>6.2. apt</title></head><body>'
    '<p id="title"><a href="index.html">Site</a></p><div class="section"><div class="titlepage">'
    f'<h2 class="title">6.2. APT</h2></div>{body}</div></body></html>'
  )


ENGLISH = [
  '<acronym class="acronym">APT</acronym> is a vast project &amp; its <code class="command">'
  "apt-get</code> is the first front end.",
  "Numerous other interfaces then appeared.<br> Note this.",
  'Run this: <pre class="screen">apt update</pre> and wait.',
]
PERSIAN = [
  '<acronym class="acronym">APT</acronym> یک پروژه بزرگ است و <code class="command">apt-get'
  "</code> نخستین رابط آن است.",
  ENGLISH[1],  # not translated yet: the package falls back to English
  'این را اجرا کنید: <pre class="screen">apt update</pre> و صبر کنید.',
]


@pytest.fixture
def handbook(tmp_path):
  for locale, paragraphs in (("en-US", ENGLISH), ("fa-IR", PERSIAN)):
    directory = os.path.join(tmp_path, debian.HANDBOOK_DIR, locale)
    _write(os.path.join(directory, "sect.apt-get.html"), _page(paragraphs))
    _write(os.path.join(directory, "index.html"), _page([f"{locale} preface."]))
  return str(tmp_path)


def _dictd(root, name: str, entries: list[tuple[list[str], bytes]]):
  """A dictd database: `name.dict.dz` (gzip; dictzip's random-access table is optional for a
  reader that inflates it whole) and `name.index`, `headword TAB offset TAB length` with the
  numbers in dictd's base 64, one line per headword, sorted."""
  digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

  def b64(value: int) -> str:
    out = digits[value % 64]
    while value >= 64:
      value //= 64
      out = digits[value % 64] + out
    return out

  header = b"00-database-short\n     A test database\n"
  body, lines = header, [f"00databaseshort\t{b64(0)}\t{b64(len(header))}"]
  for headwords, text in entries:
    for headword in headwords:
      lines.append(f"{headword}\t{b64(len(body))}\t{b64(len(text))}")
    body += text
  _write(os.path.join(root, debian.DICTD_DIR, f"{name}.dict.dz"), gzip.compress(body))
  _write(os.path.join(root, debian.DICTD_DIR, f"{name}.index"), "\n".join(sorted(lines)) + "\n")


ELEMENT_ENTRIES = [
  (["aluminium"], b"aluminium\nSame as {aluminum}, chiefly British in usage.\n\n"),
  (
    ["darmstadtium"],
    b"darmstadtium\nSymbol: Ds\nAtomic number: 110\nAtmic weight: 281\nHeavy.\n\n",
  ),
  (["helium"], b"helium\nSymbol: He\nAtomic number: 2\nAtomic weight: 4.0026\nInert gas.\n\n"),
  (["hydrogen"], b"hydrogen\nSymbol: H\nAtomic number: 1\nAtomic weight: 1.0079\nLightest.\n\n"),
  (["gold"], b"gold\nSymbol: Au\nAtomic number: 79\nAtomic weight: 196.96655\nNoble.\n\n"),
  (["iron"], b"iron\nSymbol: Fe\nAtomic number: 26\nAtomic weight: 55.847\nMetal.\n\n"),
  (["oxygen"], b"oxygen\nSymbol: O\nAtomic number: 8\nAtomic weight: 15.9994\nGas.\n\n"),
  (["sodium"], b"sodium\nSymbol: Na\nAtomic number: 11\nAtomic weight: 22.9898\nSoft.\n\n"),
  (
    ["roentgenium"],
    "roentgenium\nSymbol: Rg\nAtomic number: 111\nR\u00f6ntgen.\n".encode("latin-1"),
  ),
  (["unnildecium"], b"unnildecium\nSymbol: Unn\nAtomic number: 110\nPlaceholder name.\n\n"),
  (["unnilhexium"], b"unnilhexium\nSymbol:\nAtomic number: 106\nAtomic weight: (263)\n\n"),
]

FOLDOC_ENTRIES = [
  (
    ["hash coding", "hash table"],
    b"hash coding\nhash table\n\n   <programming, algorithm> A scheme for providing rapid\n"
    b"   access to data items which are distinguished by some\n   {key}.\n\n"
    b"   See also: {btree}, {checksum}.\n\n   (1997-08-03)\n\n",
  ),
  (
    ["NOR"],
    b"NOR\n\n   Not OR.\n\n   Its truth table is:\n\n    A | B | A NOR B\n    F | F | T\n\n"
    b"   {Usenet} newsgroup: {news:comp.logic}.\n\n   (1995-02-15)\n\n",
  ),
  (["wolfram"], b"wolfram\n\n   (http://example.org/)\n\n   (2000-01-01)\n\n"),
]


@pytest.fixture
def dictionaries(tmp_path):
  _dictd(tmp_path, "elements", ELEMENT_ENTRIES)
  _dictd(tmp_path, "foldoc", FOLDOC_ENTRIES)
  return str(tmp_path)


@pytest.fixture
def fortune_root(tmp_path):
  directory = os.path.join(tmp_path, debian.FORTUNES_DIR, "ga")
  _write(
    os.path.join(directory, "proverbs"),
    "%\nIs fearr rith maith.\n%\nTús maith\nleath na hoibre.\n%\n",
  )
  os.symlink("proverbs", os.path.join(directory, "proverbs.u8"))  # as fortunes-ga ships it
  _write(os.path.join(directory, "proverbs.dat"), b"\x00\x00\x00\x02binary index")
  _write(os.path.join(directory, "empty.u8"), "")
  return str(tmp_path)


# ----- readers ----------------------------------------------------------------------------------


def test_doc_examples():
  result = doctest.testmod(debian)
  assert result.attempted > 0 and result.failed == 0


def test_ztext_reader_and_osis_text(bible):
  entries = list(
    debian.ztext_entries(os.path.join(bible, "usr/share/sword/modules/texts/ztext/engWEB2015eb"))
  )
  assert len(entries) == 9 + 4 and entries[0] == "" and entries[4] == GENESIS_1[0]
  assert debian.bible_chapters(bible) == [
    [
      "In the beginning, God created the heavens and the earth.",
      "God said, “Let there be light,” and there was light.",
    ],
    ["The heavens, the earth, and all their vast array were finished."],
    ["The book of the genealogy of Jesus Christ."],
  ]


def test_bible_is_a_dataset(bible, tmp_path):
  source = builders.data_source(
    "debian/bible_web",
    "train",
    tmp_path / "data",
    root=bible,
    passage_chars=60,
    validation_fraction=0.0,
  )
  texts = [builders.decode_text(r["text"]) for r in source]
  # Verses of a chapter are joined until a passage reaches 60 characters; chapters never mix.
  assert texts == [
    "In the beginning, God created the heavens and the earth. God said, “Let there be light,” "
    "and there was light.",
    "The heavens, the earth, and all their vast array were finished.",
    "The book of the genealogy of Jesus Christ.",
  ]
  assert all(r["prompt"] == b"" for r in source)


def test_handbook_keeps_translated_paragraphs(handbook, tmp_path):
  pages = debian.handbook_pages(handbook, "en-US")
  assert pages["sect.apt-get.html"] == [
    "APT is a vast project & its apt-get is the first front end.",
    "Numerous other interfaces then appeared. Note this.",
    "Run this: and wait.",  # a code block is not prose
  ]
  persian = debian.handbook_documents(handbook, "fa")
  assert persian == [
    ["fa-IR preface."],
    ["APT یک پروژه بزرگ است و apt-get نخستین رابط آن است.", "این را اجرا کنید: و صبر کنید."],
  ]
  source = builders.data_source(
    "debian/handbook_fa", "train", tmp_path / "data", root=handbook, validation_fraction=0.0
  )
  assert [builders.decode_text(r["text"]) for r in source] == [
    "fa-IR preface.",
    "APT یک پروژه بزرگ است و apt-get نخستین رابط آن است.\nاین را اجرا کنید: و صبر کنید.",
  ]


def test_fortunes(fortune_root):
  assert debian.fortune_files(fortune_root, "ga") == [
    os.path.realpath(os.path.join(fortune_root, debian.FORTUNES_DIR, "ga", "proverbs"))
  ]
  assert debian.fortunes(fortune_root, "ga") == [
    "Is fearr rith maith.",
    "Tús maith\nleath na hoibre.",
  ]


def test_passages_split_long_units_at_sentences():
  long = "First sentence here. Second one follows. Third closes it."
  assert debian.passages([long], passage_chars=12) == [
    "First sentence here.",
    "Second one follows.",
    "Third closes it.",
  ]
  assert debian.passages(["a", "", "b"], passage_chars=100, separator="\n") == ["a\nb"]
  with pytest.raises(ValueError, match="positive"):
    debian.passages(["a"], passage_chars=0)


def test_elements_and_probes(dictionaries, tmp_path):
  elements = debian.elements(dictionaries)
  assert [(e["number"], e["name"], e["symbol"]) for e in elements] == [
    ("1", "hydrogen", "H"),
    ("2", "helium", "He"),
    ("8", "oxygen", "O"),
    ("11", "sodium", "Na"),
    ("26", "iron", "Fe"),
    ("79", "gold", "Au"),
    ("106", "unnilhexium", ""),  # the entry leaves the symbol blank
    ("110", "darmstadtium", "Ds"),  # first of the two entries for 110, in index order
    ("111", "roentgenium", "Rg"),  # a Latin-1 entry
  ]
  found = probes.element_probes(elements)
  shots = "The chemical symbol of oxygen is O. The chemical symbol of sodium is Na. "
  shots += "The chemical symbol of gold is Au. "
  iron = {"prompt": shots + "The chemical symbol of iron is", "answer": " Fe", "kind": "symbol"}
  assert iron in found
  assert {"answer": " 26", "kind": "number"}.items() <= found[found.index(iron) + 1].items()
  assert found[found.index(iron) + 2]["prompt"].endswith(
    "The chemical element with the symbol Fe is"
  )
  # The shot elements are not asked about; unnilhexium, without a symbol, only by number.
  assert len(found) == 3 * 5 + 1
  bare = probes.element_probes(elements, kinds=("symbol",), shots=())
  assert bare[0] == {
    "prompt": "The chemical symbol of hydrogen is",
    "answer": " H",
    "kind": "symbol",
  }
  with pytest.raises(ValueError, match="unknown probe kinds"):
    probes.element_probes(elements, kinds=("colour",))
  with pytest.raises(ValueError, match="shots="):
    probes.element_probes(elements[:2])
  source = builders.data_source("debian/elements", "facts", tmp_path / "data", root=dictionaries)
  assert [builders.decode_text(r["answer"]) for r in source][:3] == [" H", " 1", " hydrogen"]


def test_foldoc_instructions(dictionaries, tmp_path):
  definitions = debian.foldoc_definitions(dictionaries)
  assert definitions == [  # in the index's order, where capitals sort first
    {"term": "NOR", "categories": "", "definition": "Not OR.\nIts truth table is:"},
    {
      "term": "hash table",
      "categories": "programming, algorithm",
      "definition": "A scheme for providing rapid access to data items which are distinguished "
      "by some key.",
    },
  ]
  paths = debian.write_instructions(tmp_path / "sft", root=dictionaries, validation_fraction=0.5)
  records = [r for split in ("train", "validation") for r in sft.read_sft(paths[split])]
  assert sorted(r["prompt"] for r in records) == [
    'What is "NOR" in computing?',
    'What is "hash table" in computing?',
  ]
  before = os.stat(paths["train"]).st_mtime_ns
  assert (
    debian.write_instructions(tmp_path / "sft", root=dictionaries, validation_fraction=0.5) == paths
  )
  assert os.stat(paths["train"]).st_mtime_ns == before  # unchanged content is not rewritten
  # The TFDS config `debian/foldoc` holds the same records, read as instruction data.
  for split in ("train", "validation"):
    source = builders.data_source(
      "debian/foldoc", split, tmp_path / "data", root=dictionaries, validation_fraction=0.5
    )
    assert builders.instruction_records(source) == sft.read_sft(paths[split])
  elements = builders.data_source("debian/elements", "facts", tmp_path / "data", root=dictionaries)
  assert builders.instruction_records(elements) is None  # probes are not instruction data


# ----- names, options, errors -------------------------------------------------------------------


def test_registered_with_tfds_for_config_specs(bible, tmp_path):
  assert tfds.builder_cls("debian") is debian.Debian
  assert builders.options_key("debian/bible_web") == "debian_bible_web"
  built = builders.builder("debian/bible_web", tmp_path, root=bible)
  assert built.builder_config.name.startswith("bible_web-")
  other = builders.builder("debian/bible_web", tmp_path, root=bible, passage_chars=100)
  assert other.builder_config.name != built.builder_config.name  # options have their own build
  with pytest.raises(ValueError, match="unknown options"):
    builders.builder("debian/bible_web", tmp_path, root=bible, chars=100)
  with pytest.raises(ValueError, match="no config 'bible_kjv'|debian configs"):
    builders.builder("debian/bible_kjv", tmp_path)


@pytest.mark.parametrize(
  ("name", "package"),
  [
    ("bible_web", "sword-text-web"),
    ("handbook_fa", "debian-handbook"),
    ("fortunes_ga", "fortunes-ga"),
    ("elements", "dict-elements"),
  ],
)
def test_missing_package_names_the_install_line(tmp_path, name, package):
  with pytest.raises(FileNotFoundError, match=f"apt-get install -y {package}"):
    debian.debian_config(name, root=str(tmp_path))


# ----- known probes -----------------------------------------------------------------------------


class _Successor(nnx.Module):
  """A language model that always predicts the next byte value: after "ab" it writes "c"."""

  def __init__(self):
    self.scale = nnx.Param(np.float32(10.0))

  def __call__(self, tokens):
    return nnx.one_hot((tokens + 1) % 259, 259) * self.scale


def test_recalled_and_known_probes(dictionaries, tmp_path):
  tokenizer = data.ByteTokenizer()
  records = [
    {"prompt": "ab", "answer": "cd"},  # written, but then "e" continues the word: not recalled
    {"prompt": "+,", "answer": "-."},  # each byte follows the one before, then "/": recalled
    {"prompt": "ab", "answer": "d"},
    {"prompt": "xyz", "answer": "{"},
    {"prompt": "x", "answer": "yz{"},
    {"prompt": "x", "answer": "yq"},
  ]
  model = _Successor()
  assert probes.recalled(records, model, tokenizer, batch_size=2).tolist() == [
    False,
    True,
    False,
    True,
    True,
    False,
  ]
  path = probes.known_probes(records, model, tokenizer, tmp_path / "probes" / "set.jsonl")
  assert probes.read_probes(path) == [records[1], records[3], records[4]]
  header = json.loads(open(path).readline())
  assert header["num_probes"] == 6 and header["num_known"] == 3
  before = os.stat(path).st_mtime_ns
  assert probes.known_probes(records, model, tokenizer, path) == path
  assert os.stat(path).st_mtime_ns == before  # same probes and model: reused
  model.scale[...] = np.float32(-10.0)  # other weights: the set is recomputed
  probes.known_probes(records, model, tokenizer, path)
  assert json.loads(open(path).readline())["num_known"] == 0


def test_known_split_of_elements(dictionaries, tmp_path):
  everything = probes.element_probes(debian.elements(dictionaries))
  known = tmp_path / "known.jsonl"
  known.write_text(
    json.dumps({"source": {}}) + "\n" + "".join(json.dumps(p) + "\n" for p in everything[2:4])
  )
  options = {"root": dictionaries, "known": str(known)}
  source = builders.data_source("debian/elements", "known", tmp_path / "data", **options)
  assert [builders.decode_text(r["prompt"]) for r in source] == [
    p["prompt"] for p in everything[2:4]
  ]
  known.write_text(json.dumps({"prompt": "The chemical symbol of iron is", "answer": " Ir"}) + "\n")
  with pytest.raises(ValueError, match="recompute the file"):
    builders.data_source("debian/elements", "known", tmp_path / "data2", **options)
  with pytest.raises(ValueError, match="for debian/elements only"):
    debian.debian_config("bible_web", known=str(known))


# ----- the real packages (CI installs them: REAL_PACKAGES) --------------------------------------


def test_real_packages():
  for package, path in (
    ("sword-text-web", "/" + debian.SWORD_WEB_CONF),
    ("debian-handbook", f"/{debian.HANDBOOK_DIR}/en-US"),
    ("dict-elements", f"/{debian.DICTD_DIR}/elements.index"),
    ("dict-foldoc", f"/{debian.DICTD_DIR}/foldoc.index"),
    ("fortunes-ga", f"/{debian.FORTUNES_DIR}/ga"),
  ):
    _installed(package, path)
  module = "/usr/share/sword/modules/texts/ztext/engWEB2015eb"
  first = [debian.osis_text(e) for e in itertools.islice(debian.ztext_entries(module), 12)]
  assert "In the beginning, God created the heavens and the earth." in first
  elements = {e["name"]: e for e in debian.elements()}
  assert len(elements) == 118 and (elements["iron"]["symbol"], elements["iron"]["number"]) == (
    "Fe",
    "26",
  )
  pages = debian.handbook_pages("/", "en-US")
  assert len(pages) > 100 and sum(map(len, pages.values())) > 2500
  assert len(debian.foldoc_definitions()) > 10000
  assert len(debian.fortunes("/", "ga")) > 100
