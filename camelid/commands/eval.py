"""camelid eval MODEL --tasks T1,T2: lm-evaluation-harness tasks scored by camelid (--include-path
DIR for your own)."""

from __future__ import annotations

from camelid.commands.common import DTYPE_HELP, quantization, quantization_args

HELP = "lm-evaluation-harness tasks scored by camelid (accuracy, exact match, perplexity)"


def add_arguments(p) -> None:
    p.add_argument("model", help="model name or path")
    p.add_argument("--tasks", required=True, help="comma-separated task names: the harness's, or --include-path's")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a count, or a fraction below 1)")
    p.add_argument("--batch-size", type=int, default=1, help="requests scored or generated together")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    quantization_args(p)


def main(args) -> int:
    try:
        from camelid.evaluate.harness import evaluate, report
    except ImportError as e:
        raise RuntimeError(f"camelid eval needs lm-evaluation-harness: pip install 'camelid[eval]' ({e})") from None
    results = evaluate(args.model, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                       limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, dtype=args.dtype,
                       **quantization(args))
    print(report(results, args.output))
    return 0
