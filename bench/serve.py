"""Serving under load on the default model (issue 18): each server a subprocess on loopback with
the same threads, started one at a time, spoken to over HTTP by streaming clients (threads).

    python bench/serve.py [--threads 2] [--quick] [--skip-old] [--skip-llama-cpp]

Servers:
  camelid      this tree's `camelid serve` (paged KV cache, chunked prefill, prefix caching)
  old          `camelid serve` at commit 8e8f136 (one static cache row per slot; a prompt is prefilled
               alone, pausing the streams), from a git worktree in $TMPDIR/camelid-8e8f136
  llama.cpp    llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the same GGUF file

Scenarios (chat requests, greedy; figures per server in one run):
  1. 1, 8, 32 and 64 concurrent streams of a short question, 32 tokens each: throughput (completion
     tokens/s over the wall time), p50/p99 time to first token and inter-token latency; the ratio
     to camelid, and the fraction of the decode bound (batch x DRAM GB/s / weight bytes per step).
  2. one 2,000-token prompt arriving while 8 streams decode: the streams' p99 inter-token latency
     over their p99 without it (target <= 3x), at --max-prefill-chunk 256 (default) and 64.
  3. a shared 1,000-token system prompt, 32 requests at once on 32 slots: mean time to first token
     with prefix caching over without (target >= 5x lower).
  4. 32 short requests on 32 slots: the KV blocks held at the peak over the static cache's
     max-batch x context tokens (target <= 25%), with the budget set to a quarter of it.

Nothing here is a test: figures depend on the machine; run it alone (two cores: any other job
skews every number).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
OLD = "8e8f136"
sys.path.insert(0, str(ROOT / "bench"))


# ---------------------------------------------------------------------- servers
class Proc:
    """A server subprocess on a free port; /health (or /v1/models) polled until it answers."""

    def __init__(self, name, argv, cwd, env, port, model_name):
        self.name, self.port, self.model_name = name, port, model_name
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{name}-", suffix=".log", delete=False)
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.p.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{self.log.read()[-3000:]}")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def close(self):
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(threads: int, pythonpath: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def camelid(gguf, threads, *flags, tree=ROOT, name="camelid"):
    port = free_port()
    argv = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
            "import sys; from camelid.cli import main; sys.exit(main(sys.argv[1:]))",
            "serve", "--model", str(gguf), "--port", str(port), "--served-model-name", "m", *flags]
    return Proc(name, argv, str(tree), env_for(threads, str(tree)), port, "m")


def start_llama_cpp(gguf, threads):
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_threads",
            str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096", "--model_alias", "m",
            "--interrupt_requests", "False"]  # its default: a new request cuts the running stream off
    return Proc("llama.cpp", argv, str(ROOT), env_for(threads), port, "m")


def old_tree() -> Path | None:
    """A worktree of the engine before issue 18, its kernels built; None when git cannot make one."""
    path = Path(tempfile.gettempdir()) / f"camelid-{OLD}"
    if not path.exists():
        r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), OLD],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"old engine skipped: {r.stderr.strip()}")
            return None
    subprocess.run([sys.executable, "-m", "camelid.kernels"], cwd=path, env=env_for(2, str(path)), check=True,
                   capture_output=True)
    return path


# ---------------------------------------------------------------------- clients
def stream_chat(url, model, messages, max_tokens, t_submit=None) -> dict:
    """One streaming chat request: send time, the arrival time of each content chunk, tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter() if t_submit is None else t_submit
    times, tokens = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    return {"t0": t0, "times": times, "tokens": tokens if tokens is not None else len(times)}


def run_streams(url, model, jobs, start_delays=None) -> tuple[list[dict], float]:
    """Each (messages, max_tokens) job in its own thread, all at once (or after its delay); the wall time."""
    out = [None] * len(jobs)

    def one(i):
        if start_delays:
            time.sleep(start_delays[i])
        out[i] = stream_chat(url, model, *jobs[i])

    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out, time.perf_counter() - t


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summary(results, wall) -> dict:
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99),
            "itl50": pct(itl, 50), "itl99": pct(itl, 99), "ttft_mean": statistics.mean(ttft) if ttft else 0}


def question(i):
    return [{"role": "user", "content": f"Write one sentence about the number {i}."}]


