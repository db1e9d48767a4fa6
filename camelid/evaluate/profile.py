"""Where a decode step's time goes: matrix products, attention, the other native work, other
torch ops, and Python (`camelid bench --profile` prints the table).

    table = profile_decode(model, prompt_ids, steps=32)
    print(format_table(table))

The steps are the generate iterator's own (generate_tokens, greedy), after the prefill. Op times
are torch.profiler's self times; inside camelid's fused decode op (camelid::decode_layers) the
kernels' own stage clocks split its time into products, attention and the rest (norms, RoPE, cache
writes, activation quantization, SiLU, residual adds). Python is the wall time the ops leave.
The profiler adds a little time per op, so the profiled step is printed beside an unprofiled one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MATMUL = ("camelid::quant_linear", "camelid::dense_linear", "aten::mm", "aten::addmm", "aten::bmm",
          "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::mkldnn_linear",
          "mkldnn::_linear_pointwise", "aten::_linear_pointwise")
ATTENTION = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_attention_math", "aten::softmax", "aten::_softmax")
FUSED = "camelid::decode_layers"


@dataclass
class Profile:
    parts: list  # (category, ms per step)
    step_ms: float  # profiled wall time per step
    plain_ms: float  # the same steps without the profiler
    steps: int
    top: list  # (op name, ms per step) of the other torch ops, largest first
    rows: int = 1  # tokens per step (the batch)


def _steps(model, ids: torch.Tensor, n: int):
    from camelid.generation.generate import generate_tokens

    it = generate_tokens(model, ids, max_new_tokens=n + 1, min_new_tokens=n + 1)
    next(it)  # the prefill and the first token
    return it


def _timed(model, ids, n) -> float:
    it = _steps(model, ids, n)
    start = time.perf_counter()
    for _ in it:
        pass
    return (time.perf_counter() - start) / n


def profile_decode(model, ids: torch.Tensor, steps: int = 32) -> Profile:
    """Profile `steps` greedy decode steps of `model` after the prompt `ids` [B, T]."""
    from torch.profiler import ProfilerActivity, profile

    import camelid.kernels as kernels

    native = kernels.available()
    with torch.inference_mode():
        _timed(model, ids, 4)  # warm-up
        plain = _timed(model, ids, steps)
        it = _steps(model, ids, steps)
        if native:
            torch.ops.camelid.layer_profile(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in it:
                pass
            wall = time.perf_counter() - start
        stages = torch.ops.camelid.layer_profile(False) if native else [0.0, 0.0, 0.0, 0.0]
    per = 1e3 / steps  # seconds over all steps -> ms per step
    self_us = {}
    for e in prof.key_averages():
        self_us[e.key] = self_us.get(e.key, 0.0) + e.self_cpu_time_total
    ops = sum(self_us.values()) / 1e6
    matmul = sum(self_us.get(k, 0.0) for k in MATMUL) / 1e6
    attention = sum(self_us.get(k, 0.0) for k in ATTENTION) / 1e6
    fused = self_us.get(FUSED, 0.0) / 1e6
    f_mm, f_att, f_other = (x / 1e9 for x in stages[:3])
    other_ops = ops - matmul - attention - fused
    rows = [("matrix products (layers, in the fused op)", f_mm * per),
            ("attention (in the fused op)", f_att * per),
            ("norms, RoPE, cache, quantize, SiLU, adds (fused op)", f_other * per),
            ("fused op outside its stages (checks, buffers)", max(fused - f_mm - f_att - f_other, 0.0) * per),
            ("matrix products (torch ops: lm_head, unfused layers)", matmul * per),
            ("attention (torch ops)", attention * per),
            ("other torch ops (embedding, sampling, masks ...)", other_ops * per),
            ("Python (generate loop, sampling, bookkeeping)", max(wall - ops, 0.0) * per)]
    skip = set(MATMUL) | set(ATTENTION) | {FUSED}
    top = sorted(((k, v / 1e3 / steps) for k, v in self_us.items() if k not in skip), key=lambda kv: -kv[1])[:6]
    return Profile(parts=rows, step_ms=wall * per, plain_ms=plain * 1e3, steps=steps, top=top, rows=ids.shape[0])


def format_table(p: Profile) -> str:
    total = sum(ms for _, ms in p.parts) or 1.0
    lines = [f"{f'decode step, batch {p.rows}':56} {'ms':>8} {'share':>7}"]
    lines += [f"{name:56} {ms:8.3f} {100 * ms / total:6.1f}%" for name, ms in p.parts]
    lines.append(f"{'total (profiled)':56} {p.step_ms:8.3f}")
    lines.append(f"{'total without the profiler':56} {p.plain_ms:8.3f}   ({p.rows * 1e3 / p.plain_ms:.1f} tok/s, "
                 f"{p.steps} steps)")
    if p.top:
        lines.append("largest other torch ops (ms/step): " + ", ".join(f"{k} {v:.3f}" for k, v in p.top))
    return "\n".join(lines)
