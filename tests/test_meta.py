"""Meta's original checkpoint folders (params.json + consolidated.NN.pth) against transformers.

Each case takes a tiny random transformers LlamaForCausalLM, writes it out the way Meta's
repositories store a model (written here, independently of camelid: Meta names, RoPE rows in
adjacent-pair order, model-parallel shards split the way fairscale's layers split them), and loads
it back with camelid.formats.meta.load_meta. The Meta files are themselves checked first by a small
forward pass in Meta's own formulation (complex-number RoPE on adjacent pairs, repeat_kv, Meta's
llama3 frequency scaling), so a mistake in this file's writer cannot cancel one in the loader.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformers  # the oracle

from camelid import CheckpointError, ConfigError
from camelid.formats import meta
from camelid.formats.meta import convert_meta_to_hf, intermediate_size, load_meta, meta_config

TOL = 1e-4  # float32 logits, camelid vs transformers
MAX_ERR: dict[str, float] = {}  # largest error seen per case (read by whoever runs this in-process)

# HF name -> Meta name, written out by hand (not taken from camelid's table).
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_META = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
COLUMN = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
ROW = ("wo.weight", "w2.weight")


# ---------------------------------------------------------------------- the Meta side, written here

def halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (per head: first half real parts, second half imaginary) -> Meta's adjacent
    (real, imag) pairs: HF row i -> 2i, HF row D/2 + i -> 2i + 1."""
    D = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for i in range(D // 2):
            out[h * D + 2 * i] = w[h * D + i]
            out[h * D + 2 * i + 1] = w[h * D + D // 2 + i]
    return out


def to_meta_state(hf_model, params: dict, rope_freqs: bool = False) -> dict[str, torch.Tensor]:
    H = params["n_heads"]
    Hkv = params.get("n_kv_heads") or H
    out = {}
    for name, t in hf_model.state_dict().items():
        t = t.detach().clone()
        if name in HF_TO_META:
            out[HF_TO_META[name]] = t
            continue
        _, _, i, rest = name.split(".", 3)
        m = f"layers.{i}.{LAYER_HF_TO_META[rest]}"
        if m.endswith("wq.weight"):
            t = halves_to_pairs(t, H)
        elif m.endswith("wk.weight"):
            t = halves_to_pairs(t, Hkv)
        out[m] = t
    if hf_model.config.tie_word_embeddings:
        out.pop("output.weight", None)  # Llama 3.2 1B/3B style: no separate output matrix
    if rope_freqs:  # Llama 1/2 checkpoints carry the frequencies too
        hd = params["dim"] // H
        out["rope.freqs"] = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    return out


def split_shards(state: dict[str, torch.Tensor], n: int, embedding_dim: int) -> list[dict[str, torch.Tensor]]:
    """Model-parallel split: column-parallel on dim 0, row-parallel on dim 1, norms copied,
    tok_embeddings on `embedding_dim` (1: Llama 1/2 ParallelEmbedding, 0: Llama 3 VocabParallel)."""
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        if name == "tok_embeddings.weight":
            d = embedding_dim
        elif name.endswith(COLUMN):
            d = 0
        elif name.endswith(ROW):
            d = 1
        else:
            d = None
        pieces = [t] * n if d is None or n == 1 else list(torch.chunk(t, n, dim=d))
        assert d is None or n == 1 or all(p.shape[d] * n == t.shape[d] for p in pieces)
        for shard, p in zip(shards, pieces):
            shard[name] = p.clone().contiguous()  # a view would save its whole storage
    return shards


def write_meta(directory: Path, params: dict, shards: list[dict], names: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save(shard, directory / (names[i] if names else f"consolidated.{i:02d}.pth"))
    return directory


def meta_scaled_freqs(freqs: torch.Tensor, scale: float, low: float = 1.0, high: float = 4.0,
                      old_len: int = 8192) -> torch.Tensor:
    """Meta's llama3 frequency scaling, element by element as their reference code states it."""
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scale)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / scale + smooth * f)
    return torch.tensor(out, dtype=freqs.dtype)


def meta_forward(state: dict, params: dict, tokens: torch.Tensor, start: int = 0,
                 scaled: bool | None = None) -> torch.Tensor:
    """Logits the way Meta's model.py computes them (float32, no cache)."""
    dim, H = params["dim"], params["n_heads"]
    Hkv = params.get("n_kv_heads") or H
    hd, eps = dim // H, params["norm_eps"]
    B, T = tokens.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if params.get("use_scaled_rope") if scaled is None else scaled:
        freqs = meta_scaled_freqs(freqs, params.get("rope_scaling_factor", 8.0))
    angles = torch.outer(torch.arange(start, start + T).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # [1, T, 1, hd/2]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(x):  # adjacent pairs as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis).flatten(3)

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = state["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, state[p + "attention_norm.weight"])
        q = rotary((x @ state[p + "attention.wq.weight"].T).view(B, T, H, hd))
        k = rotary((x @ state[p + "attention.wk.weight"].T).view(B, T, Hkv, hd))
        v = (x @ state[p + "attention.wv.weight"].T).view(B, T, Hkv, hd)
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)  # repeat_kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(hd) + mask
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim)
        h = h + att @ state[p + "attention.wo.weight"].T
        x = norm(h, state[p + "ffn_norm.weight"])
        gate, up = x @ state[p + "feed_forward.w1.weight"].T, x @ state[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ state[p + "feed_forward.w2.weight"].T
    out = state.get("output.weight", state["tok_embeddings.weight"])
    return norm(h, state["norm.weight"]) @ out.T


# ---------------------------------------------------------------------- cases

def llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# id -> (params.json, transformers config overrides, shards, tok_embeddings split dim, rope.freqs,
#        first position: far out for the scaled-rope cases, where the scaling only shows at large angles)
CASES = {
    "mha-llama1-1shard": (
        dict(dim=64, n_layers=2, n_heads=4, vocab_size=-1, multiple_of=32, norm_eps=1e-6),
        dict(num_attention_heads=4, intermediate_size=192, rms_norm_eps=1e-6), 1, 0, True, 0),
    "gqa-llama2_70b-2shards-embedding_split_dim1": (
        dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=-1, multiple_of=32,
             ffn_dim_multiplier=1.3, norm_eps=1e-5),
        dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=224), 2, 1, True, 0),
    "gqa-llama3-2shards-embedding_split_dim0": (
        dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, multiple_of=16,
             ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0),
        dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=256,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), 2, 0, False, 0),
    "gqa-llama31-scaled_rope-1shard": (
        dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, multiple_of=16,
             ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
        dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=256, max_position_embeddings=131072,
             rope_parameters={"rope_theta": 500000.0, **llama3_rope(8.0)}), 1, 0, False, 5000),
    "gqa-llama32-scaled_rope_factor32-tied-2shards": (
        dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, multiple_of=16,
             ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
             rope_scaling_factor=32.0),
        dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=256, max_position_embeddings=131072,
             tie_word_embeddings=True, rope_parameters={"rope_theta": 500000.0, **llama3_rope(32.0)}),
        2, 0, False, 3000),
}
BASE_HF = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2)


