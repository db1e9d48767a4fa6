"""camelid convert SRC DST --to hf|gguf: convert, reload, and report the max logit difference."""

from __future__ import annotations

from camelid.commands.common import PROMPTS

HELP = "convert between checkpoint formats and check the result"
# Largest max |logit difference| a conversion may show, by the dtype it writes.
TOLERANCE = {"float32": 1e-4, "f32": 1e-4, "float16": 0.1, "f16": 0.1, "bfloat16": 1.0, "q8_0": 1.0}


def add_arguments(p) -> None:
    p.add_argument("src", help="HF folder, .gguf file, Meta folder, or model name")
    p.add_argument("dst", help="output folder (--to hf) or .gguf file (--to gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], required=True)
    p.add_argument("--dtype", help="hf: float32|bfloat16|float16; gguf: f32|f16|q8_0 (default float32 / f16)")
    p.add_argument("--tolerance", type=float, help="largest acceptable max |logit diff| (default by dtype)")


def main(args) -> int:
    import torch

    from camelid.commands.common import load_model
    from camelid.text.tokenizer import Tokenizer

    dtype = args.dtype or ("float32" if args.to == "hf" else "f16")
    allowed = ("float32", "bfloat16", "float16") if args.to == "hf" else ("f32", "f16", "q8_0")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not one of {allowed} for --to {args.to}")
    source = load_model(args.src, dtype="float32")
    try:
        tokenizer = Tokenizer.from_pretrained(args.src)
    except (FileNotFoundError, ValueError):
        tokenizer = None  # weights only: compare on fixed random ids
    if args.to == "hf":
        source.to(getattr(torch, dtype)).save_pretrained(args.dst)
        source.float()
        if tokenizer is not None:
            tokenizer.save_pretrained(args.dst)
    else:
        from camelid.formats.gguf_write import save_gguf
        from camelid.text.gguf_vocab import tokenizer_gguf_fields

        save_gguf(source, args.dst, dtype=dtype, vocab=None if tokenizer is None else tokenizer_gguf_fields(tokenizer))
    reloaded = load_model(args.dst, dtype="float32")
    if tokenizer is not None:
        prompts = [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, source.config.vocab_size, (1, 16), generator=g) for _ in range(3)]
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            worst = max(worst, (source(ids).logits - reloaded(ids).logits).abs().max().item())
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    verdict = "ok" if worst <= tolerance else "FAILED"
    print(f"{args.src} -> {args.dst} ({args.to}, {dtype}): max |logit diff| {worst:.3g} "
          f"on {len(prompts)} prompts (tolerance {tolerance:g}): {verdict}")
    return 0 if worst <= tolerance else 1
