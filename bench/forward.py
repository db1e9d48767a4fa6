"""Forward-pass (prefill) speed: camelid vs transformers, same weights, same process, same threads.

    python bench/forward.py [--config smollm2-135m] [--seq 128 512] [--batch 1] [--threads 2] [--dtype float32]

Random weights with the real architecture: speed does not depend on the values. Prints tokens/s
for each library and camelid's ratio (> 1 means camelid is faster).
"""

import argparse
import statistics
import time

import torch


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers

    from camelid import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(config).to(dtype).eval()
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "torch_dtype"})
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)

    print(f"{args.config} {args.dtype}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'seq':>6} {'camelid tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}  max|dlogit|")
    for seq in args.seq:
        ids = torch.randint(0, config.vocab_size, (args.batch, seq))
        with torch.inference_mode():
            t_ours = timed(lambda: ours(ids), args.repeats)
            t_theirs = timed(lambda: theirs(ids, use_cache=False), args.repeats)
            diff = (ours(ids).logits.float() - theirs(ids, use_cache=False).logits.float()).abs().max().item()
        n = args.batch * seq
        print(f"{seq:>6} {n / t_ours:>14.1f} {n / t_theirs:>19.1f} {t_theirs / t_ours:>6.2f}  {diff:.2e}")


if __name__ == "__main__":
    main()
