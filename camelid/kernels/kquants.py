"""GGUF's K-quants (Q4_K, Q6_K: super-blocks of 256 weights) as fields, and the kernels' tiles of
them (pure functions on uint8 tensors; camelid/kernels/__init__.py dispatches here).

    Q4_K  144 B: f16 d, f16 dmin, 12 B of 6-bit scales sc[8] and mins mn[8], 128 B of nibbles
          w = (d * sc[j]) * q - dmin * mn[j]            (j: the weight's 32-block)
    Q6_K  210 B: 128 B low nibbles, 64 B high 2-bit pairs, int8 scales sc[16], f16 d
          w = (d * sc[j]) * (q - 32)                    (j: the weight's 16-block)

Tiles (16 output rows, one super-block; csrc/kernels.h):
    Q4_K  d[16] f16 | dmin[16] f16 | sc[8][16] u8 | mn[8][16] u8 | 8 x 256 B codes      2368 B
    Q6_K  d[16] f16 | sc[16][16] i8 | 8 x (256 B low nibbles | 128 B high bits)           3360 B
Codes of a 32-block are laid out as Q4_0's (csrc/kernels.h): 4 chunks of 64 B, chunk c byte 4r+i =
input 4c+i (low nibble) and 16+4c+i (high nibble) of row r. Q6_K's high bits: 2 planes of 64 B,
plane p byte 4r+i holds, at bits 2u, input 4(4p+u)+i's two high bits. The 6-bit scales are kept
unpacked (one byte each: 64 B more per tile than the file); everything else is the file's bits,
so unrepack gives the file's bytes back.
"""

from __future__ import annotations

import torch

Q4_K, Q6_K = 12, 14
TILE = 16
TILE_BYTES = {Q4_K: 2368, Q6_K: 3360}


# ---------------------------------------------------------------------- file blocks <-> fields

def q4k_fields(raw: torch.Tensor):
    """[N, S, 144] -> d, dmin (uint8 [N, S, 2] f16 bytes), sc, mn (uint8 [N, S, 8]), q (uint8 [N, S, 256])."""
    d, dmin, s = raw[..., 0:2], raw[..., 2:4], raw[..., 4:16].long()
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    qs = raw[..., 16:].reshape(*raw.shape[:-1], 4, 1, 32)  # chunk c: 64 weights, low nibbles then high
    q = torch.cat([qs & 15, qs >> 4], -2).reshape(*raw.shape[:-1], 256)
    return d, dmin, sc.to(torch.uint8), mn.to(torch.uint8), q


def q4k_blocks(d, dmin, sc, mn, q) -> torch.Tensor:
    """The inverse of q4k_fields."""
    sc, mn = sc.long(), mn.long()
    s = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                   (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1).to(torch.uint8)
    qc = q.reshape(*q.shape[:-1], 4, 2, 32)
    qs = (qc[..., 0, :] | (qc[..., 1, :] << 4)).reshape(*q.shape[:-1], 128)
    return torch.cat([d, dmin, s, qs], -1)


def q6k_fields(raw: torch.Tensor):
    """[N, S, 210] -> d (uint8 [N, S, 2] f16 bytes), sc (uint8 [N, S, 16], int8 bits), q (uint8 [N, S, 256], 0..63)."""
    lead = raw.shape[:-1]
    ql = raw[..., 0:128].reshape(*lead, 2, 1, 2, 32)  # half n, nibble, ql[l] / ql[l + 32]
    qh = raw[..., 128:192].reshape(*lead, 2, 1, 32)
    low = torch.cat([ql & 15, ql >> 4], -3)  # [.., 2 halves, 2 nibbles, 2, 32]: element 128n + 64 nib + 32 k + l
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    high = (qh >> shifts.view(4, 1)) & 3  # [.., 2, 4, 32]: element 128n + 32 u + l, u = 2 nib + k
    q = low.reshape(*lead, 2, 4, 32) | (high << 4)
    return raw[..., 208:210], raw[..., 192:208], q.reshape(*lead, 256)


