"""HF checkpoint folders: load / save round trips, and every broken folder fails by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import camelid
from camelid import CheckpointError, LlamaConfig, LlamaForCausalLM, load_pretrained
from camelid.formats import hf

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def leftovers(directory: Path) -> list[str]:
    return [n for n in listing(directory) if n.endswith(".tmp") or n.startswith(".")]


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: LlamaConfig | None = None,
                     filename: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (config or LlamaConfig(**TINY)).save_pretrained(directory)
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / filename)
    else:
        torch.save(tensors, directory / filename)
    return directory


def write_sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict | None = None):
    """Shards by file name, and an index mapping each tensor to its (first) file unless given."""
    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**TINY).save_pretrained(directory)
    for filename, tensors in shards.items():
        save_file(tensors, directory / filename)
    if weight_map is None:
        weight_map = {}
        for filename, tensors in shards.items():
            for name in tensors:
                weight_map.setdefault(name, filename)
    write_index(directory, {"metadata": {}, "weight_map": weight_map})
    return directory


def write_index(directory: Path, index) -> None:
    text = index if isinstance(index, str) else json.dumps(index)
    (directory / hf.SAFE_INDEX).write_text(text, encoding="utf-8")


def split_in_two(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    names = sorted(state)
    half = len(names) // 2
    return {k: state[k] for k in names[:half]}, {k: state[k] for k in names[half:]}


@pytest.fixture
def saved(tmp_path):
    """A saved tiny model: (folder, its state dict)."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", state_of(model)


# ---------------------------------------------------------------------- happy paths

def test_single_file_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert listing(tmp_path) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = load_pretrained(tmp_path)
    assert_same_weights(loaded, state_of(model))
    assert dataclasses.replace(loaded.config, torch_dtype=None, extra={}) == model.config
    assert loaded.config.torch_dtype == "float32"
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():  # plain layers both sides (the CPU default runs camelid's own float kernel)
        plain = load_pretrained(tmp_path, pack=False)
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_sharded_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in listing(tmp_path) if n.endswith(".safetensors")]
    assert len(shards) > 2 and all(hf._SHARD_RE.match(n) for n in shards)
    assert "model.safetensors" not in shards
    index = json.loads((tmp_path / hf.SAFE_INDEX).read_text())
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for shard in shards:  # every shard under the limit unless one tensor alone is bigger
        tensors = load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
    assert_same_weights(load_pretrained(tmp_path), state_of(model))


@pytest.mark.parametrize("size", [50_000, "50KB", "0.05MB", " 48.83 kib "])
def test_max_shard_size_spellings(tmp_path, size):
    tiny_model().save_pretrained(tmp_path, max_shard_size=size)
    assert (tmp_path / hf.SAFE_INDEX).is_file()


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(dtype="bfloat16"), torch.bfloat16),
    (dict(dtype=torch.float16), torch.float16),
    (dict(torch_dtype="bfloat16"), torch.bfloat16),
    (dict(torch_dtype=torch.float16), torch.float16),
    (dict(dtype="float32", torch_dtype="float32"), torch.float32),
    (dict(), torch.float32),
], ids=["bf16-name", "fp16-dtype", "torch_dtype-name", "torch_dtype-dtype", "both-agree", "default"])
def test_load_in_a_dtype(saved, kwargs, dtype):
    directory, state = saved
    model = load_pretrained(directory, **kwargs)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.config.torch_dtype == str(dtype).removeprefix("torch.")
    assert_same_weights(model, {k: v.to(dtype) for k, v in state.items()})


def test_load_auto_takes_the_config_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert_same_weights(loaded, state_of(model))
    assert load_pretrained(tmp_path).dtype == torch.float32  # no dtype: float32, as transformers


def test_load_auto_prefers_the_config_dtype_over_the_tensors(tmp_path):
    state = state_of(tiny_model())  # float32 tensors
    write_checkpoint(tmp_path, state, LlamaConfig(**TINY, torch_dtype="bfloat16"))
    assert load_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_load_auto_without_config_dtype_takes_the_tensors_dtype(tmp_path):
    state = {k: v.to(torch.float16) for k, v in state_of(tiny_model()).items()}
    write_checkpoint(tmp_path, state)
    assert "torch_dtype" not in json.loads((tmp_path / "config.json").read_text())
    assert load_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float16


