"""camelid against transformers' LlamaForCausalLM (the test oracle), plus the behaviours that have
no transformers counterpart checked against closed forms or against camelid's own unbatched path.

Every model here is tiny (hidden 64, 2 layers, vocab 160) and float32. Weights are random *and*
large enough to matter: transformers initialises biases to 0 and norms to 1, which would let a
dropped bias or norm pass unnoticed, so `randomize_` redraws every parameter before comparing.
transformers' dynamic-NTK rotary embedding caches its growth in module state, so each forward
through transformers runs on a fresh deep copy of a model that has never run.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import transformers  # the oracle; a test dependency, so a missing one fails loudly instead of skipping
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as HFRotaryEmbedding

import camelid
from camelid import KVCache
from camelid.core import model as camelid_model
from camelid.core.rope import ntk_rope, rope_inv_freq

IMPLS = ("sdpa", "eager")
LOGIT_TOL = 1e-4  # float32, camelid vs transformers
REL_TOL = 1e-4  # loss and gradients, relative
SELF_TOL = 1e-5  # camelid vs camelid: padded batch vs single row, cached decode vs full forward

# Largest error seen per category; read by whoever runs the file in-process (not asserted on).
MAX_ERR: dict[str, float] = defaultdict(float)


def _note(category: str, err: float) -> float:
    MAX_ERR[category] = max(MAX_ERR[category], err)
    return err


# ---------------------------------------------------------------------- configs

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def ramp(n: int, lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


@dataclass
class Case:
    id: str
    overrides: dict
    seq_len: int = 20
    # "scaled": cos/sin must differ from plain RoPE at these positions; "plain": must equal it.
    rope_expect: str = "plain"
    d: dict = field(init=False)

    def __post_init__(self):
        self.d = {**BASE, **self.overrides}


def rp(rope_type: str, theta: float = 10000.0, **params) -> dict:
    """transformers >= 5 spelling: rope_parameters with rope_theta inside."""
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}


CASES = [
    # attention layouts; the first uses the legacy top-level rope_theta spelling
    Case("mha-default-legacy_rope_theta", dict(num_key_value_heads=4, rope_theta=10000.0)),
    Case("gqa-default-rope_parameters", rp("default", theta=500.0)),
    Case("mqa-default", dict(num_key_value_heads=1)),
    # every rope type; legacy rope_scaling spelling (with "type" and with "rope_type") mixed in
    Case("linear-legacy_rope_scaling_type", dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0}),
         rope_expect="scaled"),
    Case("dynamic-shorter_than_max_pos", rp("dynamic", factor=2.0), seq_len=20),
    Case("dynamic-longer_than_max_pos-legacy_rope_scaling",
         dict(max_position_embeddings=16, rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
         seq_len=40, rope_expect="scaled"),
    # orig 32, low 1, high 4: wavelengths 6.3 (kept), 19.9 (smoothed), >= 63 (divided by factor)
    Case("llama3", dict(max_position_embeddings=128, **rp("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)), seq_len=24, rope_expect="scaled"),
    # theta 100 puts the beta_fast..beta_slow ramp across pairs 0..5 of 8 (not all on one side)
    Case("yarn-original_max_pos", dict(max_position_embeddings=256, **rp(
        "yarn", theta=100.0, factor=4.0, original_max_position_embeddings=64)), rope_expect="scaled"),
    Case("yarn-mscale-mscale_all_dim", dict(max_position_embeddings=256, **rp(
        "yarn", theta=100.0, factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8)),
         rope_expect="scaled"),
    Case("yarn-betas-no_truncate-attention_factor", dict(max_position_embeddings=256, **rp(
        "yarn", theta=100.0, factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0,
        truncate=False, attention_factor=1.3)), rope_expect="scaled"),
    Case("yarn-no_original_max_pos", dict(max_position_embeddings=64, rope_theta=100.0,
                                          rope_scaling={"rope_type": "yarn", "factor": 2.0}), rope_expect="scaled"),
    Case("longrope-below_original-short_factor", dict(max_position_embeddings=64, **rp(
        "longrope", factor=4.0, original_max_position_embeddings=16,
        short_factor=ramp(8, 1.0, 1.6), long_factor=ramp(8, 1.0, 12.0))), seq_len=12, rope_expect="scaled"),
    Case("longrope-above_original-long_factor", dict(max_position_embeddings=64, **rp(
        "longrope", factor=4.0, original_max_position_embeddings=16,
        short_factor=ramp(8, 1.0, 1.6), long_factor=ramp(8, 1.0, 12.0))), seq_len=24, rope_expect="scaled"),
    Case("longrope-above_original-no_factor-head_dim24", dict(max_position_embeddings=64, head_dim=24, **rp(
        "longrope", original_max_position_embeddings=16,
        short_factor=ramp(12, 1.0, 1.6), long_factor=ramp(12, 1.0, 12.0))), seq_len=24, rope_expect="scaled"),
    # shapes and options
    Case("explicit_head_dim24", dict(head_dim=24)),
    Case("attention_bias-mlp_bias", dict(attention_bias=True, mlp_bias=True)),
    Case("tied_embeddings", dict(tie_word_embeddings=True)),
    Case("mqa-head_dim24-bias-tied-llama3", dict(num_key_value_heads=1, head_dim=24, attention_bias=True,
                                                max_position_embeddings=128,
                                                mlp_bias=True, tie_word_embeddings=True, **rp(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)),
         seq_len=24, rope_expect="scaled"),
]
CASE_IDS = [c.id for c in CASES]


# ---------------------------------------------------------------------- helpers

@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter (tied ones once): norms around 1, nonzero biases, logits of a few units."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.2 * noise)
        else:  # embeddings too: a tied lm_head then gives logits of a few units, like the untied one
            p.copy_(noise * p.shape[-1] ** -0.5)
    return model


def hf_model(d: dict, seed: int = 0):
    """A pristine transformers model (eager attention: the plainest reference) with random weights."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(d)))
    hf.set_attn_implementation("eager")
    return randomize_(hf, seed).eval()


