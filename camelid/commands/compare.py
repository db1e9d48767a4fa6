"""camelid compare A B [--prompt P ...]: per-layer divergence, logits, top-1 and KL of two models,
and where A and B first differ."""

from __future__ import annotations

from camelid.commands.common import PROMPTS

HELP = "per-layer divergence, logits, top-1 agreement and KL of two models"


def add_arguments(p) -> None:
    p.add_argument("a", help="the reference model: name or path")
    p.add_argument("b", help="the model compared with it (the same checkpoint with other options, or another)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: three fixed ones)")
    p.add_argument("--prompts-file", default=None, help="more prompts, one per line")
    for side in ("a", "b"):
        p.add_argument(f"--dtype-{side}", default=None, help=f"{side.upper()}'s dtype (default float32)")
        p.add_argument(f"--load-in-8bit-{side}", action="store_true", help=f"{side.upper()} in int8")
        p.add_argument(f"--load-in-4bit-{side}", action="store_true", help=f"{side.upper()} in int4 g32")
        p.add_argument(f"--adapter-{side}", default=None, help=f"a LoRA adapter on {side.upper()}")
    p.add_argument("--threshold", type=float, default=1e-4, help="name the first state diverging by more (default 1e-4)")
    p.add_argument("--metric", choices=["rel_l2", "max_abs", "mean_abs", "cosine"], default="rel_l2",
                   help="divergence the threshold applies to (cosine: 1 - cosine similarity; default rel_l2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _prompts(args) -> list[str]:
    """--prompt and --prompts-file, checked; the fixed three when neither is given."""
    from pathlib import Path

    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise ValueError(f"--prompt number {i + 1} is empty")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {path} holds no prompt (one per line; blank lines are skipped)")
        prompts += lines
    return prompts or PROMPTS


def main(args) -> int:
    import json

    import torch

    from camelid.commands.common import load_model, weights_kind
    from camelid.evaluate.compare import compare
    from camelid.text.tokenizer import Tokenizer

    prompts = _prompts(args)
    if args.threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {args.threshold}")
    models = {side: load_model(getattr(args, side), dtype=getattr(args, f"dtype_{side}"),
                               adapter=getattr(args, f"adapter_{side}"),
                               load_in_8bit=getattr(args, f"load_in_8bit_{side}"),
                               load_in_4bit=getattr(args, f"load_in_4bit_{side}"))
              for side in ("a", "b")}
    tokenizer = None
    for name in (args.a, args.b):  # A's tokenizer, else B's (a quantized folder may have none)
        try:
            tokenizer = Tokenizer.from_pretrained(name)
            break
        except FileNotFoundError:
            continue
    if tokenizer is None:
        raise FileNotFoundError(f"neither {args.a} nor {args.b} has a tokenizer to encode the prompts")
    rows = [tokenizer.encode(p) for p in prompts]
    if not all(rows):
        raise ValueError(f"prompt {prompts[rows.index([])]!r} encodes to no tokens")
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])  # left-padded, (B, T)
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    c = compare(models["a"], models["b"], input_ids, attention_mask)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "prompts": len(prompts),
                          **c.to_dict(args.threshold, args.metric)}))
        return 0
    for side in ("a", "b"):
        m = models[side]
        print(f"{side}: {getattr(args, side)} ({weights_kind(m)} linears, {m.dtype})")
    print(f"{len(prompts)} prompts, {c.tokens} tokens\n{c.table(args.threshold, args.metric)}")
    return 0
