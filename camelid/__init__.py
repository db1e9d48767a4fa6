"""camelid: the Llama model family in Python and PyTorch, end to end.

The names a user types are here; the rest is imported on first use, so `import camelid` stays
light (no tokenizers, no generation machinery until asked for)."""

from camelid.core import accounting
from camelid.core.cache import Int8KVCache, KVCache
from camelid.core.config import ConfigError, LlamaConfig
from camelid.core.model import CausalLMOutput, LlamaModel
from camelid.formats import CheckpointError
from camelid.hf_compat import LlamaForCausalLM, TextStreamer, load_pretrained

_LAZY = {
    "Tokenizer": "camelid.text.tokenizer",
    "generate_tokens": "camelid.generation.generate",
    "generate": "camelid.generation.generate",
    "SamplingParams": "camelid.generation.sampling",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camelid' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "Int8KVCache", "KVCache", "LlamaConfig",
           "LlamaForCausalLM", "LlamaModel", "SamplingParams", "TextStreamer", "Tokenizer", "accounting",
           "generate", "generate_tokens", "load_pretrained"]
