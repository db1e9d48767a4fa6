"""Generation speed of any `generate(ids, new_tokens)` callable: time to first token, prefill
tok/s, greedy decode tok/s at batch 1 and batch 8, and the process's peak RSS. `camelid bench`
prints these for a camelid model; bench/generate.py runs the same measurement on the peers.

    figures = measure(lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n), vocab_size)
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Figures:
    ttft: float  # seconds: a prompt of `short` tokens to its first new token
    prefill: float  # tok/s over a prompt of `long` tokens (ending with one new token)
    decode1: float  # tok/s, one row, after the first token
    decode8: float  # tok/s summed over 8 rows, after the first token
    peak_rss: int  # bytes, the whole process so far (everything it loaded counts)

    def row(self, name: str) -> str:
        return (f"{name:18} {self.ttft:8.3f} {self.prefill:14.1f} {self.decode1:12.1f} {self.decode8:12.1f} "
                f"{self.peak_rss / 2**20:10.0f}")


HEADER = f"{'':18} {'TTFT s':>8} {'prefill tok/s':>14} {'decode b1':>12} {'decode b8':>12} {'peak MiB':>10}"


def timed(fn: Callable, repeats: int = 3):
    """Median wall time of `repeats` runs after one warm-up (the first call of a shape sets up kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def peak_rss() -> int:
    """The process's peak resident set in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def prompts(vocab_size: int, short: int = 32, long: int = 512, seed: int = 0):
    """Random prompts of ordinary tokens (no specials: ids 100.. up to 40000 or the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    high = min(40000, vocab_size)
    return (torch.randint(min(100, high - 1), high, (1, short), generator=g),
            torch.randint(min(100, high - 1), high, (1, long), generator=g))


def measure(generate: Callable[[torch.Tensor, int], object], vocab_size: int, new: int = 64, short: int = 32,
            long: int = 512, batch: int = 8) -> Figures:
    """`generate(ids [B, T], n)` must produce exactly n new tokens per row (min_new_tokens=n).
    Decode rates leave out the first token (that is the TTFT's prefill)."""
    prompt, prompt_long = prompts(vocab_size, short, long)
    generate(prompt, 4)  # warm-up
    ttft, _ = timed(lambda: generate(prompt, 1))
    pre, _ = timed(lambda: generate(prompt_long, 1))
    d1, _ = timed(lambda: generate(prompt, new + 1), repeats=1)
    batch_ttft, _ = timed(lambda: generate(prompt.repeat(batch, 1), 1))  # a median, as ttft: one slow run made d8 - it < 0
    d8, _ = timed(lambda: generate(prompt.repeat(batch, 1), new + 1), repeats=1)
    return Figures(ttft=ttft, prefill=long / pre, decode1=new / (d1 - ttft), decode8=batch * new / (d8 - batch_ttft),
                   peak_rss=peak_rss())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every distinct parameter, except the embedding
    matrix when lm_head holds its own copy (a step reads one embedding row; a packed tied
    lm_head is such a copy). Quantized models: their codes and scales (camelid.transforms.quantize)."""
    from camelid.transforms.quantize import is_quantized
    from camelid.transforms.quantize import weight_bytes as quantized_bytes

    if is_quantized(model):
        return quantized_bytes(model)
    skip = set()
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    if embed is not None and (lm_head is None or lm_head.weight is not embed.weight):
        skip.add(id(embed.weight))
    params = {id(p): p for p in model.parameters() if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in params.values())
