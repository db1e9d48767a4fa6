"""ALiBi against independent closed forms (Press et al. 2022) and a hand-written reference forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.core.rope import alibi_bias, alibi_slopes


def closed_form_slopes(n):
    """m_i = 2^(-8i/p) for i <= p (p the largest power of two <= n); the remaining n - p heads
    take the odd-indexed slopes of 2p heads: 2^(-4(2j-1)/p), j = 1..n-p."""
    p = 2 ** int(math.log2(n))
    return [2 ** (-8 * i / p) for i in range(1, p + 1)] + [2 ** (-4 * (2 * j - 1) / p) for j in range(1, n - p + 1)]


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 8, 12, 16, 20, 32, 40, 52, 64, 96])
def test_slopes_match_closed_form(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(closed_form_slopes(n)), rtol=1e-6, atol=0)


def test_slopes_known_values():
    # 8 heads: 1/2, 1/4, ..., 1/256 (the paper's example)
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 12 heads: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12)[8:].tolist() == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, torch.arange(3, 6), kv_len=6)  # queries at slots 3, 4, 5
    for h in range(4):
        for i, q in enumerate(range(3, 6)):
            for k in range(6):
                assert bias[0, h, i, k].item() == pytest.approx(-slopes[h].item() * (q - k))


def test_bias_softmax_equals_paddlenlp_key_index_form():
    """PaddleNLP adds slope * key_index; within a causal row that differs by a constant."""
    T, H = 7, 6
    slopes = alibi_slopes(H)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ours = alibi_bias(slopes, torch.arange(T), T)[0].masked_fill(~causal, float("-inf"))
    paddle = (slopes[:, None, None] * torch.arange(T).float()[None, None, :]).expand(H, T, T)
    paddle = paddle.masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(ours.softmax(-1), paddle.softmax(-1), rtol=1e-6, atol=1e-7)


def reference_forward(model, ids):
    """A from-scratch ALiBi Llama forward written only from the state dict (no camelid modules)."""
    sd, c = model.state_dict(), model.config
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    B, T = ids.shape

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    slopes = torch.tensor(closed_form_slopes(H))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bias = (-slopes[:, None, None] * (i - j)).masked_fill(j > i, float("-inf"))  # (H, T, T)
    x = sd["model.embed_tokens.weight"][ids]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D) + bias).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv", [(8, 8), (6, 2), (12, 4)])
def test_alibi_model_matches_reference(impl, heads, kv):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48 if heads != 8 else 64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv, alibi=True)
    model = LlamaForCausalLM(config).eval().set_attn_implementation(impl)
    assert model.model.rotary_emb is None  # ALiBi replaces rotary embeddings
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_forward(model, ids), rtol=0, atol=1e-5)


def test_alibi_config_round_trips():
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=6, alibi=True)
    d = config.to_dict()
    assert d["alibi"] is True and LlamaConfig.from_dict(d).alibi
    assert "alibi" not in LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=6).to_dict()
