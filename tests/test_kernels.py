"""camelid's own CPU kernels (camelid/kernels) against float64 references and against each other.

Bounds are derived, not tuned: a float32 sum of n terms is within n * 2^-24 * sum|terms| of the
exact sum (plus one rounding per product), so each check is `|kernel - float64| <= (n + 4) *
2^-23 * (|x| @ |W|^T)`, which holds on any x86 CPU. The paths (AVX-512, AVX2, portable) are
compared to the bit: they do the same float32 operations in the same order.
"""

import subprocess
import sys
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

import camelid.kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="camelid's kernels are not built on this machine")

EPS = 2.0 ** -23
FORMATS = {"q4_0": (K.Q4_0, Q.Q4_0), "q4_1": (K.Q4_1, Q.Q4_1), "q5_0": (K.Q5_0, Q.Q5_0),
           "q5_1": (K.Q5_1, Q.Q5_1), "q8_0": (K.Q8_0, Q.Q8_0), "q4_k": (K.Q4_K, Q.Q4_K), "q6_k": (K.Q6_K, Q.Q6_K)}


def kin(fmt: str, k: int) -> int:
    """k inputs rounded up to the format's block (256 for the K-quants)."""
    b = K.BLOCK[FORMATS[fmt][0]]
    return -(-k // b) * b


def isas():
    """Every path this CPU can run, the portable one included."""
    order = ["scalar", "avx2", "avx512", "amx"]
    return order[:order.index(K.best_isa()) + 1]


def blocks_of(w: torch.Tensor, fmt: str) -> torch.Tensor:
    qtype, gtype = FORMATS[fmt]
    if qtype in K.kquants.TILE_BYTES:  # gguf-py has no K-quant quantizer
        return K.kquants.quantize(w, qtype)
    raw = torch.from_numpy(gguf_quantize(w.numpy(), gtype))
    return K.file_blocks(raw, *w.shape, qtype)


def run(x, raw, qtype, isa=None):
    packed = K.repack(raw, qtype)
    if isa is None:
        return K.quant_linear(x, packed, qtype, raw.shape[0])
    with K.forced_isa(isa):
        return K.quant_linear(x, packed, qtype, raw.shape[0])


def bound(xq: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return (n + 4) * EPS * (xq.abs().double() @ w.abs().double().t()) + 1e-30


# ---------------------------------------------------------------------- layouts

@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_dequantize_like_the_gguf_package_and_repack_round_trips(fmt):
    qtype, gtype = FORMATS[fmt]
    w = torch.randn(37, 3 * K.BLOCK[qtype])
    raw = blocks_of(w, fmt)
    want = gguf_dequantize(raw.reshape(37, -1).numpy(), gtype)
    assert torch.equal(K.dequantize(raw, qtype), torch.from_numpy(want).float())
    packed = K.repack(raw, qtype)
    assert tuple(packed.shape) == (3, 3, K.TILE_BYTES[qtype])
    assert torch.equal(K.unrepack(packed, qtype, 37), raw)
    ids = torch.tensor([0, 36, 17, 16, 15])
    assert torch.equal(K.packed_rows(packed, qtype, ids), K.dequantize(raw, qtype)[ids])


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_every_bit_of_a_k_quant_block_is_read_like_the_gguf_package(fmt):
    """Random bytes (every scale, min and code bit pattern) with finite f16 super-block scales."""
    qtype, gtype = FORMATS[fmt]
    g = torch.Generator().manual_seed(qtype)
    raw = torch.randint(0, 256, (21, 2, K.FILE_BYTES[qtype]), dtype=torch.uint8, generator=g)
    scale = (torch.rand(21, 2, 2, generator=g) * 0.02).half().view(torch.uint8).reshape(21, 2, 4)
    raw[..., 0:4] = scale if qtype == K.Q4_K else raw[..., 0:4]
    raw[..., 208:210] = scale[..., :2] if qtype == K.Q6_K else raw[..., 208:210]
    want = gguf_dequantize(raw.reshape(21, -1).numpy(), gtype)
    assert torch.equal(K.dequantize(raw, qtype), torch.from_numpy(want).float())
    packed = K.repack(raw, qtype)
    assert torch.equal(K.unrepack(packed, qtype, 21), raw)
    ids = torch.tensor([0, 20, 16, 3])
    assert torch.equal(torch.ops.camelid.quant_rows(packed, qtype, ids, 21), K.dequantize(raw, qtype)[ids])
    x = torch.randn(3, 512)
    outs = {isa: run(x, raw, qtype, isa) for isa in isas()}
    assert all(torch.equal(y, outs["scalar"]) for y in outs.values())
    ref = K.reference_quant_linear(x, raw, qtype)
    assert (outs["scalar"].double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_k_quant_activations_are_ggmls_q8_k():
    """One scale per 256 (the element of largest |x|, its sign kept: d = max / -127), as ggml's
    Q4_K / Q6_K dot products quantize them; NaN poisons its super-block only."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 768, generator=g) * torch.logspace(-3, 2, 5)[:, None]
    x[2, 300] = float("nan")
    x[3, :256] = 0
    want = K.quantize_act_k_reference(x)
    got = torch.ops.camelid.quantize_act(x, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.allclose(got[1], want[1], equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(got[1][2, 8:16]).all() and torch.isfinite(got[1][2, :8]).all() and (got[1][3, :8] == 0).all()
    peak = x[0, :256].abs().argmax()
    assert got[0][0, peak] == -127 and got[1][0, 0] * x[0, peak] < 0  # the largest is code -127, d of the other sign


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_k_quant_quantizer_error_is_that_of_its_bits(fmt):
    """camelid's K-quant fit (gguf-py has none): relative RMS error near what the bits allow
    (uniform steps over a Gaussian: about 8% at 4 bits with a min, 2% at 6 bits)."""
    qtype = FORMATS[fmt][0]
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    err = K.dequantize(K.kquants.quantize(w, qtype), qtype) - w
    rel = (err.pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel < {"q4_k": 0.1, "q6_k": 0.03}[fmt]
    with pytest.raises(ValueError, match="not a multiple of 256"):
        K.kquants.quantize(torch.randn(4, 576), qtype)


def test_float_tiles_round_trip():
    w = torch.randn(37, 50)
    t = K.tile(w)
    assert tuple(t.shape) == (3, 50, 16) and torch.equal(K.untile(t, 37), w)


# ---------------------------------------------------------------------- quantized products

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,Kin,M", [(1, 32, 1), (37, 96, 2), (17, 352, 3), (64, 576, 17), (200, 1536, 1)])
def test_quant_linear_matches_float64_on_the_same_activations(fmt, N, Kin, M):
    qtype, Kin = FORMATS[fmt][0], kin(fmt, Kin)
    g = torch.Generator().manual_seed(N * 1000 + Kin + M)
    w, x = torch.randn(N, Kin, generator=g), torch.randn(M, Kin, generator=g) * 3
    raw = blocks_of(w, fmt)
    y = run(x, raw, qtype)
    ref = K.reference_quant_linear(x, raw, qtype)
    q, d, _ = K.quantize_act_reference(x)
    xq = (q.float().view(M, -1, 32) * d[..., None]).reshape(M, Kin)
    assert (y.double() - ref).abs().le(bound(xq, K.dequantize(raw, qtype), Kin // 32 * 2)).all()
    # and against the unquantized activations: each input is off by at most half its block's step
    wd = K.dequantize(raw, qtype).double()
    exact = x.double() @ wd.t()
    step = d.double().repeat_interleave(32, 1) / 2  # [M, K]
    assert (y.double() - exact).abs().le(step @ wd.abs().t() + bound(x, wd, Kin)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_isa_path_gives_the_same_bits(fmt):
    qtype, k = FORMATS[fmt][0], kin(fmt, 160)
    w, x = torch.randn(45, k), torch.randn(17, k)  # 17 rows: AMX where the CPU has it
    raw = blocks_of(w, fmt)
    outs = {isa: run(x, raw, qtype, isa) for isa in isas()}
    assert len(outs) >= 2  # the portable path and at least the machine's own
    for isa, y in outs.items():
        assert torch.equal(y, outs["scalar"]), isa
    q, d, s = K.quantize_act_reference(x)
    for isa in isas():
        with K.forced_isa(isa):
            got = torch.ops.camelid.quantize_act(x)
        assert all(torch.equal(a, b) for a, b in zip(got, (q, d, s))), isa


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_gives_the_same_bits_in_any_batch(fmt):
    qtype, k = FORMATS[fmt][0], kin(fmt, 576)
    w, x = torch.randn(50, k), torch.randn(17, k)
    raw = blocks_of(w, fmt)
    packed = K.repack(raw, qtype)
    whole = K.quant_linear(x, packed, qtype, 50)
    for M in (1, 2, 3, 5, 8, 16):
        for start in range(0, 17 - M + 1, M):
            assert torch.equal(K.quant_linear(x[start:start + M].contiguous(), packed, qtype, 50),
                               whole[start:start + M])


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_inputs_poison_only_their_row(fmt):
    qtype, k = FORMATS[fmt][0], kin(fmt, 64)
    w, x = torch.randn(20, k), torch.randn(4, k)
    raw = blocks_of(w, fmt)
    clean = run(x, raw, qtype)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    for isa in isas():
        y = run(x, raw, qtype, isa)
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), isa
        assert torch.equal(y[[0, 3]], clean[[0, 3]]), isa


def test_bad_calls_raise_instead_of_reading_out_of_bounds():
    raw = blocks_of(torch.randn(16, 64), "q8_0")
    packed = K.repack(raw, K.Q8_0)
    with pytest.raises(RuntimeError, match="columns"):
        K.quant_linear(torch.randn(1, 96), packed, K.Q8_0, 16)
    with pytest.raises(RuntimeError, match="weight must be"):
        K.quant_linear(torch.randn(1, 64), packed, K.Q4_0, 16)
    with pytest.raises(RuntimeError, match="no kernel for GGML type 13"):  # Q5_K
        K.quant_linear(torch.randn(1, 64), packed, 13, 16)
    with pytest.raises(RuntimeError, match="float32"):
        K.quant_linear(torch.randn(1, 64, dtype=torch.float64), packed, K.Q8_0, 16)
    with pytest.raises(RuntimeError, match="row 16 outside"):  # an embedding id past the table
        torch.ops.camelid.quant_rows(packed, K.Q8_0, torch.tensor([0, 16]), 16)


# ---------------------------------------------------------------------- float products

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,Kin,M", [(1, 1, 1), (37, 50, 2), (17, 576, 3), (64, 33, 17)])
def test_dense_linear_matches_float64(dtype, N, Kin, M):
    w, x = torch.randn(N, Kin).to(dtype), torch.randn(M, Kin)
    y = K.dense_linear(x, K.tile(w), N)
    ref = x.double() @ w.double().t()
    assert (y.double() - ref).abs().le(bound(x, w.float(), Kin)).all()
    outs = {}
    for isa in isas():
        with K.forced_isa(isa):
            outs[isa] = K.dense_linear(x, K.tile(w), N)
    assert all(torch.equal(o, outs["scalar"]) for o in outs.values())
    rows = torch.cat([K.dense_linear(x[i:i + 1].contiguous(), K.tile(w), N) for i in range(M)])
    assert torch.equal(rows, y)


# ---------------------------------------------------------------------- files: fallbacks and corrupt blocks

def tiny_gguf(path, types: dict[str, Q], corrupt: str | None = None, I: int = 128):
    """A 2-layer Llama GGUF (hidden 64, 4 heads of 16, 2 KV heads, MLP width I) with weights in
    `types` (name -> GGML type; default Q8_0); `corrupt`: a tensor whose first block's scale is set
    to NaN."""
    g = torch.Generator().manual_seed(0)
    C, V, L = 64, 96, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(C)
    w.add_feed_forward_length(I)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    shapes = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    for i in range(L):
        shapes.update({f"blk.{i}.attn_norm.weight": (C,), f"blk.{i}.ffn_norm.weight": (C,),
                       f"blk.{i}.attn_q.weight": (C, C), f"blk.{i}.attn_k.weight": (32, C),
                       f"blk.{i}.attn_v.weight": (32, C), f"blk.{i}.attn_output.weight": (C, C),
                       f"blk.{i}.ffn_gate.weight": (I, C), f"blk.{i}.ffn_up.weight": (I, C),
                       f"blk.{i}.ffn_down.weight": (C, I)})
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * torch.randn(shape, generator=g)).numpy())
            continue
        qtype = types.get(name, Q.Q8_0)
        weights = 0.2 * torch.randn(shape, generator=g)
        if qtype in (Q.Q4_K, Q.Q6_K):  # camelid's quantizer: gguf-py has none
            raw = K.kquants.quantize(weights, qtype.value).reshape(shape[0], -1).numpy()
        elif qtype == Q.Q5_K:  # no quantizer anywhere here: random codes under small f16 scales
            raw = torch.randint(0, 256, (shape[0], shape[1] // 256, 176), generator=g, dtype=torch.uint8)
            raw[..., 0:4] = torch.tensor([0.002, 0.001]).half().view(torch.uint8)
            raw = raw.reshape(shape[0], -1).numpy()
        else:
            raw = gguf_quantize(weights.numpy(), qtype)
        if name == corrupt:
            at = 208 if qtype == Q.Q6_K else 0  # the (first) f16 scale of the first block
            raw[0, at:at + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_loads_with_its_blocks_and_its_kernels_by_default(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.transforms.quantize import BlockLinear

    path = tiny_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_0,
                                           "blk.1.attn_q.weight": Q.Q4_1})
    model = LlamaForCausalLM.from_pretrained(path)
    assert isinstance(model.lm_head, BlockLinear) and model.lm_head.format == "q8_0"
    assert model.model.layers[0].mlp.gate_up_proj.inner.format == "q4_0"
    assert model.model.layers[1].self_attn.q_proj.format == "q4_1"  # parts of two formats: not fused
    floats = LlamaForCausalLM.from_pretrained(path, dtype="float32")  # dequantized, for parity work
    assert not any(isinstance(m, BlockLinear) for m in floats.modules())
    ids = torch.tensor([[1, 5, 9, 30, 2, 77]])
    with torch.inference_mode():
        a, b = model(ids).logits, floats(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # int8 activations: a small, bounded drift


def test_k_quant_layers_load_as_they_are_and_save_back_byte_for_byte(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.formats.gguf_file import GGUFFile
    from camelid.formats.gguf_write import save_gguf

    path = tiny_gguf(tmp_path / "m.gguf", {"blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K}, I=256)
    model = LlamaForCausalLM.from_pretrained(path)
    assert [layer.mlp.down_proj.format for layer in model.model.layers] == ["q4_k", "q6_k"]
    floats = LlamaForCausalLM.from_pretrained(path, dtype="float32")
    ids = torch.tensor([[1, 5, 9, 30, 2, 77]])
    with torch.inference_mode():
        a, b = model(ids).logits, floats(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    save_gguf(model, tmp_path / "back.gguf", dtype="auto")
    src, back = GGUFFile(path), GGUFFile(tmp_path / "back.gguf")
    for name in ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight"):
        assert back.tensors[name].type == src.tensors[name].type
        assert np.array_equal(np.asarray(back.tensors[name].data), np.asarray(src.tensors[name].data)), name


def test_a_nan_k_quant_scale_is_reported_with_the_tensor_name(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.formats import CheckpointError

    path = tiny_gguf(tmp_path / "m.gguf", {"blk.1.ffn_down.weight": Q.Q6_K}, corrupt="blk.1.ffn_down.weight", I=256)
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_down\.weight: block 0 of row 0 has a NaN"):
        LlamaForCausalLM.from_pretrained(path)


def test_a_type_with_no_kernel_is_dequantized_with_a_one_line_note(tmp_path):
    from camelid import LlamaForCausalLM

    path = tiny_gguf(tmp_path / "m.gguf", {"blk.0.ffn_down.weight": Q.Q5_K, "blk.1.ffn_down.weight": Q.Q5_K}, I=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LlamaForCausalLM.from_pretrained(path)
    notes = [str(w.message) for w in caught if "no kernel" in str(w.message)]
    assert len(notes) == 1 and "Q5_K (blk.0.ffn_down.weight and 1 more)" in notes[0] and "\n" not in notes[0]
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_a_nan_scale_is_reported_with_the_tensor_name(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.formats import CheckpointError

    path = tiny_gguf(tmp_path / "m.gguf", {}, corrupt="blk.1.attn_v.weight")
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_v\.weight: block 0 of row 0 has a NaN"):
        LlamaForCausalLM.from_pretrained(path)


def test_without_a_compiler_camelid_warns_once_and_runs_on_torch(tmp_path):
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from camelid import LlamaForCausalLM\nimport camelid.kernels as K\n"
            f"m = LlamaForCausalLM.from_pretrained({str(tiny_gguf(tmp_path / 'm.gguf', {}))!r})\n"
            "print('available', K.available(), m.dtype, tuple(m(torch.tensor([[1, 2]])).logits.shape))")
    env = {"CAMELID_HOME": str(tmp_path / "home"), "CXX": "/bin/false", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "available False torch.float32 (1, 2, 96)" in r.stdout  # dequantized, on torch's kernels
    notes = [line for line in r.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(notes) == 1


@pytest.mark.slow
def test_a_fresh_machine_builds_once_and_a_second_start_only_loads(tmp_path):
    env = {"CAMELID_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "camelid.kernels"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "loaded, running" in r.stdout, r.stderr[-2000:]
    libs = list((tmp_path / "kernels").glob("*/camelid_kernels*.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime
    code = "import time; t = time.perf_counter(); import camelid.kernels as K; print(K.available(), time.perf_counter() - t)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    ok, seconds = r.stdout.split()
    assert ok == "True" and float(seconds) < 30  # no compiler run: loading only (import torch included)
    assert [p.stat().st_mtime for p in (tmp_path / "kernels").glob("*/camelid_kernels*.so")] == [mtime]


# ---------------------------------------------------------------------- the fused decode layer

@pytest.mark.parametrize("types", [{"blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q4_1},
                                   {"blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K},
                                   {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q5_1,
                                    "blk.1.ffn_gate.weight": Q.Q5_0}],
                         ids=["q4_1", "k-quants", "unfused-parts"])
@pytest.mark.parametrize("storage", [torch.float32, torch.float16], ids=["f32-cache", "f16-cache"])
def test_the_fused_decode_layer_matches_the_pytorch_layer(tmp_path, types, storage):
    from camelid import LlamaForCausalLM
    from camelid.core.cache import KVCache

    path = tiny_gguf(tmp_path / "m.gguf", types, I=256)
    model = LlamaForCausalLM.from_pretrained(path)
    assert model.model.fused_decode is not None  # q/k/v or gate/up of other formats: side by side
    parts = [[len(w) for w in step.weights] for step in model.model.fused_decode.steps]
    assert parts == ([[3, 1, 1, 1], [1, 1, 2, 1]] if "blk.0.attn_q.weight" in types else [[1, 1, 1, 1]] * 2)
    ids = torch.tensor([[0, 0, 4, 8, 15, 16], [1, 23, 42, 7, 9, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    steps = []
    for fused in (True, False):
        saved = model.model.fused_decode
        if not fused:
            model.model.fused_decode = None
        cache = KVCache(model.config, 2, 16, storage=storage)
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache, cache_position=torch.arange(6))
            m2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            steps.append(model(torch.tensor([[5], [6]]), attention_mask=m2, cache=cache,
                               cache_position=torch.tensor([6])).logits)
        model.model.fused_decode = saved
    a, b = steps
    # float32 RMSNorm / RoPE / softmax / SiLU computed in another order: a few float32 ulps of
    # the hidden state, amplified by at most the int8 rounding of one activation block
    assert (a - b).abs().max() <= 1e-3 * b.abs().max()


@pytest.mark.parametrize("storage", [torch.float32, torch.float16], ids=["f32-cache", "f16-cache"])
def test_the_fused_decode_step_gives_the_same_bits_on_every_isa_path(tmp_path, storage):
    from camelid import LlamaForCausalLM
    from camelid.core.cache import KVCache

    model = LlamaForCausalLM.from_pretrained(tiny_gguf(
        tmp_path / "m.gguf", {"blk.1.ffn_down.weight": Q.Q4_0, "blk.0.ffn_down.weight": Q.Q6_K}, I=256))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 5])  # 40 keys: the exp runs 16 at a time and then the tail
    outs = {}
    for isa in isas():
        with K.forced_isa(isa), torch.inference_mode():
            cache = KVCache(model.config, 1, 64, storage=storage)
            model(ids, cache=cache, cache_position=torch.arange(40))
            outs[isa] = model(torch.tensor([[7, 8, 9]]), cache=cache, cache_position=torch.arange(40, 43)).logits
            if storage == torch.float16:  # the step's own keys went in as torch rounds them
                k = cache.k[1][:, :, 40:43].clone()
                model.model.fused_decode, saved = None, model.model.fused_decode
                model(torch.tensor([[7, 8, 9]]), cache=cache, cache_position=torch.arange(40, 43))
                model.model.fused_decode = saved
                assert torch.equal(cache.k[1][:, :, 40:43], k)
    assert all(torch.equal(o, outs["scalar"]) for o in outs.values())


def test_gguf_block_models_keep_a_float16_kv_cache_as_llama_cpp_does(tmp_path):
    from camelid import LlamaConfig, LlamaForCausalLM
    from camelid.core.cache import Int8KVCache, model_cache
    from camelid.generation.generate import generate_tokens

    blocks = LlamaForCausalLM.from_pretrained(tiny_gguf(tmp_path / "m.gguf", {}))
    assert blocks.cache_dtype == "float16" and blocks.dtype == torch.float32
    cache = model_cache(blocks, 2, 8)
    assert cache.k[0].dtype == cache.v[1].dtype == torch.float16 and cache.dtype == torch.float32
    assert model_cache(blocks, 2, 8, "float32").k[0].dtype == torch.float32
    assert isinstance(model_cache(blocks, 2, 8, "int8"), Int8KVCache)
    with pytest.raises(ValueError, match="cache_dtype must be one of .*'f16'"):
        model_cache(blocks, 2, 8, "f16")
    # update() hands attention the rounded keys in the compute dtype (the prefill sees what decode reads)
    k = torch.randn(2, 2, 3, 16) * 10
    keys, values = cache.update(0, torch.arange(3), k, -k, 3)
    assert keys.dtype == torch.float32 and torch.equal(keys, k.half().float()) and torch.equal(values, -keys)
    floats = LlamaForCausalLM.from_pretrained(tiny_gguf(tmp_path / "m.gguf", {}), dtype="float32")
    assert floats.cache_dtype is None and model_cache(floats, 1, 8).k[0].dtype == torch.float32
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert plain.cache_dtype is None and model_cache(plain, 1, 8).k[0].dtype == torch.float32
    # generate's default is the model's: the same tokens as an explicit float16 cache
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    runs = {kind: torch.stack([s.tokens for s in generate_tokens(blocks, ids, max_new_tokens=8, cache_dtype=kind)])
            for kind in (None, "float16")}
    assert torch.equal(runs[None], runs["float16"])


@pytest.mark.slow
def test_default_model_batch_of_16_is_bit_identical_to_each_prompt_alone(smollm2_gguf, smollm2_tokenizer):
    from camelid import LlamaForCausalLM
    from camelid.generation.generate import generate_tokens

    model = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    assert model.quantization_config["format"] == "q4_1"
    words = "the cat sat on a mat while seven quiet rivers ran past old stone bridges under grey skies".split()
    prompts = [smollm2_tokenizer.encode(" ".join(words[: 1 + (3 * i) % len(words)])) for i in range(16)]

    def greedy(rows):
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        steps = list(generate_tokens(model, ids, mask, max_new_tokens=6))
        return torch.stack([s.tokens for s in steps], 1)

    alone = torch.cat([greedy([p]) for p in prompts])
    for B in (2, 5, 16):
        assert torch.equal(greedy(prompts[:B]), alone[:B]), B


def test_the_decode_profile_splits_the_fused_step_and_accounts_for_the_wall_time(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.evaluate.profile import format_table, profile_decode

    model = LlamaForCausalLM.from_pretrained(tiny_gguf(tmp_path / "m.gguf", {}))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    prof = profile_decode(model, ids, steps=8)
    p = dict(prof.parts)
    fused = [v for k, v in p.items() if "fused op" in k]
    assert p["matrix products (layers, in the fused op)"] > 0 and all(v >= 0 for v in p.values())
    assert p["matrix products (torch ops: lm_head, unfused layers)"] > 0  # the lm_head
    assert abs(sum(ms for _, ms in prof.parts) - prof.step_ms) <= 0.05 * prof.step_ms + 0.05
    model.model.fused_decode = None  # the PyTorch layers: no stage clocks, the products are torch ops
    q = dict(profile_decode(model, ids, steps=8).parts)
    assert all(q[k] == 0 for k in p if "in the fused op" in k or "(fused op)" in k)
    assert "Python" in format_table(prof) and sum(fused) > 0


def test_the_stage_clocks_count_each_fused_call_once(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.generation.generate import generate_tokens

    model = LlamaForCausalLM.from_pretrained(tiny_gguf(tmp_path / "m.gguf", {}))
    it = generate_tokens(model, torch.tensor([[3, 1, 4]]), max_new_tokens=6, min_new_tokens=6)
    next(it)  # the prefill: PyTorch layers
    torch.ops.camelid.layer_profile(True)
    steps = sum(1 for _ in it)
    mm, att, other, calls = torch.ops.camelid.layer_profile(False)
    assert calls == steps == 5 and mm > 0 and att > 0 and other > 0
    assert torch.ops.camelid.layer_profile(False)[3] == calls  # off: nothing more counted


@pytest.mark.parametrize("dtype", ["q8_0", "q5_0", "q5_1", "q4_k", "q6_k"])
def test_every_block_type_saves_loads_as_it_is_and_saves_back_byte_for_byte(tmp_path, dtype):
    """save_gguf from floats -> from_pretrained keeps the blocks -> save_gguf(dtype='auto') writes
    the same bytes (an untied embedding table included)."""
    from camelid import LlamaForCausalLM
    from camelid.core.config import LlamaConfig
    from camelid.core.model import LlamaForCausalLM as Core
    from camelid.formats.gguf_file import GGUFFile
    from camelid.formats.gguf_write import save_gguf

    torch.manual_seed(0)
    model = Core(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    src = GGUFFile(save_gguf(model, tmp_path / "a.gguf", dtype=dtype))
    loaded = LlamaForCausalLM.from_pretrained(src.path)
    want = {t.type.name.lower() for t in src.tensors.values()} - {"f32", "f16"}
    assert {m.format for m in loaded.modules() if hasattr(m, "qtype")} == want
    back = GGUFFile(save_gguf(loaded, tmp_path / "b.gguf", dtype="auto"))
    for name, t in src.tensors.items():
        if t.type.name not in ("F32", "F16"):
            assert back.tensors[name].type == t.type and np.array_equal(np.asarray(back.tensors[name].data),
                                                                         np.asarray(t.data)), name
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a, b = loaded(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 0.2 * b.abs().max()  # 4- to 8-bit weights and int8 activations


def test_a_bfloat16_model_decodes_in_the_fused_step_close_to_its_pytorch_layers(tmp_path):
    """bfloat16 weights and cache, float32 inside the step: the PyTorch bfloat16 layers round
    every intermediate to bfloat16 (8 bits), so the two agree to bfloat16's precision; the fused
    step is also batch-invariant."""
    from camelid import LlamaConfig, LlamaForCausalLM
    from camelid.core.cache import KVCache

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.model.fused_decode is not None
    ids = torch.tensor([[5, 9, 30, 2, 77, 41]])
    steps = {}
    for fused in (True, False):
        saved = model.model.fused_decode
        model.model.fused_decode = saved if fused else None
        with torch.inference_mode():
            cache = KVCache(model.config, 1, 16, dtype=torch.bfloat16)
            model(ids, cache=cache, cache_position=torch.arange(6))
            steps[fused] = model(torch.tensor([[7]]), cache=cache, cache_position=torch.tensor([6])).logits.float()
        model.model.fused_decode = saved
    assert (steps[True] - steps[False]).abs().max() <= 0.05 * steps[False].abs().max()
    alone = model.generate(ids, max_new_tokens=6, do_sample=False)
    batch = model.generate(torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0] + ids[0].tolist()]),
                           attention_mask=torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6]), max_new_tokens=6,
                           do_sample=False)
    assert torch.equal(batch[1, -6:], alone[0, -6:])


@pytest.mark.parametrize("isa", isas())
def test_argmax_is_torchs_on_ties_nan_and_odd_widths(isa):
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(5, n, generator=g) for n in (1, 7, 16, 17, 49152, 49155)]
    tie = torch.zeros(4, 100)
    tie[0, [3, 40, 77]] = 2.0  # equal maxima in different lanes and chunks: the first wins
    tie[1, [99, 98]] = 1.0  # in the tail
    tie[2] = -torch.inf  # nothing but -inf: index 0
    tie[3, [5, 21]] = torch.tensor([-0.0, 0.0]) + 3.0
    rows.append(tie)
    nan = torch.randn(4, 50000, generator=g)
    nan[0, 12345] = torch.nan  # a NaN wins, as in torch
    nan[1, [49999, 20]] = torch.nan  # the first NaN
    nan[2, 3] = torch.nan
    nan[3, 49990] = torch.nan  # in the tail past the last full 16
    rows.append(nan)
    with K.forced_isa(isa):
        for x in rows:
            assert torch.equal(K.argmax(x), x.argmax(-1)), (isa, x.shape)
    x = torch.randn(3, 2, 33, generator=g)  # any leading shape; other dtypes go to torch
    assert torch.equal(K.argmax(x), x.argmax(-1))
    assert torch.equal(K.argmax(x.bfloat16()), x.bfloat16().argmax(-1))
    assert torch.equal(K.argmax(x[..., ::2]), x[..., ::2].argmax(-1))
