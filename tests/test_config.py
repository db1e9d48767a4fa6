"""LlamaConfig: real transformers config files round-trip, and every bad value fails by name."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import transformers

from camelid import ConfigError, LlamaConfig
from camelid.core import config as config_module

# The smallest config that exercises GQA (4 query heads share 2 KV heads), head_dim 16.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def tiny(**overrides) -> dict:
    # A deep copy: transformers.LlamaConfig edits the rope dict it is given (adds rope_theta).
    return copy.deepcopy({**TINY, **overrides})


def write_config(directory: Path, data) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def read_json(directory: Path):
    return json.loads((directory / "config.json").read_text(encoding="utf-8"))


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def transformers_attributes(directory: Path) -> dict:
    return transformers.LlamaConfig.from_pretrained(directory).to_dict()


def assert_round_trip(src: Path, dst: Path) -> LlamaConfig:
    """camelid reads src/config.json and writes dst/config.json: nothing the file said is lost or
    changed, and transformers reads the copy exactly as it reads the original."""
    original = read_json(src)
    config = LlamaConfig.from_pretrained(src)
    config.save_pretrained(dst)
    written = read_json(dst)
    changed = {k: (v, written.get(k, "<absent>")) for k, v in original.items() if written.get(k, "<absent>") != v}
    assert not changed, f"keys changed by the round trip (original, written): {changed}"
    assert transformers_attributes(dst) == transformers_attributes(src)
    # And reading our own output again gives the same config.
    assert LlamaConfig.from_pretrained(dst) == config
    return config


# ---------------------------------------------------------------------- real transformers files

TRANSFORMERS_CONFIGS = {
    "defaults": {},
    "llama-3.1-like": dict(num_key_value_heads=2, eos_token_id=[128001, 128008, 128009], bos_token_id=128000,
                           vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                           rope_scaling=LLAMA3_ROPE, dtype="bfloat16", architectures=["LlamaForCausalLM"]),
    "llama-3.2-tied": dict(tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE, factor=32.0),
                           max_position_embeddings=131072, rope_theta=500000.0, dtype="bfloat16"),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, dtype="float16"),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
                 max_position_embeddings=8192),
    "longrope": dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 1024}, max_position_embeddings=4096),
    "explicit-head-dim": dict(head_dim=32),
    "biases-gelu-pad": dict(attention_bias=True, mlp_bias=True, pad_token_id=0, hidden_act="gelu",
                            rms_norm_eps=1e-5, attention_dropout=0.1, initializer_range=0.01),
}


@pytest.mark.parametrize("overrides", TRANSFORMERS_CONFIGS.values(), ids=TRANSFORMERS_CONFIGS.keys())
def test_transformers5_config_round_trips(tmp_path, overrides):
    transformers.LlamaConfig(**tiny(**overrides)).save_pretrained(tmp_path / "src")
    original = read_json(tmp_path / "src")
    assert "rope_parameters" in original and "transformers_version" in original  # the v5 spelling
    config = assert_round_trip(tmp_path / "src", tmp_path / "dst")
    assert config.extra["transformers_version"] == original["transformers_version"]
    if "architectures" in overrides:
        assert read_json(tmp_path / "dst")["architectures"] == ["LlamaForCausalLM"]


def test_transformers5_llama31_values_are_read(tmp_path):
    transformers.LlamaConfig(**tiny(**TRANSFORMERS_CONFIGS["llama-3.1-like"])).save_pretrained(tmp_path)
    config = LlamaConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.torch_dtype == "bfloat16"
    assert config.eos_token_ids == [128001, 128008, 128009]
    assert config.head_dim == 16 and config.num_key_value_heads == 2


# transformers 4 files, as the Hub serves them: rope_theta + rope_scaling (often with the legacy
# "type" key), torch_dtype, eos_token_id lists.
V4_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "transformers_version": "4.44.0",
           "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
           "tie_word_embeddings": False, "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2}
V4_CONFIGS = {
    "llama-2": dict(rope_scaling=None, rope_theta=10000.0, torch_dtype="float16", max_position_embeddings=4096),
    "llama-3.1": dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), torch_dtype="bfloat16",
                      bos_token_id=128000, eos_token_id=[128001, 128008, 128009], vocab_size=128256,
                      max_position_embeddings=131072, attention_bias=False, mlp_bias=False),
    "legacy-type-linear": dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=10000.0,
                               torch_dtype="float32"),
    "legacy-type-dynamic": dict(rope_scaling={"type": "dynamic", "factor": 4.0}),
    "both-type-keys-yarn": dict(rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 2048},
                                max_position_embeddings=8192),
    "llama3-legacy-type": dict(rope_scaling={k if k != "rope_type" else "type": v for k, v in LLAMA3_ROPE.items()},
                               rope_theta=500000, max_position_embeddings=131072),
    "dtype-key-and-legacy-type": dict(dtype="bfloat16", rope_scaling={"type": "linear", "factor": 2.0}),
    "integer-floats": dict(rope_theta=10000, attention_dropout=0),
    "no-optional-keys": {},
}


@pytest.mark.parametrize("fields", V4_CONFIGS.values(), ids=V4_CONFIGS.keys())
def test_transformers4_config_round_trips(tmp_path, fields):
    data = {**V4_BASE, **TINY, **fields} if fields else dict(TINY)
    write_config(tmp_path / "src", data)
    assert_round_trip(tmp_path / "src", tmp_path / "dst")


def test_legacy_rope_type_key_is_normalised_in_memory(tmp_path):
    write_config(tmp_path, tiny(rope_scaling={"type": "linear", "factor": 2.0}))
    config = LlamaConfig.from_pretrained(tmp_path)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.rope_type == "linear"


def test_changed_rope_is_written_not_the_stale_original(tmp_path):
    config = LlamaConfig.from_dict(tiny(rope_scaling={"type": "linear", "factor": 2.0}))
    config.rope_scaling["factor"] = 4.0
    assert config.to_dict()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    transformers.LlamaConfig(**tiny(rope_scaling={"rope_type": "linear", "factor": 2.0})).save_pretrained(tmp_path)
    config = LlamaConfig.from_pretrained(tmp_path)
    config.rope_theta = 20000.0
    assert config.to_dict()["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}


@pytest.mark.parametrize("key, rope", [
    ("rope_parameters", {"type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    ("rope_parameters", {"rope_type": "dynamic_ntk", "factor": 2.0, "rope_theta": 1e4}),
    ("rope_scaling", {"rope_type": "dynamic_ntk", "factor": 2.0}),
    ("rope_scaling", {"rope_type": "default"}),
])
def test_unusual_rope_spellings_are_written_back_verbatim(tmp_path, key, rope):
    write_config(tmp_path / "src", tiny(**{key: rope}))
    LlamaConfig.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "dst")
    assert read_json(tmp_path / "dst")[key] == rope


def test_both_dtype_keys_are_kept(tmp_path):
    write_config(tmp_path / "src", tiny(torch_dtype="bfloat16", dtype="bfloat16"))
    assert_round_trip(tmp_path / "src", tmp_path / "dst")


# ---------------------------------------------------------------------- dicts and derived fields

@pytest.mark.parametrize("fields", [
    {},
    dict(eos_token_id=[5, 6, 7], rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE), torch_dtype="bfloat16"),
    dict(alibi=True, num_key_value_heads=4, hidden_size=60, head_dim=15),
    dict(head_dim=32, tie_word_embeddings=True, pad_token_id=3, bos_token_id=None, eos_token_id=None),
], ids=["plain", "llama3", "alibi", "head-dim-tied"])
def test_from_dict_to_dict_round_trip(fields):
    config = LlamaConfig(**tiny(**fields))
    again = LlamaConfig.from_dict(config.to_dict())
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_unknown_keys_are_kept_verbatim():
    data = tiny(architectures=["LlamaForCausalLM"], transformers_version="4.40.0", quantization_config={"bits": 4})
    config = LlamaConfig.from_dict(data)
    assert config.extra == {"architectures": ["LlamaForCausalLM"], "transformers_version": "4.40.0",
                            "quantization_config": {"bits": 4}}
    out = config.to_dict()
    assert {k: out[k] for k in config.extra} == config.extra


def test_from_dict_does_not_modify_its_argument():
    data = tiny(rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 5e4}, eos_token_id=[1, 2])
    before = copy.deepcopy(data)
    config = LlamaConfig.from_dict(data)
    assert data == before
    assert config.rope_theta == 5e4 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    data["eos_token_id"].append(3)
    assert config.eos_token_id == [1, 2]


def test_to_dict_returns_a_copy():
    config = LlamaConfig(**tiny(eos_token_id=[1, 2], rope_scaling={"rope_type": "linear", "factor": 2.0}))
    out = config.to_dict()
    out["eos_token_id"].append(9)
    out["rope_scaling"]["factor"] = 8.0
    assert config.eos_token_id == [1, 2]
    assert config.rope_scaling["factor"] == 2.0


def test_post_init_derives_head_dim_and_kv_heads():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4)
    assert config.head_dim == 16
    assert config.num_key_value_heads == 4


@pytest.mark.parametrize("build", [
    lambda: LlamaConfig(**tiny(head_dim=32)),
    lambda: LlamaConfig.from_dict(tiny(head_dim=32)),
], ids=["constructor", "from_dict"])
def test_explicit_head_dim_is_never_overwritten(build):
    config = build()
    assert config.hidden_size == 64 and config.num_attention_heads == 4
    assert config.head_dim == 32
    assert LlamaConfig.from_dict(config.to_dict()).head_dim == 32


def test_explicit_head_dim_allows_hidden_size_not_divisible_by_heads():
    config = LlamaConfig(**tiny(hidden_size=60, head_dim=16))
    assert config.head_dim == 16


@pytest.mark.parametrize("rope, expected", [
    ({"type": "dynamic_ntk", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
    ({"rope_type": "default"}, None),
    (None, None),
])
def test_rope_normalisation(rope, expected):
    assert LlamaConfig(**tiny(rope_scaling=rope)).rope_scaling == expected


# ---------------------------------------------------------------------- bad input: each by name

def bad(**overrides) -> dict:
    return tiny(**overrides)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_missing_required_field(field):
    data = tiny()
    del data[field]
    with pytest.raises(ConfigError, match=rf"missing required field\(s\): .*\b{field}\b"):
        LlamaConfig.from_dict(data)


def test_missing_required_fields_are_all_named():
    with pytest.raises(ConfigError, match="vocab_size, hidden_size, intermediate_size"):
        LlamaConfig.from_dict({"num_hidden_layers": 2, "num_attention_heads": 4})


@pytest.mark.parametrize("field, value", [
    ("hidden_size", "4096"),
    ("vocab_size", 128.0),
    ("num_hidden_layers", 2.5),
    ("max_position_embeddings", True),
    ("tie_word_embeddings", "false"),
    ("attention_bias", 0),
    ("rms_norm_eps", "1e-6"),
    ("hidden_act", 3),
    ("rope_scaling", "linear"),
    ("eos_token_id", "2"),
    ("eos_token_id", [1, "2"]),
    ("torch_dtype", 16),
], ids=lambda v: repr(v))
def test_ill_typed_field(field, value):
    with pytest.raises(ConfigError, match=rf"\b{field}\b has the wrong type"):
        LlamaConfig.from_dict(bad(**{field: value}))


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_attention_heads", "rms_norm_eps",
                                   "use_cache"])
def test_null_for_a_required_value(field):
    with pytest.raises(ConfigError, match=rf"{field} must not be null"):
        LlamaConfig.from_dict(bad(**{field: None}))


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"hidden_size \(66\) is not divisible by num_attention_heads \(4\)"):
        LlamaConfig.from_dict(bad(hidden_size=66))


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"):
        LlamaConfig.from_dict(bad(num_key_value_heads=3))


def test_odd_head_dim_with_rope():
    with pytest.raises(ConfigError, match=r"head_dim \(15\) must be even"):
        LlamaConfig.from_dict(bad(hidden_size=60))


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", -1), ("hidden_size", -64), ("intermediate_size", 0),
    ("num_hidden_layers", 0), ("num_attention_heads", -4), ("num_key_value_heads", 0),
    ("max_position_embeddings", -2048), ("head_dim", 0), ("head_dim", -16), ("pretraining_tp", 0),
])
def test_non_positive_size(field, value):
    with pytest.raises(ConfigError, match=rf"\b{field} must be a positive integer, got {value}"):
        LlamaConfig.from_dict(bad(**{field: value}))


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", -1e-6), ("rms_norm_eps", 0.0), ("rms_norm_eps", float("nan")), ("rope_theta", 0),
    ("rope_theta", float("inf")), ("initializer_range", -0.02),
])
def test_non_positive_float(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be a positive finite number"):
        LlamaConfig.from_dict(bad(**{field: value}))


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_attention_dropout_out_of_range(value):
    with pytest.raises(ConfigError, match=r"attention_dropout must be in \[0, 1\)"):
        LlamaConfig.from_dict(bad(attention_dropout=value))


def test_unknown_hidden_act():
    with pytest.raises(ConfigError, match="hidden_act 'tanh' is not supported"):
        LlamaConfig.from_dict(bad(hidden_act="tanh"))


def test_wrong_model_type():
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not a Llama"):
        LlamaConfig.from_dict(bad(model_type="gpt2"))


def test_pad_token_id_outside_vocab():
    with pytest.raises(ConfigError, match=r"pad_token_id \(128\) must be below vocab_size \(128\)"):
        LlamaConfig.from_dict(bad(pad_token_id=128))


@pytest.mark.parametrize("field", ["pad_token_id", "bos_token_id"])
def test_negative_special_token_id(field):
    with pytest.raises(ConfigError, match=rf"{field} must be a non-negative integer"):
        LlamaConfig.from_dict(bad(**{field: -1}))


@pytest.mark.parametrize("value", [[128001, -1], -2])
def test_eos_token_id_negative(value):
    with pytest.raises(ConfigError, match="eos_token_id must be an integer, a list of integers"):
        LlamaConfig.from_dict(bad(eos_token_id=value))


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias", "tie_word_embeddings", "use_cache", "alibi"])
def test_non_bool_flag_in_constructor(field):
    with pytest.raises(ConfigError, match=rf"{field} must be true or false, got 'no'"):
        LlamaConfig(**tiny(**{field: "no"}))


@pytest.mark.parametrize("field, value", [("hidden_size", "64"), ("num_hidden_layers", 2.0),
                                          ("vocab_size", True)])
def test_ill_typed_size_in_constructor(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be a positive integer, got {value!r}"):
        LlamaConfig(**tiny(**{field: value}))


def test_eos_token_id_string_entry_in_constructor():
    with pytest.raises(ConfigError, match="eos_token_id"):
        LlamaConfig(**tiny(eos_token_id=[128001, "128008"]))


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_unknown_dtype(key):
    with pytest.raises(ConfigError, match=rf"^{key} 'float8' is not one of"):
        LlamaConfig.from_dict(bad(**{key: "float8"}))


def test_unknown_rope_type():
    with pytest.raises(ConfigError, match=r"unknown rope_type 'su' in rope_scaling"):
        LlamaConfig.from_dict(bad(rope_scaling={"type": "su", "factor": 2.0}))


def test_rope_type_must_be_a_string():
    with pytest.raises(ConfigError, match=r"rope_scaling.rope_type must be a string"):
        LlamaConfig.from_dict(bad(rope_scaling={"rope_type": ["linear"], "factor": 2.0}))


def test_rope_scaling_without_a_type():
    with pytest.raises(ConfigError, match="rope_scaling has no rope_type"):
        LlamaConfig.from_dict(bad(rope_scaling={"factor": 2.0}))


@pytest.mark.parametrize("rope, missing", [
    ({"type": "linear"}, "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": None}, "rope_scaling.factor"),
    ({"rope_type": "dynamic"}, "rope_scaling.factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 2048}, "rope_scaling.factor"),
    ({k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}, "rope_scaling.low_freq_factor"),
    (dict(LLAMA3_ROPE, high_freq_factor=None), "rope_scaling.high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8}, "rope_scaling.long_factor"),
], ids=["linear", "linear-null", "dynamic", "yarn", "llama3-low", "llama3-high-null", "longrope"])
def test_rope_type_missing_its_parameters(rope, missing):
    with pytest.raises(ConfigError, match=rf"of type '\w+' is missing {missing}"):
        LlamaConfig.from_dict(bad(rope_scaling=rope))


def test_rope_parameters_errors_name_rope_parameters():
    with pytest.raises(ConfigError, match=r"rope_parameters of type 'linear' is missing rope_parameters.factor"):
        LlamaConfig.from_dict(bad(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}))


@pytest.mark.parametrize("length", [7, 9, 16])
def test_longrope_factor_list_of_wrong_length(length):
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * length}
    with pytest.raises(ConfigError, match=rf"rope_scaling.long_factor must be a list of head_dim // 2 = 8 "
                                          rf"positive numbers, got a list of {length}"):
        LlamaConfig.from_dict(bad(rope_scaling=rope))


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 0.5}, r"rope_scaling.factor must be >= 1"),
    ({"rope_type": "linear", "factor": -2.0}, r"rope_scaling.factor must be a positive number"),
    ({"rope_type": "linear", "factor": "2"}, r"rope_scaling.factor must be a positive number"),
    (dict(LLAMA3_ROPE, high_freq_factor=1.0), r"rope_scaling.high_freq_factor must be greater"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, r"rope_scaling.truncate must be true or false"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7 + [-1.0]},
     r"rope_scaling.long_factor must be a list"),
])
def test_bad_rope_parameter_value(rope, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(bad(rope_scaling=rope))


@pytest.mark.parametrize("data", [[TINY], "config", 3, None], ids=["list", "string", "int", "null"])
def test_from_dict_rejects_non_objects(data):
    with pytest.raises(ConfigError, match="config must be a JSON object"):
        LlamaConfig.from_dict(data)


# ---------------------------------------------------------------------- bad files

def test_config_json_not_valid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 128,', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # a failed load writes nothing


def test_config_json_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path / "config.json")


def test_config_json_is_a_list(tmp_path):
    write_config(tmp_path, [TINY])
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: config must be a JSON object, got list"):
        LlamaConfig.from_pretrained(tmp_path)


def test_file_errors_name_the_file_and_the_field(tmp_path):
    write_config(tmp_path, bad(num_key_value_heads=3))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: num_key_value_heads \(3\)"):
        LlamaConfig.from_pretrained(tmp_path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing)):
        LlamaConfig.from_pretrained(missing)
    assert not missing.exists()


# ---------------------------------------------------------------------- atomic save

def saved_config(directory: Path) -> str:
    LlamaConfig(**TINY).save_pretrained(directory)
    return (directory / "config.json").read_text(encoding="utf-8")


def test_save_pretrained_writes_readable_json(tmp_path):
    path = LlamaConfig(**tiny(eos_token_id=[1, 2])).save_pretrained(tmp_path / "a" / "b")
    assert path == tmp_path / "a" / "b" / "config.json"
    assert read_json(tmp_path / "a" / "b")["eos_token_id"] == [1, 2]
    assert temp_files(tmp_path / "a" / "b") == []


def test_save_pretrained_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        LlamaConfig(**TINY).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644  # not tempfile's 0600


def test_save_is_atomic_when_serialising_fails(tmp_path, monkeypatch):
    before = saved_config(tmp_path)

    def broken_dumps(*args, **kwargs):
        raise RuntimeError("dumps failed")

    monkeypatch.setattr(config_module.json, "dumps", broken_dumps)
    config = LlamaConfig(**tiny(vocab_size=256))
    with pytest.raises(RuntimeError, match="dumps failed"):
        config.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text(encoding="utf-8") == before
    assert temp_files(tmp_path) == []
    with pytest.raises(RuntimeError, match="dumps failed"):
        config.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    before = saved_config(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        LlamaConfig(**tiny(vocab_size=256)).save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text(encoding="utf-8") == before
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    with pytest.raises(OSError, match="No space left"):
        LlamaConfig(**TINY).save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_is_atomic_when_the_write_is_interrupted(tmp_path, monkeypatch):
    before = saved_config(tmp_path)

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_module.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        LlamaConfig(**tiny(vocab_size=256)).save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text(encoding="utf-8") == before
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_unserialisable_extra_fails_before_touching_the_folder(tmp_path):
    config = LlamaConfig.from_dict(tiny(custom=1))
    config.extra["custom"] = float("nan")  # not valid JSON: json.dumps would write NaN
    with pytest.raises(ValueError, match="JSON"):
        config.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("theta", [1e-300, 0.5, 1, 1.0])
def test_rope_theta_at_or_below_one_is_refused(theta):
    """Issue 19, findings 9 and 10: rope_theta 1e-300 gave NaN logits, and YaRN with rope_theta 1
    divided by zero; a RoPE base must exceed 1."""
    with pytest.raises(ConfigError, match="rope_theta must be greater than 1"):
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, rope_theta=theta)


def test_longrope_with_a_one_position_original_context_and_deep_json_are_config_errors(tmp_path):
    """Issue 19, finding 10: ZeroDivisionError at the first forward; RecursionError reading JSON."""
    from camelid.core.config import ConfigError, LlamaConfig

    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64}
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
               "original_max_position_embeddings": 1}
    with pytest.raises(ConfigError, match="original_max_position_embeddings must be a context length of at least 2"):
        LlamaConfig.from_dict({**base, "rope_scaling": scaling})
    (tmp_path / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        LlamaConfig.from_pretrained(tmp_path)