def camelid_from(hf, d: dict) -> camelid.LlamaForCausalLM:
    """camelid's model for the same dict, holding the transformers model's weights."""
    cm = camelid.LlamaForCausalLM(camelid.LlamaConfig.from_dict(copy.deepcopy(d)))
    own = cm.state_dict()
    state = {k: v for k, v in hf.state_dict().items() if k in own}  # transformers may hold extra keys
    cm.load_state_dict(state, strict=True)  # strict: camelid expects nothing transformers lacks
    return cm.eval()


def fresh(hf):
    """A copy that has never run (transformers' dynamic rope keeps state between forwards)."""
    return copy.deepcopy(hf)


def tokens(batch: int, seq_len: int, vocab: int = BASE["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|: relative to the tensor's scale, so near-zero entries do not blow up."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


# ---------------------------------------------------------------------- 1. parity with transformers

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rotary_cos_sin_match_transformers(case):
    """cos/sin (frequencies and YaRN/LongRoPE attention scale) for a batch of position rows."""
    hf_cfg = transformers.LlamaConfig(**copy.deepcopy(case.d))
    cfg = camelid.LlamaConfig.from_dict(copy.deepcopy(case.d))
    T = case.seq_len
    positions = torch.stack([torch.arange(T), torch.arange(T) + 3])  # second row: offset (max = T + 2)
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = HFRotaryEmbedding(hf_cfg)(x, positions)
    cos, sin = camelid_model.LlamaRotaryEmbedding(cfg)(positions, torch.float32)
    assert _note("rotary cos/sin", max(max_abs(cos, hf_cos), max_abs(sin, hf_sin))) <= 1e-6

    # The case must exercise what its name says: scaled types move the angles, plain ones do not.
    plain = camelid.LlamaConfig.from_dict({**BASE, **{k: v for k, v in case.d.items()
                                                      if k not in ("rope_parameters", "rope_scaling")}})
    plain.rope_theta = cfg.rope_theta
    plain_cos, _ = camelid_model.LlamaRotaryEmbedding(plain)(positions, torch.float32)
    differs = max_abs(cos, plain_cos) > 1e-3
    assert differs == (case.rope_expect == "scaled"), f"{case.id}: rope scaling had {'an' if differs else 'no'} effect"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_match_transformers(case):
    hf = hf_model(case.d)
    cm = camelid_from(hf, case.d)
    ids = tokens(2, case.seq_len)
    with torch.no_grad():
        ref = fresh(hf)(ids).logits
        assert ref.abs().max() > 1.0  # weights are not near-uniform: errors would show
        for impl in IMPLS:
            out = cm.set_attn_implementation(impl)(ids).logits
            assert out.shape == ref.shape
            err = _note("logits", max_abs(out, ref))
            assert err <= LOGIT_TOL, f"{impl}: max |logit diff| {err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_and_gradients_match_transformers(case):
    hf = hf_model(case.d)  # pristine: this is its only forward
    cm = camelid_from(hf, case.d)
    ids = tokens(2, case.seq_len)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored: a prompt prefix ...
    labels[1, -4:] = -100  # ... and a padded tail
    labels[1, 5] = -100

    ref_loss = hf(ids, labels=labels).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    for impl in IMPLS:
        cm.zero_grad(set_to_none=True)
        loss = cm.set_attn_implementation(impl)(ids, labels=labels).loss
        loss.backward()
        assert _note("loss", rel_err(loss.detach(), ref_loss.detach())) <= REL_TOL, \
            f"{impl}: loss {loss.item()} vs transformers {ref_loss.item()}"
        grads = {n: p.grad for n, p in cm.named_parameters()}
        assert sorted(grads) == sorted(ref_grads)
        for name, ref in ref_grads.items():
            assert grads[name] is not None, f"{impl}: {name} got no gradient"
            err = _note("gradients", rel_err(grads[name], ref))
            assert err <= REL_TOL, f"{impl}: gradient of {name} off by {err:.3g} (relative)"


def test_hidden_states_match_transformers():
    """num_hidden_layers + 1 entries: the embeddings, each layer's input, and last the final-normed
    state (transformers overwrites hidden_states[-1] with last_hidden_state)."""
    case = CASES[1]
    hf = hf_model(case.d)
    cm = camelid_from(hf, case.d)
    ids = tokens(2, case.seq_len)
    with torch.no_grad():
        ref = fresh(hf)(ids, output_hidden_states=True).hidden_states
        for impl in IMPLS:
            out = cm.set_attn_implementation(impl)(ids, output_hidden_states=True).hidden_states
            assert len(out) == len(ref) == case.d["num_hidden_layers"] + 1
            for i, (a, b) in enumerate(zip(out, ref)):
                err = _note("hidden states", max_abs(a, b))
                assert err <= LOGIT_TOL, f"{impl}: hidden_states[{i}] off by {err:.3g}"


def test_rope_parameters_and_rope_scaling_spellings_agree():
    """The same YaRN rope in the transformers-5 and the legacy spelling gives the same camelid config."""
    params = dict(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8)
    new = camelid.LlamaConfig.from_dict({**BASE, **rp("yarn", theta=100.0, **params)})
    old = camelid.LlamaConfig.from_dict({**BASE, "rope_theta": 100.0, "rope_scaling": {"type": "yarn", **params}})
    assert (new.rope_type, new.rope_theta, new.rope_scaling) == (old.rope_type, old.rope_theta, old.rope_scaling)
    f_new, s_new = rope_inv_freq(new, 40)
    f_old, s_old = rope_inv_freq(old, 40)
    assert s_new == s_old != 1.0 and torch.equal(f_new, f_old)


# ---------------------------------------------------------------------- 2. static NTK (no transformers equivalent)

def paddle_ntk_inv_freq(dim: int, base: float, factor: float) -> torch.Tensor:
    """PaddleNLP LlamaNTKScalingRotaryEmbedding, written out: base' = base * factor^(dim/(dim-2))."""
    base = base * factor ** (dim / (dim - 2))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


@pytest.mark.parametrize("head_dim", [16, 24, 128])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0])
def test_ntk_rope_closed_form(head_dim, base, factor):
    cfg = camelid.LlamaConfig.from_dict({**BASE, "head_dim": head_dim, "rope_theta": base,
                                         "rope_scaling": {"type": "ntk", "factor": factor}})
    expected = paddle_ntk_inv_freq(head_dim, base, factor)
    for seq_len in (None, 8, 10 * cfg.max_position_embeddings):  # static: the length changes nothing
        inv_freq, scale = ntk_rope(cfg, seq_len)
        assert scale == 1.0 and inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
        torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    if factor > 1:  # and it is not plain RoPE
        assert not torch.allclose(expected, paddle_ntk_inv_freq(head_dim, base, 1.0), rtol=1e-3)


