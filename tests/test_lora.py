"""camelid.transforms.lora: adapters that start as the identity, train alone (also on an NF4 base), merge and
unmerge exactly, and go both ways between camelid and peft; bad adapters fail before the model changes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import camelid.transforms.lora as lora
from camelid import LlamaConfig, LlamaForCausalLM
from camelid.transforms.fuse import fuse, is_fused
from camelid.transforms.lora import (LoRALinear, apply_lora, load_adapter, lora_layers, merge, merge_and_unload,
                                     print_trainable_parameters, save_adapter, unmerge)
from camelid.transforms.packed import is_packed, pack
from camelid.transforms.quantize import quantize

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(1))


def tiny(**kw):
    torch.manual_seed(0)
    config = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**{**config, **kw})).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize(model, seed=3):
    """Non-zero B (a fresh adapter is the identity, which would hide a wrong scaling or layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def differ(a, b):  # the adapter must change the logits visibly, else a match proves nothing
    return (a - b).abs().max() > 1e-2


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train(capsys):
    model = tiny()
    ref, base_total = logits(model), sum(p.numel() for p in model.parameters())
    assert base_total == 2 * 120 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    apply_lora(model, r=4, lora_alpha=8)
    assert torch.equal(logits(model), ref)
    assert sorted(lora_layers(model)) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ATTN)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2) for p in ATTN
                         for ab in "AB"}
    model(IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora_layers(model).values())
    # q, o: 64 -> 64; k, v: 64 -> 32 (2 kv heads of 16): r * (in + out) each, in 2 layers
    n = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert n == 3584
    line = print_trainable_parameters(model)
    assert line == f"trainable params: {n:,} || all params: {base_total + n:,} || trainable%: " \
                   f"{100 * n / (base_total + n):.4f}"
    assert line in capsys.readouterr().out


def test_target_modules_lists_regexes_and_all_linear():
    names = lambda target: sorted(lora_layers(apply_lora(tiny(), target_modules=target)))
    assert names(["q_proj", "down_proj"]) == [f"model.layers.{i}.{p}" for i in range(2)
                                              for p in ("mlp.down_proj", "self_attn.q_proj")]
    assert names(["layers.1.self_attn.v_proj"]) == ["model.layers.1.self_attn.v_proj"]
    assert names(r"model\.layers\.1\.mlp\.(gate|up)_proj") == ["model.layers.1.mlp.gate_proj",
                                                               "model.layers.1.mlp.up_proj"]
    model = apply_lora(tiny(), target_modules="all-linear")
    assert len(lora_layers(model)) == 2 * 7 and type(model.lm_head) is nn.Linear
    assert model.lora_config["target_modules"] == sorted(ALL)


def test_a_target_that_is_not_there_names_it_and_the_real_layers():
    model = tiny()
    with pytest.raises(ValueError, match="'qkv_proj'") as e:
        apply_lora(model, target_modules=["q_proj", "qkv_proj"])
    assert all(name in str(e.value) for name in ALL + ("lm_head",))
    assert not lora_layers(model) and not hasattr(model, "lora_config")


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=-1), dict(r=1.5), dict(r=True), dict(lora_alpha=0),
                                dict(lora_alpha=-8), dict(lora_alpha=float("nan")), dict(lora_alpha=float("inf")),
                                dict(lora_alpha=True), dict(lora_alpha="16"), dict(lora_dropout=1.0),
                                dict(lora_dropout=-0.1)], ids=str)
def test_bad_arguments_raise_before_the_model_changes(kw):
    model = fuse(tiny())
    with pytest.raises(ValueError, match=next(iter(kw))):
        apply_lora(model, **kw)
    assert not lora_layers(model) and is_fused(model) and not hasattr(model, "lora_config")


