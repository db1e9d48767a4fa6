"""camelid's CPU kernels against llama.cpp and transformers, same machine, same threads, one run.

    python bench/cpu.py [--threads 2] [--new 64] [--files q4_1,q4_0,q8_0,q4_k_m] [--skip-transformers]

Files: the default model's shipped Q4_1 GGUF, and a Q4_0, a Q8_0 and a Q4_K_M GGUF that llama.cpp's own
quantizer (llama-cpp-python's llama_model_quantize) makes from camelid's f16 export of it (cached
in $CAMELID_HOME/bench/). Each engine runs in a fresh child process, alone, so its peak RSS is its
own and nothing else competes for the cores. Per file and engine: time from a fresh process to
the first token, prefill tok/s at 512 tokens, greedy decode tok/s at batch 1 (and batch 8 for
camelid), peak RSS; then the ratios, and the fraction of the bandwidth bound reached (weight bytes
read per token x tok/s over the DRAM read bandwidth measured here first). The float rows compare
camelid's bfloat16 default float path and float32 against transformers float32 on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_files import llama_cpp_figures, make_files  # noqa: E402


# ---------------------------------------------------------------------- children (one engine each)

def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike ru_maxrss it starts afresh at exec, so a
    child does not inherit its parent's peak)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from camelid.evaluate.benchmark import measure

    if args.engine == "llama.cpp":
        from llama_cpp import Llama

        ll = Llama(model_path=args.file, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                   n_batch=512, verbose=False)
        ttft, prefill, d1 = llama_cpp_figures(ll, args.new)
        from gguf import GGUFReader

        wb = sum(int(t.n_bytes) for t in GGUFReader(args.file).tensors)  # every tensor, once per token
        return dict(ttft=ttft, prefill=prefill, decode1=d1, decode8=None, rss=peak_rss(), wbytes=wb)
    if args.engine == "transformers":
        import transformers

        path = Path(args.file)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()

        def gen(ids, n):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=2)
        f = measure(gen, model.config.vocab_size, args.new)
        wb = sum(p.numel() * p.element_size() for p in model.parameters())
        return dict(ttft=f.ttft, prefill=f.prefill, decode1=f.decode1, decode8=f.decode8, rss=peak_rss(), wbytes=wb)
    from camelid import LlamaForCausalLM
    from camelid.evaluate.benchmark import weight_bytes

    model = LlamaForCausalLM.from_pretrained(args.file, dtype=args.dtype)
    f = measure(lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                model.config.vocab_size, args.new)
    return dict(ttft=f.ttft, prefill=f.prefill, decode1=f.decode1, decode8=f.decode8, rss=peak_rss(),
                wbytes=weight_bytes(model))


def first_token(args) -> None:
    """Print one line when the first new token exists: the parent times process start -> that line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.engine == "llama.cpp":
        from llama_cpp import Llama

        ll = Llama(model_path=args.file, n_threads=args.threads, n_ctx=512, verbose=False)
        ll.eval(ll.tokenize(b"The capital of France is"))
        print("token", int(ll.sample(temp=0.0)), flush=True)
        return
    from camelid import LlamaForCausalLM
    from camelid.text.tokenizer import Tokenizer

    model = LlamaForCausalLM.from_pretrained(args.file, dtype=args.dtype)
    ids = Tokenizer.from_pretrained(args.file).encode("The capital of France is")
    out = model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)
    print("token", int(out[0, -1]), flush=True)


def run_child(*argv, threads: int) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, str(HERE), *argv, "--threads", str(threads)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        print(f"  {' '.join(argv)}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_to_first_token(*argv, threads: int, repeats: int = 3) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        p = subprocess.Popen([sys.executable, str(HERE), "--first-token", *argv, "--threads", str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        p.stdout.readline()
        times.append(time.perf_counter() - start)
        p.wait()
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------- the parent

def bandwidth(threads: int) -> float:
    """DRAM read GB/s: a float32 sum over 1 GiB (far past any cache), median of 5, `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / sorted(times)[2] / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--files", default="q4_1,q4_0,q8_0,q4_k_m")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--child", dest="engine", default=None)
    ap.add_argument("--first-token", action="store_true")
    ap.add_argument("--file")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    if args.first_token:
        return first_token(args)
    if args.engine:
        print(json.dumps(child(args)))
        return

    import torch

    import camelid.kernels as kernels
    kernels.available()
    bw = bandwidth(args.threads)
    files = make_files()
    print(f"{args.threads} threads, torch {torch.__version__}, camelid kernels: {kernels.isa()}; "
          f"DRAM read {bw:.1f} GB/s (float32 sum over 1 GiB)")
    t = args.threads
    rows = {}
    for name in args.files.split(","):
        f = str(files[name])
        for engine in ("camelid", "llama.cpp"):
            r = run_child("--child", engine, "--file", f, "--new", str(args.new), threads=t)
            if r is not None:
                r["first"] = time_to_first_token("--child", engine, "--file", f, threads=t)
                rows[(name, engine)] = r
    if not args.skip_transformers:
        f = str(files["q4_1"])
        for engine, dtype in (("camelid", "bfloat16"), ("camelid", "float32"), ("transformers", None)):
            r = run_child("--child", engine, "--file", f, "--new", str(args.new),
                          *(["--dtype", dtype] if dtype else []), threads=t)
            if r is not None:
                rows[("float", f"{engine} {dtype or 'float32'}")] = r

    head = (f"{'file':6} {'engine':22} {'first tok s':>11} {'prefill512':>10} {'decode b1':>9} {'decode b8':>9} "
            f"{'b8/b1':>6} {'peak MiB':>8} {'GB/s':>6} {'of bound':>8}")
    print(head)
    for (name, engine), r in rows.items():
        name = name[:6]
        gbs = r["wbytes"] * r["decode1"] / 1e9 if r["wbytes"] else None
        d8 = f"{r['decode8']:9.1f}" if r["decode8"] else f"{'-':>9}"
        ratio = f"{r['decode8'] / r['decode1']:6.2f}" if r["decode8"] else f"{'-':>6}"
        print(f"{name:6} {engine:22} {r.get('first', float('nan')):11.2f} {r['prefill']:10.1f} {r['decode1']:9.1f} "
              f"{d8} {ratio} {r['rss'] / 2**20:8.0f} {gbs or float('nan'):6.1f} "
              f"{(gbs / bw if gbs else float('nan')):8.0%}")
    print("ratios (camelid / peer, > 1: camelid faster or smaller):")
    for name in args.files.split(","):
        a, b = rows.get((name, "camelid")), rows.get((name, "llama.cpp"))
        if a and b:
            print(f"  {name}: decode b1 {a['decode1'] / b['decode1']:.2f}x, prefill {a['prefill'] / b['prefill']:.2f}x, "
                  f"first token {b['first'] / a['first']:.2f}x, peak RSS {a['rss'] / b['rss']:.2f}x of llama.cpp's")
    tf = rows.get(("float", "transformers float32"))
    for key in (("float", "camelid bfloat16"), ("float", "camelid float32")):
        if tf and key in rows:
            print(f"  {key[1]} / transformers float32: decode b1 {rows[key]['decode1'] / tf['decode1']:.2f}x, "
                  f"prefill {rows[key]['prefill'] / tf['prefill']:.2f}x")


if __name__ == "__main__":
    main()
