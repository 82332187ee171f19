"""The model families a config can name, and the one way to build a model from a config.

`config.model` is a dict of a family's config fields plus `family`: "transformer" (the default,
`Transformer`/`TransformerConfig`, the compact model the embedded benchmarks train from scratch)
or "llama" (`Llama`/`LlamaConfig`: Llama 3 and Qwen3, the layout Hugging Face checkpoints load
into). Both are called alike, `model(tokens, segment_ids=..., positions=...)`, and carry the same
logical axis names, so the trainer, sharding and generation take either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from finch_jax.models.llama import Llama, Llama3RopeScaling, LlamaConfig
from finch_jax.models.transformer import Transformer, TransformerConfig

ModelConfig = TransformerConfig | LlamaConfig
FAMILIES = {"transformer": (TransformerConfig, Transformer), "llama": (LlamaConfig, Llama)}


def config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
  """The model config a `config.model` dict describes (`family` picks the class).

  Raises:
    ValueError: for an unknown family or field, naming the valid ones.
  """
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  family = values.pop("family", "transformer")
  if family not in FAMILIES:
    raise ValueError(f"Unknown model family {family!r}: use one of {sorted(FAMILIES)}.")
  cls = FAMILIES[family][0]
  known = {field.name for field in dataclasses.fields(cls)}
  if unknown := sorted(set(values) - known):
    raise ValueError(
      f"Unknown {cls.__name__} fields {unknown} for family {family!r}; known: {sorted(known)}."
    )
  if isinstance(values.get("rope_scaling"), Mapping):
    values["rope_scaling"] = Llama3RopeScaling(**values["rope_scaling"])
  if isinstance(values.get("eos_token_id"), list):
    values["eos_token_id"] = tuple(values["eos_token_id"])
  return cls(**values)


def family_of(config: ModelConfig) -> str:
  """ "transformer" or "llama"."""
  for family, (cls, _) in FAMILIES.items():
    if isinstance(config, cls):
      return family
  raise TypeError(f"Not a model config: {type(config).__name__}.")


def build(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """A fresh model of `config`'s family."""
  return FAMILIES[family_of(config)][1](config, rngs=rngs)
