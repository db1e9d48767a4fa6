"""Fused q/k/v and gate/up products (camelid.transforms.fuse): the same outputs, the original names in
state_dict and files, a way back, and what cannot be fused left alone."""

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.transforms.fuse import FusedLinear, fuse, is_fused, unfuse
from camelid.transforms.quantize import quantize


def tiny(**kw):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **kw)
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["float", "int8", "int4", "nf4"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_computes_the_same_and_saves_the_same_tensors(kind, bias):
    model = tiny(attention_bias=bias, mlp_bias=bias)
    if kind != "float":
        model = quantize(model, bits=8 if kind == "int8" else 4, format=None if kind != "nf4" else "nf4")
    with torch.inference_mode():
        ref, state = model(IDS).logits, {k: v.clone() for k, v in model.state_dict().items()}
        fuse(model)
        assert is_fused(model) and isinstance(model.model.layers[1].mlp.gate_up_proj, FusedLinear)
        assert not hasattr(model.model.layers[0].self_attn, "q_proj")
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
        fused_state = model.state_dict()
        assert sorted(fused_state) == sorted(state)
        assert all(torch.equal(fused_state[k], v) for k, v in state.items())
        unfuse(model)
        assert not is_fused(model) and model.model.layers[0].self_attn.qkv_proj is None
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_fused_quantized_model_saves_and_reloads(tmp_path):
    model = fuse(quantize(tiny(), bits=4))
    model.save_pretrained(tmp_path / "q")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "q")  # quantized checkpoints load fused
    assert is_fused(again)
    with torch.inference_mode():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_float_models_save_under_hf_names(tmp_path):
    model = fuse(tiny())
    model.save_pretrained(tmp_path / "hf")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "hf", pack=False)
    assert not is_fused(plain)
    with torch.inference_mode():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_layers_of_different_kinds_are_left_alone():
    model = quantize(tiny(), bits=4)
    attn = model.model.layers[0].self_attn
    attn.k_proj = torch.nn.Linear(64, 32)  # one float layer among int4 ones
    fuse(model)
    assert attn.qkv_proj is None and hasattr(attn, "q_proj")  # this attention stays as it was
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, FusedLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, FusedLinear)


def test_speculative_decoding_stays_exact_on_a_fused_model():
    from camelid.generation.generate import generate_tokens
    from camelid.generation.speculative import speculative_tokens

    model = fuse(quantize(tiny(), bits=8))
    prompt = IDS[:1]
    ref = [int(s.tokens) for s in generate_tokens(model, prompt, max_new_tokens=20)]
    got = [int(s.tokens) for s in speculative_tokens(model, prompt, max_new_tokens=20, draft_model=model)]
    assert got == ref


def test_load_in_4bit_fuses(smollm2_gguf):
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf, load_in_4bit=True)
    assert is_fused(model) and model.quantization_config["format"] in ("int4", "q4_1")  # q4_1: camelid's kernels
