"""Model layer: config, the Llama-family decoder with its KV cache, loading, tokenizers."""

from hybridgraph.model.config import PRESETS, ConfigError, ModelConfig, preset
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import LoadError, load_model
from hybridgraph.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["PRESETS", "ByteTokenizer", "ConfigError", "HFTokenizer", "LoadError", "ModelConfig",
           "Tokenizer", "Transformer", "load_model", "preset"]