def hf_model(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE_HF, **overrides}))
    with torch.no_grad():  # transformers sets norms to 1: redraw so a swapped norm cannot hide
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.ndim == 1 else torch.randn_like(p) * 0.15)
    return model.eval()


def hf_logits(model, tokens, start=0):
    positions = torch.arange(start, start + tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions).logits


def camelid_logits(model, tokens, start=0):
    positions = torch.arange(start, start + tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids=positions).logits


TOKENS = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(0))


def make_case(tmp_path: Path, case_id: str, dtype=torch.float32):
    params, overrides, n, emb_dim, freqs, start = CASES[case_id]
    hf = hf_model(overrides)
    state = {k: v.to(dtype) for k, v in to_meta_state(hf, params, freqs).items()}
    write_meta(tmp_path / "meta", params, split_shards(state, n, emb_dim))
    return hf, state, params, start


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    """A 2-shard GQA folder for the bad-input tests to copy and break."""
    base = tmp_path_factory.mktemp("gqa")
    hf, state, params, _ = make_case(base, "gqa-llama3-2shards-embedding_split_dim0")
    return base / "meta", params


def broken(tmp_path: Path, gqa_folder) -> tuple[Path, dict]:
    src, params = gqa_folder
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst, dict(params)


def shards_of(folder: Path) -> list[dict]:
    return [torch.load(folder / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]


# ---------------------------------------------------------------------- layout and arithmetic

def test_row_permutation_on_one_head():
    # one head of 6 rows: Meta (r0 i0 r1 i1 r2 i2) -> HF (r0 r1 r2 i0 i1 i2)
    meta_rows = torch.tensor([[0.0], [10.0], [1.0], [11.0], [2.0], [12.0]])
    assert meta.meta_to_hf_rows(meta_rows, 1).flatten().tolist() == [0, 1, 2, 10, 11, 12]
    w = torch.randn(8 * 6, 5)
    assert torch.equal(meta.meta_to_hf_rows(meta.hf_to_meta_rows(w, 8), 8), w)
    assert torch.equal(meta.hf_to_meta_rows(w, 8), halves_to_pairs(w, 8))


@pytest.mark.parametrize("dim, multiple_of, mult, expected", [
    (4096, 256, None, 11008),     # Llama 2 7B
    (5120, 256, None, 13824),     # Llama 2 13B
    (8192, 4096, 1.3, 28672),     # Llama 2 70B
    (4096, 1024, 1.3, 14336),     # Llama 3 8B
    (16384, 4096, 1.2, 53248),    # Llama 3.1 405B
    (2048, 256, 1.5, 8192),       # Llama 3.2 1B
    (3072, 256, 1.0, 8192),       # Llama 3.2 3B
    (64, 32, 1.3, 224), (64, 32, None, 192), (64, 16, 1.5, 256),  # the tiny cases below
])
def test_intermediate_size_of_published_models(dim, multiple_of, mult, expected):
    assert intermediate_size(dim, multiple_of, mult) == expected


# ---------------------------------------------------------------------- logits against transformers

@pytest.mark.parametrize("case_id", list(CASES))
def test_load_meta_matches_transformers(tmp_path, case_id):
    hf, state, params, start = make_case(tmp_path, case_id)
    ref = hf_logits(hf, TOKENS, start)
    # the files really are in Meta's layout: Meta's own formulation reproduces transformers
    ref_err = (meta_forward(state, params, TOKENS, start) - ref).abs().max().item()
    MAX_ERR[case_id + " (Meta-formulation reference)"] = ref_err
    assert ref_err <= TOL

    model = load_meta(tmp_path / "meta")
    err = (camelid_logits(model, TOKENS, start) - ref).abs().max().item()
    MAX_ERR[case_id] = err
    assert err <= TOL, f"{case_id}: max |diff| {err}"

    c = model.config
    assert c.vocab_size == 160 and c.intermediate_size == CASES[case_id][1]["intermediate_size"]
    assert c.num_key_value_heads == (params.get("n_kv_heads") or params["n_heads"])
    assert c.tie_word_embeddings == ("output.weight" not in state)
    if params.get("use_scaled_rope"):
        assert c.rope_scaling == llama3_rope(params.get("rope_scaling_factor", 8.0))
        # and the scaling matters at these positions: plain RoPE gives other logits
        assert (meta_forward(state, params, TOKENS, start, scaled=False) - ref).abs().max() > 100 * TOL
    else:
        assert c.rope_scaling is None
    assert model.dtype == torch.float32 and not any(p.is_meta for p in model.parameters())


def test_convert_meta_to_hf_loads_in_transformers(tmp_path):
    hf, state, params, start = make_case(tmp_path, "gqa-llama2_70b-2shards-embedding_split_dim1")
    # a Llama 3 style tiktoken tokenizer.model: 100 byte tokens, then the special tokens
    import base64

    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(100)]
    (tmp_path / "meta" / "tokenizer.model").write_text("\n".join(lines) + "\n")

    out = convert_meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "meta" / "tokenizer.model").read_bytes()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    err = (hf_logits(loaded, TOKENS) - hf_logits(hf, TOKENS)).abs().max().item()
    MAX_ERR["convert_meta_to_hf"] = err
    assert err <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == 100  # <|begin_of_text|> follows the ranks
    assert config["eos_token_id"] == [101, 108, 109]  # end_of_text, eom_id, eot_id


