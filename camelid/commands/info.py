"""camelid info MODEL: architecture, parameters, FLOPs and memory as a table, for a preset, a
packaged model name, an HF folder or config.json, a .gguf file or a Meta folder (no weight read)."""

from __future__ import annotations

from camelid.core.presets import PRESETS

HELP = "parameters, FLOPs and memory of a preset or checkpoint"
DESCRIPTION = f"Presets: {', '.join(PRESETS)}"


def add_arguments(p) -> None:
    p.add_argument("model", help="preset name, packaged model name, checkpoint folder, config.json, or .gguf file")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: min(max_pos, 4096))")
    p.add_argument("--batch-size", type=int, default=1)


def main(args) -> int:
    from camelid.core import accounting
    from camelid.formats import checkpoint_config

    config = checkpoint_config(args.model)  # the one resolver: presets, names, folders, GGUF, Meta
    rows = accounting.summary(config, args.seq_len or min(config.max_position_embeddings, 4096), args.batch_size)
    width = max(len(k) for k, _ in rows)
    print(f"{args.model}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
