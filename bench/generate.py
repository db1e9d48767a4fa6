"""Generation speed on the default model: camelid vs transformers (same weights, same process,
same threads), and llama.cpp's own Q4_1 decode when llama-cpp-python is installed.

    python bench/generate.py [--threads 2] [--new 64] [--dtype float32]

Prints time to first token, prefill tok/s at 512 tokens, greedy decode tok/s at batch 1 and 8,
camelid's ratio to transformers (> 1: camelid faster), and the weight-read bandwidth decode
achieves (weight bytes x decode steps/s).
"""

import argparse
import time

import torch


def timed(fn, repeats=3):
    """Median wall time of `repeats` runs after one warm-up (first calls of a shape set kernels up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers

    from camelid import LlamaForCausalLM
    from camelid.hub import pull

    path = pull()
    ours = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    g = torch.Generator().manual_seed(0)
    prompt512 = torch.randint(100, 40000, (1, 512), generator=g)
    prompt = torch.randint(100, 40000, (1, 32), generator=g)
    rows = {}

    def run_ours(ids, new):
        return ours.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def run_theirs(ids, new):
        with torch.inference_mode():
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=2)

    for name, run in (("camelid", run_ours), ("transformers", run_theirs)):
        run(prompt, 4)  # warm-up
        ttft, _ = timed(lambda: run(prompt, 1))
        pre, _ = timed(lambda: run(prompt512, 1))
        d1, _ = timed(lambda: run(prompt, args.new + 1), repeats=1)
        d8, _ = timed(lambda: run(prompt.repeat(8, 1), args.new + 1), repeats=1)
        rows[name] = dict(ttft=ttft, prefill=512 / pre, decode1=args.new / (d1 - ttft),
                          decode8=8 * args.new / (d8 - ttft * 1.0))
    try:
        from llama_cpp import Llama

        ll = Llama(model_path=str(path), n_threads=args.threads, n_ctx=1024, verbose=False)
        toks = prompt[0].tolist()
        ttft, _ = timed(lambda: (ll.reset(), ll.eval(toks)))
        pre, _ = timed(lambda: (ll.reset(), ll.eval(prompt512[0].tolist())))
        ll.reset()
        ll.eval(toks)
        start = time.perf_counter()
        for _ in range(args.new):
            ll.eval([int(ll.sample(temp=0.0))])
        rows["llama.cpp Q4_1"] = dict(ttft=ttft, prefill=512 / pre, decode1=args.new / (time.perf_counter() - start),
                                      decode8=float("nan"))
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp row skipped")

    print(f"default model, {args.dtype}, {args.threads} threads, {args.new} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; camelid weights {weight_bytes / 2**20:.0f} MiB")
    print(f"{'':16} {'TTFT s':>8} {'prefill512 tok/s':>17} {'decode b1 tok/s':>16} {'decode b8 tok/s':>16}")
    for name, r in rows.items():
        print(f"{name:16} {r['ttft']:8.3f} {r['prefill']:17.1f} {r['decode1']:16.1f} {r['decode8']:16.1f}")
    a, b = rows["camelid"], rows["transformers"]
    print(f"camelid / transformers: TTFT {b['ttft'] / a['ttft']:.2f}x faster, prefill {a['prefill'] / b['prefill']:.2f}x, "
          f"decode b1 {a['decode1'] / b['decode1']:.2f}x, decode b8 {a['decode8'] / b['decode8']:.2f}x; "
          f"camelid b8/b1 throughput {a['decode8'] / a['decode1']:.2f}x")
    print(f"camelid decode b1 weight-read bandwidth: {weight_bytes * a['decode1'] / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