def test_applying_twice_raises():
    model = apply_lora(tiny())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, target_modules=["gate_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)}) == sorted(ATTN)


def test_merge_unmerge_and_merge_and_unload():
    model = randomize(apply_lora(tiny(), r=4, lora_alpha=8, target_modules="all-linear"))
    base = {n: m.base.weight.detach().clone() for n, m in lora_layers(model).items()}
    adapted = logits(model)
    assert differ(adapted, logits(tiny()))
    merge(model)
    assert all(m.merged and not torch.allclose(m.base.weight, base[n]) for n, m in lora_layers(model).items())
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    merge(model)  # merging twice adds nothing
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    unmerge(model)
    for n, m in lora_layers(model).items():
        assert not m.merged
        torch.testing.assert_close(m.base.weight, base[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    merge(model)  # merge_and_unload of a merged model must not add the update a second time
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and not hasattr(model, "lora_config")
    for i in range(2):
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        assert all(type(getattr(attn, p)) is nn.Linear for p in ATTN)
        assert all(type(getattr(mlp, p)) is nn.Linear for p in ALL[4:])
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)


def test_a_quantized_base_cannot_merge_but_merges_and_unloads():
    model = randomize(apply_lora(quantize(tiny(), bits=4, format="nf4"), r=4, lora_alpha=8, target_modules=ALL))
    adapted = logits(model)
    with pytest.raises(ValueError, match="quantized base"):
        merge(model)
    assert not any(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    with torch.no_grad():
        hidden = model.model(IDS)[0]
    merge_and_unload(model)
    assert not lora_layers(model)
    assert all(type(model.get_submodule(f"model.layers.{i}.self_attn.{p}")) is nn.Linear for i in range(2) for p in ATTN)
    with torch.no_grad():  # what enters the (untouched) lm_head, then the logits: the int8 lm_head rounds
        torch.testing.assert_close(model.model(IDS)[0], hidden, rtol=0, atol=1e-4)  # its input to bfloat16,
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=5e-3)  # so 1e-6 there can be ~2e-3 here


@pytest.mark.parametrize("kv_heads,use_rslora", [(4, False), (2, False), (2, True)], ids=["mha", "gqa", "rslora"])
def test_camelid_adapters_load_in_peft(tmp_path, kv_heads, use_rslora):
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    model = tiny(num_key_value_heads=kv_heads)
    model.save_pretrained(tmp_path / "base")
    base_logits = logits(model)
    randomize(apply_lora(model, r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora))
    save_adapter(model, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf), base_logits, rtol=0, atol=1e-4)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = logits(model)
    assert differ(ours, base_logits)
    torch.testing.assert_close(logits(hf), ours, rtol=0, atol=1e-4)


def test_peft_adapters_load_in_camelid(tmp_path):
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    tiny().save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    hf = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path / "adapter")
    model = load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)}) == ["down_proj", "q_proj", "v_proj"]
    assert len(lora_layers(model)) == 6
    ours = logits(model)
    assert differ(ours, logits(tiny()))
    torch.testing.assert_close(ours, logits(hf), rtol=0, atol=1e-4)


def test_qlora_trains_the_adapters_of_an_nf4_base():
    model = quantize(tiny(), bits=4, format="nf4")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=8, lora_alpha=16, target_modules="all-linear")
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 2 * 7
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    state = model.state_dict()  # the base keeps its names, and its codes and scales are untouched
    assert set(frozen) < set(state)
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


def test_all_linear_on_a_quantized_model_leaves_the_embedding_table_alone():
    model = apply_lora(quantize(tiny(), bits=4, format="nf4"), target_modules="all-linear")
    logits(model)
    assert "model.embed_tokens.table" not in lora_layers(model) and len(lora_layers(model)) == 2 * 7


def test_an_adapter_on_a_tied_lm_head_merges_only_by_untying(tmp_path):
    """merge() in place would change the shared embedding too: refused. merge_and_unload() gives
    the lm_head its own weight and marks the config untied, so a save keeps it."""
    model = randomize(apply_lora(tiny(tie_word_embeddings=True), target_modules=["lm_head"]))
    adapted = logits(model)
    with pytest.raises(ValueError, match="lm_head shares its weight"):
        merge(model)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    merge_and_unload(model)
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", pack=False)
    torch.testing.assert_close(logits(reloaded), adapted, rtol=0, atol=1e-5)


def test_a_lora_model_loads_its_own_state_dict():
    model = randomize(apply_lora(tiny()))
    other = apply_lora(tiny())
    other.load_state_dict(model.state_dict())  # strict: base tensors under the layer's own names
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