def test_conflicting_dtype_and_torch_dtype(saved):
    with pytest.raises(ValueError, match="dtype or torch_dtype"):
        load_pretrained(saved[0], dtype="float16", torch_dtype="bfloat16")


@pytest.mark.parametrize("first, second", [("20KB", "5GB"), ("5GB", "20KB"), ("20KB", "40KB")],
                         ids=["sharded-to-single", "single-to-sharded", "more-to-fewer-shards"])
def test_resave_removes_stale_files(tmp_path, first, second):
    tiny_model(seed=1).save_pretrained(tmp_path, max_shard_size=first)
    before = listing(tmp_path)
    model = tiny_model(seed=2)
    model.save_pretrained(tmp_path, max_shard_size=second)
    after = listing(tmp_path)
    if second == "5GB":
        assert after == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / hf.SAFE_INDEX).read_text())
        assert after == sorted({"config.json", hf.SAFE_INDEX, *index["weight_map"].values()})
        assert "model.safetensors" not in after
    assert after != before
    assert_same_weights(load_pretrained(tmp_path), state_of(model))


def test_resave_keeps_unrelated_files(saved):
    directory, _ = saved
    (directory / "tokenizer.json").write_text("{}")
    (directory / "generation_config.json").write_text("{}")
    tiny_model(seed=3).save_pretrained(directory, max_shard_size="20KB")
    assert {"tokenizer.json", "generation_config.json"} <= set(listing(directory))


def test_tied_model_saves_no_lm_head_and_reloads_tied(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path, pack=False)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_tied_model_reloads_tied_in_another_dtype(tmp_path):
    tiny_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, dtype="bfloat16", pack=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16