def q6k_blocks(d, sc, q) -> torch.Tensor:
    """The inverse of q6k_fields."""
    lead = q.shape[:-1]
    qq = q.reshape(*lead, 2, 2, 2, 32)  # half n, nibble, k, l
    low, high = qq & 15, (q.reshape(*lead, 2, 4, 32) >> 4)
    ql = (low[..., 0, :, :] | (low[..., 1, :, :] << 4)).reshape(*lead, 128)
    qh = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)).reshape(*lead, 64)
    return torch.cat([ql, qh, sc, d], -1)


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """File blocks [N, S, bytes] -> float32 [N, S * 256], rounded as ggml (and gguf-py) do."""
    N = raw.shape[0]
    f16 = lambda b: b.contiguous().view(torch.float16).float()  # noqa: E731  [.., 2] bytes -> [.., 1]
    if qtype == Q4_K:
        d, dmin, sc, mn, q = q4k_fields(raw)
        scale, low = (f16(d) * sc.float())[..., None], (f16(dmin) * mn.float())[..., None]
        return (scale * q.view(*q.shape[:-1], 8, 32).float() - low).reshape(N, -1)
    d, sc, q = q6k_fields(raw)
    scale = (f16(d) * sc.view(torch.int8).float())[..., None]
    return (scale * (q.view(*q.shape[:-1], 16, 16).float() - 32)).reshape(N, -1)


