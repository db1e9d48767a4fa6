"""camelid quantize SRC DST --bits 4|8: a weight-only quantized checkpoint that reloads quantized:
GGUF blocks (q4_1 / q4_0 / q8_0, camelid's CPU kernels; the default where they are built), or
int4 / int8 / nf4 (torch's kernels)."""

from __future__ import annotations

HELP = "write a weight-only quantized checkpoint (reloads without re-quantizing)"


def add_arguments(p) -> None:
    p.add_argument("src", help="HF folder, .gguf file, Meta folder, or model name")
    p.add_argument("dst", help="output folder (new or empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--group-size", type=int, default=None, help="int4: 32 (default) | 64 | 128 | 256")
    p.add_argument("--format", choices=["q4_1", "q4_0", "q4_k", "int4", "nf4", "q8_0", "int8"], default=None,
                   help="codes: 4-bit q4_1 | q4_0 | q4_k | int4 | nf4, 8-bit q8_0 | int8 (default: q4_1 / q8_0 on "
                        "CPU with camelid's kernels, else int4 / int8)")


def main(args) -> int:
    from pathlib import Path

    from camelid.load import load, save
    from camelid.transforms.quantize import quantization_summary, weight_bytes

    dst = Path(args.dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(f"{dst} exists and is not an empty folder: choose a new destination")
    eight = ("q8_0", "int8")
    if args.bits == 8 and (args.group_size is not None or args.format not in (None, *eight)):
        raise ValueError("--bits 8 takes --format q8_0 or int8, and no --group-size")
    if args.bits == 4 and args.format in eight:
        raise ValueError(f"--format {args.format} is 8-bit: use --bits 8")
    flags = dict(load_in_8bit=True, bnb_8bit_quant_type=args.format) if args.bits == 8 else dict(
        load_in_4bit=True, bnb_4bit_quant_type=args.format, group_size=args.group_size)
    model = load(args.src, **flags)
    save(model, dst)
    summary = quantization_summary(model)
    print(f"{args.src} -> {dst}: {summary}; weights {weight_bytes(model) / 2**20:.1f} MiB")
    save_tokenizer(args.src, dst)
    return 0


def save_tokenizer(src, dst) -> None:
    """The source's tokenizer (and generation_config.json) beside the written weights, so that
    generate / chat / serve / perplexity read the folder as they read the source."""
    import shutil
    import sys
    from pathlib import Path

    from camelid.text.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(src)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"note: {src} has no tokenizer to copy ({e}); give the programs that read {dst} one", file=sys.stderr)
        return
    tokenizer.save_pretrained(dst)
    config = Path(src) / "generation_config.json"
    if config.is_file():
        shutil.copyfile(config, Path(dst) / config.name)