def test_ntk_model_equals_default_rope_with_the_closed_form_base():
    """Static NTK is plain RoPE with a larger base, so a transformers default-RoPE model with
    rope_theta = base' is an oracle for the whole camelid forward pass."""
    dim, factor, theta = 16, 4.0, 10000.0
    scaled_theta = theta * factor ** (dim / (dim - 2))
    hf = hf_model({**BASE, **rp("default", theta=scaled_theta)})
    cm = camelid_from(hf, {**BASE, "rope_theta": theta, "rope_scaling": {"rope_type": "ntk", "factor": factor}})
    assert cm.config.rope_type == "ntk"
    ids = tokens(2, 24)
    with torch.no_grad():
        ref = fresh(hf)(ids).logits
        for impl in IMPLS:
            err = _note("logits", max_abs(cm.set_attn_implementation(impl)(ids).logits, ref))
            assert err <= LOGIT_TOL, f"{impl}: {err:.3g}"


# ---------------------------------------------------------------------- 3. checkpoints, both directions

FILE_CASES = [
    Case("untied", {}),
    Case("tied", dict(tie_word_embeddings=True)),
    Case("llama3-head_dim24-bias", dict(head_dim=24, attention_bias=True, mlp_bias=True, max_position_embeddings=128, **rp(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
]
FILE_IDS = [c.id for c in FILE_CASES]


def _safetensors_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            keys.update(st.keys())
    return keys


@pytest.mark.parametrize("case", FILE_CASES, ids=FILE_IDS)
def test_transformers_save_pretrained_loads_in_camelid(case, tmp_path):
    hf = hf_model(case.d)
    hf.save_pretrained(tmp_path)
    tied = case.d.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in _safetensors_keys(tmp_path)) != tied  # transformers drops the tied copy
    cm = camelid.LlamaForCausalLM.from_pretrained(tmp_path, pack=False)
    assert cm.config.tie_word_embeddings == tied
    assert (cm.lm_head.weight is cm.model.embed_tokens.weight) == tied
    ids = tokens(2, 16)
    with torch.no_grad():
        err = _note("logits (files)", max_abs(cm(ids).logits, fresh(hf)(ids).logits))
    assert err <= LOGIT_TOL


@pytest.mark.parametrize("shard", [None, "50KB"], ids=["single_file", "sharded_50KB"])
@pytest.mark.parametrize("case", FILE_CASES, ids=FILE_IDS)
def test_camelid_save_pretrained_loads_in_transformers(case, shard, tmp_path):
    cm = randomize_(camelid.LlamaForCausalLM(camelid.LlamaConfig.from_dict(copy.deepcopy(case.d))), seed=3).eval()
    cm.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    if shard:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
        weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map.values()) == {p.name for p in shards}
    else:
        assert not shards and (tmp_path / "model.safetensors").is_file()
    tied = case.d.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in _safetensors_keys(tmp_path)) != tied

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    ids = tokens(2, 16)
    with torch.no_grad():
        err = _note("logits (files)", max_abs(hf(ids).logits, cm(ids).logits))
    assert err <= LOGIT_TOL


