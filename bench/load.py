"""Time from a fresh process to the first logits of the default model (SmolLM2-135M-Instruct
Q4_1 GGUF): camelid vs transformers (gguf_file=) vs llama.cpp (llama-cpp-python, if installed).

    python bench/load.py [--threads 2] [--repeats 3]

Each measurement is a new Python process (imports included), on the same threads; the median
of the repeats is printed with camelid's ratio (> 1 means camelid is faster).
"""

import argparse
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is"

CAMELID = """
import torch; torch.set_num_threads({threads})
from camelid import LlamaForCausalLM
from camelid.text.tokenizer import Tokenizer
m = LlamaForCausalLM.from_pretrained({path!r}); t = Tokenizer.from_pretrained({path!r})
with torch.no_grad(): m(torch.tensor([t.encode({prompt!r})])).logits
"""
TRANSFORMERS = """
import torch; torch.set_num_threads({threads})
import os, transformers
d, f = os.path.split({path!r})
m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
t = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
with torch.no_grad(): m(**t({prompt!r}, return_tensors="pt")).logits
"""
LLAMA_CPP = """
from llama_cpp import Llama
m = Llama(model_path={path!r}, n_threads={threads}, verbose=False, logits_all=False)
m.eval(m.tokenize({prompt!r}.encode(), add_bos=False))
"""


def run(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from camelid.formats.hub import pull

    path = str(pull())
    peers = {"camelid": CAMELID, "transformers": TRANSFORMERS}
    try:
        import llama_cpp  # noqa: F401
        peers["llama.cpp"] = LLAMA_CPP
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp column skipped")
    times = {}
    for name, code in peers.items():
        code = code.format(path=path, threads=args.threads, prompt=PROMPT)
        times[name] = statistics.median(run(code) for _ in range(args.repeats))
    print(f"load to first logits, {path.rsplit('/', 1)[-1]}, {args.threads} threads, median of {args.repeats}")
    for name, t in times.items():
        ratio = "" if name == "camelid" else f"   camelid is {t / times['camelid']:.2f}x faster"
        print(f"  {name:<13} {t:6.2f} s{ratio}")


if __name__ == "__main__":
    main()
