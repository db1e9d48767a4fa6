"""Weight-only quantization (camelid.transforms.quantize): error bounds per format, the GGUF block mappings,
the kernels against a float reference, the tied table, save/reload, bad input, and quality and
memory on the default model."""

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn

import camelid.transforms.quantize as Q
from camelid import CheckpointError, LlamaConfig, LlamaForCausalLM
from camelid.formats.gguf_blocks import int4_from_q4_0, int4_from_q4_1
from camelid.load import int8_from_q8_0, load_gguf_quantized, load_quantized, save_quantized
from camelid.transforms.quantize import (BlockLinear, NF4_CODES, Int4Linear, Int8Linear, NF4Linear, QuantizedEmbedding, quantize,
                                         quantize_int4, quantize_int8, quantize_nf4, weight_bytes)

GPL3 = "/usr/share/common-licenses/GPL-3"
SETTINGS = [dict(bits=8), dict(bits=4), dict(bits=4, group_size=64, lm_head_bits=4),
            dict(bits=4, format="nf4"), dict(bits=4, format="nf4", lm_head_bits=4)]


BLOCKS = __import__("camelid.kernels", fromlist=["available"]).available()  # camelid's CPU kernels built here
FOUR = "q4_1" if BLOCKS else "int4"  # load_in_4bit's default format on this machine

