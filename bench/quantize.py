"""Decode speed and memory of quantized models on the default model (SmolLM2-135M-Instruct, Q4_1
GGUF), in one run: camelid float32 / int8 / int4 g32 (quantized from the float model) / int4 read
straight from the GGUF, against transformers float32 and llama.cpp on the same GGUF file.

    python bench/quantize.py [--threads 2] [--new 64] [--perplexity]

Every row is a greedy loop at batch 1 over the same 32-token prompt (prefill not timed); the
last camelid row runs its activations (and KV cache) in bfloat16, the others in float32. Printed
per row: decode tok/s (median of 3 runs), the model's matmuls alone at one token (the ceiling
the rest of the step eats into), resident weight bytes and their ratio to the float16 size,
the weight bytes read per second, how many of the greedy tokens match camelid float32, and the
ratios to transformers and llama.cpp. --perplexity adds perplexity on GPL-3 (context 512, the
whole text; minutes per model).
"""

import argparse
import gc
import time

import torch


def median_rate(run, repeats=3):
    run()  # warm-up: first calls set kernels up
    results = [run() for _ in range(repeats)]
    return sorted(r[0] for r in results)[repeats // 2], results[0][1]


@torch.inference_mode()
def camelid_decode(model, prompt, new):
    """Greedy decode with a static KVCache: (tokens/s over the new tokens after the first, tokens)."""
    from camelid import KVCache

    T0 = prompt.shape[1]
    cache = KVCache(model.config, 1, T0 + new, dtype=model.dtype)
    logits = model(prompt, cache=cache, cache_position=torch.arange(T0), logits_to_keep=1).logits[:, -1]
    tok, out = logits.argmax(-1, keepdim=True), []
    start = time.perf_counter()
    for i in range(new - 1):
        out.append(int(tok))
        logits = model(tok, cache=cache, cache_position=torch.tensor([T0 + i]), logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
    return (new - 1) / (time.perf_counter() - start), out + [int(tok)]


@torch.inference_mode()
def matmuls_alone(model, repeats=20):
    """Steps/s of every linear layer of the model once on one token (what decode cannot beat)."""
    layers = [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    xs = {m.in_features: torch.randn(1, m.in_features, dtype=model.dtype) for m in layers}
    for m in layers:
        m(xs[m.in_features])
    start = time.perf_counter()
    for _ in range(repeats):
        for m in layers:
            m(xs[m.in_features])
    return repeats / (time.perf_counter() - start)


@torch.inference_mode()
def transformers_decode(model, prompt, new):
    out = model(prompt, use_cache=True)
    past, tok, toks = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    start = time.perf_counter()
    for _ in range(new - 1):
        toks.append(int(tok))
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return (new - 1) / (time.perf_counter() - start), toks + [int(tok)]


def llama_cpp_decode(ll, prompt, new):
    ll.reset()
    ll.eval(prompt[0].tolist())
    toks = []
    start = time.perf_counter()
    for _ in range(new - 1):
        toks.append(int(ll.sample(temp=0.0)))
        ll.eval([toks[-1]])
    rate = (new - 1) / (time.perf_counter() - start)
    return rate, toks + [int(ll.sample(temp=0.0))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--perplexity", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from camelid import LlamaForCausalLM
    from camelid.core.accounting import parameter_count
    from camelid.formats.gguf_file import GGUFFile
    from camelid.formats.hub import pull
    from camelid.transforms.fuse import fuse
    from camelid.transforms.quantize import quantize, weight_bytes

    path = pull()
    prompt = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    make = {
        "camelid float32": lambda: LlamaForCausalLM.from_pretrained(path),
        "camelid int8": lambda: fuse(quantize(LlamaForCausalLM.from_pretrained(path), bits=8)),
        "camelid int4 g32": lambda: fuse(quantize(LlamaForCausalLM.from_pretrained(path), bits=4, group_size=32)),
        "camelid int4 unfused": lambda: quantize(LlamaForCausalLM.from_pretrained(path), bits=4, group_size=32),
        "camelid int4 all": lambda: fuse(quantize(LlamaForCausalLM.from_pretrained(path), bits=4, lm_head_bits=4)),
        "camelid Q4_1->int4": lambda: LlamaForCausalLM.from_pretrained(path, load_in_4bit=True),  # fused
        # activations in bfloat16 too: no float32 <-> bfloat16 conversion around each int kernel
        "camelid int4 g32 bf16": lambda: quantize(LlamaForCausalLM.from_pretrained(path), bits=4).to(torch.bfloat16),
    }
    rows, fp16 = {}, None
    ids = None
    if args.perplexity:
        from camelid.text.tokenizer import Tokenizer

        ids = Tokenizer.from_pretrained(path).encode(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read())
    for name, build in make.items():
        start = time.perf_counter()
        model = build()
        load = time.perf_counter() - start
        fp16 = fp16 or 2 * parameter_count(model.config)
        rate, toks = median_rate(lambda m=model: camelid_decode(m, prompt, args.new))
        rows[name] = dict(rate=rate, toks=toks, bytes=weight_bytes(model), mm=matmuls_alone(model), load=load)
        if ids is not None:
            from camelid.evaluate.perplexity import perplexity

            rows[name]["ppl"] = perplexity(model, ids, context=512).value
        del model
        gc.collect()
        print(f"  {name}: {rate:.1f} tok/s", flush=True)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    rate, toks = median_rate(lambda m=theirs: transformers_decode(m, prompt, args.new))
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in theirs.parameters()}
    rows["transformers float32"] = dict(rate=rate, toks=toks, bytes=sum(unique.values()), mm=float("nan"))
    del theirs
    gc.collect()
    try:
        from llama_cpp import Llama

        ll = Llama(model_path=str(path), n_threads=args.threads, n_ctx=512, verbose=False)
        rate, toks = median_rate(lambda: llama_cpp_decode(ll, prompt, args.new))
        g = GGUFFile(path)
        rows["llama.cpp Q4_1"] = dict(rate=rate, toks=toks, bytes=sum(t.data.nbytes for t in g.tensors.values()),
                                      mm=float("nan"))
        g.close()
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp row skipped")

    ref, hf, lc = rows["camelid float32"]["toks"], rows["transformers float32"]["rate"], rows.get("llama.cpp Q4_1")
    print(f"\ndefault model, batch 1 greedy decode, {args.new} new tokens, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; float16 size {fp16 / 1e6:.1f} MB")
    print(f"{'':22} {'tok/s':>7} {'matmuls':>8} {'weights MB':>11} {'x fp16':>7} {'GB/s':>6} {'same tokens':>12} "
          f"{'vs HF':>6} {'vs llama.cpp':>13}" + (f" {'ppl GPL-3':>10}" if ids is not None else ""))
    for name, r in rows.items():
        same = next((i for i, (a, b) in enumerate(zip(r["toks"], ref)) if a != b), len(ref))
        print(f"{name:22} {r['rate']:7.1f} {r['mm']:8.1f} {r['bytes'] / 1e6:11.1f} {r['bytes'] / fp16:7.3f} "
              f"{r['bytes'] * r['rate'] / 1e9:6.1f} {f'{same}/{len(ref)}':>12} {r['rate'] / hf:5.2f}x "
              f"{r['rate'] / lc['rate'] if lc else float('nan'):12.2f}x"
              + (f" {r['ppl']:10.4f}" if 'ppl' in r else ""))
    print("matmuls: steps/s of the model's linear layers alone at one token; GB/s: weight bytes x tok/s; "
          "same tokens: greedy tokens equal to camelid float32's before the first difference")


if __name__ == "__main__":
    main()
