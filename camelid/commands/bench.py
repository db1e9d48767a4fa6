"""camelid bench [--model M] [--profile]: time to first token, prefill and decode tok/s (batch 1 and
8), peak RSS; --profile adds where a decode step's time goes (products, attention, other ops, Python)."""

from __future__ import annotations

from camelid.commands.common import DTYPE_HELP, MODEL_HELP, quantization, quantization_args, weights_kind

HELP = "time to first token, prefill and decode tok/s (batch 1 and 8), peak RSS"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for the prefill figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    p.add_argument("--no-pack", action="store_true", help="plain nn.Linear weights (not batch-invariant on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="also print a decode step's time by kind: matrix products, attention, other ops, Python")
    quantization_args(p)


def main(args) -> int:
    import torch

    from camelid.evaluate.benchmark import HEADER, measure, weight_bytes
    from camelid.hf_compat import LlamaForCausalLM
    from camelid.load import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.new <= 0 or args.prompt_len <= 0:
        raise ValueError(f"--new and --prompt-len must be positive, got {args.new} and {args.prompt_len}")
    model = load(args.model, dtype=args.dtype, pack=False if args.no_pack else None, model_cls=LlamaForCausalLM,
                 **quantization(args))
    if args.prompt_len + 1 >= model.config.max_position_embeddings:
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room in the model's context "
                         f"({model.config.max_position_embeddings})")
    figures = measure(lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, compile=args.compile),
                      model.config.vocab_size, new=args.new, long=args.prompt_len)
    wb = weight_bytes(model)
    print(f"{args.model or 'smollm2-135m-instruct'}, {model.dtype}{', compiled' if args.compile else ''}, "
          f"{weights_kind(model)} linears, {torch.get_num_threads()} threads, "
          f"{args.new} new tokens, prefill over {args.prompt_len} tokens; weights {wb / 2**20:.0f} MiB")
    print(HEADER)
    print(figures.row("camelid"))
    print(f"decode b1 weight-read bandwidth {wb * figures.decode1 / 1e9:.1f} GB/s; "
          f"b8/b1 throughput {figures.decode8 / figures.decode1:.2f}x")
    if args.profile:
        from camelid.evaluate.benchmark import prompts
        from camelid.evaluate.profile import format_table, profile_decode

        print()
        print(format_table(profile_decode(model, prompts(model.config.vocab_size)[0], steps=args.new)))
    return 0
