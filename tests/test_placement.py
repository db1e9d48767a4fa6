"""device_map / max_memory placement (camelid.transforms.placement): plans from the config on the meta device,
clear errors before any weight is read, loaders putting each tensor on its unit's device, and a
placed model computing what the model on one device computes. The multi-device run needs CUDA
(GPU + CPU offload on one GPU); on a CPU-only machine it is skipped."""

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.formats.common import empty_model
from camelid.transforms.placement import (PlacementError, check_device_map, dispatch, infer_device_map, parse_memory,
                                          plan_device_map, units)

CUDA = torch.cuda.is_available()


def tiny(tie=False, layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("placed") / "tiny"
    model = tiny()
    model.save_pretrained(path)
    return path, model


def meta_model(tie=False):
    return empty_model(tiny(tie).config)[0]


CPU = torch.device("cpu")


# ---------------------------------------------------------------------- plans

def test_parse_memory():
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory(1234) == 1234
    for bad in ("lots", "12 parsecs", -5, True):
        with pytest.raises(PlacementError, match="max_memory"):
            parse_memory(bad)


def test_units_count_every_weight_once():
    for tie in (False, True):
        model = meta_model(tie)
        sizes = units(model)
        assert list(sizes)[:2] == ["model.embed_tokens", "model.layers.0"] and list(sizes)[-2:] == ["model.norm", "lm_head"]
        unique = {id(p): p for p in model.parameters()}
        assert sum(sizes.values()) == sum(p.numel() * 4 for p in unique.values())
        assert (sizes["lm_head"] == 0) == tie


def test_auto_on_cpu_places_everything_on_cpu():
    plan = plan_device_map(meta_model(), "auto", {"cpu": "1GiB"})
    assert set(plan.values()) == {CPU} and len(plan) == 4 + 3


def test_sequential_fill_and_overflow(monkeypatch):
    """With (pretend) GPUs, 'sequential' fills cuda:0 up to its budget, then cuda:1, then the CPU;
    'auto' balances the layers over the GPUs. Only planning: no tensor is made on them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    model = meta_model()
    sizes = units(model)
    layer = sizes["model.layers.0"]
    first = sizes["model.embed_tokens"] + 2 * layer  # room for the embedding and two layers
    plan = infer_device_map(model, {0: first, 1: layer, "cpu": "1GiB"}, "sequential")
    devices = [str(plan[f"model.layers.{i}"]) for i in range(4)]
    assert str(plan["model.embed_tokens"]) == "cuda:0" and devices == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    assert str(plan["model.norm"]) == "cpu" and str(plan["lm_head"]) == "cpu"
    balanced = infer_device_map(model, {0: "1GiB", 1: "1GiB"}, "auto")
    assert {str(d) for d in balanced.values()} == {"cuda:0", "cuda:1"}
    assert str(balanced["model.layers.0"]) == "cuda:0" and str(balanced["model.layers.3"]) == "cuda:1"


def test_tied_lm_head_goes_with_the_embedding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = meta_model(tie=True)
    sizes = units(model)
    plan = infer_device_map(model, {0: sizes["model.embed_tokens"] + 1, "cpu": "1GiB"}, "sequential")
    assert str(plan["model.embed_tokens"]) == "cuda:0" and plan["lm_head"] == plan["model.embed_tokens"]
    assert str(plan["model.layers.0"]) == "cpu"


def test_explicit_map_with_prefixes():
    plan = check_device_map(meta_model(), {"model": "cpu", "lm_head": "cpu"})
    assert set(plan.values()) == {CPU} and len(plan) == 7
    plan = check_device_map(meta_model(), {"": "cpu"})
    assert set(plan.values()) == {CPU}


# ---------------------------------------------------------------------- bad input, before any weight is read

def _no_read(monkeypatch):
    """Make reading any weight file fail loudly: errors must come from the plan, not from loading."""
    import camelid.formats.hf as hf

    def boom(*a, **k):
        raise AssertionError("a weight file was read")
    monkeypatch.setattr(hf, "read_file", boom)


@pytest.mark.parametrize("device_map, match", [
    ({"model.embed_tokens": "cuda:0", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
     "'cuda:0' does not exist"),
    ({"model.embed_tokens": 3, "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}, "3 does not exist"),
    ({"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}, "'disk'"),
    ({"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "tpu:0"}, "tpu:0"),
    ({"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu"}, "does not place lm_head"),
    ({"model.embed_tokens": "cpu", "model.layer.0": "cpu", "model.norm": "cpu", "lm_head": "cpu"},
     "'model.layer.0', which is not a module"),
    ({"": "cpu", "model.layers.1.mlp": "cpu"}, "inside a unit"),
    ({"model.embed_tokens": "cpu", "model.layers.0.self_attn": "cpu", "model.layers.0.mlp": "cpu",
      "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
      "lm_head": "cpu"}, "model.layers.0 as a whole"),
    ("everywhere", "not a device"),
    ({}, "non-empty dict"),
])
def test_bad_device_map(saved, monkeypatch, device_map, match):
    _no_read(monkeypatch)
    with pytest.raises(PlacementError, match=match):
        LlamaForCausalLM.from_pretrained(saved[0], device_map=device_map)


@pytest.mark.parametrize("max_memory, match", [
    ({"cpu": "10KB"}, "max_memory is too small: the model needs"),
    ({"cpu": "lots"}, "max_memory\\['cpu'\\]: 'lots' is not a memory size"),
    ({0: "1GiB"}, "device 0 does not exist"),
    ({"cpu": "1GiB", "cpu:0": "1GiB"}, "names cpu twice"),
])
def test_bad_max_memory(saved, monkeypatch, max_memory, match):
    _no_read(monkeypatch)
    with pytest.raises(PlacementError, match=match):
        LlamaForCausalLM.from_pretrained(saved[0], device_map="auto", max_memory=max_memory)


def test_max_memory_too_small_for_one_layer(monkeypatch):
    """The budgets add up, but the last layer fits on no device that is left."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = meta_model()
    sizes = units(model)
    total = sum(sizes.values())
    with pytest.raises(PlacementError, match="fits on no device"):
        infer_device_map(model, {0: total - sizes["lm_head"] + 1, "cpu": sizes["lm_head"] - 1}, "sequential")


def test_other_bad_combinations(saved, monkeypatch):
    _no_read(monkeypatch)
    with pytest.raises(ValueError, match="max_memory applies with device_map"):
        LlamaForCausalLM.from_pretrained(saved[0], max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="device or device_map, not both"):
        LlamaForCausalLM.from_pretrained(saved[0], device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="quantized weights"):
        LlamaForCausalLM.from_pretrained(saved[0], device_map="auto", load_in_8bit=True)
    with pytest.raises(PlacementError, match="max_memory applies to device_map='auto'"):
        LlamaForCausalLM.from_pretrained(saved[0], device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    with pytest.raises(PlacementError, match="device_map 'fastest' is not one of|'fastest' is not a device"):
        LlamaForCausalLM.from_pretrained(saved[0], device_map="fastest")


def test_tied_lm_head_on_another_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PlacementError, match="lm_head is tied"):
        check_device_map(meta_model(tie=True), {"model": "cpu", "lm_head": 0})


# ---------------------------------------------------------------------- running placed models

def test_auto_on_cpu_loads_and_matches(saved):
    path, model = saved
    ids = torch.tensor([[5, 17, 99, 3, 64, 12, 7]])
    placed = LlamaForCausalLM.from_pretrained(path, device_map="auto")
    assert set(placed.device_map.values()) == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_hooked_model_matches_and_generates(saved):
    """The input-moving hooks and per-layer cache devices on one device: logits of a padded batch
    and greedy tokens (through the KV cache) equal the plain model's."""
    path, model = saved
    placed = LlamaForCausalLM.from_pretrained(path, pack=False)
    dispatch(placed, {name: CPU for name in units(placed)}, hooks=True)
    ids = torch.tensor([[0, 0, 5, 17, 99], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(placed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)
        holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 0, 0, 1]])  # masks travel inside the attention plan
        torch.testing.assert_close(placed(ids, attention_mask=holes).logits, model(ids, attention_mask=holes).logits,
                                   atol=1e-5, rtol=0)
    assert torch.equal(placed.generate(ids, attention_mask=mask, max_new_tokens=8),
                       model.generate(ids, attention_mask=mask, max_new_tokens=8))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tie", [False, True])
def test_gpu_and_cpu_offload_match_one_device(tmp_path, tie):
    """Half the layers on cuda:0, the rest (and the head) on the CPU: logits and greedy tokens equal
    the model wholly on the CPU; each layer's KV cache sits on its layer's device."""
    from camelid.core.cache import KVCache, layer_devices

    model = tiny(tie)
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
                  "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": 0 if tie else "cpu"}
    placed = LlamaForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map)
    assert placed.model.layers[0].mlp.down_proj.weight.device.type == "cuda"
    assert placed.model.layers[3].mlp.down_proj.weight.device.type == "cpu"
    assert [d.type for d in layer_devices(placed)] == ["cuda", "cuda", "cpu", "cpu"]
    assert KVCache(placed.config, 1, 8, device=layer_devices(placed)).k[0].device.type == "cuda"
    ids = torch.tensor([[5, 17, 99, 3, 64, 12, 7]])
    with torch.no_grad():
        out = placed(ids).logits
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=0)
    assert torch.equal(placed.generate(ids, max_new_tokens=8).cpu(), model.generate(ids, max_new_tokens=8))
