"""camelid convert SRC DST --to hf|gguf: convert, reload, and report the max logit difference.

A lossy target (float16, bfloat16, q8_0) is judged against what that format must lose: the source
rounded through it by an independent path (torch's casts; the gguf package's own Q8_0 quantizer),
the reference. The written file passes when its logits are within the fixed tolerance of the
source, or no further from it than the reference (x 1.25), with the reference's greedy tokens."""

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

    from camelid.text.tokenizer import Tokenizer

    dtype = args.dtype or ("float32" if args.to == "hf" else "f16")
    allowed = ("float32", "bfloat16", "float16") if args.to == "hf" else ("f32", "f16", "q8_0")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not one of {allowed} for --to {args.to}")
    from camelid.hf_compat import LlamaForCausalLM
    from camelid.load import load

    # a lossy target is compared as float weights (its reference is); a lossless one in camelid's
    # CPU layout, where the two models compute alike to the bit
    pack = False if dtype in LOSSY else None
    source = load(args.src, dtype="float32", pack=pack, model_cls=LlamaForCausalLM)
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
    reloaded = load(args.dst, dtype="float32", pack=pack, model_cls=LlamaForCausalLM)
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
    note = ""
    if worst > tolerance and args.tolerance is None and dtype in LOSSY:
        reference = rounded_through(source, dtype)
        ref_worst, same = 0.0, True
        with torch.no_grad():
            for ids in prompts:
                ref_worst = max(ref_worst, (source(ids).logits - reference(ids).logits).abs().max().item())
                same &= greedy(reference, ids) == greedy(reloaded, ids)
        tolerance = max(tolerance, 1.25 * ref_worst)
        note = (f"; the source rounded through {dtype} by itself is {ref_worst:.3g} away, greedy tokens "
                f"{'equal to' if same else 'DIFFERENT from'} it")
        ok = worst <= tolerance and same
    else:
        ok = worst <= tolerance
    print(f"{args.src} -> {args.dst} ({args.to}, {dtype}): max |logit diff| {worst:.3g} "
          f"on {len(prompts)} prompts (tolerance {tolerance:.3g}{note}): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


LOSSY = ("float16", "f16", "bfloat16", "q8_0")


def greedy(model, ids, n: int = 16) -> list[int]:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n)[0, ids.shape[1]:].tolist()


def rounded_through(model, dtype: str):
    """A copy of `model` (float32, unpacked) whose weights went through `dtype` and back, by another
    path than the writer's: torch's casts; Q8_0 by the gguf package's quantizer, 2-D weights whose
    rows split into 32-blocks (the others float16, norms float32, as GGUF files keep them)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim < 2:
                continue
            if dtype == "bfloat16":
                p.copy_(p.bfloat16().float())
            elif dtype == "q8_0" and p.shape[-1] % 32 == 0:
                from gguf import GGMLQuantizationType
                from gguf.quants import dequantize, quantize

                q8 = quantize(p.numpy(), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(dequantize(q8, GGMLQuantizationType.Q8_0)).view_as(p))
            else:
                p.copy_(p.half().float())
    return ref
