"""camelid: the Llama model family in Python and PyTorch, end to end.

The names a user types are here, each imported on first use, so `import camelid` (and `camelid
--help`) stays light: no torch until a name that needs it is asked for."""

_LAZY = {
    "accounting": None,  # a module: camelid.core.accounting
    "Int8KVCache": "camelid.core.cache",
    "KVCache": "camelid.core.cache",
    "ConfigError": "camelid.core.config",
    "LlamaConfig": "camelid.core.config",
    "CausalLMOutput": "camelid.core.model",
    "LlamaModel": "camelid.core.model",
    "CheckpointError": "camelid.formats",
    "LlamaForCausalLM": "camelid.hf_compat",
    "TextStreamer": "camelid.hf_compat",
    "load_pretrained": "camelid.hf_compat",
    "Tokenizer": "camelid.text.tokenizer",
    "generate_tokens": "camelid.generation.generate",
    "generate": "camelid.generation.generate",
    "SamplingParams": "camelid.generation.sampling",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        if _LAZY[name] is None:
            return importlib.import_module(f"camelid.core.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camelid' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "Int8KVCache", "KVCache", "LlamaConfig",
           "LlamaForCausalLM", "LlamaModel", "SamplingParams", "TextStreamer", "Tokenizer", "accounting",
           "generate", "generate_tokens", "load_pretrained"]