# ---------------------------------------------------------------------- scenarios
def sweep(server, levels, max_tokens) -> dict:
    stream_chat(server.url, server.model_name, question(0), 4)  # warm-up
    out = {}
    for n in levels:
        results, wall = run_streams(server.url, server.model_name, [(question(i), max_tokens) for i in range(n)])
        out[n] = summary(results, wall)
        s = out[n]
        print(f"  {server.name:>9} {n:>3} streams: {s['tok_s']:7.1f} tok/s  TTFT p50 {s['ttft50']:6.2f} s "
              f"p99 {s['ttft99']:6.2f} s  ITL p50 {s['itl50'] * 1e3:7.1f} ms p99 {s['itl99'] * 1e3:7.1f} ms", flush=True)
    return out


def long_prompt_text(tokenizer, n) -> str:
    words = ("river map harbour lighthouse compass meridian parallel coast island chart survey scale "
             "legend north atlas border valley ridge delta estuary").split()
    text, i = "", 0
    while len(tokenizer.encode(text)) < n:
        text += " ".join(words[(i * 7 + j) % len(words)] for j in range(50)) + ". "
        i += 1
    ids = tokenizer.encode(text)[:n]
    return tokenizer.decode(ids)


def interference(server, long_text, streams=8, max_tokens=96) -> tuple[float, float, float]:
    """(p99 ITL of the streams without, with the long prompt, the long prompt's TTFT)."""
    jobs = [(question(i), max_tokens) for i in range(streams)]
    base, _ = run_streams(server.url, server.model_name, jobs)
    box = {}

    def long_one():
        time.sleep(1.0)  # the streams are decoding
        box["r"] = stream_chat(server.url, server.model_name, [{"role": "user", "content": long_text}], 4)

    th = threading.Thread(target=long_one)
    th.start()
    loaded, _ = run_streams(server.url, server.model_name, jobs)
    th.join()
    r = box["r"]
    without = summary(base, 1)["itl99"]
    with_ = summary(loaded, 1)["itl99"]
    return without, with_, (r["times"][0] - r["t0"]) if r["times"] else float("nan")