def weights(N, K, seed=0):
    """Gaussian weights with a few large outliers, a constant row and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[torch.rand(N, K, generator=g) < 0.01] *= 20
    w[1] = 0.3
    w[2] = 0.0
    return w


def tiny(tie=True, hidden=64, **kw):
    torch.manual_seed(0)
    # vocab 250: not a multiple of 16, so the int4 lm_head runs with padded rows
    config = LlamaConfig(vocab_size=250, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, **kw)
    return LlamaForCausalLM(config).eval()


def ids(B=2, T=9, vocab=250):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def dequant_int4(q, s, z):
    N, K = q.shape
    return ((q.float().view(N, s.shape[1], -1) - 8) * s.float()[..., None] + z.float()[..., None]).reshape(N, K)


# ---------------------------------------------------------------------- float -> codes: error bounds

def test_int8_error_bound():
    w = weights(37, 96)
    q, s, z = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (37,)
    assert bool((s.float() >= (w.amax(1) - w.amin(1)) / 255).all())  # rounded up, never down
    err = (q.float() * s.float()[:, None] + z[:, None] - w).abs()
    assert bool((err <= s.float()[:, None] / 2 * (1 + 1e-5) + 1e-7).all())
    assert err[1:3].max() == 0  # a constant row, and an all-zero one, come back exactly


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bound(group_size):
    w = weights(40, 256)
    q, s, z = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (40, 256 // group_size)
    wg = w.view(40, -1, group_size)
    err = (dequant_int4(q, s, z) - w).view_as(wg).abs().amax(-1)
    # half a step, plus the bfloat16 rounding of the offset (the codes absorb the scale's)
    slack = (z.float() - (wg.amin(-1) + 8 * s.float())).abs()
    assert bool((err <= s.float() / 2 + slack + 1e-6).all())
    assert float(err.mean() / s.float().mean()) < 0.5


def test_nf4_picks_the_nearest_code():
    w = weights(24, 128)
    q, absmax = quantize_nf4(w, 64)
    x = (w.view(24, 2, 64) / absmax.clamp(min=1e-30)[..., None]).reshape(24, 128)
    chosen = (x - NF4_CODES[q.long()]).abs()
    nearest = (x[..., None] - NF4_CODES).abs().amin(-1)
    assert torch.allclose(chosen, nearest, atol=1e-6)
    layer = NF4Linear(q, absmax)
    assert (layer.dequantize() - w).abs().max() <= 0.16 * absmax.max()  # half the widest NF4 gap


# ---------------------------------------------------------------------- layers against a float reference

@pytest.mark.parametrize("fmt,N,K", [("int8", 250, 96), ("int4", 250, 96), ("int4", 48, 64), ("nf4", 250, 128)])
def test_layer_matches_float_reference(fmt, N, K):
    w, b = weights(N, K), torch.randn(N)
    layer = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}[fmt].from_float(w, b, 32 if fmt != "nf4" else 64)
    x = torch.randn(3, 5, K)
    y = layer(x)
    assert y.shape == (3, 5, N) and y.dtype == torch.float32
    # the kernel against its own dequantized weight, in float64: the rest is bfloat16 rounding of
    # activations and output (int8: of x @ q^T before the row offsets are added, so rows whose
    # offset is large against their spread, as the outliers here make, lose most)
    exact = x.to(torch.bfloat16).double() @ layer.dequantize().double().t() + b.double()
    assert float((y - exact).abs().max() / exact.abs().max()) < (2e-2 if fmt == "int8" else 1e-2)
    # and against the float layer: the quantization error itself
    ref = x @ w.t() + b
    rel = float((y - ref).norm() / (ref - b).norm())
    assert rel < {"int8": 0.02, "int4": 0.12, "nf4": 0.2}[fmt], rel


def test_int8_codes_at_any_address():
    """torch's int8 kernel segfaults on codes that are not 64-byte aligned (as tensors read from a
    safetensors file are) once it multiplies several rows: Int8Linear keeps its own aligned copy."""
    q, s, z = quantize_int8(weights(64, 64))
    buf = torch.empty(64 * 64 + 4, dtype=torch.int8)
    shifted = buf[4:].view(64, 64).copy_(q)
    x = torch.randn(18, 64)
    assert torch.equal(Int8Linear(shifted, s, z)(x), Int8Linear(q, s, z)(x))


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_gradient_flows_to_the_input(fmt):
    layer = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}[fmt].from_float(weights(48, 64), None, 32)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.dequantize()
    assert torch.allclose(x.grad, 2 * (x @ w.t()) @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N,K", [(16, 64), (48, 64), (80, 96), (208, 128), (250, 64), (64, 576)])
def test_int4_codes_and_rows_from_the_packed_layout(N, K):
    q, s, z = quantize_int4(weights(N, K, seed=N), 32)
    layer = Int4Linear(q, s, z)
    assert torch.equal(layer.codes(), q)  # through the kernel on the identity
    rows = torch.tensor([0, N - 1, N // 2, 5, 5])
    assert torch.equal(layer.rows(rows), dequant_int4(q, s, z)[rows])  # gathered from the packed bytes
    assert torch.equal(layer.dequantize(), dequant_int4(q, s, z))


# ---------------------------------------------------------------------- GGUF blocks

@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_gguf_q4_blocks_map_to_int4_exactly(qtype):
    w = weights(48, 128).numpy()
    raw = gguf_quantize(w, qtype)
    expected = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))
    q, s, z = (int4_from_q4_0 if qtype == T.Q4_0 else int4_from_q4_1)(raw, (48, 128))
    assert torch.equal(dequant_int4(q, s, z), expected)  # exact in float32
    # stored in bfloat16, what the kernels take: d keeps 8 of 11 bits, the offset is rounded too
    got = Int4Linear(q, s, z).dequantize()
    bound = (8 * s.abs() + z.abs()) * 2 ** -8  # |q - 8| <= 8 steps of a 2^-9-relative scale error, + offset's
    err = (got - expected).view(48, 4, 32).abs().amax(-1)
    assert bool((err <= bound + 1e-7).all())


def test_gguf_q8_0_maps_to_int8_within_half_a_row_step():
    w = weights(40, 96).numpy()
    raw = gguf_quantize(w, T.Q8_0)
    expected = torch.from_numpy(gguf_dequantize(raw, T.Q8_0).astype(np.float32))
    q, s, z = int8_from_q8_0(raw, (40, 96), rows_per_chunk=16)  # several chunks
    err = (q.float() * s.float()[:, None] + z[:, None] - expected).abs()
    assert bool((err <= s.float()[:, None] / 2 * (1 + 1e-5) + 1e-7).all())


def test_gguf_blocks_of_the_wrong_size_are_rejected():
    with pytest.raises(ValueError, match="expected 480 bytes"):
        int4_from_q4_1(np.zeros(470, np.uint8), (12, 64))
    with pytest.raises(ValueError, match="blocks of 32"):
        int4_from_q4_0(bytes(18), (1, 48))


# ---------------------------------------------------------------------- whole models

@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_quantized_model_is_close_to_the_float_one(kw):
    model, x = tiny(), ids()
    with torch.no_grad():
        ref = model(x).logits
    quantize(model, **kw)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # frozen, so the int kernels run
    out = model(x).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < {8: 0.03, 4: 0.15}[kw["bits"]] * (2 if kw.get("lm_head_bits") == 4 else 1), rel
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6


def test_tied_table_is_one_copy():
    model = tiny()
    float_bytes = weight_bytes(model)
    quantize(model, bits=4, lm_head_bits=4)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.table is model.lm_head
    assert not any(k.startswith("model.embed_tokens") for k in model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    codes = sum(m.qweight.numel() + m.scales_and_zeros.numel() * 2 for m in layers)
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    assert weight_bytes(model) == codes + norms < 0.2 * float_bytes
    x = ids()
    assert torch.equal(emb(x), model.lm_head.dequantize()[x])


def test_untied_embedding_gets_its_own_table():
    model = tiny(tie=False)
    emb_w = model.model.embed_tokens.weight.detach().clone()
    quantize(model, bits=8)
    emb = model.model.embed_tokens
    assert isinstance(emb.table, Int8Linear) and emb.table is not model.lm_head
    x = ids()
    assert float((emb(x) - emb_w[x]).abs().max()) <= float(emb.table.scales.float().max()) / 2 + 1e-6


def test_packed_linears_are_quantized_like_plain_ones():
    packed = pytest.importorskip("camelid.transforms.packed")
    if not packed.available():
        pytest.skip("oneDNN packing unavailable")
    plain, x = tiny(), ids()
    other = packed.pack(tiny())  # camelid's tiles where its kernels are built, else oneDNN's layout
    assert any(isinstance(m, packed.PackedLinear) for m in other.modules())
    quantize(plain, bits=4)
    quantize(other, bits=4)
    assert not any(isinstance(m, packed.PackedLinear) for m in other.modules())
    assert torch.equal(plain(x).logits, other(x).logits)


def test_dtype_cast_keeps_the_codes_and_moves_are_refused():
    model = quantize(tiny(), bits=4)
    before = model.model.layers[0].mlp.up_proj.qweight.clone()
    model.to(torch.bfloat16)
    assert model(ids()).logits.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[0].mlp.up_proj.qweight, before)
    with pytest.raises(RuntimeError, match="do not move between devices"):
        model.to("meta")


# ---------------------------------------------------------------------- save / reload

@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_save_and_reload_without_requantizing(tmp_path, monkeypatch, kw, tie):
    model = quantize(tiny(tie=tie, attention_bias=True), **kw)
    x = ids()
    out = model(x).logits
    save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("quantize_int8", "quantize_int4", "quantize_nf4"):
        monkeypatch.setattr(Q, name, lambda *a, **k: pytest.fail("reloading re-quantized"))
    again = load_quantized(tmp_path / "q")
    assert torch.equal(again(x).logits, out)
    assert again.quantization_config == model.quantization_config
    assert LlamaConfig.from_pretrained(tmp_path / "q").extra["quantization_config"]["quant_method"] == "camelid"
    before = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = quantize(tiny(), bits=4)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("camelid.formats.hf.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(OSError):
        save_quantized(model, tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["config.json"]


def test_reload_rejects_bad_checkpoints(tmp_path):
    tiny().save_pretrained(tmp_path / "float")
    with pytest.raises(CheckpointError, match="not a camelid quantized checkpoint"):
        load_quantized(tmp_path / "float")
    save_quantized(quantize(tiny(), bits=4), tmp_path / "q")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "q" / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.scales_and_zeros"]
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj: .*no scales"):
        load_quantized(tmp_path / "q")


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,message", [
    (dict(bits=3), "unsupported quantization bits=3"),
    (dict(bits=8, format="nf4"), "unsupported quantization"),
    (dict(bits=8, group_size=32), "int8 has one scale per output channel"),
    (dict(bits=4, group_size=48), "unsupported group_size 48"),
    (dict(bits=4, group_size=16), "unsupported group_size 16"),
    (dict(bits=4, lm_head_bits=2), "lm_head_bits must be 8 or 4"),
])
def test_bad_arguments(kw, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        quantize(model, **kw)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 15  # untouched


def test_group_size_must_divide_every_input():
    model = tiny(hidden=96)  # 96 inputs: 32 divides them, 64 does not
    with pytest.raises(ValueError, match=r"group_size 64 does not divide .*q_proj \(96\).*fit this model: \[32\]"):
        quantize(model, bits=4, group_size=64)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 15
    quantize(model, bits=4, group_size=32)


def test_quantizing_twice_is_an_error():
    model = quantize(tiny(), bits=4)
    with pytest.raises(ValueError, match="already quantized .*int4"):
        quantize(model, bits=8)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny(), "unused")


# ---------------------------------------------------------------------- the default model

def test_gguf_loaded_quantized(smollm2_gguf, smollm2_tokenizer):
    from camelid.formats.gguf_file import GGUFFile

    model = load_gguf_quantized(smollm2_gguf)
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 210 and isinstance(model.lm_head, Int8Linear)  # Q4_1 layers, Q8_0 table
    assert model.model.embed_tokens.table is model.lm_head
    assert model.quantization_config == {"format": "int4", "bits": 4, "group_size": 32, "lm_head": "int8"}
    g = GGUFFile(smollm2_gguf)
    try:
        for name in ("blk.0.ffn_down.weight", "blk.29.attn_v.weight"):
            t = g.tensors[name]
            expected = torch.from_numpy(gguf_dequantize(t.data, t.type).reshape(t.shape))
            assert torch.equal(dequant_int4(*int4_from_q4_1(t.data, t.shape)), expected)
    finally:
        g.close()
    ref = LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32")
    x = torch.tensor([smollm2_tokenizer.encode(open(GPL3, encoding="utf-8").read()[:2000])])
    with torch.inference_mode():
        a, b = model(x).logits, ref(x).logits
    assert float((a - b).norm() / b.norm()) < 0.03
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9


@pytest.mark.slow
def test_quality_and_memory_on_the_default_model(smollm2_gguf, smollm2_tokenizer):
    """Perplexity on the first 2048 tokens of GPL-3 at context 512 (the full text is in
    bench/quantize.py --perplexity) and resident weight bytes against the float16 size."""
    from camelid.core.accounting import parameter_count
    from camelid.evaluate.perplexity import perplexity

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    text_ids = smollm2_tokenizer.encode(open(GPL3, encoding="utf-8").read())[:2048]
    float_model = LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32")
    fp16 = 2 * parameter_count(float_model.config)

    def measure(model):
        return perplexity(model, text_ids, context=512).value, weight_bytes(model) / fp16

    base, _ = measure(float_model)
    int8, int8_mem = measure(quantize(LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32"), bits=8))
    int4, int4_mem = measure(quantize(LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32"), bits=4, group_size=32))
    gguf, gguf_mem = measure(load_gguf_quantized(smollm2_gguf))
    small_mem = weight_bytes(quantize(LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32"), bits=4, lm_head_bits=4)) / fp16
    # measured here: int8 +0.39%, int4 +0.30%, Q4_1 -> int4 +0.04% (whole text: +0.16%, +0.48%, +0.22%)
    assert int8 <= base * 1.005, (base, int8)
    assert int4 <= base * 1.03, (base, int4)
    assert gguf <= base * 1.005, (base, gguf)
    assert int8_mem < 0.51 and small_mem <= 0.35  # all int4, lm_head too: 0.313x (but +6.5% perplexity)
    assert int4_mem < 0.355 and gguf_mem < 0.355  # int4 layers + int8 lm_head table: 0.3535x


# ---------------------------------------------------------------------- from_pretrained / save_pretrained

def test_from_pretrained_load_in_8bit_and_4bit(tmp_path):
    tiny(tie=False).save_pretrained(tmp_path / "hf")
    m8 = LlamaForCausalLM.from_pretrained(tmp_path / "hf", load_in_8bit=True)  # Q8_0 blocks where camelid's
    eight = BlockLinear if BLOCKS else Int8Linear                              # kernels are built, else int8
    assert isinstance(m8.model.layers[0].self_attn.qkv_proj.inner, eight) and m8.dtype == torch.float32
    assert isinstance(LlamaForCausalLM.from_pretrained(tmp_path / "hf", load_in_8bit=True, bnb_8bit_quant_type="int8")
                      .model.layers[0].self_attn.qkv_proj.inner, Int8Linear)
    m4 = LlamaForCausalLM.from_pretrained(tmp_path / "hf", load_in_4bit=True, group_size=64)
    assert m4.quantization_config["format"] == "int4" and m4.quantization_config["group_size"] == 64
    nf4 = LlamaForCausalLM.from_pretrained(tmp_path / "hf", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert isinstance(nf4.model.layers[1].mlp.down_proj, NF4Linear)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", pack=False)
    x = ids()
    with torch.inference_mode():
        for m in (m8, m4, nf4):
            out = m.generate(x, max_new_tokens=3)
            assert out.shape == (2, 12) and torch.equal(out[:, :9], x)
            assert float((m(x).logits - ref(x).logits).norm() / ref(x).logits.norm()) < 0.2


def test_save_pretrained_of_a_quantized_model_reloads_quantized(tmp_path):
    model = quantize(tiny(), bits=4)
    model.save_pretrained(tmp_path / "q")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "q")  # no flags: the checkpoint says it is quantized
    assert again.quantization_config == model.quantization_config
    assert torch.equal(again(ids()).logits, model(ids()).logits)


def test_load_in_4bit_reads_gguf_blocks(smollm2_gguf, monkeypatch):
    monkeypatch.setattr(Q, "quantize_int4", lambda *a, **k: pytest.fail("the Q4_1 blocks were re-quantized"))
    monkeypatch.setattr(BlockLinear, "from_float", lambda *a, **k: pytest.fail("the Q4_1 blocks were re-quantized"))
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf, load_in_4bit=True)
    want = ({"format": "q4_1", "bits": 4, "group_size": 32, "lm_head": "q8_0_g32"} if BLOCKS else
            {"format": "int4", "bits": 4, "group_size": 32, "lm_head": "int8"})
    assert model.quantization_config == want
    int4 = LlamaForCausalLM.from_pretrained(smollm2_gguf, load_in_4bit=True, bnb_4bit_quant_type="int4")
    assert int4.quantization_config == {"format": "int4", "bits": 4, "group_size": 32, "lm_head": "int8"}


@pytest.mark.parametrize("kw, message", [
    (dict(load_in_8bit=True, load_in_4bit=True), "not both"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type"),
    (dict(load_in_8bit=True, group_size=32), "group_size applies to load_in_4bit"),
    (dict(load_in_4bit=True, group_size=48), "unsupported group_size 48"),
])
def test_from_pretrained_bad_quantization_flags(tmp_path, kw, message):
    tiny().save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM.from_pretrained(tmp_path / "hf", **kw)


def test_a_quantized_checkpoint_refuses_requantizing(tmp_path):
    quantize(tiny(), bits=8).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        LlamaForCausalLM.from_pretrained(tmp_path / "q", load_in_4bit=True)


def test_load_in_4bit_of_a_gguf_without_q4_blocks_quantizes_it(tmp_path):
    from camelid.formats import save_gguf

    save_gguf(tiny(hidden=64), tmp_path / "m.gguf", dtype="q8_0")  # Q8_0 blocks: int8 if kept as they are
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf", load_in_4bit=True)
    assert model.quantization_config["format"] == FOUR and model.quantization_config["group_size"] == 32
