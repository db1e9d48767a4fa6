"""camelid: the Llama model family in Python and PyTorch, end to end."""

from .cache import Int8KVCache, KVCache
from .config import ConfigError, LlamaConfig
from .formats import CheckpointError, load_pretrained
from .model import CausalLMOutput, LlamaForCausalLM, LlamaModel

__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "Int8KVCache", "KVCache", "LlamaConfig",
           "LlamaForCausalLM", "LlamaModel", "load_pretrained"]
