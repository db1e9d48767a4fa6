"""Position encodings: the rotary-embedding (RoPE) family as pure functions, and ALiBi slopes.

Every RoPE variant is `fn(config, seq_len) -> (inv_freq, attention_scale)`:
  inv_freq         float32 [head_dim // 2], the angular frequency of each rotated pair
  attention_scale  multiplies cos and sin (YaRN / LongRoPE temperature; 1.0 elsewhere)
`seq_len` (the largest position + 1 in the current forward) matters only to the dynamic types
("dynamic", "longrope"); the others ignore it, so the model computes them once.

A position p rotates pair i by the angle p * inv_freq[i]; scaling schemes stretch the context by
shrinking some or all of the frequencies.
"""

from __future__ import annotations

import math

import torch

from camelid.core.config import LlamaConfig


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    # theta_i = base^(-2i/dim), i = 0 .. dim/2 - 1
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def default_rope(config: LlamaConfig, seq_len: int | None = None):
    return _base_inv_freq(config.head_dim, config.rope_theta), 1.0


def linear_rope(config: LlamaConfig, seq_len: int | None = None):
    """Position interpolation: every frequency divided by `factor` (positions / factor)."""
    inv_freq, _ = default_rope(config)
    return inv_freq / config.rope_scaling["factor"], 1.0


def ntk_rope(config: LlamaConfig, seq_len: int | None = None):
    """Static NTK-aware scaling (PaddleNLP LlamaNTKScalingRotaryEmbedding):
    base' = base * factor^(dim / (dim - 2)), fixed for all lengths."""
    dim, factor = config.head_dim, config.rope_scaling["factor"]
    return _base_inv_freq(dim, config.rope_theta * factor ** (dim / (dim - 2))), 1.0


def dynamic_ntk_rope(config: LlamaConfig, seq_len: int | None = None):
    """Dynamic NTK: plain RoPE up to max_position_embeddings, then the base grows with the length:
    base' = base * (factor * L / max_pos - (factor - 1))^(dim / (dim - 2))."""
    dim, factor = config.head_dim, config.rope_scaling["factor"]
    max_pos = config.max_position_embeddings
    L = max(seq_len or max_pos, max_pos)
    base = config.rope_theta * ((factor * L / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(dim, base), 1.0


def llama3_rope(config: LlamaConfig, seq_len: int | None = None):
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    s = config.rope_scaling
    inv_freq, _ = default_rope(config)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope(config: LlamaConfig, seq_len: int | None = None):
    """YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, blend the band
    between beta_slow and beta_fast rotations, and temper attention by `mscale`."""
    s, dim, base = config.rope_scaling, config.head_dim, config.rope_theta
    orig = s.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = s.get("factor") or config.max_position_embeddings / orig
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else _yarn_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations):  # which pair index completes `rotations` turns over `orig` tokens
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    # blend = 1 keeps the original (extrapolated) frequency, 0 takes the interpolated one
    blend = 1 - ramp
    inv_freq = interpolated * (1 - blend) + extrapolated * blend
    return inv_freq, float(attention)


def longrope_rope(config: LlamaConfig, seq_len: int | None = None):
    """LongRoPE (Phi-3): per-pair rescale factors, `short_factor` within the original context and
    `long_factor` beyond it; attention tempered by sqrt(1 + ln(factor) / ln(orig))."""
    s, dim = config.rope_scaling, config.head_dim
    orig = s.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = s.get("factor") or config.max_position_embeddings / orig
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = s["long_factor"] if seq_len and seq_len > orig else s["short_factor"]
    ext = torch.tensor(ext, dtype=torch.float32)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * config.rope_theta ** exponent), float(attention)


ROPE_FUNCTIONS = {
    "default": default_rope,
    "linear": linear_rope,
    "ntk": ntk_rope,
    "dynamic": dynamic_ntk_rope,
    "llama3": llama3_rope,
    "yarn": yarn_rope,
    "longrope": longrope_rope,
}
DYNAMIC_ROPE_TYPES = {"dynamic", "longrope"}


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return ROPE_FUNCTIONS[config.rope_type](config, seq_len)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, attention_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T], computed in float32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): pairs are (i, i + D/2), HF layout
    return (emb.cos() * attention_scale).to(dtype), (emb.sin() * attention_scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, T, D]; pair i is (x[i], x[i + D/2])."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------- ALiBi

def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022), as PaddleNLP's `_get_interleave`.

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    Otherwise: the slopes for the largest power of two m below n, followed by every other slope
    of the 2m-head sequence until there are n.
    """
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(m)
    if m < num_heads:
        slopes += power_of_two(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Additive attention bias [1, H, T, S]: -slope * (query slot - key slot).

    PaddleNLP adds slope * key_index; the two differ by a per-row constant, which softmax
    ignores. Distances (not absolute indices) keep a left-padded row equal to the row alone.
    """
    k_slots = torch.arange(kv_len, device=q_slots.device, dtype=torch.float32)
    dist = k_slots[None, :] - q_slots.float()[:, None]  # (T, S), <= 0 where visible
    return slopes.to(q_slots.device)[None, :, None, None] * dist[None, None]
