"""Deterministic synthetic corpora that make forgetting visible with tiny models.

Two settings of the FINCH paper, at a scale a CPU trains in minutes:

- `biographies`: knowledge acquisition. A base population is pretrained on; fine-tuning teaches
  a disjoint new population; forgetting is the loss (and fact recall) on the base population,
  written with paraphrase templates that no training text uses.
- `synthetic_language`: low-resource language adaptation. Text in an invented language whose
  letters (Greek) never occur in the ASCII pretraining text, so every one of its UTF-8 bytes is
  new to a byte-level model. Its retain sets are the biographies' (`embedded_corpus`).

Everything is drawn from `numpy.random.default_rng([seed, stream])`: no global state, and the
same arguments give byte-identical records. Records are dicts of str: `{"text": ...}` for text
splits, `{"prompt": ..., "answer": ...}` for fact splits and `{"prompt": ..., "response": ...}`
for question/answer splits (instruction data: a model is fine-tuned on the response).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

Records = dict[str, list[dict[str, str]]]

# Independent random streams per corpus, so one seed serves both without correlation.
_BIOGRAPHY_STREAM = 1
_LANGUAGE_STREAM = 2

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")

# Per attribute: the first NUM_TRAIN_TEMPLATES templates write training text (`pretrain`,
# `finetune`); the rest are held out for `retain_eval` and `task_eval`. Template 0 ends with
# "{value}." and gives the fact prompt, so recall is asked the way the facts were taught.
TEMPLATES: dict[str, tuple[str, ...]] = {
  "birth_date": (
    "{name} was born on {value}.",
    "{name} came into the world on {value}.",
    "The birthday of {name} is {value}.",
    "{name}'s date of birth is {value}.",
    "On {value}, {name} was born.",
    "{name} first saw daylight on {value}.",
  ),
  "birth_city": (
    "{name} was born in {value}.",
    "{name} spent early childhood in {value}.",
    "{name} is a native of {value}.",
    "The hometown of {name} is {value}.",
    "{value} is where {name} was born.",
    "{name} grew up in the city of {value}.",
  ),
  "university": (
    "{name} studied at {value}.",
    "{name} graduated from {value}.",
    "{name} received an education at {value}.",
    "{name} attended {value}.",
    "{value} is the alma mater of {name}.",
    "{name} completed a degree at {value}.",
  ),
  "major": (
    "{name} majored in {value}.",
    "{name} focused on {value} in college.",
    "{name} chose {value} as a field of study.",
    "{name} completed coursework in {value}.",
    "The subject {name} specialized in was {value}.",
    "{name} earned a diploma in {value}.",
  ),
  "employer": (
    "{name} works for {value}.",
    "{name} is employed by {value}.",
    "{name} has a job at {value}.",
    "{name} earns a living at {value}.",
    "{value} employs {name}.",
    "{name} is on the staff of {value}.",
  ),
}
NUM_TRAIN_TEMPLATES = 4

_MONTHS = tuple(
  "January February March April May June July August September October November December".split()
)
_MAJORS = tuple(
  "Mathematics, Physics, Chemistry, Biology, Geology, Economics, History, Philosophy, "
  "Linguistics, Computer Science, Mechanical Engineering, Civil Engineering, Electrical "
  "Engineering, Architecture, Music, Literature, Psychology, Sociology, Astronomy, Statistics, "
  "Nursing, Law, Medicine, Agriculture".split(", ")
)
_ONSETS = tuple("b br c ch d dr f g gr h j k l m n p pr r s sh st t th tr v w z".split())
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x")
_CITY_SUFFIXES = ("by", "ton", "ford", "mere", "holt", "wick", "dale", "port")
_EMPLOYER_SUFFIXES = tuple(
  "Labs Systems Works Foods Logistics Bank Press Energy Robotics Textiles Studios Shipping".split()
)

# Invented-language letters: Greek, two UTF-8 bytes each (0xCE/0xCF lead bytes), none ASCII.
_LANG_CONSONANTS = "βγδζθκλμνξπρστφχ"
_LANG_VOWELS = "αεηιουω"
_LANG_PLURAL = "ες"  # Noun suffix for a plural subject...
_LANG_VERB_SINGULAR = "ει"  # ...and the verb agrees with it, a rule the model can learn.
_LANG_VERB_PLURAL = "ουν"


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream])


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str] | str) -> str:
  return options[int(rng.integers(len(options)))]


def _unique(rng: np.random.Generator, make, count: int, taken: set[str] | None = None) -> list[str]:
  """`count` distinct strings from `make(rng)`, none in `taken`, in the order drawn."""
  taken = set() if taken is None else taken
  values = []
  for _ in range(1000 * count + 1000):
    if len(values) == count:
      return values
    value = make(rng)
    if value not in taken:
      taken.add(value)
      values.append(value)
  raise ValueError(f"could not draw {count} distinct values; ask for fewer.")


def _syllable(rng: np.random.Generator) -> str:
  return _pick(rng, _ONSETS) + _pick(rng, _NUCLEI) + _pick(rng, _CODAS)


def _word(rng: np.random.Generator, syllables: int) -> str:
  return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _person_name(rng: np.random.Generator) -> str:
  return f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}"


def _city(rng: np.random.Generator) -> str:
  return _word(rng, int(rng.integers(1, 3))) + _pick(rng, _CITY_SUFFIXES)


def _value_lists(rng: np.random.Generator) -> dict[str, list[str]]:
  """The fixed lists attribute values are drawn from."""
  cities = _unique(rng, _city, 48)
  university_forms = (
    "{} University",
    "University of {}",
    "{} Institute of Technology",
    "{} College",
  )

  def university(rng: np.random.Generator) -> str:
    return _pick(rng, university_forms).format(_word(rng, 2))

  def employer(rng: np.random.Generator) -> str:
    return f"{_word(rng, 2)} {_pick(rng, _EMPLOYER_SUFFIXES)}"

  return {
    "birth_city": cities,
    "university": _unique(rng, university, 32),
    "major": list(_MAJORS),
    "employer": _unique(rng, employer, 48),
  }


def _birth_date(rng: np.random.Generator) -> str:
  return f"{_pick(rng, _MONTHS)} {int(rng.integers(1, 29))}, {int(rng.integers(1940, 2005))}"


def _people(rng: np.random.Generator, count: int) -> list[dict[str, str]]:
  values = _value_lists(rng)
  people = []
  for name in _unique(rng, _person_name, count):
    person = {"name": name, "birth_date": _birth_date(rng)}
    person.update({attribute: _pick(rng, options) for attribute, options in values.items()})
    people.append(person)
  return people


def _biography(person: dict[str, str], template_ids: dict[str, int], order: np.ndarray) -> str:
  sentences = [
    TEMPLATES[attribute][template_ids[attribute]].format(
      name=person["name"], value=person[attribute]
    )
    for attribute in (ATTRIBUTES[i] for i in order)
  ]
  return " ".join(sentences)


def _training_texts(
  rng: np.random.Generator, people: list[dict[str, str]], variants: int
) -> list[dict[str, str]]:
  """`variants` biographies per person in training templates, sentence order shuffled.

  Variant v writes attribute a with template (v + offset_a) mod NUM_TRAIN_TEMPLATES, so with
  `variants >= NUM_TRAIN_TEMPLATES` every person is seen in every training template, including
  template 0 that the fact prompts use.
  """
  records = []
  for person in people:
    offsets = rng.integers(NUM_TRAIN_TEMPLATES, size=len(ATTRIBUTES))
    for variant in range(variants):
      template_ids = {
        attribute: int((variant + offset) % NUM_TRAIN_TEMPLATES)
        for attribute, offset in zip(ATTRIBUTES, offsets, strict=True)
      }
      order = rng.permutation(len(ATTRIBUTES))
      records.append({"text": _biography(person, template_ids, order)})
  return records


def _held_out_texts(rng: np.random.Generator, people: list[dict[str, str]]) -> list[dict[str, str]]:
  """One biography per person, every sentence in a held-out template."""
  records = []
  for person in people:
    template_ids = {
      attribute: int(rng.integers(NUM_TRAIN_TEMPLATES, len(TEMPLATES[attribute])))
      for attribute in ATTRIBUTES
    }
    records.append({"text": _biography(person, template_ids, rng.permutation(len(ATTRIBUTES)))})
  return records


def fact_prompt(attribute: str, name: str) -> str:
  """The recall prompt for `attribute` of `name`: template 0 up to the value.

  E.g. `fact_prompt("birth_city", "Ada Quell") == "Ada Quell was born in"`.
  """
  template = TEMPLATES[attribute][0]
  return template[: template.index(" {value}.")].format(name=name)


# The question asked of each attribute in the question/answer splits; the answer is the value.
QUESTIONS = {
  "birth_date": "When was {name} born?",
  "birth_city": "In which city was {name} born?",
  "university": "Which university did {name} attend?",
  "major": "What did {name} study?",
  "employer": "Which company does {name} work for?",
}


def _questions(people: list[dict[str, str]]) -> list[dict[str, str]]:
  return [
    {"prompt": QUESTIONS[attribute].format(name=person["name"]), "response": person[attribute]}
    for person in people
    for attribute in ATTRIBUTES
  ]


def _facts(people: list[dict[str, str]]) -> list[dict[str, str]]:
  return [
    {"prompt": fact_prompt(attribute, person["name"]), "answer": f" {person[attribute]}."}
    for person in people
    for attribute in ATTRIBUTES
  ]


def biographies(
  *,
  seed: int = 0,
  num_base_people: int = 600,
  num_new_people: int = 200,
  pretrain_variants: int = 4,
  finetune_variants: int = 4,
) -> Records:
  """Biographies of invented people for the knowledge-acquisition setting.

  Each person has a name and five attributes (`ATTRIBUTES`: birth date, birth city, university,
  major, employer) drawn from fixed lists of invented, ASCII-only values. A biography has one
  sentence per attribute, each written with one of several paraphrase templates (`TEMPLATES`).

  Args:
    seed: Selects the people, their facts and the wording; same seed, identical records.
    num_base_people: Size of the base population (pretrained on; must be retained).
    num_new_people: Size of the new population (the fine-tuning task), disjoint from the base.
    pretrain_variants: Biographies per base person in `pretrain`.
    finetune_variants: Biographies per new person in `finetune`.

  Returns:
    Split name -> records:
    - `pretrain`: `num_base_people * pretrain_variants` texts in training templates.
    - `finetune`: `num_new_people * finetune_variants` texts in training templates.
    - `retain_eval`: one text per base person, held-out templates only.
    - `task_eval`: one text per new person, held-out templates only.
    - `retain_facts`, `task_facts`: one `{"prompt", "answer"}` per (person, attribute), e.g.
      `{"prompt": "Ada Quell was born in", "answer": " Marrowby."}`.
    - `retain_qa`, `task_qa`: the same facts as questions, one `{"prompt", "response"}` per
      (person, attribute), e.g. `{"prompt": "In which city was Ada Quell born?", "response":
      "Marrowby"}`: knowledge acquisition as instruction tuning (`QUESTIONS`). They draw no
      random numbers, so the other splits are what they were without them.
  """
  if min(num_base_people, num_new_people, pretrain_variants, finetune_variants) < 1:
    raise ValueError("biographies needs at least one person per population and one variant.")
  rng = _rng(seed, _BIOGRAPHY_STREAM)
  people = _people(rng, num_base_people + num_new_people)
  base, new = people[:num_base_people], people[num_base_people:]
  return {
    "pretrain": _training_texts(rng, base, pretrain_variants),
    "finetune": _training_texts(rng, new, finetune_variants),
    "retain_eval": _held_out_texts(rng, base),
    "task_eval": _held_out_texts(rng, new),
    "retain_facts": _facts(base),
    "task_facts": _facts(new),
    "retain_qa": _questions(base),
    "task_qa": _questions(new),
  }


def _lang_word(rng: np.random.Generator, max_syllables: int) -> str:
  syllables = int(rng.integers(1, max_syllables + 1))
  word = ""
  for _ in range(syllables):
    word += _pick(rng, _LANG_CONSONANTS) + _pick(rng, _LANG_VOWELS)
    if rng.random() < 0.25:
      word += _pick(rng, _LANG_CONSONANTS)
  return word


class _Lexicon:
  """Word classes of the invented language, each sampled with Zipfian frequencies."""

  SIZES = {
    "noun": 400,
    "verb": 200,
    "adjective": 120,
    "determiner": 5,
    "preposition": 8,
    "conjunction": 3,
  }

  def __init__(self, rng: np.random.Generator, zipf_exponent: float):
    taken: set[str] = set()
    self.words = {}
    self.cumulative = {}
    for word_class, size in self.SIZES.items():
      max_syllables = 1 if size <= 8 else 3  # Function words are short, as in real languages.
      words = _unique(rng, lambda r, n=max_syllables: _lang_word(r, n), size, taken)
      weights = 1.0 / np.arange(1, size + 1) ** zipf_exponent
      self.words[word_class] = words
      self.cumulative[word_class] = np.cumsum(weights) / weights.sum()

  def sample(self, rng: np.random.Generator, word_class: str) -> str:
    words = self.words[word_class]
    index = np.searchsorted(self.cumulative[word_class], rng.random(), side="right")
    return words[min(int(index), len(words) - 1)]


def _noun_phrase(rng: np.random.Generator, lexicon: _Lexicon, plural: bool, nested: bool) -> str:
  # Determiner, noun, then adjectives: the order differs from English on purpose.
  noun = lexicon.sample(rng, "noun") + (_LANG_PLURAL if plural else "")
  words = [lexicon.sample(rng, "determiner"), noun]
  if rng.random() < 0.4:
    words.append(lexicon.sample(rng, "adjective"))
  if nested and rng.random() < 0.2:
    words.append(_prepositional_phrase(rng, lexicon))
  return " ".join(words)


def _prepositional_phrase(rng: np.random.Generator, lexicon: _Lexicon) -> str:
  return (
    lexicon.sample(rng, "preposition")
    + " "
    + _noun_phrase(rng, lexicon, plural=bool(rng.random() < 0.3), nested=False)
  )


def _clause(rng: np.random.Generator, lexicon: _Lexicon) -> str:
  # Subject-object-verb order; the verb agrees with the subject's number.
  plural = bool(rng.random() < 0.3)
  words = [_noun_phrase(rng, lexicon, plural=plural, nested=True)]
  if rng.random() < 0.7:
    words.append(_noun_phrase(rng, lexicon, plural=bool(rng.random() < 0.3), nested=True))
  verb_suffix = _LANG_VERB_PLURAL if plural else _LANG_VERB_SINGULAR
  words.append(lexicon.sample(rng, "verb") + verb_suffix)
  if rng.random() < 0.3:
    words.append(_prepositional_phrase(rng, lexicon))
  return " ".join(words)


def _sentence(rng: np.random.Generator, lexicon: _Lexicon) -> str:
  sentence = _clause(rng, lexicon)
  if rng.random() < 0.2:
    sentence += " " + lexicon.sample(rng, "conjunction") + " " + _clause(rng, lexicon)
  return sentence[0].upper() + sentence[1:] + "."


def synthetic_language(
  *,
  seed: int = 0,
  num_finetune: int = 2000,
  num_task_eval: int = 300,
  sentences_per_text: tuple[int, int] = (3, 6),
  zipf_exponent: float = 1.1,
) -> Records:
  """Paragraphs in an invented language for the language-adaptation setting.

  A small grammar (subject-object-verb clauses, noun phrases with trailing adjectives and
  prepositional phrases, verb agreement with a plural suffix) over a lexicon of 736 invented
  words whose frequencies within each word class follow a Zipf law. Letters are Greek, so the
  text shares only spaces and full stops with the ASCII biographies.

  Args:
    seed: Selects the lexicon and the texts; same seed, identical records.
    num_finetune: Paragraphs in `finetune`.
    num_task_eval: Paragraphs in `task_eval`, none equal to a `finetune` paragraph.
    sentences_per_text: Inclusive range of sentences per paragraph.
    zipf_exponent: Exponent s of the word frequencies, p(rank k) proportional to 1 / k**s.

  Returns:
    Split name -> records: `finetune` and `task_eval`, each `{"text": ...}`. The retain sets
    that go with them come from `biographies` (see `embedded_corpus`).
  """
  low, high = sentences_per_text
  if not 1 <= low <= high:
    raise ValueError(
      f"sentences_per_text must be (low, high) with 1 <= low <= high, got {sentences_per_text}."
    )
  rng = _rng(seed, _LANGUAGE_STREAM)
  lexicon = _Lexicon(rng, zipf_exponent)

  def paragraph(rng: np.random.Generator) -> str:
    count = int(rng.integers(low, high + 1))
    return " ".join(_sentence(rng, lexicon) for _ in range(count))

  texts = _unique(rng, paragraph, num_finetune + num_task_eval)
  return {
    "finetune": [{"text": text} for text in texts[:num_finetune]],
    "task_eval": [{"text": text} for text in texts[num_finetune:]],
  }


CORPORA = ("biographies", "synthetic_language")


def _generators(name: str) -> tuple:
  if name not in CORPORA:
    raise ValueError(f"unknown embedded corpus {name!r}; choose one of {CORPORA}.")
  return (biographies,) if name == "biographies" else (biographies, synthetic_language)


def corpus_options(name: str) -> dict[str, Any]:
  """The options corpus `name` accepts (see `embedded_corpus`), with their defaults."""
  return {
    key: parameter.default
    for function in _generators(name)
    for key, parameter in inspect.signature(function).parameters.items()
  }


def check_options(name: str, options: dict[str, Any]) -> None:
  """Raises ValueError, listing the valid ones, if `options` are not options of corpus `name`."""
  accepted = corpus_options(name)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(
      f"unknown option(s) {unknown} for embedded corpus {name!r}; valid options: "
      f"{sorted(accepted)}."
    )


def embedded_corpus(name: str, **options: Any) -> Records:
  """Every split of an embedded benchmark, ready to fine-tune on and measure forgetting.

  - `"biographies"`: the splits of `biographies(**options)`.
  - `"synthetic_language"`: `finetune` and `task_eval` from `synthetic_language`, plus
    `pretrain`, `retain_eval` and `retain_facts` from `biographies`: the model pretrained on the
    biographies must keep them while it learns the language. Options go to whichever of the two
    functions takes them (`seed` to both), so equal options give identical shared splits.

  Raises:
    ValueError: for an unknown corpus or option, listing the valid ones.
  """
  check_options(name, options)

  def call(function) -> Records:
    parameters = inspect.signature(function).parameters
    return function(**{k: v for k, v in options.items() if k in parameters})

  people = call(biographies)
  if name == "biographies":
    return people
  # The language replaces the biographies' task: the new population plays no part here.
  shared = {split: people[split] for split in ("pretrain", "retain_eval", "retain_facts")}
  return {**call(synthetic_language), **shared}
