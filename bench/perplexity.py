"""Perplexity of camelid and llama.cpp on the same GGUF files, by llama.cpp's own algorithm.

    python bench/perplexity.py [--text /usr/share/common-licenses/GPL-3] [--ctx 512] [--threads 2]

llama.cpp's `perplexity` tool: tokenize the whole text once (BOS first), cut it into chunks of
n_ctx tokens, make each chunk's first token BOS, evaluate the chunk, and score only its second
half (the log-probability of token i + 1 given tokens <= i, for i from n_ctx/2 on); ppl =
exp(mean NLL). Both engines get the same token ids (llama.cpp's tokenizer) and the same chunks,
so the figures differ only by the engines' arithmetic. Files: the shipped Q4_1 and the Q4_0 /
Q8_0 / Q4_K_M that bench/cpu.py makes; camelid runs each with its blocks (the default) and dequantized
to float32 (the reference for "within 3% of float32").
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def chunks(tokens: list[int], ctx: int, bos: int) -> list[list[int]]:
    out = []
    for start in range(0, len(tokens) - ctx + 1, ctx):
        c = tokens[start:start + ctx]
        out.append([bos] + c[1:])
    return out


def nll_of(logits: np.ndarray, chunk: list[int]) -> tuple[float, int]:
    """Summed NLL over the second half of a chunk, from its [n_ctx, V] logits (float64 softmax)."""
    half = len(chunk) // 2
    lg = logits[half:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    target = np.array(chunk[half + 1:])
    return float((lse - lg[np.arange(len(target)), target]).sum()), len(target)


def llama_cpp_ppl(path: str, cs, ctx: int, threads: int) -> float:
    from llama_cpp import Llama

    ll = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
               logits_all=True, verbose=False)
    total, n = 0.0, 0
    for c in cs:
        ll.reset()
        ll.eval(c)
        s, k = nll_of(np.array(ll.scores[:len(c)]), c)
        total, n = total + s, n + k
    return math.exp(total / n)


def camelid_ppl(path: str, cs, dtype) -> float:
    from camelid import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    total, n = 0.0, 0
    with torch.inference_mode():
        for c in cs:
            logits = model(torch.tensor([c])).logits[0].float().numpy()
            s, k = nll_of(logits, c)
            total, n = total + s, n + k
    return math.exp(total / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", default="q4_1,q4_0,q8_0,q4_k_m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llama_cpp import Llama

    import bench_files

    files = bench_files.make_files()
    text = open(args.text, encoding="utf-8").read()
    vocab = Llama(model_path=str(files["q4_1"]), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode(), add_bos=True)
    cs = chunks(tokens, args.ctx, vocab.token_bos())
    print(f"{args.text}: {len(tokens)} tokens, {len(cs)} chunks of {args.ctx}, second halves scored; "
          f"{args.threads} threads")
    print(f"{'file':6} {'llama.cpp':>10} {'camelid':>10} {'diff':>8} {'camelid f32':>12} {'vs f32':>8} {'s':>6}")
    for name in args.files.split(","):
        start = time.perf_counter()
        theirs = llama_cpp_ppl(str(files[name]), cs, args.ctx, args.threads)
        ours = camelid_ppl(str(files[name]), cs, None)
        f32 = camelid_ppl(str(files[name]), cs, "float32")
        print(f"{name:6} {theirs:10.4f} {ours:10.4f} {ours / theirs - 1:+8.3%} {f32:12.4f} {ours / f32 - 1:+8.3%} "
              f"{time.perf_counter() - start:6.0f}")


if __name__ == "__main__":
    main()
