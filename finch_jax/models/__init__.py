"""Language models: one decoder (Llama 3 / Qwen3, and the compact `LlamaConfig.tiny()`), Hugging
Face and GGUF loading, Hugging Face saving, generation."""

from finch_jax.models.generate import greedy_generate, sample
from finch_jax.models.gguf import GGUFError, is_gguf_file, load_gguf
from finch_jax.models.hf import HFTokenizer, load_hf, save_hf
from finch_jax.models.llama import Llama, Llama3RopeScaling, LlamaConfig
from finch_jax.models.registry import ModelConfig, build, config_from_dict

__all__ = ["greedy_generate", "sample"]
__all__ += ["HFTokenizer", "Llama", "Llama3RopeScaling", "LlamaConfig", "load_hf", "save_hf"]
__all__ += ["ModelConfig", "build", "config_from_dict"]
__all__ += ["GGUFError", "is_gguf_file", "load_gguf"]