def shared_prefix(server, system, n=32) -> float:
    jobs = [([{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
             8) for i in range(n)]
    results, _ = run_streams(server.url, server.model_name, jobs)
    return summary(results, 1)["ttft_mean"]


# ---------------------------------------------------------------------- the run
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 and 8 streams only, fewer tokens")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--scenarios", default="1,2,3,4", help="which scenarios to run, e.g. 2,3")
    args = ap.parse_args()
    run = {int(x) for x in args.scenarios.split(",")}

    import torch

    from camelid.formats.hub import pull
    from camelid.text.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    gguf = pull(quiet=True)
    tok = Tokenizer.from_pretrained(gguf)
    levels = [1, 8] if args.quick else [1, 8, 32, 64]
    max_tokens = 16 if args.quick else 32

    from cpu import bandwidth

    bw = bandwidth(args.threads)
    weight_bytes = gguf.stat().st_size  # the Q4_1 file: what a decode step reads (its blocks are kept as they are)
    print(f"default model {gguf.name} ({weight_bytes / 1e6:.0f} MB), {args.threads} threads, DRAM read {bw:.1f} GB/s; "
          f"decode bound at batch B: B x {bw * 1e9 / weight_bytes:.0f} tok/s", flush=True)

    servers = [("camelid", lambda: camelid(gguf, args.threads))]
    tree = None if args.skip_old else old_tree()
    if tree is not None:
        servers.append(("old", lambda: camelid(gguf, args.threads, tree=tree, name="old")))
    if not args.skip_llama_cpp:
        try:
            import llama_cpp.server  # noqa: F401

            servers.append(("llama.cpp", lambda: start_llama_cpp(gguf, args.threads)))
        except ImportError as e:
            print(f"llama.cpp skipped: {e} (pip install 'llama-cpp-python[server]')")

    if 1 in run:
        scenario_streams(servers, levels, max_tokens, bw, weight_bytes)
    if 2 in run:
        scenario_long_prompt(gguf, tok, args.threads, tree)
    if 3 in run:
        scenario_prefix(gguf, tok, args.threads)
    if 4 in run:
        scenario_memory(gguf, args.threads, max_tokens)


def scenario_streams(servers, levels, max_tokens, bw, weight_bytes):
    print("\n1. concurrent streams (max_tokens %d, max-batch 8)" % max_tokens, flush=True)
    table = {}
    for name, start in servers:
        s = start()
        try:
            table[name] = sweep(s, levels, max_tokens)
        finally:
            s.close()
    print(f"\n  {'server':>9} {'streams':>7} {'tok/s':>7} {'x camelid':>9} {'of bound':>8} {'TTFT p50':>8} "
          f"{'TTFT p99':>8} {'ITL p50':>8} {'ITL p99':>8}")
    for name, rows in table.items():
        for n, s in rows.items():
            ratio = s["tok_s"] / table["camelid"][n]["tok_s"]
            bound = min(n, 8) * bw * 1e9 / weight_bytes
            print(f"  {name:>9} {n:>7} {s['tok_s']:7.1f} {ratio:9.2f} {s['tok_s'] / bound:8.1%} {s['ttft50']:7.2f}s "
                  f"{s['ttft99']:7.2f}s {s['itl50'] * 1e3:6.0f}ms {s['itl99'] * 1e3:6.0f}ms")



def scenario_long_prompt(gguf, tok, threads, tree):
    print("\n2. one 2,000-token prompt arriving while 8 streams decode (their p99 inter-token latency)", flush=True)
    long_text = long_prompt_text(tok, 2000)
    for label, start in [("camelid (default)", lambda: camelid(gguf, threads)),
                         ("camelid chunk 64", lambda: camelid(gguf, threads, "--max-prefill-chunk", "64"))] + \
                        ([("old", lambda: camelid(gguf, threads, tree=tree, name="old"))] if tree else []):
        s = start()
        try:
            stream_chat(s.url, s.model_name, question(0), 4)
            without, with_, first = interference(s, long_text)
        finally:
            s.close()
        print(f"  {label:>18}: p99 ITL {without * 1e3:6.0f} ms without, {with_ * 1e3:6.0f} ms with = "
              f"{with_ / without:5.2f}x (target <= 3x); the long prompt's TTFT {first:.1f} s", flush=True)



def scenario_prefix(gguf, tok, threads):
    print("\n3. a shared 1,000-token system prompt, 32 requests at once on 32 slots (mean time to first token)",
          flush=True)
    system = long_prompt_text(tok, 1000)
    ttft = {}
    for label, flags in (("prefix caching", ()), ("no prefix caching", ("--no-prefix-caching",))):
        s = camelid(gguf, threads, "--max-batch", "32", *flags)
        try:
            stream_chat(s.url, s.model_name, question(0), 4)
            ttft[label] = shared_prefix(s, system)
            hits = s.metrics()
            q = hits.get('vllm:prefix_cache_queries_total{model_name="m"}', 0)
            h = hits.get('vllm:prefix_cache_hits_total{model_name="m"}', 0)
        finally:
            s.close()
        print(f"  {label:>18}: mean TTFT {ttft[label]:6.2f} s; prefix hit rate {h / max(q, 1):.1%}", flush=True)
    print(f"  with / without: {ttft['no prefix caching'] / ttft['prefix caching']:.1f}x lower (target >= 5x)")



def scenario_memory(gguf, threads, max_tokens):
    print("\n4. KV memory at 32 short requests (32 slots x 4096 tokens static = 131,072 tokens)", flush=True)
    static = 32 * 4096
    s = camelid(gguf, threads, "--max-batch", "32", "--kv-cache-memory", f"{static // 4}tokens")
    try:
        stream_chat(s.url, s.model_name, question(0), 4)
        run_streams(s.url, s.model_name, [(question(i), max_tokens) for i in range(32)])
        m = s.metrics()
    finally:
        s.close()
    peak = m["camelid_kv_cache_blocks_peak"] * m["camelid_kv_cache_block_tokens"]
    print(f"  budget {static // 4} tokens (25%); peak held {peak:.0f} tokens = {peak / static:.2%} of the static cache "
          f"(target <= 25%); preemptions {m['camelid_preemptions_total']:.0f}")


if __name__ == "__main__":
    main()
