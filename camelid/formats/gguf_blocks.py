"""GGUF's quantized blocks decoded to plain tensors (pure functions, numpy in, torch out).

    Q4_0  per 32 weights: f16 d, 16 bytes of nibbles        w = d * (q - 8)
    Q4_1  per 32 weights: f16 d, f16 m, 16 bytes of nibbles  w = d * q + m
    Q8_0  per 32 weights: f16 d, 32 int8                     w = d * q

The int4 forms are exact: codes [N, K] with scales and zeros [N, K/32] such that
w = (q - 8) * scale + zero, the layout camelid.transforms.quantize.Int4Linear takes.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def _gguf_blocks(raw, shape, block_bytes: int) -> np.ndarray:
    """A GGUF tensor's raw bytes (numpy uint8 or bytes) for PyTorch shape [N, K] -> (N, K/32, block_bytes)."""
    N, K = shape
    a = np.frombuffer(raw, np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else np.asarray(raw)
    if a.dtype != np.uint8 or K % 32 or a.size != N * (K // 32) * block_bytes:
        raise ValueError(f"expected {N * (K // 32) * block_bytes} bytes ({block_bytes}-byte blocks of 32) "
                         f"for shape {tuple(shape)}, got {a.size} of {a.dtype}")
    return a.reshape(N, K // 32, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:  # (..., 2) bytes -> (...) float32
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _q4_codes(qs: np.ndarray, shape) -> torch.Tensor:  # (N, G, 16) -> [N, K]: byte j holds j (low), j + 16
    return torch.from_numpy(np.concatenate([qs & 15, qs >> 4], -1).reshape(shape))


def int4_from_q4_0(raw, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 (per 32 weights: f16 d, 16 bytes; w = d * (q - 8)) -> (q uint8 [N, K], scales float32
    [N, K/32], zeros float32 [N, K/32]) with w = (q - 8) * scale + zero exactly (zero = 0)."""
    b = _gguf_blocks(raw, shape, 18)
    d = _f16(b[..., :2])
    return _q4_codes(b[..., 2:], shape), torch.from_numpy(d), torch.zeros(d.shape)


def int4_from_q4_1(raw, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (per 32 weights: f16 d, f16 m, 16 bytes; w = d * q + m) -> (q, scales, zeros) with
    w = (q - 8) * d + (m + 8d), equal in float32 to ggml's d * q + m (checked on every tensor of
    the default model). Int4Linear stores them as bfloat16, which keeps 8 of d's 11 bits."""
    b = _gguf_blocks(raw, shape, 20)
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    return _q4_codes(b[..., 4:], shape), torch.from_numpy(d), torch.from_numpy(m + 8 * d)


def q8_0_rows(raw, shape, rows_per_chunk: int = 4096) -> Iterator[torch.Tensor]:
    """Q8_0 blocks -> float32 [rows, K] chunks of the exact weights (chunks bound the float copy)."""
    b = _gguf_blocks(raw, shape, 34)
    for c in range(0, shape[0], rows_per_chunk):
        blocks = b[c:c + rows_per_chunk]
        w = _f16(blocks[..., :2])[..., None] * np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        yield torch.from_numpy(w.reshape(-1, shape[1]))
