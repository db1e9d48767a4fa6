"""camelid quantize SRC DST --bits 4|8: a weight-only int8 / int4 / nf4 checkpoint that reloads quantized."""

from __future__ import annotations

HELP = "write a weight-only quantized checkpoint (reloads without re-quantizing)"


def add_arguments(p) -> None:
    p.add_argument("src", help="HF folder, .gguf file, Meta folder, or model name")
    p.add_argument("dst", help="output folder (new or empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--group-size", type=int, default=None, help="int4: 32 (default) | 64 | 128 | 256")
    p.add_argument("--format", choices=["int4", "nf4"], default="int4", help="4-bit codes (default int4)")


def main(args) -> int:
    from pathlib import Path

    from camelid.load import load, save
    from camelid.transforms.quantize import quantization_summary, weight_bytes

    dst = Path(args.dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(f"{dst} exists and is not an empty folder: choose a new destination")
    if args.bits == 8 and (args.group_size is not None or args.format != "int4"):
        raise ValueError("--group-size and --format apply to --bits 4")
    flags = dict(load_in_8bit=True) if args.bits == 8 else dict(
        load_in_4bit=True, bnb_4bit_quant_type=args.format, group_size=args.group_size)
    model = load(args.src, **flags)
    save(model, dst)
    summary = quantization_summary(model)
    print(f"{args.src} -> {dst}: {summary}; weights {weight_bytes(model) / 2**20:.1f} MiB")
    return 0
