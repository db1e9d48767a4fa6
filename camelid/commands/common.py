"""What several programs share: the sampling and quantization flags, the model + tokenizer
loading (all through camelid.load.load), and a one-word description of a model's weights."""

from __future__ import annotations

MODEL_HELP = "model name or path (default: smollm2-135m-instruct)"
DTYPE_HELP = "float32 (default) | bfloat16 | float16"
# The prompts convert and compare check logits on by default.
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, 12 cats"]


def sampling_args(p) -> None:
    """--model, the sampling flags, --dtype, --prompt-lookup, --kv-cache, --adapter and the
    quantization flags (generate and chat)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                   help="speculative decoding: draft up to K tokens by prompt lookup (greedy; same output, faster "
                        "when the answer copies the prompt)")
    p.add_argument("--kv-cache", choices=["int8", "float16", "bfloat16", "float32"], default=None,
                   help="the KV cache's dtype (default: float16 for GGUF-block models, as llama.cpp; else the "
                        "model's; int8: long contexts)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (camelid finetune's final/, or peft's)")
    quantization_args(p)


def sampling(args) -> dict:
    """The sampling flags as keyword arguments of camelid.generation.generate.generate."""
    return dict(do_sample=args.temperature > 0, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                prompt_lookup_num_tokens=args.prompt_lookup, cache_dtype=args.kv_cache)


def quantization_args(p) -> None:
    p.add_argument("--load-in-8bit", action="store_true", help="int8 weights (camelid/quantize.py)")
    p.add_argument("--load-in-4bit", action="store_true", help="int4 g32 weights (a Q4 GGUF: its own blocks)")


def quantization(args) -> dict:
    return dict(load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit)


def load_model(name, dtype=None, adapter=None, load_in_8bit: bool = False, load_in_4bit: bool = False):
    """`name` through the one loader, as the class with generate / save_pretrained."""
    from camelid.hf_compat import LlamaForCausalLM
    from camelid.load import load

    return load(name, dtype=dtype, adapter=adapter, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                model_cls=LlamaForCausalLM)


def load_model_and_tokenizer(args):
    """args.model with args.dtype, the quantization flags and args.adapter, and its tokenizer."""
    from camelid.text.tokenizer import Tokenizer

    model = load_model(args.model, dtype=args.dtype, adapter=args.adapter, **quantization(args))
    return model, Tokenizer.from_pretrained(args.model)


def weights_kind(model) -> str:
    """'int4 g32', 'int8', 'nf4 g64', 'packed' or 'unpacked': what the linear layers hold."""
    from camelid.transforms.packed import is_packed
    from camelid.transforms.quantize import is_quantized, quantization_summary

    if is_quantized(model):
        q = quantization_summary(model)
        return f"{q['format']}" + (f" g{q['group_size']}" if q.get("group_size") else "")
    return "packed" if is_packed(model) else "unpacked"
