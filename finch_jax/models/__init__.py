"""Language models: a decoder-only transformer and batched generation."""

from finch_jax.models.generate import greedy_generate, sample
from finch_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "greedy_generate", "sample"]
