"""Counting without weights: parameters, FLOPs and memory, from a LlamaConfig alone.

FLOPs follow PaddleNLP's `get_model_flops` / `get_hardware_flops` (Narayanan et al. 2021, eq. 3):
2 FLOPs per multiply-add, backward = 2x forward, recomputation adds the recomputed part of the
forward once more. Unlike PaddleNLP's formula (hidden_size^2 * 4 for q/k/v/o), the projections
here count GQA/MQA key/value heads and an explicit head_dim, so they are exact for every preset;
for plain MHA the two agree to the FLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

from camelid.core.config import LlamaConfig

RECOMPUTE = ("none", "full", "full_attn", "core_attn")


# ---------------------------------------------------------------------- parameters

def parameter_count(config: LlamaConfig, exclude_embeddings: bool = False) -> int:
    """Unique parameters; a tied lm_head counts once (as transformers' num_parameters())."""
    C, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attn = C * (q + 2 * kv) + q * C + (q + 2 * kv + C if config.attention_bias else 0)
    mlp = 3 * C * I + (2 * I + C if config.mlp_bias else 0)
    per_layer = attn + mlp + 2 * C  # + two RMSNorm weights
    embeddings = V * C * (1 if config.tie_word_embeddings else 2)
    return L * per_layer + C + (0 if exclude_embeddings else embeddings)


# ---------------------------------------------------------------------- FLOPs

@dataclass
class Flops:
    """FLOPs of one step over `batch_size` sequences of `seq_len` tokens."""
    qkvo: int  # attention projections, all layers, forward
    core_attention: int  # q @ k^T and probs @ v, all layers, forward
    mlp: int  # gate/up/down + SwiGLU product, all layers, forward
    logits: int  # lm_head, forward
    recompute: int  # extra forward work recomputed in backward
    training: bool
    tokens: int

    @property
    def forward(self) -> int:
        return self.qkvo + self.core_attention + self.mlp + self.logits

    @property
    def total(self) -> int:
        return self.forward * (3 if self.training else 1) + self.recompute

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def flops(config: LlamaConfig, seq_len: int, batch_size: int = 1, training: bool = False,
          recompute: str = "none") -> Flops:
    """FLOPs of a forward (training=False) or forward+backward step, with optional recompute
    granularity as PaddleNLP names it: none | full | full_attn | core_attn."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r} is not one of {RECOMPUTE}")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    C, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    s, b = seq_len, batch_size
    qkvo = 2 * s * (C * (q + 2 * kv) + q * C)
    core = 2 * 2 * s * s * q  # full s x s scores, as PaddleNLP counts (no causal halving)
    mlp = 2 * (3 * s * C * I + s * I)
    logits = 2 * s * C * V
    extra = {"none": 0, "full": qkvo + core + mlp, "full_attn": qkvo + core, "core_attn": core}[recompute]
    return Flops(qkvo=b * L * qkvo, core_attention=b * L * core, mlp=b * L * mlp, logits=b * logits,
                 recompute=b * L * extra if training else 0, training=training, tokens=b * s)


def model_flops(config: LlamaConfig, seq_len: int, batch_size: int = 1) -> int:
    """Training FLOPs of one step without recompute (the numerator of MFU)."""
    return flops(config, seq_len, batch_size, training=True).total


def hardware_flops(config: LlamaConfig, seq_len: int, batch_size: int = 1, recompute: str = "full") -> int:
    """Training FLOPs the hardware actually executes, recompute included (the numerator of HFU)."""
    return flops(config, seq_len, batch_size, training=True, recompute=recompute).total


def mfu(config: LlamaConfig, seq_len: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training run at `tokens_per_second` on hardware of `peak_flops`."""
    return model_flops(config, seq_len) / seq_len * tokens_per_second / peak_flops


# ---------------------------------------------------------------------- memory

BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def weight_bytes(config: LlamaConfig, dtype: str = "bfloat16", group_size: int = 32) -> int:
    """Bytes of the weights. For int8 (per output channel) and int4 (group-wise, `group_size`
    inputs per group with a bfloat16 scale and zero point) only the decoder's linear layers are
    quantized; embeddings, lm_head and norms stay bfloat16, as the quantizers keep them."""
    if dtype not in BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(BYTES)}")
    total = parameter_count(config)
    if dtype not in ("int8", "int4"):
        return int(total * BYTES[dtype])
    C, I = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linears = [(C, q), (C, kv), (C, kv), (q, C), (C, I), (C, I), (I, C)]  # (in, out) per layer
    n_linear = config.num_hidden_layers * sum(i * o for i, o in linears)
    if dtype == "int8":
        scales = config.num_hidden_layers * sum(o for _, o in linears) * 2
    else:
        scales = config.num_hidden_layers * sum(-(-i // group_size) * o for i, o in linears) * 2 * 2
    return int(n_linear * BYTES[dtype] + scales + (total - n_linear) * 2)


def kv_cache_bytes(config: LlamaConfig, batch_size: int, context: int, dtype: str = "bfloat16") -> int:
    """Keys and values of every layer for `batch_size` sequences of `context` tokens."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return int(per_token * batch_size * context * BYTES[dtype])


# ---------------------------------------------------------------------- a readable summary

def _human(n: float, unit: str = "") -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for prefix, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n:.0f} B"


def summary(config: LlamaConfig, seq_len: int, batch_size: int) -> list[tuple[str, str]]:
    """(field, value) rows for `camelid info`: the architecture, parameters, FLOPs and memory."""
    c = config
    rope = "ALiBi" if c.alibi else f"{c.rope_type} (theta {c.rope_theta:g})"
    if c.rope_scaling:
        rope += ", " + ", ".join(f"{k}={v}" for k, v in c.rope_scaling.items()
                                 if k != "rope_type" and not isinstance(v, list))
    attn = ("MHA" if c.num_key_value_heads == c.num_attention_heads else
            "MQA" if c.num_key_value_heads == 1 else f"GQA ({c.num_attention_heads // c.num_key_value_heads} q per kv)")
    fwd = flops(c, seq_len, batch_size)
    train = flops(c, seq_len, batch_size, training=True)
    train_rc = flops(c, seq_len, batch_size, training=True, recompute="full")
    rows = [
        ("vocab_size", f"{c.vocab_size:,}"),
        ("hidden_size / intermediate_size", f"{c.hidden_size:,} / {c.intermediate_size:,}"),
        ("layers", str(c.num_hidden_layers)),
        ("heads / kv heads / head_dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}  [{attn}]"),
        ("position encoding", rope),
        ("max_position_embeddings", f"{c.max_position_embeddings:,}"),
        ("tied embeddings", str(c.tie_word_embeddings)),
        ("parameters", f"{parameter_count(c):,}"),
        ("parameters (non-embedding)", f"{parameter_count(c, exclude_embeddings=True):,}"),
        (f"forward FLOPs/token @ seq {seq_len}", _human(fwd.per_token, "FLOP")),
        ("train FLOPs/token (no recompute)", _human(train.per_token, "FLOP")),
        ("train FLOPs/token (full recompute)", _human(train_rc.per_token, "FLOP")),
        (f"train FLOPs/step (batch {batch_size})", _human(train.total, "FLOP")),
    ]
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        rows.append((f"weights {dtype}", _bytes(weight_bytes(c, dtype))))
    for ctx in sorted({seq_len, c.max_position_embeddings}):
        rows.append((f"KV cache bf16, batch {batch_size} x {ctx:,} tokens",
                     _bytes(kv_cache_bytes(c, batch_size, ctx))))
    return rows
