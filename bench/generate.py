"""Generation speed on the default model: camelid vs transformers (same weights, same process,
same threads), and llama.cpp's own Q4_1 decode when llama-cpp-python is installed.

    python bench/generate.py [--threads 2] [--new 64] [--dtype float32]

Prints time to first token, prefill tok/s at 512 tokens, greedy decode tok/s at batch 1 and 8,
camelid's ratio to transformers (> 1: camelid faster), and the weight-read bandwidth decode
achieves (weight bytes x decode steps/s).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_files import llama_cpp_figures  # noqa: E402

from camelid.evaluate.benchmark import HEADER, Figures, measure, peak_rss, weight_bytes


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
    from camelid.formats.hub import pull

    path = pull()
    ours = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=dtype).eval()
    V = ours.config.vocab_size

    def run_theirs(ids, new):
        with torch.inference_mode():
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=2)

    # peak RSS is the process's: both models are loaded by now, so it is shared, not per engine
    # pack=False: plain nn.Linear weights (torch's BLAS), faster on some CPUs but not batch-invariant
    unpacked = LlamaForCausalLM.from_pretrained(path, dtype=dtype, pack=False)
    rows = {"camelid": measure(lambda ids, n: ours.generate(ids, max_new_tokens=n, min_new_tokens=n), V, args.new),
            "camelid pack=False": measure(lambda ids, n: unpacked.generate(ids, max_new_tokens=n, min_new_tokens=n),
                                          V, args.new),
            "transformers": measure(run_theirs, V, args.new)}
    try:
        from llama_cpp import Llama

        ll = Llama(model_path=str(path), n_threads=args.threads, n_ctx=1024, verbose=False)
        ttft, prefill, d1 = llama_cpp_figures(ll, args.new)
        rows["llama.cpp Q4_1"] = Figures(ttft=ttft, prefill=prefill, decode1=d1, decode8=float("nan"),
                                         peak_rss=peak_rss())
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp row skipped")

    wb = weight_bytes(ours)
    print(f"default model, {args.dtype}, {args.threads} threads, {args.new} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; camelid weights read per step {wb / 2**20:.0f} MiB")
    print(HEADER)
    for name, r in rows.items():
        print(r.row(name))
    a, b, u = rows["camelid"], rows["transformers"], rows["camelid pack=False"]
    print(f"camelid pack=False / transformers: decode b1 {u.decode1 / b.decode1:.2f}x, decode b8 "
          f"{u.decode8 / b.decode8:.2f}x (not batch-invariant)")
    print(f"camelid / transformers: TTFT {b.ttft / a.ttft:.2f}x faster, prefill {a.prefill / b.prefill:.2f}x, "
          f"decode b1 {a.decode1 / b.decode1:.2f}x, decode b8 {a.decode8 / b.decode8:.2f}x; "
          f"camelid b8/b1 throughput {a.decode8 / a.decode1:.2f}x")
    if "llama.cpp Q4_1" in rows:
        c = rows["llama.cpp Q4_1"]
        print(f"camelid / llama.cpp Q4_1: prefill {a.prefill / c.prefill:.2f}x, decode b1 {a.decode1 / c.decode1:.2f}x")
    print(f"camelid decode b1 weight-read bandwidth: {wb * a.decode1 / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
