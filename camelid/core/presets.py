"""Architecture presets for the Llama families in the design documents, usable without weights.

Values are those of the published config.json files (Meta's and HuggingFaceTB's). Names are
lower-case; the Hugging Face repo ids are accepted as aliases.
"""

from __future__ import annotations

_LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2)
_LLAMA2 = dict(_LLAMA1, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001, num_key_value_heads=8)
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_LLAMA32 = dict(_LLAMA31, tie_word_embeddings=True,
                rope_scaling=dict(_LLAMA31["rope_scaling"], factor=32.0))
_CODELLAMA = dict(_LLAMA2, vocab_size=32016, max_position_embeddings=16384, rope_theta=1000000.0)
_SMOLLM2 = dict(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _size(hidden, intermediate, layers, heads, kv_heads=None, **kw):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads, **kw)


PRESETS: dict[str, dict] = {
    "llama-7b": dict(_LLAMA1, **_size(4096, 11008, 32, 32)),
    "llama-13b": dict(_LLAMA1, **_size(5120, 13824, 40, 40)),
    "llama-33b": dict(_LLAMA1, **_size(6656, 17920, 60, 52)),
    "llama-65b": dict(_LLAMA1, **_size(8192, 22016, 80, 64)),
    "llama-2-7b": dict(_LLAMA2, **_size(4096, 11008, 32, 32)),
    "llama-2-13b": dict(_LLAMA2, **_size(5120, 13824, 40, 40)),
    "llama-2-70b": dict(_LLAMA2, **_size(8192, 28672, 80, 64, 8)),
    "llama-3-8b": dict(_LLAMA3, **_size(4096, 14336, 32, 32, 8)),
    "llama-3-70b": dict(_LLAMA3, **_size(8192, 28672, 80, 64, 8)),
    "llama-3.1-8b": dict(_LLAMA31, **_size(4096, 14336, 32, 32, 8)),
    "llama-3.1-70b": dict(_LLAMA31, **_size(8192, 28672, 80, 64, 8)),
    "llama-3.1-405b": dict(_LLAMA31, **_size(16384, 53248, 126, 128, 8)),
    "llama-3.2-1b": dict(_LLAMA32, **_size(2048, 8192, 16, 32, 8, head_dim=64)),
    "llama-3.2-3b": dict(_LLAMA32, **_size(3072, 8192, 28, 24, 8, head_dim=128)),
    "codellama-7b": dict(_CODELLAMA, **_size(4096, 11008, 32, 32)),
    "codellama-13b": dict(_CODELLAMA, **_size(5120, 13824, 40, 40)),
    "codellama-34b": dict(_CODELLAMA, vocab_size=32000, **_size(8192, 22016, 48, 64, 8)),
    "smollm2-135m": dict(_SMOLLM2, **_size(576, 1536, 30, 9, 3)),
    "smollm2-360m": dict(_SMOLLM2, **_size(960, 2560, 32, 15, 5)),
    "smollm2-1.7b": dict(_SMOLLM2, rope_theta=130000.0, **_size(2048, 8192, 24, 32, 32)),
}

ALIASES = {
    "huggyllama/llama-7b": "llama-7b", "huggyllama/llama-13b": "llama-13b",
    "huggyllama/llama-30b": "llama-33b", "llama-30b": "llama-33b", "huggyllama/llama-65b": "llama-65b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-405b": "llama-3.1-405b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b", "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "codellama/codellama-7b-hf": "codellama-7b", "codellama/codellama-13b-hf": "codellama-13b",
    "codellama/codellama-34b-hf": "codellama-34b",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m", "huggingfacetb/smollm2-135m": "smollm2-135m",
    "huggingfacetb/smollm2-360m-instruct": "smollm2-360m", "huggingfacetb/smollm2-360m": "smollm2-360m",
    "huggingfacetb/smollm2-1.7b-instruct": "smollm2-1.7b", "huggingfacetb/smollm2-1.7b": "smollm2-1.7b",
}


def preset_fields(name: str) -> dict | None:
    """The config.json fields of a preset name or HF repo id (case-insensitive); None if unknown.
    Plain data, so config.py can build a LlamaConfig from it without presets importing config."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return dict(PRESETS[key]) if key in PRESETS else None
