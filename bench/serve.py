"""Serving throughput on the default model: N concurrent streaming clients through the real HTTP
server (continuous batching) vs the same requests one at a time, in one run.

    python bench/serve.py [--clients 32] [--max-tokens 32] [--max-batch 8] [--threads 2]

Prints completion tokens/s aggregated over all clients, mean time to first token, and the ratio
to serving the requests one after another through the same server.
"""

import argparse
import socket
import threading
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import openai
    import uvicorn

    from camelid import LlamaForCausalLM
    from camelid.serve.app import create_app
    from camelid.text.tokenizer import Tokenizer

    model, tok = LlamaForCausalLM.from_pretrained(None), Tokenizer.from_pretrained(None)
    app = create_app(model, tok, model_name="m", max_batch=args.max_batch, max_queue=4 * args.clients)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    questions = [f"Write a sentence about the number {i}." for i in range(args.clients)]

    def one(q, out, i):
        t0 = time.perf_counter()
        first, n = None, 0
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], stream=True,
                                                max_tokens=args.max_tokens, temperature=0,
                                                stream_options={"include_usage": True})
        for c in stream:
            if c.choices and c.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            if c.usage:
                n = c.usage.completion_tokens
        out[i] = (first or 0.0, n)

    one(questions[0], [None], 0)  # warm-up
    for mode in ("concurrent", "one at a time"):
        out = [None] * args.clients
        t = time.perf_counter()
        if mode == "concurrent":
            threads = [threading.Thread(target=one, args=(q, out, i)) for i, q in enumerate(questions)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        else:
            for i, q in enumerate(questions):
                one(q, out, i)
        dt = time.perf_counter() - t
        tokens = sum(n for _, n in out)
        ttft = sum(f for f, _ in out) / len(out)
        print(f"{mode:>14}: {args.clients} clients, {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} tok/s; "
              f"mean time to first token {ttft:.2f} s")
        if mode == "concurrent":
            concurrent = tokens / dt
    print(f"continuous batching vs one at a time: {concurrent / (tokens / dt):.2f}x")
    server.should_exit = True


if __name__ == "__main__":
    main()