def test_tied_config_with_a_stored_lm_head_loads_tied(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    state = state_of(model)  # includes lm_head.weight, as some exporters write it
    assert "lm_head.weight" in state
    write_checkpoint(tmp_path, state, model.config)
    loaded = load_pretrained(tmp_path, pack=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_checkpoint_without_lm_head_loads_tied(tmp_path):
    state = state_of(tiny_model())
    del state["lm_head.weight"]
    write_checkpoint(tmp_path, state)  # the config says untied
    loaded = load_pretrained(tmp_path, pack=False)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, state["model.embed_tokens.weight"])


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_rotary_inv_freq_buffers_are_dropped(tmp_path, filename):
    state = state_of(tiny_model())
    expected = dict(state)
    for i in range(TINY["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    write_checkpoint(tmp_path, state, filename=filename)
    assert_same_weights(load_pretrained(tmp_path), expected)


def test_pytorch_model_bin(tmp_path):
    model = tiny_model()
    write_checkpoint(tmp_path, state_of(model), filename="pytorch_model.bin")
    assert_same_weights(load_pretrained(tmp_path), state_of(model))


def test_pytorch_model_bin_in_the_pre_zip_format(tmp_path):
    """torch < 1.6 wrote a plain pickle that cannot be memory-mapped; it must still load."""
    model = tiny_model()
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    torch.save(state_of(model), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same_weights(load_pretrained(tmp_path), state_of(model))


def test_sharded_pytorch_model_bin(tmp_path):
    model = tiny_model()
    first, second = split_in_two(state_of(model))
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    torch.save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {**{k: "pytorch_model-00001-of-00002.bin" for k in first},
                  **{k: "pytorch_model-00002-of-00002.bin" for k in second}}
    (tmp_path / hf.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(load_pretrained(tmp_path), state_of(model))


def test_hugging_face_cache_layout_with_symlinked_shards(tmp_path):
    """snapshots/<rev>/ holds links to ../../blobs/<hash>: the way hub downloads are stored."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for name in listing(tmp_path / "plain"):
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        (tmp_path / "plain" / name).rename(blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    assert_same_weights(load_pretrained(snapshot), state_of(model))


def test_from_pretrained_classmethod(saved):
    directory, state = saved
    assert_same_weights(LlamaForCausalLM.from_pretrained(directory, dtype="float32"), state)


def test_saved_files_respect_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tiny_model().save_pretrained(tmp_path, max_shard_size="20KB")
    finally:
        os.umask(old)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in listing(tmp_path)}
    assert set(modes.values()) == {0o644}, modes  # safetensors and mkstemp would give 0600


def test_editing_a_loaded_model_does_not_touch_the_file(saved):
    """Weights are memory-mapped: the mapping must be private (copy-on-write)."""
    directory, state = saved
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    model = load_pretrained(directory, pack=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == digest
    assert_same_weights(load_pretrained(directory), state)


def test_transformers_reads_what_camelid_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ours = state_of(model)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_camelid_reads_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False))
    theirs.save_pretrained(tmp_path)
    assert_same_weights(load_pretrained(tmp_path), {k: v.detach() for k, v in theirs.state_dict().items()})


# ---------------------------------------------------------------------- bad checkpoints

def test_missing_tensors_are_listed(tmp_path):
    state = state_of(tiny_model())
    del state["model.layers.1.mlp.down_proj.weight"], state["model.norm.weight"]
    write_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.down_proj\.weight, "
                                              r"model\.norm\.weight$"):
        load_pretrained(tmp_path)


def test_many_missing_tensors_are_summarised(tmp_path):
    state = {k: v for k, v in state_of(tiny_model()).items() if not k.startswith("model.layers.")}
    write_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.0\.input_layernorm\.weight, .* "
                                              r"and \d+ more"):
        load_pretrained(tmp_path)


def test_unexpected_tensors_are_listed(tmp_path):
    state = state_of(tiny_model())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    state["score.weight"] = torch.ones(2, 32)
    write_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm\.weight, "
                                              r"score\.weight"):
        load_pretrained(tmp_path)


def test_misshapen_tensor_names_both_shapes(tmp_path):
    state = state_of(tiny_model())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # MHA shape in a GQA model
    write_checkpoint(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.layers\.0\.self_attn\.k_proj\.weight "
                                              r"\(32, 32\) \(expected \(16, 32\)\)"):
        load_pretrained(tmp_path)


def test_checkpoint_for_another_config(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 100
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight \(96, 32\) \(expected \(100, 32\)\)"):
        load_pretrained(directory)


def test_same_tensor_in_two_shards(tmp_path):
    first, second = split_in_two(state_of(tiny_model()))
    second["model.norm.weight"] = first.get("model.norm.weight", torch.ones(32))
    first["model.norm.weight"] = second["model.norm.weight"]
    write_sharded(tmp_path, {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second})
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' appears in both "
                                              r"model-00001-of-00002\.safetensors and model-00002-of-00002"):
        load_pretrained(tmp_path)


def test_index_naming_the_wrong_shard(tmp_path):
    first, second = split_in_two(state_of(tiny_model()))
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {k: "model-00001-of-00002.safetensors" for k in [*first, *second]}
    write_sharded(tmp_path, shards, weight_map)
    with pytest.raises(CheckpointError, match=rf"tensors not in the shard the index names: {sorted(second)[0]}"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_index_pointing_outside_the_folder(tmp_path, where):
    first, second = split_in_two(state_of(tiny_model()))
    directory = tmp_path / "ckpt"
    directory.mkdir()
    outside = {"parent": tmp_path / "x.safetensors", "absolute": tmp_path / "abs.safetensors",
               "subfolder": directory / "sub" / "x.safetensors"}[where]
    outside.parent.mkdir(exist_ok=True)
    save_file(second, outside)  # the file exists: only where it is is wrong
    filename = {"parent": "../x.safetensors", "absolute": str(outside), "subfolder": "sub/x.safetensors"}[where]
    write_sharded(directory, {"model-00001-of-00002.safetensors": first},
                  {**{k: "model-00001-of-00002.safetensors" for k in first}, **{k: filename for k in second}})
    with pytest.raises(CheckpointError, match=rf"points outside the checkpoint folder: '{filename}'"):
        load_pretrained(directory)


def test_index_naming_a_missing_shard(tmp_path):
    first, second = split_in_two(state_of(tiny_model()))
    write_sharded(tmp_path, {"model-00001-of-00002.safetensors": first},
                  {**{k: "model-00001-of-00002.safetensors" for k in first},
                   **{k: "model-00002-of-00002.safetensors" for k in second}})
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002\.safetensors' \(for tensor '.*'\) "
                                              r"does not exist"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("index", [
    '{"weight_map": {',
    json.dumps({"metadata": {}}),
    json.dumps(["model.safetensors"]),
    json.dumps({"weight_map": ["model.safetensors"]}),
    json.dumps({"weight_map": {"model.norm.weight": 3}}),
], ids=["not-json", "no-weight_map", "list", "weight_map-list", "non-string-file"])
def test_invalid_index(saved, index):
    directory, _ = saved
    write_index(directory, index)
    with pytest.raises(CheckpointError, match=rf"{directory / hf.SAFE_INDEX}: "):
        load_pretrained(directory)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 0], ids=["half", "almost-all", "header-cut", "empty"])
def test_truncated_safetensors(saved, keep):
    directory, _ = saved
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable safetensors file"):
        load_pretrained(directory)


def test_truncated_shard(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = tmp_path / sorted(n for n in listing(tmp_path) if hf._SHARD_RE.match(n))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        load_pretrained(tmp_path)


def test_file_truncated_between_checking_and_reading(saved, monkeypatch):
    """E.g. a download still being written: the data read must be checked again, not trusted."""
    directory, _ = saved
    path = directory / "model.safetensors"
    check = hf.check_names_and_shapes

    def check_then_truncate(*args):
        check(*args)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    monkeypatch.setattr(hf, "check_names_and_shapes", check_then_truncate)
    with pytest.raises(CheckpointError, match=rf"{path}: cannot read tensor data"):
        load_pretrained(directory)


def test_config_without_weights(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no weights found"):
        load_pretrained(tmp_path)
    assert listing(tmp_path) == ["config.json"]


@pytest.mark.parametrize("content", [b"\x00garbage" * 50, b"", b"PK\x03\x04 not really a zip"],
                         ids=["garbage", "empty", "fake-zip"])
def test_corrupt_pytorch_model_bin(tmp_path, content):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'pytorch_model.bin'}: cannot be read"):
        load_pretrained(tmp_path)


def test_pytorch_model_bin_that_is_not_a_state_dict(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")  # weights-only-safe, but not a dict
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'pytorch_model.bin'}: not a state dict"):
        load_pretrained(tmp_path)


class Payload:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, layout):
    directory, marker = tmp_path / "ckpt", tmp_path / "pwned"
    state = state_of(tiny_model())
    state["model.norm.weight"] = Payload(marker)
    directory.mkdir()
    LlamaConfig(**TINY).save_pretrained(directory)
    if layout == "single":
        bin_path = directory / "pytorch_model.bin"
        torch.save(state, bin_path)
    else:
        first, second = split_in_two(state)
        bin_path = directory / "pytorch_model-00002-of-00002.bin"
        torch.save(first, directory / "pytorch_model-00001-of-00002.bin")
        torch.save(second, bin_path)
        weight_map = {**{k: "pytorch_model-00001-of-00002.bin" for k in first},
                      **{k: bin_path.name for k in second}}
        (directory / hf.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{bin_path}: cannot be read as a weights-only"):
        load_pretrained(directory)
    assert not marker.exists()

    # The payload is live: an unsafe load of the same file does run it. (So the assertion above
    # can fail, and would if camelid ever unpickled without weights_only.)
    live = tmp_path / "live"
    torch.save({"x": Payload(live)}, tmp_path / "live.bin")
    torch.load(tmp_path / "live.bin", weights_only=False)
    assert live.exists()


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_pretrained(missing)
    assert not missing.exists()


def test_path_is_a_file(saved):
    directory, _ = saved
    with pytest.raises(CheckpointError, match=rf"{directory / 'model.safetensors'}: not a checkpoint"):
        load_pretrained(directory / "model.safetensors")


def test_folder_without_config(saved):
    directory, _ = saved
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{directory}: not a checkpoint camelid can read"):
        load_pretrained(directory)


def test_bad_config_in_a_checkpoint(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(camelid.ConfigError, match=rf"{directory / 'config.json'}: num_key_value_heads \(3\)"):
        load_pretrained(directory)


@pytest.mark.parametrize("dtype", ["float8", "fp16", "int8", torch.int8, 16],
                         ids=["float8", "fp16", "int8-name", "int8-dtype", "int"])
def test_bad_dtype_fails_before_reading_weights(saved, monkeypatch, dtype):
    directory, _ = saved

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were opened before the dtype was checked")

    monkeypatch.setattr(hf, "weight_files", no_reading)
    with pytest.raises(ValueError, match=rf"dtype {dtype!r} is not one of|dtype must be a floating torch dtype, "
                                         rf"got {dtype!r}"):
        load_pretrained(directory, dtype=dtype)


@pytest.mark.parametrize("size", ["lots", 0, -5, "0MB", "-5GB", "5 parsecs", True, 1.5e6, "0.1B", None])
def test_bad_max_shard_size(tmp_path, size):
    with pytest.raises(ValueError, match=rf"max_shard_size {size!r} is not a size"):
        tiny_model().save_pretrained(tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- atomic save

def failing_save_file(fail_on_call: int, exc: BaseException, partial: bool = True):
    """A save_file that works until call `fail_on_call`, which writes half a file, then raises."""
    calls = []

    def fake(tensors, filename, metadata=None):
        calls.append(filename)
        save_file(tensors, filename, metadata=metadata)
        if len(calls) == fail_on_call:
            if partial:  # what a full disk leaves: a torn file under the name being written
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
            raise exc

    return fake, calls


@pytest.mark.parametrize("first, second, fail_on", [
    ("5GB", "20KB", 3),   # single -> sharded, fails on shard 3
    ("20KB", "20KB", 2),  # same shard names: a half-renamed save would mix old and new weights
    ("20KB", "5GB", 1),   # sharded -> single, fails on the only file
], ids=["single-to-sharded", "sharded-to-sharded", "sharded-to-single"])
def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, first, second, fail_on):
    old = tiny_model(seed=1)
    old.save_pretrained(tmp_path, max_shard_size=first)
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}

    fake, calls = failing_save_file(fail_on, OSError(28, "No space left on device"))
    monkeypatch.setattr(hf, "save_file", fake)
    with pytest.raises(OSError, match="No space left"):
        tiny_model(seed=2).save_pretrained(tmp_path, max_shard_size=second)
    assert len(calls) == fail_on

    assert leftovers(tmp_path) == []
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before
    assert_same_weights(load_pretrained(tmp_path), state_of(old))


def test_interrupted_save_cleans_up(tmp_path, monkeypatch):
    fake, _ = failing_save_file(2, KeyboardInterrupt(), partial=False)
    monkeypatch.setattr(hf, "save_file", fake)
    with pytest.raises(KeyboardInterrupt):
        tiny_model().save_pretrained(tmp_path / "new", max_shard_size="20KB")
    assert not (tmp_path / "new").exists()  # it made the folder, so it removes it


def test_failed_config_write_leaves_no_weights(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("unrelated")
    real_replace = os.replace
    renamed = []

    def replace(src, dst):
        if Path(dst).name == "config.json":
            raise OSError(5, "I/O error")
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"):
        tiny_model().save_pretrained(tmp_path)
    assert leftovers(tmp_path) == []
    # Weights renamed before config.json failed are whole files (never torn); nothing is a temp.
    for path in renamed:
        assert load_file(path)


# ---------------------------------------------------------------------- peak memory

MAKE_CHECKPOINT = """
import sys, torch
from camelid import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4)
model = LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1])
print(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
"""

# Linux carries a parent's peak RSS into ru_maxrss across fork + exec (so a child of a 350 MB pytest
# starts with ru_maxrss = 350 MB), and the imports can peak above where they settle. So where /proc
# exists, the child resets its own high-water mark after the imports and reads VmRSS / VmHWM, which
# belong to this process image alone; elsewhere it falls back to ru_maxrss.
MEASURE_LOAD = """
import resource, sys, torch, camelid

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before, peak = status("VmRSS"), lambda: status("VmHWM")
except OSError:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    before = peak()
model = camelid.load_pretrained(sys.argv[1], pack=False)  # the load itself; packing is a later transform
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())  # touch every weight
print(peak() - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.slow
def test_peak_memory_of_a_load_is_about_one_copy_of_the_weights(tmp_path):
    def run(script, *args):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [int(x) for x in out.stdout.split()]

    (weight_bytes,) = run(MAKE_CHECKPOINT, tmp_path)
    assert 90e6 < weight_bytes < 130e6
    assert (tmp_path / "model.safetensors").stat().st_size >= weight_bytes
    growth, loaded_bytes = run(MEASURE_LOAD, tmp_path)
    assert loaded_bytes == weight_bytes
    # One copy is the file's pages (mapped) plus 13-31 MB of allocator and thread-pool slack that
    # varies run to run (measured: 1.13-1.31x; CI once saw 1.31x); a second copy would be >= 2x.
    assert growth <= 1.6 * weight_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    """Issue 19, finding 9: NaN/Inf weights loaded without a word and gave NaN logits."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = bad
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight' holds NaN or infinite"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_bool_weights_are_refused_naming_the_tensor(tmp_path, dtype):
    """Issue 19, finding 9: integer and bool safetensors weights were cast to float silently."""
    from safetensors.torch import load_file, save_file

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"must be floating point.*model.norm.weight \("):
        load_pretrained(tmp_path)
