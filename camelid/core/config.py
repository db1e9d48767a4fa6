"""LlamaConfig: the transformers `config.json` keys as a dataclass, validated on the way in.

Field names are exactly the Hugging Face keys, so a real config.json loads with no mapping and
`save_pretrained` writes a file transformers reads back. Keys camelid does not model are kept in
`extra` and written back unchanged, so a round trip loses nothing.

RoPE comes in two spellings in the wild:
  transformers < 5:   "rope_theta": 1e4, "rope_scaling": {"type"|"rope_type": "linear", "factor": 2}
  transformers >= 5:  "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2}
Both are read into `rope_theta` + `rope_scaling` (normalised to `rope_type`, None for default),
and written back in the spelling they came in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.atomic import atomic_write_text, make_dir, remove_if_empty
from camelid.core.presets import PRESETS, preset_fields


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or inconsistent. The message names the field."""


# rope_type -> (required keys, optional keys). "ntk" is PaddleNLP's static NTK-aware scaling
# (LlamaNTKScalingRotaryEmbedding); "dynamic" is dynamic NTK. Formulas live in rope.py.
ROPE_TYPES: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "ntk": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast",
                          "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": ({"short_factor", "long_factor"}, {"original_max_position_embeddings",
                                                   "attention_factor", "factor"}),
}
_ROPE_ALIASES = {"dynamic_ntk": "dynamic"}  # PaddleNLP's name for dynamic NTK

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Keys that must be present in a config.json: a checkpoint without them is not describable.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalised: {"rope_type": ..., params}; None = default
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pretraining_tp: int = 1  # accepted for compatibility; slicing matmuls changes nothing but rounding
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str | None = None  # "float32" | "bfloat16" | "float16": the checkpoint's dtype
    use_cache: bool = True
    model_type: str = "llama"
    # PaddleNLP extra: ALiBi linear biases instead of rotary embeddings.
    alibi: bool = False
    # Everything else in config.json (architectures, transformers_version, ...), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # Which spelling the file used, so save_pretrained writes the same one back.
    _rope_key: str = field(default="rope_scaling", repr=False, compare=False)
    _dtype_key: str = field(default="torch_dtype", repr=False, compare=False)
    # The rope object exactly as the file spelled it (legacy "type", aliases, a "default" entry),
    # written back verbatim while it still means what rope_theta + rope_scaling say.
    _rope_raw: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads) \
                and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_scaling = _normalise_rope(self.rope_scaling, self._rope_key)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "pretraining_tp"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly if that is intended")
        _check_positive_int("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if not self.alibi and self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        if not self.rope_theta > 1:  # theta ** (-2i / D): at or below 1 the frequencies stop falling
            raise ConfigError(f"rope_theta must be greater than 1 (a RoPE base; Llama uses 1e4 to 5e5), got "
                              f"{self.rope_theta!r}: at 1 every frequency is 1 and YaRN divides by log(rope_theta), "
                              f"below it the frequencies overflow (1e-300 gave NaN logits)")
        if not _is_number(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_cache", "alibi"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                raise ConfigError(f"{name} must be a non-negative integer or null, got {v!r}")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"pad_token_id ({self.pad_token_id}) must be below vocab_size ({self.vocab_size})")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(_is_int(e) and e >= 0 for e in eos_list):
            raise ConfigError(f"eos_token_id must be an integer, a list of integers, or null, got {eos!r}")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            raise ConfigError(f"{self._dtype_key} {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")
        if self.model_type != "llama":
            raise ConfigError(f"model_type {self.model_type!r} is not a Llama-architecture model")
        if self.rope_scaling is not None:
            _validate_rope(self.rope_scaling, self.head_dim, self._rope_key)

    # ------------------------------------------------------------------ derived views
    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids as a list (Llama 3 has several)."""
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, list) else [] if eos is None else [eos]

    # ------------------------------------------------------------------ dict / file I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a config.json dict, rejecting missing or ill-typed fields by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)  # never alias (or, below, pop from) the caller's nested objects
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        kwargs: dict[str, Any] = {}
        if "rope_parameters" in d:
            params = d.pop("rope_parameters")
            if not isinstance(params, dict):
                raise ConfigError(f"rope_parameters must be an object, got {params!r}")
            kwargs["_rope_raw"] = copy.deepcopy(params)
            params = dict(params)
            if "rope_theta" in params:
                kwargs["rope_theta"] = params.pop("rope_theta")
            d.pop("rope_scaling", None)  # transformers 5 writes both only when they agree
            kwargs["rope_scaling"] = params
            kwargs["_rope_key"] = "rope_parameters"
        elif isinstance(d.get("rope_scaling"), dict):
            kwargs["_rope_raw"] = copy.deepcopy(d["rope_scaling"])
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
            kwargs["_dtype_key"] = "dtype"
        hints = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        extra = {}
        for key, value in d.items():
            if key in hints and key != "extra":
                kwargs[key] = _check_type(key, value, hints[key].type)
            else:
                extra[key] = value
        if isinstance(kwargs.get("rope_scaling"), dict) and "rope_theta" in kwargs["rope_scaling"]:
            kwargs["rope_theta"] = kwargs["rope_scaling"].pop("rope_theta")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict, in the rope and dtype spelling it was read in."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_") or f.name in ("extra", "rope_scaling", "rope_theta", "torch_dtype"):
                continue
            if f.name == "alibi" and not self.alibi:
                continue  # camelid/PaddleNLP extra: only written when on, so HF files round-trip
            out[f.name] = getattr(self, f.name)
        scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
        raw = self._rope_raw if self._raw_rope_still_valid() else None
        if self._rope_key == "rope_parameters":
            out["rope_parameters"] = raw or {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = raw or scaling
        if self.torch_dtype is not None:
            out[self._dtype_key] = self.torch_dtype
        out.update(self.extra)
        return copy.deepcopy(out)  # the caller may edit the dict; the config must not change with it

    def _raw_rope_still_valid(self) -> bool:
        """Whether the rope object as read still says what rope_theta + rope_scaling say now."""
        raw = self._rope_raw
        if not isinstance(raw, dict):
            return False
        raw = dict(raw)
        if self._rope_key == "rope_parameters":
            if "rope_theta" not in raw or raw.pop("rope_theta") != self.rope_theta:
                return False
        elif "rope_theta" in raw:
            return False  # from_dict moved it out to rope_theta: write the normalised form
        try:
            return _normalise_rope(raw, self._rope_key) == self.rope_scaling
        except ConfigError:
            return False

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "LlamaConfig":
        """A folder with config.json, a config.json file, or a preset name (see camelid.core.presets)."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            except RecursionError:
                raise ConfigError(f"{path}: JSON nested too deeply to be a model config") from None
            try:
                return cls.from_dict(data)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        return preset_config(str(name_or_path))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write directory/config.json atomically (temp file + rename)."""
        directory = Path(directory)
        # Serialise first: a config that cannot be written must not leave a new folder behind.
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        created = make_dir(directory)
        try:
            return atomic_write_text(directory / "config.json", text)
        except BaseException:
            remove_if_empty(directory, created)
            raise


def preset_config(name: str) -> LlamaConfig:
    """The LlamaConfig of a preset name or HF repo id (case-insensitive; camelid/core/presets.py)."""
    fields = preset_fields(name)
    if fields is None:
        raise ConfigError(f"{name!r} is neither a config folder/file nor a preset; presets: {', '.join(PRESETS)}")
    return LlamaConfig(**fields)


# ---------------------------------------------------------------------- helpers

_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_positive_int(name: str, v) -> None:
    if not _is_int(v) or v <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _check_type(name: str, value, hint: str):
    """Reject a JSON value whose type cannot be what the field means (e.g. "4096" for a size)."""
    hint = str(hint)
    if value is None:
        if "None" in hint:
            return value
        raise ConfigError(f"{name} must not be null")
    if hint.startswith("int | list"):
        ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    elif hint.startswith("int"):
        ok = _is_int(value)
    elif hint.startswith("float"):
        ok = _is_number(value)
    elif hint.startswith("bool"):
        ok = isinstance(value, bool)
    elif hint.startswith("str"):
        ok = isinstance(value, str)
    elif hint.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name} has the wrong type: expected {hint}, got {value!r}")
    return float(value) if hint.startswith("float") else value


def _normalise_rope(scaling: dict | None, key: str = "rope_scaling") -> dict | None:
    """Legacy `type` -> `rope_type`; aliases resolved; default type -> None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{key} must be an object or null, got {scaling!r}")
    scaling = dict(scaling)
    legacy = scaling.pop("type", None)
    rope_type = scaling.get("rope_type", legacy)
    if rope_type is None:
        raise ConfigError(f"{key} has no rope_type (or legacy type): {scaling!r}")
    if not isinstance(rope_type, str):
        raise ConfigError(f"{key}.rope_type must be a string, got {rope_type!r}")
    rope_type = _ROPE_ALIASES.get(rope_type, rope_type)
    scaling["rope_type"] = rope_type
    if rope_type == "default" and set(scaling) <= {"rope_type", "rope_theta"}:
        return None
    return scaling


def _validate_rope(scaling: dict, head_dim: int, where: str = "rope_scaling") -> None:
    rope_type = scaling["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope_type {rope_type!r} in {where}; supported: {sorted(ROPE_TYPES)}")
    required, optional = ROPE_TYPES[rope_type]
    missing = sorted(k for k in required if scaling.get(k) is None)  # absent, or null
    if missing:
        raise ConfigError(f"{where} of type {rope_type!r} is missing {', '.join(f'{where}.{k}' for k in missing)}")
    for key, value in scaling.items():
        if key == "rope_type":
            continue
        if key == "truncate":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.truncate must be true or false, got {value!r}")
        elif key in ("short_factor", "long_factor"):
            if not (isinstance(value, list) and len(value) == head_dim // 2
                    and all(_is_number(v) and math.isfinite(v) and v > 0 for v in value)):
                got = f"a list of {len(value)}" if isinstance(value, list) else repr(value)
                raise ConfigError(f"{where}.{key} must be a list of head_dim // 2 = {head_dim // 2} "
                                  f"positive numbers, got {got}")
        elif key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                     "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
            if key == "original_max_position_embeddings" and value is not None and value < 2:
                raise ConfigError(f"{where}.{key} must be a context length of at least 2 positions, got {value!r}")
    if rope_type in ("linear", "dynamic", "ntk", "llama3", "yarn") and scaling["factor"] < 1:
        raise ConfigError(f"{where}.factor must be >= 1 for {rope_type!r}, got {scaling['factor']!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"{where}.high_freq_factor must be greater than {where}.low_freq_factor")
