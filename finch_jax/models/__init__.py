"""Language models: a decoder-only transformer and batched generation."""

from finch_jax.models.generate import greedy_generate, sample
from finch_jax.models.hf import HFTokenizer, load_hf, save_hf
from finch_jax.models.llama import Llama, Llama3RopeScaling, LlamaConfig
from finch_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "greedy_generate", "sample"]
__all__ += ["HFTokenizer", "Llama", "Llama3RopeScaling", "LlamaConfig", "load_hf", "save_hf"]