def test_convert_scaled_rope_round_trips_through_transformers(tmp_path):
    hf, state, params, start = make_case(tmp_path, "gqa-llama32-scaled_rope_factor32-tied-2shards")
    out = convert_meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings
    err = (hf_logits(loaded, TOKENS, start) - hf_logits(hf, TOKENS, start)).abs().max().item()
    MAX_ERR["convert_meta_to_hf scaled rope"] = err
    assert err <= TOL


def test_bfloat16_checkpoint_keeps_its_dtype_with_auto(tmp_path):
    hf, state, params, start = make_case(tmp_path, "gqa-llama3-2shards-embedding_split_dim0", dtype=torch.bfloat16)
    model = load_meta(tmp_path / "meta", dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.torch_dtype == "bfloat16"
    # the weights are the bf16 ones, un-permuted: compare with the bf16-rounded HF weights
    expected = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    for name, t in model.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert load_meta(tmp_path / "meta").dtype == torch.float32  # None: float32, as load_hf


def test_loaded_model_does_not_read_the_shard_file_afterwards(tmp_path):
    hf, state, params, start = make_case(tmp_path, "mha-llama1-1shard")  # float32 as stored: no conversion copy
    model = load_meta(tmp_path / "meta")
    before = camelid_logits(model, TOKENS)
    shard = tmp_path / "meta" / "consolidated.00.pth"
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, shard)  # same layout, other values
    assert torch.equal(camelid_logits(model, TOKENS), before)