@pytest.mark.parametrize("case", FILE_CASES[:2], ids=FILE_IDS[:2])
def test_legacy_pytorch_model_bin_loads_in_camelid(case, tmp_path):
    hf = hf_model(case.d)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # tied: holds lm_head.weight as well
    hf.config.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    cm = camelid.LlamaForCausalLM.from_pretrained(tmp_path)
    ids = tokens(2, 16)
    with torch.no_grad():
        err = _note("logits (files)", max_abs(cm(ids).logits, fresh(hf)(ids).logits))
    assert err <= LOGIT_TOL


# ---------------------------------------------------------------------- 4. left-padded batches

SELF_CASES = {
    "gqa-rope": {**BASE},
    "mqa-yarn": {**BASE, "num_key_value_heads": 1, "max_position_embeddings": 256, **rp(
        "yarn", theta=100.0, factor=4.0, original_max_position_embeddings=64)},
    # 6 heads: not a power of two, so the interleaved ALiBi slopes are used too
    "alibi-6heads-gqa": {**BASE, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2, "alibi": True},
}


def self_model(name: str, impl: str) -> camelid.LlamaForCausalLM:
    cfg = camelid.LlamaConfig.from_dict(copy.deepcopy(SELF_CASES[name]))
    return randomize_(camelid.LlamaForCausalLM(cfg), seed=5).eval().set_attn_implementation(impl)


