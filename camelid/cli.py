"""The `camelid` command line. Subcommands:

  camelid info PRESET_OR_PATH   architecture, parameters, FLOPs and memory as a table
"""

from __future__ import annotations

import argparse
import sys

from . import accounting
from .config import ConfigError, LlamaConfig
from .presets import PRESETS


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


def info_table(config: LlamaConfig, seq_len: int, batch_size: int) -> list[tuple[str, str]]:
    c = config
    rope = "ALiBi" if c.alibi else f"{c.rope_type} (theta {c.rope_theta:g})"
    if c.rope_scaling:
        rope += ", " + ", ".join(f"{k}={v}" for k, v in c.rope_scaling.items()
                                 if k != "rope_type" and not isinstance(v, list))
    attn = ("MHA" if c.num_key_value_heads == c.num_attention_heads else
            "MQA" if c.num_key_value_heads == 1 else f"GQA ({c.num_attention_heads // c.num_key_value_heads} q per kv)")
    fwd = accounting.flops(c, seq_len, batch_size)
    train = accounting.flops(c, seq_len, batch_size, training=True)
    train_rc = accounting.flops(c, seq_len, batch_size, training=True, recompute="full")
    rows = [
        ("vocab_size", f"{c.vocab_size:,}"),
        ("hidden_size / intermediate_size", f"{c.hidden_size:,} / {c.intermediate_size:,}"),
        ("layers", str(c.num_hidden_layers)),
        ("heads / kv heads / head_dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}  [{attn}]"),
        ("position encoding", rope),
        ("max_position_embeddings", f"{c.max_position_embeddings:,}"),
        ("tied embeddings", str(c.tie_word_embeddings)),
        ("parameters", f"{accounting.parameter_count(c):,}"),
        ("parameters (non-embedding)", f"{accounting.parameter_count(c, exclude_embeddings=True):,}"),
        (f"forward FLOPs/token @ seq {seq_len}", _human(fwd.per_token, "FLOP")),
        ("train FLOPs/token (no recompute)", _human(train.per_token, "FLOP")),
        ("train FLOPs/token (full recompute)", _human(train_rc.per_token, "FLOP")),
        (f"train FLOPs/step (batch {batch_size})", _human(train.total, "FLOP")),
    ]
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        rows.append((f"weights {dtype}", _bytes(accounting.weight_bytes(c, dtype))))
    for ctx in sorted({seq_len, c.max_position_embeddings}):
        rows.append((f"KV cache bf16, batch {batch_size} x {ctx:,} tokens",
                     _bytes(accounting.kv_cache_bytes(c, batch_size, ctx))))
    return rows


def cmd_info(args) -> int:
    config = LlamaConfig.from_pretrained(args.model)
    rows = info_table(config, args.seq_len or min(config.max_position_embeddings, 4096), args.batch_size)
    width = max(len(k) for k, _ in rows)
    print(f"{args.model}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camelid", description="The Llama model family in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint",
                       description=f"Presets: {', '.join(PRESETS)}")
    p.add_argument("model", help="preset name, checkpoint folder, or config.json")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: min(max_pos, 4096))")
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"camelid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