def scales(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """The f16 super-block scales as float32 [N, S, n] (corrupt-file checks)."""
    b = torch.cat([raw[..., 0:2], raw[..., 2:4]], -1) if qtype == Q4_K else raw[..., 208:210]
    return b.contiguous().view(torch.float16).float()


# ---------------------------------------------------------------------- fields <-> tiles

def _tiles(x: torch.Tensor, T: int) -> torch.Tensor:
    """[N, S, ...] -> [T, S, 16, ...] (rows padded with zeros to T * 16)."""
    pad = [0, 0] * (x.dim() - 1) + [0, T * TILE - x.shape[0]]
    return torch.nn.functional.pad(x, pad).view(T, TILE, *x.shape[1:]).transpose(1, 2)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """[T, S, 16, ...] -> [n, S, ...]."""
    return x.transpose(1, 2).reshape(-1, *x.shape[1:2], *x.shape[3:])[:n]


def _nibble_tiles(q: torch.Tensor) -> torch.Tensor:
    """Codes [T, S, 16, 256] (< 16) -> [T, S, 8, 256]: per 32-block, Q4_0's tile layout."""
    T, S = q.shape[:2]
    qb = q.reshape(T, S, TILE, 8, 2, 16)
    byte = qb[..., 0, :] | (qb[..., 1, :] << 4)  # [T, S, 16, 8, 16]: byte i = input i, 16 + i
    return byte.view(T, S, TILE, 8, 4, 4).permute(0, 1, 3, 4, 2, 5).reshape(T, S, 8, 256)


def _nibble_codes(t: torch.Tensor) -> torch.Tensor:
    """The inverse of _nibble_tiles."""
    T, S = t.shape[:2]
    byte = t.view(T, S, 8, 4, TILE, 4).permute(0, 1, 4, 2, 3, 5).reshape(T, S, TILE, 8, 1, 16)
    return torch.cat([byte & 15, byte >> 4], -2).reshape(T, S, TILE, 256)


def _high_tiles(h: torch.Tensor) -> torch.Tensor:
    """High bits [T, S, 16, 256] (< 4) -> [T, S, 8, 128]: per 32-block, 2 planes of 64 B."""
    T, S = h.shape[:2]
    hb = h.reshape(T, S, TILE, 8, 2, 4, 4)  # block, plane p, u, i
    byte = hb[..., 0, :] | (hb[..., 1, :] << 2) | (hb[..., 2, :] << 4) | (hb[..., 3, :] << 6)  # [.., 8, 2, 4]
    return byte.permute(0, 1, 3, 4, 2, 5).reshape(T, S, 8, 128)


def _high_bits(t: torch.Tensor) -> torch.Tensor:
    T, S = t.shape[:2]
    byte = t.view(T, S, 8, 2, TILE, 4).permute(0, 1, 4, 2, 3, 5)  # [T, S, 16, 8, 2, 4]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    return ((byte[..., None, :] >> shifts) & 3).reshape(T, S, TILE, 256)


def repack(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """File blocks [N, S, bytes] -> tiles uint8 [ceil(N/16), S, tile bytes]."""
    N, S, _ = raw.shape
    T = -(-N // TILE)
    if qtype == Q4_K:
        d, dmin, sc, mn, q = (_tiles(f, T) for f in q4k_fields(raw))
        parts = [d.reshape(T, S, 32), dmin.reshape(T, S, 32), sc.transpose(2, 3).reshape(T, S, 128),
                 mn.transpose(2, 3).reshape(T, S, 128), _nibble_tiles(q).reshape(T, S, 2048)]
    else:
        d, sc, q = (_tiles(f, T) for f in q6k_fields(raw))
        codes = torch.cat([_nibble_tiles(q & 15), _high_tiles(q >> 4)], -1)  # [T, S, 8, 384]
        parts = [d.reshape(T, S, 32), sc.transpose(2, 3).reshape(T, S, 256), codes.reshape(T, S, 3072)]
    return torch.cat(parts, -1).contiguous()


def unrepack(packed: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """The inverse of repack: tiles -> file blocks uint8 [n, S, bytes]."""
    T, S, _ = packed.shape
    if qtype == Q4_K:
        d, dmin = packed[..., 0:32].reshape(T, S, TILE, 2), packed[..., 32:64].reshape(T, S, TILE, 2)
        sc = packed[..., 64:192].reshape(T, S, 8, TILE).transpose(2, 3)
        mn = packed[..., 192:320].reshape(T, S, 8, TILE).transpose(2, 3)
        q = _nibble_codes(packed[..., 320:].reshape(T, S, 8, 256))
        return q4k_blocks(*(_rows(f, n) for f in (d, dmin, sc, mn, q))).contiguous()
    d = packed[..., 0:32].reshape(T, S, TILE, 2)
    sc = packed[..., 32:288].reshape(T, S, 16, TILE).transpose(2, 3)
    codes = packed[..., 288:].reshape(T, S, 8, 384)
    q = _nibble_codes(codes[..., :256]) | (_high_bits(codes[..., 256:]) << 4)
    return q6k_blocks(*(_rows(f, n) for f in (d, sc, q))).contiguous()


# ---------------------------------------------------------------------- float -> blocks

def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2)


def quantize(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """float [N, K] (K a multiple of 256) -> file blocks [N, K/256, bytes]: a plain min/max (Q4_K)
    or abs-max (Q6_K) fit per sub-block, the scales fitted to 6 or 8 bits per super-block (not
    llama.cpp's iterative search, so its error is somewhat larger; the format is the same)."""
    N, K = w.shape
    if K % 256:
        raise ValueError(f"{'q4_k' if qtype == Q4_K else 'q6_k'}: K = {K} is not a multiple of 256")
    x = w.detach().float().reshape(N, K // 256, -1)
    if qtype == Q4_K:
        xb = x.reshape(N, K // 256, 8, 32)
        lo = xb.amin(-1).clamp(max=0)  # w = s q - m with m = -lo >= 0
        span = (xb.amax(-1) - lo) / 15
        d = span.amax(-1, keepdim=True) / 63
        dmin = (-lo).amax(-1, keepdim=True) / 63
        d16, dmin16 = d.half().float(), dmin.half().float()
        sc = torch.where(d16 > 0, torch.round(span / d16.clamp(min=1e-30)), torch.zeros_like(span)).clamp(0, 63)
        mn = torch.where(dmin16 > 0, torch.round(-lo / dmin16.clamp(min=1e-30)), torch.zeros_like(lo)).clamp(0, 63)
        s, m = (d16 * sc)[..., None], (dmin16 * mn)[..., None]
        q = torch.where(s > 0, torch.round((xb + m) / s.clamp(min=1e-30)), torch.zeros_like(xb)).clamp(0, 15)
        return q4k_blocks(_f16_bytes(d), _f16_bytes(dmin), sc.to(torch.uint8), mn.to(torch.uint8),
                          q.to(torch.uint8).reshape(N, K // 256, 256))
    xb = x.reshape(N, K // 256, 16, 16)
    i = xb.abs().argmax(-1, keepdim=True)
    peak = xb.gather(-1, i)[..., 0]  # signed: the largest weight maps to code -32
    s = peak / -32
    d = s.abs().amax(-1, keepdim=True) / 127
    d16 = d.half().float()
    sc = torch.where(d16 > 0, torch.round(s / d16.clamp(min=1e-30)), torch.zeros_like(s)).clamp(-128, 127)
    step = (d16 * sc)[..., None]
    q = torch.where(step != 0, torch.round(xb / torch.where(step != 0, step, torch.ones_like(step))),
                    torch.zeros_like(xb)).clamp(-32, 31) + 32
    return q6k_blocks(_f16_bytes(d), sc.to(torch.int8).view(torch.uint8),
                      q.to(torch.uint8).reshape(N, K // 256, 256))
