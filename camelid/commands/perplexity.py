"""camelid perplexity MODEL TEXT_FILE: sliding-window perplexity; --kl-reference M for KL divergence."""

from __future__ import annotations

from camelid.commands.common import quantization, quantization_args

HELP = "perplexity of a model on a text file (sliding window)"


def add_arguments(p) -> None:
    p.add_argument("model", help="model name or path")
    p.add_argument("text_file")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default context/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    quantization_args(p)
    p.add_argument("--kl-reference", default=None, metavar="MODEL",
                   help="also report the KL divergence from this model's distributions, and top-1 agreement")


def main(args) -> int:
    from pathlib import Path

    from camelid.evaluate.perplexity import kl_divergence, perplexity
    from camelid.load import load
    from camelid.text.tokenizer import Tokenizer

    text_file = Path(args.text_file)
    if not text_file.is_file():
        raise ValueError(f"{text_file}: no such text file")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (perplexity scores tokens after the first), "
                         f"got {args.max_tokens}")
    model = load(args.model, **quantization(args))
    ids = Tokenizer.from_pretrained(args.model).encode(text_file.read_text(encoding="utf-8"))
    ids = ids[:args.max_tokens] if args.max_tokens is not None else ids
    if args.kl_reference:
        ref = load(args.kl_reference)
        d = kl_divergence(model, ref, ids, context=args.context, stride=args.stride)
        print(f"{d.model.tokens} tokens scored, context {args.context}: perplexity {d.model.value:.4f} "
              f"(reference {d.reference.value:.4f}, {100 * (d.model.value / d.reference.value - 1):+.2f}%), "
              f"mean KL {d.mean_kl:.5f} nats, top-1 agreement {100 * d.top1_agreement:.2f}%")
    else:
        p = perplexity(model, ids, context=args.context, stride=args.stride)
        print(f"{p.tokens} tokens scored, context {args.context}: perplexity {p.value:.4f}")
    return 0
