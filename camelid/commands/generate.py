"""camelid generate [--model M] PROMPT: stream a completion (chat template applied by default);
--nproc N runs it tensor parallel over N processes."""

from __future__ import annotations

import sys

from camelid.commands.common import load_model_and_tokenizer, sampling, sampling_args

HELP = "generate text from a prompt, streamed to stdout"


def add_arguments(p) -> None:
    p.add_argument("prompt")
    p.add_argument("--nproc", type=int, default=1,
                   help="tensor parallelism over N processes (gloo on CPU, NCCL with a GPU each)")
    sampling_args(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def main(args) -> int:
    if args.nproc > 1:
        import random

        from camelid.distributed import launch
        from camelid.formats import checkpoint_config
        from camelid.transforms.tp import check_plan

        try:
            config = checkpoint_config(args.model)
        except (ValueError, OSError):
            config = None  # e.g. a Meta folder: the ranks' loaders report what is wrong
        if config is not None:
            check_plan(config, args.nproc)  # a split that cannot work fails before any weight loads
        if args.load_in_8bit or args.load_in_4bit or args.adapter or args.prompt_lookup:
            raise ValueError("--nproc takes a float model: not with --load-in-*bit, --adapter or --prompt-lookup")
        if args.seed is None:  # every rank must draw the same samples
            args.seed = random.randrange(2**63)
        launch(_generate_on_rank, args.nproc, args)
        return 0
    generate(args, *load_model_and_tokenizer(args))
    return 0


def _generate_on_rank(rank, world, args):
    """One tensor-parallel rank of `camelid generate --nproc N`: rank 0 prints, the others compute along."""
    from camelid.load import load_tensor_parallel
    from camelid.text.tokenizer import Tokenizer

    model = load_tensor_parallel(args.model, dtype=args.dtype)  # each rank reads only its shard
    if rank:
        import io

        sys.stdout = io.StringIO()  # the same text is computed on every rank; one prints it
    generate(args, model, Tokenizer.from_pretrained(args.model))


def generate(args, model, tokenizer) -> None:
    """args.prompt through `model`, streamed to stdout (or one JSON object with --json)."""
    import json

    from camelid.generation.generate import generate

    chat = not args.raw and bool(tokenizer.chat_template)
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt

    def stream(row, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, stop=args.stop, chat=chat,
                      on_text=None if args.json else stream, **sampling(args))[0]
    if args.json:
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                          "completion_tokens": len(result.tokens)}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