def test_meta_config_without_shapes_and_with_wrong_vocab():
    params = dict(CASES["gqa-llama3-2shards-embedding_split_dim0"][0])
    c = meta_config(params)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 8, 2)
    assert c.rope_theta == 500000.0 and c.rms_norm_eps == 1e-5 and c.intermediate_size == 256
    assert c.max_position_embeddings == 2048 and c.rope_scaling is None
    c = meta_config({**params, "max_seq_len": 4096, "max_batch_size": 32})  # run-time keys of Meta's code
    assert c.max_position_embeddings == 4096
    c = meta_config({**params, "use_scaled_rope": True})
    assert c.max_position_embeddings == 131072 and c.rope_scaling["factor"] == 8.0
    with pytest.raises(ConfigError, match="rope_scaling_factor is set but use_scaled_rope is not true"):
        meta_config({**params, "rope_scaling_factor": 32.0})
    with pytest.raises(ConfigError, match=r"n_kv_heads \(3\) must divide n_heads \(8\)"):
        meta_config({**params, "n_kv_heads": 3})
    with pytest.raises(ConfigError, match="vocab_size is -1"):
        meta_config({**params, "vocab_size": -1})
    with pytest.raises(CheckpointError, match="vocab_size is 160, but tok_embeddings.weight has 128 rows"):
        meta_config(params, {"tok_embeddings.weight": (128, 64), "norm.weight": (64,)})


# ---------------------------------------------------------------------- bad input, each named

