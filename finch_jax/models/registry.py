"""From a config's `model` dict to a model: every model is a `Llama` of a `LlamaConfig`.

`config.model` is a dict of `LlamaConfig` fields: `LlamaConfig.tiny().__dict__` for the compact
model the embedded benchmarks train from scratch, Llama 3 / Qwen3 sizes for the layouts Hugging
Face checkpoints load into. Configs written when the compact model was a class of its own may
still say `family`: "transformer" (what they meant when they said nothing) or "llama".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from finch_jax.models.llama import COMPACT_DEFAULTS, Llama, Llama3RopeScaling, LlamaConfig

ModelConfig = LlamaConfig
# The defaults each former `family` value stood for, under the fields a config gives.
_FAMILY_DEFAULTS = {"llama": {}, "transformer": COMPACT_DEFAULTS}


def config_from_dict(values: Mapping[str, Any]) -> LlamaConfig:
  """The `LlamaConfig` a `config.model` dict (or `ml_collections.ConfigDict`) describes.

  A `family` key is read for configs written before every model was a Llama: "llama" changes
  nothing, "transformer" gives the fields it leaves out the compact model's defaults (tied
  embeddings, the scaled init), as `LlamaConfig.tiny` does.

  Raises:
    ValueError: for an unknown family or field, naming the valid fields.
  """
  values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
  known = sorted(field.name for field in dataclasses.fields(LlamaConfig))
  family = values.pop("family", "llama")
  if family not in _FAMILY_DEFAULTS:
    raise ValueError(
      f"Unknown model family {family!r}: leave `family` out (every model is a LlamaConfig, "
      f"fields {known}), or use one of {sorted(_FAMILY_DEFAULTS)}."
    )
  if unknown := sorted(set(values) - set(known)):
    raise ValueError(f"Unknown LlamaConfig fields {unknown}; known: {known}.")
  if isinstance(values.get("rope_scaling"), Mapping):
    values["rope_scaling"] = Llama3RopeScaling(**values["rope_scaling"])
  if isinstance(values.get("eos_token_id"), list):
    values["eos_token_id"] = tuple(values["eos_token_id"])
  return LlamaConfig(**{**_FAMILY_DEFAULTS[family], **values})


def build(config: LlamaConfig, rngs: nnx.Rngs) -> Llama:
  """A fresh model of `config`."""
  return Llama(config, rngs=rngs)