@pytest.fixture
def adapter(tmp_path):
    """A saved r=4 adapter on q_proj and v_proj of tiny()."""
    save_adapter(randomize(apply_lora(tiny(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
                 tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(path, **changes):
    config = json.loads((path / lora.ADAPTER_CONFIG).read_text())
    (path / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))


def add_key(path, key):
    tensors = load_file(path / lora.ADAPTER_WEIGHTS)
    save_file({**tensors, key: torch.zeros(4, 64)}, path / lora.ADAPTER_WEIGHTS)


BAD = {
    "no-config": (lambda p: (p / lora.ADAPTER_CONFIG).unlink(), FileNotFoundError, "adapter_config.json"),
    "no-weights": (lambda p: (p / lora.ADAPTER_WEIGHTS).unlink(), FileNotFoundError, "adapter_model.safetensors"),
    "not-json": (lambda p: (p / lora.ADAPTER_CONFIG).write_text("{'r': 4,"), ValueError, "not valid JSON"),
    "other-rank": (lambda p: edit_config(p, r=8), ValueError,
                   r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 64\), the model needs \(8, 64\)"),
    "unexpected-key": (lambda p: add_key(p, "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"),
                       ValueError, r"unexpected model\.layers\.0\.self_attn\.q_proj\.lora_C\.weight"),
    "dora": (lambda p: edit_config(p, use_dora=True), ValueError, "use_dora"),
    "other-peft-type": (lambda p: edit_config(p, peft_type="IA3"), ValueError, "not a LoRA adapter"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_adapter_raises_and_leaves_the_model_alone(adapter, case):
    spoil, error, message = BAD[case]
    spoil(adapter)
    model = tiny()
    with pytest.raises(error, match=message):
        load_adapter(model, adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and not hasattr(model, "lora_config")
    assert torch.equal(logits(model), logits(tiny()))


def test_save_adapter_writes_peft_files_only_and_reloads_exactly(adapter, monkeypatch):
    assert sorted(os.listdir(adapter)) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    keys = sorted(load_file(adapter / lora.ADAPTER_WEIGHTS))
    assert keys == sorted(f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                          for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB")
    config = json.loads((adapter / lora.ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == \
           ("LORA", 4, 8, ["q_proj", "v_proj"])
    model = randomize(apply_lora(tiny(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, adapter)  # over an existing adapter
    assert sorted(os.listdir(adapter)) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    torch.testing.assert_close(logits(load_adapter(tiny(), adapter)), logits(model), rtol=0, atol=0)

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(lora.os, "fsync", fail)  # a failed save leaves no temp file (nor a new folder)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, adapter.parent / "new")
    assert not (adapter.parent / "new").exists()
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, adapter)
    assert sorted(os.listdir(adapter)) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]


@pytest.mark.parametrize("transform", ["fuse", "pack", "fuse-nf4"])
def test_fused_and_packed_models_are_separated_first(transform):
    def make():
        model = tiny()
        return quantize(model, bits=4, format="nf4") if transform.endswith("nf4") else model
    plain = randomize(apply_lora(make(), r=4, lora_alpha=8, target_modules=ALL))
    model = fuse(make()) if transform.startswith("fuse") else pack(make())
    if not (is_fused(model) or is_packed(model)):
        pytest.skip("torch built without oneDNN: nothing to pack")
    apply_lora(model, r=4, lora_alpha=8, target_modules=ALL)
    assert not is_fused(model) and not is_packed(model)
    assert sorted(lora_layers(model)) == sorted(lora_layers(plain))
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            assert type(m.base) is type(lora_layers(plain)[name].base)
            for ab in ("lora_A", "lora_B"):
                getattr(m, ab).weight.copy_(getattr(lora_layers(plain)[name], ab).weight)
    torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=1e-5)


def test_loading_an_adapter_onto_an_adapted_model_is_refused(adapter):
    model = apply_lora(tiny())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(model, adapter)


def test_adapters_follow_the_models_mode():
    """A model in eval mode gets adapters in eval mode: dropout off at inference."""
    model = randomize(apply_lora(tiny().eval(), lora_dropout=0.5))
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(logits(model), logits(model), rtol=0, atol=0)
