"""camelid serve [--model M] [--port 8000]: the OpenAI-compatible HTTP server with continuous
batching (camelid.serve.app.serve)."""

from __future__ import annotations

from camelid.commands.common import MODEL_HELP

HELP = "OpenAI-compatible HTTP server (completions, chat, streaming, metrics)"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set CAMELID_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that (more: HTTP 429)")
    p.add_argument("--nproc", type=int, default=1, help="tensor parallel over N processes; rank 0 serves")
    p.add_argument("--context", type=int, default=4096,
                   help="tokens per slot (prompt + answer; the KV cache is max-batch x context; capped at the model's)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="prompt + max_tokens summed over running and waiting requests (more: HTTP 429)")
    p.add_argument("--served-model-name", default=None, help="the 'model' clients send (default: --model)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder, merged into the model")
    p.add_argument("--kv-cache-memory", default=None,
                   help="the paged KV cache's budget: bytes (4GiB, 512MB) or tokens (65536tokens); "
                        "default max-batch x context tokens")
    p.add_argument("--max-prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per engine step beside the decoding streams (a multiple of 64)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of prompts that begin alike")
    p.add_argument("--kv-cache", choices=["int8", "float16", "bfloat16", "float32"], default=None,
                   help="the KV cache's storage (int8: codes + one scale per token and head)")
    p.add_argument("--lora", "--lora-modules", dest="lora", nargs="+", action="extend", default=[],
                   metavar="NAME=DIR", help="LoRA adapters served beside the model: a request whose 'model' is "
                                            "NAME gets that adapter (requests with different adapters share a batch)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="let POST /v1/load_lora_adapter load adapters from this machine's disk")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM: seconds running requests may still take; then they end with "
                        "finish_reason 'abort' (streams get a final chunk and [DONE])")


def lora_modules(items: list[str]) -> dict[str, str]:
    """NAME=DIR pairs -> {name: folder}; a malformed or repeated one is an error naming it."""
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--lora takes NAME=DIR, got {item!r}")
        if name in out:
            raise ValueError(f"--lora: the adapter name {name!r} is given twice")
        out[name] = folder
    return out


def main(args) -> int:
    import os

    from camelid.serve.app import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("CAMELID_API_KEY") or None
    serve(args.model, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, model_name=args.served_model_name, adapter=args.adapter,
          max_tokens_limit=args.max_tokens_limit, max_total_tokens=args.max_total_tokens, context=args.context,
          nproc=args.nproc, shutdown_grace=args.shutdown_grace, kv_cache_memory=args.kv_cache_memory,
          max_prefill_chunk=args.max_prefill_chunk, prefix_caching=args.prefix_caching, kv_cache=args.kv_cache,
          adapters=lora_modules(args.lora), runtime_lora=args.allow_runtime_lora)
    return 0