class RunsCode:
    """Unpickling this calls os.mkdir(path): proof that a loader ran code from the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_that_runs_code_is_refused(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    marker = tmp_path / "pwned"
    state = shards_of(folder)[0]
    state["tok_embeddings.weight"] = RunsCode(str(marker))
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot be read as a weights-only"):
        load_meta(folder)
    assert not marker.exists()


def test_wrong_dim_in_params(tmp_path, gqa_folder):
    folder, params = broken(tmp_path, gqa_folder)
    write_meta(folder, {**params, "dim": 48, "n_heads": 6, "n_kv_heads": 2}, [])
    with pytest.raises(CheckpointError, match=r"params\.json: dim is 48"):
        load_meta(folder)
    # one shard: no embedding join to decide, caught by norm.weight
    hf, state, params, _ = make_case(tmp_path / "one", "mha-llama1-1shard")
    write_meta(tmp_path / "one" / "meta", {**params, "dim": 48}, [])
    with pytest.raises(CheckpointError, match=r"params\.json: dim is 48, but norm\.weight has shape \(64,\)"):
        load_meta(tmp_path / "one" / "meta")


@pytest.mark.parametrize("n_layers, problem", [(3, r"missing tensors: layers\.2\.attention\.wk\.weight, "
                                                   r"layers\.2\.attention\.wo\.weight"),
                                               (1, r"unexpected tensors: layers\.1\.attention\.wk\.weight")])
def test_wrong_n_layers_lists_the_tensors(tmp_path, gqa_folder, n_layers, problem):
    folder, params = broken(tmp_path, gqa_folder)
    write_meta(folder, {**params, "n_layers": n_layers}, [])
    with pytest.raises(CheckpointError, match=r"does not match its params\.json; " + problem):
        load_meta(folder)


def test_wrong_multiple_of_names_the_ffn_width(tmp_path, gqa_folder):
    folder, params = broken(tmp_path, gqa_folder)
    write_meta(folder, {**params, "multiple_of": 100}, [])
    with pytest.raises(CheckpointError, match=r"params\.json: the feed-forward width it implies \(multiple_of=100, "
                                              r"ffn_dim_multiplier=1\.5, dim=64 -> 300\) does not match "
                                              r"layers\.0\.feed_forward\.w1\.weight, which has 256 rows"):
        load_meta(folder)


def test_wrong_n_kv_heads_lists_the_misshapen_tensors(tmp_path, gqa_folder):
    folder, params = broken(tmp_path, gqa_folder)
    write_meta(folder, {**params, "n_kv_heads": 4}, [])
    with pytest.raises(CheckpointError, match=r"tensors with the wrong shape: layers\.0\.attention\.wk\.weight "
                                              r"\(16, 64\) \(expected \(32, 64\)\)"):
        load_meta(folder)


def test_shards_with_inconsistent_shapes(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    state = shards_of(folder)[1]
    state["layers.1.attention.wq.weight"] = state["layers.1.attention.wq.weight"][:16].clone()
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wq\.weight has shape \(32, 64\) in "
                                              r"consolidated\.00\.pth but \(16, 64\) in consolidated\.01\.pth"):
        load_meta(folder)


def test_embedding_shards_that_fit_no_join(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    for i, state in enumerate(shards_of(folder)):
        state["tok_embeddings.weight"] = state["tok_embeddings.weight"][:, :40].clone()
        torch.save(state, folder / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError, match=r"params\.json: dim is 64, which fits neither way of joining "
                                              r"tok_embeddings\.weight from 2 shards of shape \(80, 40\)"):
        load_meta(folder)


def test_shards_with_different_tensors(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    state = shards_of(folder)[1]
    del state["layers.0.ffn_norm.weight"]
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"missing from consolidated\.01\.pth: layers\.0\.ffn_norm\.weight"):
        load_meta(folder)


def test_missing_params_json(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    (folder / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"no params\.json"):
        load_meta(folder)


def test_no_consolidated_files(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    for f in folder.glob("consolidated.*.pth"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no consolidated\.\*\.pth weight files"):
        load_meta(folder)


def test_shard_numbering_gap(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"shard numbering has a gap: no shard 1 \(found consolidated\.00\.pth, "
                                              r"consolidated\.02\.pth\)"):
        load_meta(folder)


def test_replicated_norm_differs_between_shards(tmp_path, gqa_folder):
    folder, _ = broken(tmp_path, gqa_folder)
    state = shards_of(folder)[1]
    state["layers.1.attention_norm.weight"] = state["layers.1.attention_norm.weight"] + 1e-3
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention_norm\.weight differs between "
                                              r"consolidated\.00\.pth and consolidated\.01\.pth"):
        load_meta(folder)


def test_unknown_params_key_is_refused(tmp_path, gqa_folder):
    folder, params = broken(tmp_path, gqa_folder)
    write_meta(folder, {**params, "moe_args": {"num_experts": 16}}, [])
    with pytest.raises(ConfigError, match=r"params\.json: key\(s\) camelid does not know: moe_args"):
        load_meta(folder)


def test_from_pretrained_and_convert_cli_dispatch_meta_folders(tmp_path, gqa_folder, capsys):
    """A Meta folder loads through the generic entry points, and `camelid convert` reports on it."""
    from camelid import LlamaForCausalLM
    from camelid.cli import main
    from camelid.formats.meta import load_meta

    folder = gqa_folder[0] if isinstance(gqa_folder, tuple) else gqa_folder
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    generic = LlamaForCausalLM.from_pretrained(folder, pack=False)
    with torch.no_grad():
        assert torch.equal(generic(tokens).logits, load_meta(folder)(tokens).logits)
    assert main(["convert", str(folder), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "max |logit diff| 0 " in capsys.readouterr().out
