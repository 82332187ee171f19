"""TFDS builders written as array_record and read back as random-access sources.

Dataset names:

- `"embedded/biographies"`, `"embedded/synthetic_language"`: generated locally by
  `finch_jax.data.synthetic` (`EmbeddedCorpus`); nothing is downloaded.
- `"local_text:<path>"`: a directory of UTF-8 `.txt` files, one file, or a glob (`LocalText`).
- `"debian/<config>"`: text and knowledge probes read from installed Debian packages
  (`finch_jax.data.debian`, a builder registered with TFDS, so the catalog path below builds it).
- Anything else is a TFDS catalog name such as `"lm1b"` or `"wikipedia/20230601.en"`,
  downloaded and prepared by TFDS on first use.

No TensorFlow is needed for the first two. TFDS imports TF lazily, only where a feature or
reader asks for it, and this path never asks: `Text` features are encoded with numpy, examples
are serialized with TFDS's own copy of the `tf.train.Example` protos
(`tensorflow_datasets.proto`), the array_record writer and reader are a C++ extension, and
`as_data_source` parses with `ExampleParserNp` (protobuf + numpy), giving `bytes` for text
features (`decode_text` turns a field into str). Catalog datasets need whatever their own
builders need (many image datasets import TensorFlow to decode).

Building happens once per name and options: a second `prepare` finds the finished directory
`data_dir/<builder>/<config>/<version>` and reuses it. `data_dir` may be a bucket
(`gs://BUCKET/...`): array_record reads from one, but writes only local files, so there a
dataset is built in a temporary local directory and its files uploaded (see `prepare`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

from finch_jax import files
from finch_jax.data import synthetic

FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD

EMBEDDED_PREFIX = "embedded/"
LOCAL_TEXT_PREFIX = "local_text:"
JSONL_PREFIX = "jsonl:"  # instruction data for supervised fine-tuning, `finch_jax.data.sft`
# Not a dataset: as replay data or an eval set, sequences the base model samples itself.
BASE_SAMPLES = "base_samples"

VALID_NAMES_HELP = (
  "valid dataset names are 'embedded/biographies', 'embedded/synthetic_language', "
  "'local_text:<directory, file or glob of UTF-8 .txt files>', 'jsonl:<file or glob of "
  "prompt/response or chat-messages JSONL>' (instruction data), 'debian/<config>' (text from "
  "installed Debian packages, finch_jax.data.debian.CONFIG_NAMES), or a TFDS catalog name "
  "(see tfds.list_builders())"
)

# The string features of every record this project builds, empty where unused.
FEATURE_NAMES = ("text", "prompt", "answer", "response")


def options_key(name: str) -> str:
  """The key of a dataset's builder options in `config.data.options`: its name with each run of
  characters other than letters and digits written as one '_' ("embedded/biographies" ->
  "embedded_biographies", "local_text:/data/de/*.u8" -> "local_text_data_de_u8")."""
  return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def decode_text(value: str | bytes) -> str:
  """A text field of a source record as str: TFDS sources give UTF-8 `bytes` without TF."""
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _digest(payload: Any) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class _PackagedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders here: tells TFDS where their code is.

  TFDS 4.9.10 locates a packaged builder's code through `importlib_resources`, a backport it
  imports lazily but does not install on Python >= 3.9, so `download_and_prepare` of any builder
  inside a package fails with ModuleNotFoundError. The path is known; give it directly.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


@dataclasses.dataclass
class EmbeddedConfig(tfds.core.BuilderConfig):
  """Which embedded corpus to generate, and the options passed to its generator.

  Attributes:
    corpus: `"biographies"` or `"synthetic_language"` (see `synthetic.embedded_corpus`).
    options: sorted `(name, value)` pairs for `synthetic.embedded_corpus`; empty for defaults.
  """

  corpus: str = "biographies"
  options: tuple[tuple[str, Any], ...] = ()


class EmbeddedCorpus(_PackagedBuilder):
  """The synthetic benchmarks of `finch_jax.data.synthetic`, as a TFDS dataset.

  Every example has four string features, empty where unused: `text` for text splits,
  `prompt` and `answer` for fact splits (`retain_facts`, `task_facts`), `prompt` and `response`
  for question/answer splits (`retain_qa`, `task_qa`: instruction data, see
  `instruction_records`). Examples keep the generator's order (shuffling belongs to the input
  pipeline), so `source[i]` is record i.

  Splits per config:
  - `biographies`: pretrain, finetune, retain_eval, task_eval, retain_facts, task_facts,
    retain_qa, task_qa.
  - `synthetic_language`: finetune, task_eval (the language), pretrain, retain_eval,
    retain_facts (identical to those of `biographies` built with the same options).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Biographies and synthetic language of finch_jax.data.synthetic.",
    "1.1.0": "Question/answer splits of the biographies (feature `response`).",
  }
  BUILDER_CONFIGS = [
    EmbeddedConfig(name=corpus, corpus=corpus, description=f"synthetic.embedded_corpus({corpus!r})")
    for corpus in synthetic.CORPORA
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({key: tfds.features.Text() for key in FEATURE_NAMES})
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=features,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    records = synthetic.embedded_corpus(config.corpus, **dict(config.options))
    return {split: self._generate_examples(rows) for split, rows in records.items()}

  def _generate_examples(self, rows: list[dict[str, str]]) -> Iterator[tuple[int, dict]]:
    for index, row in enumerate(rows):
      yield index, {key: row.get(key, "") for key in FEATURE_NAMES}


def embedded_config(corpus: str, **options: Any) -> EmbeddedConfig:
  """The config for `corpus` with generator `options`; non-default options get their own name.

  The name carries a digest of the options that differ from their defaults, so differently
  sized corpora live side by side in one data_dir, each built once, and spelling out a default
  reuses the default build.
  """
  if corpus not in synthetic.CORPORA:
    raise ValueError(f"unknown embedded corpus {corpus!r}; {VALID_NAMES_HELP}.")
  synthetic.check_options(corpus, options)  # Fail now, not halfway through a build.
  defaults = synthetic.corpus_options(corpus)
  options = {key: value for key, value in options.items() if value != defaults[key]}
  if not options:
    return next(c for c in EmbeddedCorpus.BUILDER_CONFIGS if c.name == corpus)
  items = tuple(sorted(options.items()))
  return EmbeddedConfig(
    name=f"{corpus}-{_digest(items)}",
    corpus=corpus,
    options=items,
    description=f"synthetic.embedded_corpus({corpus!r}, **{dict(items)!r})",
  )


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  """Where a user's text lives and how it is cut into examples.

  Attributes:
    path: absolute directory (all `*.txt` below it, recursively), file, or glob.
    unit: `"paragraph"` (blocks separated by blank lines), `"line"` (each non-empty line), or
      `"percent"` (records separated by lines holding only `%`, the format of fortune files).
    validation_fraction: share of examples sent to `validation`, chosen by a hash of the text.
  """

  path: str = ""
  unit: str = "paragraph"
  validation_fraction: float = 0.05


UNITS = ("paragraph", "line", "percent")
_SEPARATORS = {
  "paragraph": re.compile(r"\n[ \t]*\n"),
  "line": re.compile(r"\n"),
  "percent": re.compile(r"^%[ \t]*$", re.MULTILINE),
}


def local_text_files(path: str) -> list[Path]:
  """The files `local_text:<path>` reads, sorted: a directory's `*.txt`, one file, or a glob.

  Raises:
    FileNotFoundError: when nothing exists at `path`, naming the fix.
    ValueError: when `path` holds no text files.
  """
  if glob.has_magic(path):
    files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    where = f"the glob {path!r}"
  elif os.path.isdir(path):
    files = sorted(p for p in Path(path).rglob("*.txt") if p.is_file())
    where = f"the directory {path!r}"
  elif os.path.isfile(path):
    return [Path(path)]
  else:
    raise FileNotFoundError(
      f"local_text: {path!r} does not exist. Pass 'local_text:<directory>' with UTF-8 .txt files "
      "in it (searched recursively), one file, or a glob such as 'local_text:/data/**/*.md'."
    )
  if not files:
    raise ValueError(
      f"local_text: no files in {where}. Put UTF-8 .txt files there, or pass a glob that "
      "matches your files, e.g. 'local_text:/data/books/**/*.md'."
    )
  return files


def _read_units(file: Path, unit: str) -> list[str]:
  try:
    text = file.read_text(encoding="utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(
      f"local_text: {file} is not valid UTF-8 ({error.reason} at byte {error.start}); "
      "convert it, e.g. `iconv -f latin1 -t utf-8`."
    ) from None
  text = text.replace("\r\n", "\n")
  pieces = _SEPARATORS[unit].split(text)
  return [piece.strip() for piece in pieces if piece.strip()]


def _hash_fraction(text: str) -> float:
  """A number in [0, 1) fixed by the text alone, so a split never depends on file order."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_local_text(texts: list[str], validation_fraction: float) -> dict[str, list[str]]:
  """`texts` split into `train` and `validation` by a hash of each text.

  Equal texts land in the same split, so duplicates cannot leak from train into validation.
  With `validation_fraction > 0` and at least two distinct texts neither split is empty: if the
  hash sends none to one side, the text with the smallest (largest) hash moves over.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  fractions = [_hash_fraction(t) for t in texts]
  is_validation = [f < validation_fraction for f in fractions]
  if validation_fraction > 0 and len(set(texts)) >= 2:
    if not any(is_validation):
      smallest = min(fractions)
      is_validation = [f == smallest for f in fractions]
    elif all(is_validation):
      largest = max(fractions)
      is_validation = [f != largest for f in fractions]
  splits = {"train": [t for t, v in zip(texts, is_validation, strict=True) if not v]}
  if validation_fraction > 0:
    splits["validation"] = [t for t, v in zip(texts, is_validation, strict=True) if v]
  return splits


class LocalText(_PackagedBuilder):
  """A user's UTF-8 text files as a TFDS dataset with one `text` feature.

  Built with a `LocalTextConfig` (use `prepare("local_text:<path>", data_dir)`): each paragraph
  (or line, `unit="line"`) is one example; `train`/`validation` are chosen by a hash of the text
  (`split_local_text`); examples keep file order, files sorted by path. The config name holds a
  fingerprint of the path, options and each file's name, size and modification time, so edited
  files are rebuilt into a new directory rather than silently reusing stale data.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Paragraph or line examples, hash-based validation split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The files are local.
    config = self.builder_config
    if not isinstance(config, LocalTextConfig):
      raise ValueError("LocalText needs a path: use prepare('local_text:<path>', data_dir).")
    texts = [t for f in local_text_files(config.path) for t in _read_units(f, config.unit)]
    if not texts:
      raise ValueError(f"local_text: the files at {config.path!r} contain no text.")
    splits = split_local_text(texts, config.validation_fraction)
    return {split: self._generate_examples(rows) for split, rows in splits.items()}

  def _generate_examples(self, texts: list[str]) -> Iterator[tuple[int, dict]]:
    for index, text in enumerate(texts):
      yield index, {"text": text}


def local_text_config(
  path: str, *, unit: str = "paragraph", validation_fraction: float = 0.05
) -> LocalTextConfig:
  """The config for the text at `path`, named by a fingerprint of path, options and files."""
  if unit not in UNITS:
    raise ValueError(f"local_text: unit must be one of {UNITS}, got {unit!r}.")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  if not path:
    raise ValueError(f"local_text needs a path after the colon; {VALID_NAMES_HELP}.")
  path = os.path.abspath(os.path.expanduser(path))
  files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in local_text_files(path)]
  fingerprint = _digest([path, unit, validation_fraction, files])
  return LocalTextConfig(
    name=f"text-{fingerprint}",
    path=path,
    unit=unit,
    validation_fraction=validation_fraction,
    description=f"{unit}s of {path}",
  )


def builder(name: str, data_dir: str | os.PathLike, **options: Any) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name` (see the module docstring), writing array_record under data_dir.

  Options: for embedded corpora, sizes and seed of `synthetic.embedded_corpus`; for local text,
  `unit` and `validation_fraction`; for catalog names, `tfds.builder` keyword arguments.

  Raises:
    ValueError: for an unknown name, listing the valid forms.
  """
  data_dir = os.fspath(data_dir)
  if name.startswith(EMBEDDED_PREFIX):
    config = embedded_config(name.removeprefix(EMBEDDED_PREFIX), **options)
    return EmbeddedCorpus(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  if name.startswith(LOCAL_TEXT_PREFIX):
    config = local_text_config(name.removeprefix(LOCAL_TEXT_PREFIX), **options)
    return LocalText(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
  check_catalog_name(name)
  try:
    return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT, **options)
  except ValueError as error:
    raise ValueError(f"cannot use dataset {name!r}: {error}; {VALID_NAMES_HELP}.") from None


def prepare(name: str, data_dir: str | os.PathLike, **options: Any) -> tfds.core.DatasetBuilder:
  """Builds `name` into `data_dir` unless it is already there, and returns its builder.

  Safe when several processes share `data_dir`: TFDS writes into a temporary directory and
  renames it; a process that loses that race finds the winner's copy and uses it. In a bucket
  see `_prepare_in_bucket`.
  """
  if files.is_remote(data_dir):
    return _prepare_in_bucket(name, data_dir, **options)
  dataset = builder(name, data_dir, **options)
  try:  # Returns at once when the data is already there.
    dataset.download_and_prepare(file_format=FILE_FORMAT)
  except OSError:
    # Another process renamed its finished copy into place first.
    dataset = builder(name, data_dir, **options)
    if not dataset.is_prepared():
      raise
  return dataset


def _prepare_in_bucket(
  name: str, data_dir: str | os.PathLike, **options: Any
) -> tfds.core.DatasetBuilder:
  """`prepare` for a `data_dir` in a bucket (`gs://...`).

  array_record's writer opens local files only (its reader also reads `gs://`), so the dataset
  is built in a temporary local directory, deleted afterwards, and its files are uploaded into
  the version directory. TFDS takes a version directory as complete once it holds
  `dataset_info.json` and `features.json`, so the JSON files go last: an upload cut short is
  not mistaken for a dataset, and the next start builds and uploads it again. Several processes
  may do this at once; each object is replaced whole, with the same content.
  """
  dataset = builder(name, data_dir, **options)
  if dataset.is_prepared():
    return dataset
  with tempfile.TemporaryDirectory(prefix="finch_jax_data_") as local:
    built = prepare(name, local, **options)
    source, target = epath.Path(built.data_path), epath.Path(dataset.data_path)
    # A version directory is flat: data shards and a few JSON files.
    files = sorted(source.iterdir(), key=lambda f: (f.suffix == ".json", f.name))
    for file in files:
      file.copy(target / file.name, overwrite=True)
  return builder(name, data_dir, **options)


def instruction_records(source: Sequence[Mapping[str, Any]]) -> list[dict[str, str]] | None:
  """The records of a split of instruction data as `{"prompt", "response"}` dicts of str (the
  input of `finch_jax.data.sft`), or None when the split is text or facts.

  A split is instruction data when its records carry a non-empty `response` (the embedded
  question/answer splits, Debian's `foldoc`); its first record decides.
  """
  if not len(source) or not decode_text(source[0].get("response", b"")):
    return None
  return [
    {"prompt": decode_text(r["prompt"]), "response": decode_text(r["response"])} for r in source
  ]


def data_source(
  name: str, split: str, data_dir: str | os.PathLike, **options: Any
) -> Sequence[dict[str, Any]]:
  """A random-access source (`len`, `source[i]`) over `split` of `name`, built if needed.

  `split` may use TFDS slicing, e.g. `"train[:10%]"`. Records are dicts of numpy values; text
  features are UTF-8 `bytes` (see `decode_text`). The source is TFDS's `ArrayRecordDataSource`.
  """
  dataset = prepare(name, data_dir, **options)
  if problem := split_problem(name, split, {s: set(FEATURE_NAMES) for s in dataset.info.splits}):
    raise ValueError(problem)
  return dataset.as_data_source(split=split)


# What each kind of set reads: a loss set or training data reads text, or instruction data
# (prompt/response records); a fact set reads prompt/answer records.
_RECORDS = {
  "text": ({"text"}, {"prompt", "response"}),
  "facts": ({"prompt", "answer"},),
}
_READS = {
  "text": "text sets read text or prompt/response records",
  "facts": "fact sets read prompt/answer records",
}


def split_problem(
  name: str, split: str, splits: Mapping[str, set[str]], kind: str | None = None
) -> str | None:
  """Why `split` (TFDS slicing allowed: 'train[:10%]' reads 'train') of dataset `name`, whose
  `splits` are {split: record fields with text} (`dataset_splits`), cannot be read as a set of
  `kind` ('text' or 'facts'; None: any), or None when it can."""
  base_split = split.split("[")[0]
  if base_split not in splits:
    return f"dataset {name!r} has no split {base_split!r}; it has {sorted(splits)}."
  if kind is None or any(needed <= splits[base_split] for needed in _RECORDS[kind]):
    return None
  usable = sorted(s for s, f in splits.items() if any(needed <= f for needed in _RECORDS[kind]))
  return f"{_READS[kind]}, and split {base_split!r} of {name!r} has none; use one of {usable}."


def dataset_splits(name: str, **options: Any) -> dict[str, set[str]] | None:
  """{split: record fields with text} of dataset `name` with builder `options`, found without
  building or downloading it; None for a TFDS catalog dataset, whose splits only a download
  would tell.

  Raises:
    ValueError, FileNotFoundError: as `builder` would (an unknown name, a catalog config that
      does not exist, bad options, missing local files), each naming the fix. Not cached: local
      files may appear or go between two calls.
  """
  if name.startswith(EMBEDDED_PREFIX):
    corpus = name.removeprefix(EMBEDDED_PREFIX)
    embedded_config(corpus, **options)  # unknown corpus or options
    return _embedded_splits(corpus)
  if name.startswith(LOCAL_TEXT_PREFIX):
    config = local_text_config(name.removeprefix(LOCAL_TEXT_PREFIX), **options)
    splits = ["train"] + (["validation"] if config.validation_fraction > 0 else [])
    return {split: {"text"} for split in splits}
  check_catalog_name(name)
  return None


@functools.lru_cache(maxsize=8)
def _embedded_splits(corpus: str) -> dict[str, set[str]]:
  """The splits of an embedded corpus and their fields, from a one-person build in memory."""
  accepted = synthetic.corpus_options(corpus)
  tiny = {
    key: 1
    for key in ("num_base_people", "num_new_people", "num_finetune", "num_task_eval")
    if key in accepted
  }
  records = synthetic.embedded_corpus(corpus, **tiny)
  return {split: {k for k, v in rows[0].items() if v} for split, rows in records.items() if rows}


def check_catalog_name(name: str) -> None:
  """Raises ValueError, naming the fix, unless `name` is a registered TFDS builder (and one of
  its configs, when it names one); reads no data and asks no server."""
  try:
    dataset, kwargs = naming.parse_builder_name_kwargs(name)
    cls = tfds.builder_cls(str(dataset))
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(
      f"unknown dataset {name!r} ({str(error).splitlines()[0]}); {VALID_NAMES_HELP}."
    ) from None
  except Exception as error:  # TFDS raises several kinds for a malformed or remote name
    raise ValueError(
      f"cannot use dataset {name!r} ({' '.join(str(error).split())}); {VALID_NAMES_HELP}."
    ) from None
  config = kwargs.get("config")
  known = [c.name for c in (getattr(cls, "BUILDER_CONFIGS", None) or [])]
  if config and config not in known:
    close = difflib.get_close_matches(config, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = (
      f"its configs: {known[:20]}{' ...' if len(known) > 20 else ''}"
      if known
      else f"it has no configs: name it {str(dataset)!r}"
    )
    raise ValueError(f"TFDS dataset {dataset!s} has no config {config!r}{hint}; {listed}.")
