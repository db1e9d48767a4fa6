"""camelid info PRESET_OR_PATH: architecture, parameters, FLOPs and memory as a table."""

from __future__ import annotations

from camelid.core.presets import PRESETS

HELP = "parameters, FLOPs and memory of a preset or checkpoint"
DESCRIPTION = f"Presets: {', '.join(PRESETS)}"


def add_arguments(p) -> None:
    p.add_argument("model", help="preset name, checkpoint folder, or config.json")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: min(max_pos, 4096))")
    p.add_argument("--batch-size", type=int, default=1)


def main(args) -> int:
    from camelid.core import accounting
    from camelid.core.config import LlamaConfig

    config = LlamaConfig.from_pretrained(args.model)
    rows = accounting.summary(config, args.seq_len or min(config.max_position_embeddings, 4096), args.batch_size)
    width = max(len(k) for k, _ in rows)
    print(f"{args.model}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