PAD_ROWS = (12, 7, 2, 12)  # row lengths of the left-padded batch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(SELF_CASES))
def test_left_padded_batch_matches_each_row_alone(name, impl):
    model = self_model(name, impl)
    rows = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(PAD_ROWS)]
    ids, mask = left_pad(rows)
    assert (mask == 0).any()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits  # positions come from the mask
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            err = _note("padded batch", max_abs(batch[i, -len(row):], alone))
            assert err <= SELF_TOL, f"row {i} (length {len(row)}): {err:.3g}"
        if not model.config.alibi:  # and transformers agrees, given the positions it does not derive itself
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(SELF_CASES[name])))
            hf.set_attn_implementation("eager")
            hf.load_state_dict(model.state_dict(), strict=True)
            ref = hf.eval()(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            real = mask.bool()
            err = _note("padded batch vs transformers", (batch - ref).abs()[real].max().item())
            assert err <= LOGIT_TOL, f"vs transformers: {err:.3g}"


# ---------------------------------------------------------------------- 5. KV cache

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(SELF_CASES))
def test_cached_decode_matches_full_forward(name, impl, padded):
    model = self_model(name, impl)
    rows = [tokens(1, n, seed=20 + i)[0] for i, n in enumerate(PAD_ROWS if padded else (12, 12))]
    ids, mask = left_pad(rows)
    B, T = ids.shape
    prefill = T - 3  # padded: the 2-token row is all padding in the prefill and starts while decoding
    full_mask = mask if padded else None
    with torch.no_grad():
        full = model(ids, attention_mask=full_mask).logits
        cache = KVCache(model.config, B, T + 4)  # more slots than used: unused slots must stay invisible
        out = model(ids[:, :prefill], attention_mask=None if full_mask is None else full_mask[:, :prefill],
                    cache=cache, cache_position=torch.arange(prefill)).logits
        real = mask[:, :prefill].bool()
        steps = [_note("cache", (out - full[:, :prefill]).abs()[real].max().item())]
        for t in range(prefill, T):
            step_mask = None if full_mask is None else full_mask[:, :t + 1]  # grows one column per step
            out = model(ids[:, t:t + 1], attention_mask=step_mask, cache=cache,
                        cache_position=torch.tensor([t])).logits
            steps.append(_note("cache", max_abs(out[:, 0], full[:, t])))
    assert max(steps) <= SELF_TOL, f"per-step max errors: {steps}"


# ---------------------------------------------------------------------- 6. gradient checkpointing

@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_checkpointing_same_loss_and_gradients(impl, monkeypatch):
    d = {**BASE, "attention_bias": True, "mlp_bias": True, "attention_dropout": 0.0}
    ref = randomize_(camelid.LlamaForCausalLM(camelid.LlamaConfig.from_dict(d)), seed=7)
    ckpt = copy.deepcopy(ref)
    ckpt.gradient_checkpointing_enable()
    ids = tokens(2, 16)
    labels = ids.clone()
    labels[:, :4] = -100

    calls = []
    real_checkpoint = camelid_model.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(camelid_model, "checkpoint", counting_checkpoint)
    losses, grads = [], []
    for model in (ref, ckpt):
        model.train().set_attn_implementation(impl)
        loss = model(ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == d["num_hidden_layers"], "gradient checkpointing did not wrap each layer once"
    assert _note("loss", rel_err(losses[1], losses[0])) <= REL_TOL
    for name, g in grads[0].items():
        assert _note("gradients", rel_err(grads[1][name], g)) <= REL_TOL, name


# ---------------------------------------------------------------------- 7. token ids outside the vocabulary

@pytest.mark.parametrize("bad", [BASE["vocab_size"], BASE["vocab_size"] + 1000, -1],
                         ids=["vocab_size", "far_above", "negative"])
def test_out_of_vocabulary_token_id_raises_naming_it(bad):
    # (for bad == vocab_size the number also appears in a printed range; the other two ids are unique)
    model = self_model("gqa-rope", "sdpa")
    ids = tokens(2, 8)
    ids[1, 5] = bad
    with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(str(bad))}(?!\d)"):
        model(ids)
