"""Weight-only quantization: model -> model transforms that swap each linear layer for a quantized one.

    model = quantize(model, bits=8)                    # int8: scale + offset per output row
    model = quantize(model, bits=4, group_size=32)     # int4: scale + offset per group of 32 inputs
    model = quantize(model, bits=4, format="nf4")      # NormalFloat4 (QLoRA bases): absmax per block

Loading a GGUF's Q4/Q8 blocks as these layers, and saving or reloading a quantized model, compose
this file with camelid.formats: see camelid/load.py (load_gguf_quantized, save, load_quantized).

Every nn.Linear (and camelid.transforms.packed.PackedLinear) is replaced. The lm_head is int8 unless
lm_head_bits=4; a tied embedding is then served from the lm_head's quantized table (one copy),
an untied one gets its own. Activations keep the model's dtype outside the layers.

    format  stored (row n, group j)          weight                      kernel (CPU | CUDA)
    int8    q int8 [N, K], s, z [N]           w = q * s[n] + z[n]         _weight_int8pack_mm | cuBLAS
    int4    q 0..15 [N, K], s, z [N, G]       w = (q - 8) * s[j] + z[j]   _weight_int4pack_mm(_for_cpu)
    nf4     q 0..15 [N, K], a [N, K/B]        w = NF4_CODES[q] * a[j]     dequantize, then F.linear

Notation: N out_features, K in_features, G = K / group_size, M input rows, T token ids.
Why (measured on the default model): activations enter the int kernels as bfloat16, scales are
bfloat16: torch's CPU int kernels are vectorized only for bfloat16 (float32/float16 take a scalar
path 20-70x slower); CUDA's int4 kernel takes nothing else. Scales are rounded up to bfloat16
before codes are rounded against them, so |w - w_q| <= s/2 holds for what is stored. int8 has
a row offset (y += sum(x) * z; the kernel is symmetric): it halves the perplexity cost of int8
layers (+0.25% vs +0.53%). The lm_head is int8 by default: int4 g32 there costs +6.5% (GPL-3).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import camelid.kernels as kernels

BF16 = torch.bfloat16
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept (and the NF4 block sizes allowed)
FORMATS = {"int8": 8, "int4": 4, "nf4": 4, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8, "q4_k": 4,
           "q6_k": 6}  # q*: GGUF blocks
# K-quants need rows a multiple of 256 long; other layers take these (llama.cpp: Q5_0 and Q8_0)
K_FALLBACK = {"q4_k": "q4_1", "q6_k": "q8_0"}
# NormalFloat4 (Dettmers et al. 2023, as bitsandbytes): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


# ---------------------------------------------------------------------- float -> codes (pure functions)

def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x (x >= 0), never 0: a scale rounded up keeps every code in range,
    and a constant row or group (range 0) divides by the smallest normal instead."""
    y = x.clamp(min=torch.finfo(BF16).tiny).to(BF16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q int8 [N, K], scales bfloat16 [N], zeros float32 [N]), w ~= q * s + z: each
    row's min..max spans the 256 levels (q = -128 at the minimum)."""
    w = w.detach().float()
    lo, hi = w.amin(1), w.amax(1)
    scale = _bf16_ceil((hi - lo) / 255)
    zero = lo + 128 * scale.float()
    q = torch.round((w - zero[:, None]) / scale.float()[:, None])
    return q.clamp_(-128, 127).to(torch.int8), scale, zero


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q uint8 [N, K] in 0..15, scales bfloat16 [N, G], zeros bfloat16 [N, G]),
    w ~= (q - 8) * s + z: each group's min..max spans the 16 levels (q = 0 at the minimum)."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = _bf16_ceil((hi - lo) / 15)
    zero = (lo + 8 * scale.float()).to(BF16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp_(0, 15).to(torch.uint8).reshape(N, K), scale, zero


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (q uint8 [N, K] in 0..15, absmax float32 [N, K / block_size]): the nearest NF4
    code to w / absmax of its block."""
    N, K = w.shape
    wb = w.detach().float().reshape(N, K // block_size, block_size)  # (N, B, b)
    absmax = wb.abs().amax(-1)
    q = torch.bucketize((wb / absmax.clamp(min=1e-30)[..., None]).contiguous(), (NF4_CODES[1:] + NF4_CODES[:-1]) / 2)
    return q.to(torch.uint8).reshape(N, K), absmax


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> [N, K/2] uint8, the even column in the high nibble: the layout CUDA's int4
    packing reads, and the one checkpoints store."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p >> 4, p & 15], -1).reshape(p.shape[0], -1)  # (N, K/2, 2) -> (N, K)


# ---------------------------------------------------------------------- int4 packing per device

def _pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Codes [N, K] (N a multiple of 16) -> the packed weight the device's int4 kernel reads."""
    tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)  # CUDA tiles K by 16 * innerKTiles
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), tiles)
    if device.type == "cuda":  # not run in CI (no GPU there)
        return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(codes).to(device), tiles)
    raise NotImplementedError(f"int4 kernels exist for cpu and cuda, not {device.type}; use format='nf4'")


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) bfloat16 @ W^T -> (M, N) bfloat16, W from the packed codes and scales/zeros (G, N, 2)."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


@functools.lru_cache(maxsize=None)
def _cpu_int4_layout(n: int) -> tuple[torch.Tensor, ...]:
    """Where torch's CPU packing puts w[r, k] of an [n, K] weight: byte block[r] * K/2 + k * stride[r]
    + offset[r], nibble shift[r]. It depends on the vector width (int4mm_kernel.cpp), so it is found
    by packing weights whose values spell their own index, at K = 2 and 4, and checked at K = 8."""
    slots = {}
    for K in (2, 4, 8):
        idx = torch.arange(n * K, dtype=torch.int32).reshape(n, K)
        held = torch.zeros(n * K, dtype=torch.int64)  # the index each nibble slot (2 * byte + high) holds
        for digit in range((n * K - 1).bit_length() // 4 + 1):
            p = torch.ops.aten._convert_weight_to_int4pack_for_cpu((idx >> 4 * digit) & 15, 1).reshape(-1)
            held |= torch.stack([p & 15, p >> 4], -1).reshape(-1).long() << 4 * digit
        slots[K] = torch.empty_like(held).index_put_((held,), torch.arange(n * K)).reshape(n, K)
    stride = slots[2][:, 1] // 2 - slots[2][:, 0] // 2
    block = slots[4][:, 0] // 2 - slots[2][:, 0] // 2
    offset, shift = slots[2][:, 0] // 2 - block, slots[2][:, 0] % 2 * 4
    for K, s in slots.items():
        byte = block[:, None] * (K // 2) + torch.arange(K) * stride[:, None] + offset[:, None]
        if not torch.equal(s, 2 * byte + shift[:, None] // 4):
            raise NotImplementedError("torch's CPU int4 packing has a layout camelid does not recognise")
    return block, stride, offset, shift


# ---------------------------------------------------------------------- quantized layers

class QuantizedLinear(nn.Module):
    """Frozen y = x W^T + b, W quantized. dequantize(): W as floats; rows(ids): W[ids] (embeddings);
    `weight` dequantizes (for inspection, not hot paths)."""

    def __init__(self, in_features: int, out_features: int, bias, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        grad = torch.is_grad_enabled() and x.requires_grad  # the int kernels have no backward
        y = F.linear(x2, self.dequantize(x.dtype)) if grad else self._matmul(x2).to(x.dtype)  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """dtype casts change the activation dtype only (codes and scales keep what the kernels need)."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.device != self.device:  # packed layouts differ per device
            raise RuntimeError("quantized layers do not move between devices: quantize the model on its device, "
                               "or load with camelid.load.load_quantized(..., device=) / load_gguf_quantized(..., device=)")
        self.dtype = probe.dtype
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        return self

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:  # (N, K)
        return self.rows(slice(None)).to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the codes and scales in a device-independent layout."""
        return dict(self._buffers)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + k: v for k, v in self.state().items()})
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.format}" + (f" group_size={self.group_size}" if hasattr(self, "group_size") else ""))


class Int8Linear(QuantizedLinear):
    format = "int8"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias=None, dtype=torch.float32):
        super().__init__(q.shape[1], q.shape[0], bias, dtype)
        q = q.to(torch.int8).contiguous()  # (N, K); torch's CPU kernel segfaults on codes not 64-byte
        self.register_buffer("qweight", q.clone() if q.data_ptr() % 64 else q)  # aligned (as in a file)
        self.register_buffer("scales", scales.to(device=q.device, dtype=BF16))  # (N,)
        self.register_buffer("zeros", zeros.to(device=q.device, dtype=torch.float32))  # (N,)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None, group_size=None) -> "Int8Linear":  # group_size: unused
        return cls(*quantize_int8(w), bias, dtype=w.dtype)

    def _matmul(self, x):  # (M, K) -> (M, N): x @ (q * s + z)^T = (x @ q^T) * s + sum(x) z
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.to(BF16), self.qweight, self.scales)
        else:  # torch's CUDA int8pack kernel is one thread per output: cuBLAS on the upcast codes instead
            y = (x.to(BF16) @ self.qweight.to(BF16).t()).float() * self.scales.float()
        return torch.addcmul(y, x.float().sum(1, keepdim=True), self.zeros)  # float32

    def rows(self, ids):  # (T,) -> (T, K)
        return self.qweight[ids].float() * self.scales[ids].float()[:, None] + self.zeros[ids][:, None]


class Int4Linear(QuantizedLinear):
    """Codes packed for the device's kernel, rows padded to a multiple of 16 (the CPU packing's
    unit) with zero weights that are cut from the output."""

    format = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias=None,
                 dtype=torch.float32, device=None):
        (N, K), G = q.shape, scales.shape[1]
        super().__init__(K, N, bias, dtype)
        self.group_size = K // G
        if self.group_size not in GROUP_SIZES or K % G:
            raise ValueError(f"int4 group size {K}/{G} is not one of {GROUP_SIZES}")
        device, pad = torch.device(device or q.device), -N % 16
        sz = torch.stack([scales, zeros], -1).to(BF16).transpose(0, 1)  # (N, G, 2) -> (G, N, 2)
        self.register_buffer("scales_and_zeros", F.pad(sz, (0, 0, 0, pad)).contiguous().to(device))
        self.register_buffer("qweight", _pack_int4(F.pad(q.to(torch.uint8), (0, 0, 0, pad), value=8), device))
        self._codes = None  # off CPU: see rows()

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None, group_size=32) -> "Int4Linear":
        return cls(*quantize_int4(w, group_size), bias, dtype=w.dtype, device=w.device)

    def _matmul(self, x):  # (M, K) -> (M, N)
        y = _int4_mm(x.to(BF16).contiguous(), self.qweight, self.group_size, self.scales_and_zeros)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def codes(self) -> torch.Tensor:
        """Codes [N, K] back from any device's layout: the kernel run on the identity with unit
        scales and zero offsets returns q - 8, small integers that bfloat16 holds exactly."""
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        eye = torch.eye(self.in_features, dtype=BF16, device=self.device)
        qt = _int4_mm(eye, self.qweight, self.group_size, unit)  # (K, N padded) = (q - 8)^T
        return (qt.t()[:self.out_features] + 8).to(torch.uint8)

    def _dequantize(self, q, ids=slice(None)):  # codes (R, K) of rows ids -> (R, K) float32
        sz = self.scales_and_zeros[:, :self.out_features][:, ids].float().transpose(0, 1)  # (R, G, 2)
        w = (q.float().view(*sz.shape[:2], self.group_size) - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(q.shape)

    def dequantize(self, dtype=torch.float32):
        return self._dequantize(self.codes()).to(dtype)

    def rows(self, ids):  # (T,) -> (T, K)
        if self.device.type == "cpu":  # gather the T rows' nibbles from the packed layout
            block, stride, offset, shift = (t[ids] for t in _cpu_int4_layout(self.qweight.shape[0]))
            K = self.in_features
            byte = (block * (K // 2) + offset)[:, None] + torch.arange(K) * stride[:, None]  # (T, K)
            q = self.qweight.view(-1)[byte] >> shift[:, None].to(torch.uint8) & 15
        else:  # unpacked once (a second copy), when first used as an embedding
            self._codes = self.codes() if self._codes is None else self._codes
            q = self._codes[ids]
        return self._dequantize(q, ids)

    def state(self):
        return {"qweight": pack_nibbles(self.codes()),
                "scales_and_zeros": self.scales_and_zeros[:, :self.out_features].contiguous()}


class NF4Linear(QuantizedLinear):
    """NF4 for frozen QLoRA bases: dequantized on the fly (no fused kernel), differentiable in x."""

    format = "nf4"

    def __init__(self, q: torch.Tensor, absmax: torch.Tensor, bias=None, dtype=torch.float32):
        super().__init__(q.shape[1], q.shape[0], bias, dtype)
        self.group_size = q.shape[1] // absmax.shape[1]
        self.register_buffer("qweight", pack_nibbles(q))  # (N, K/2)
        self.register_buffer("absmax", absmax.float())  # (N, K / group_size)

    @classmethod
    def from_float(cls, w, bias=None, group_size=64) -> "NF4Linear":
        return cls(*quantize_nf4(w, group_size), bias, dtype=w.dtype)

    def _matmul(self, x):
        return F.linear(x, self.dequantize(x.dtype))

    def rows(self, ids):  # (T,) -> (T, K)
        packed, absmax = self.qweight[ids], self.absmax[ids]
        w = NF4_CODES.to(packed.device)[unpack_nibbles(packed).int()]  # (T, K)
        return (w.view(*absmax.shape, self.group_size) * absmax[..., None]).reshape(w.shape)


class BlockLinear(QuantizedLinear):
    """GGUF's own blocks (Q4_0, Q4_1, Q8_0: 32 weights per block, f16 scales; Q4_K, Q6_K: super-
    blocks of 256) run by camelid's kernels (camelid/kernels): activations quantized to int8 per
    block of 32, integer dot products,
    rows repacked into 16-row tiles once, at construction. Batch-invariant: a row's output never
    depends on the other rows. Where the kernels are missing, the blocks are dequantized per call
    (slow but exact, the reference path)."""

    group_size = 32

    def __init__(self, blocks: torch.Tensor, qtype: int, bias=None, dtype=torch.float32):
        N, J, _ = blocks.shape
        super().__init__(kernels.BLOCK[int(qtype)] * J, N, bias, dtype)
        self.qtype, self.format = int(qtype), kernels.NAMES[int(qtype)]
        self.group_size = kernels.BLOCK[self.qtype]
        self.register_buffer("qweight", kernels.repack(blocks, self.qtype))  # [ceil(N/16), J, tile bytes]

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None, group_size=32, format="q8_0") -> "BlockLinear":
        from gguf import GGMLQuantizationType, quants

        qtype = kernels.QTYPES[format]
        if qtype in kernels.kquants.TILE_BYTES:  # gguf-py has no K-quant quantizer: camelid's own
            return cls(kernels.kquants.quantize(w.cpu(), qtype), qtype, bias, dtype=w.dtype)
        raw = quants.quantize(w.detach().float().cpu().numpy(), GGMLQuantizationType(qtype))
        return cls(kernels.file_blocks(torch.from_numpy(raw), *w.shape, qtype), qtype, bias, dtype=w.dtype)

    def _matmul(self, x):  # (M, K) -> (M, N) float32
        x = x.float().contiguous()
        if kernels.available():
            return kernels.quant_linear(x, self.qweight, self.qtype, self.out_features)
        return F.linear(x, self.dequantize())

    def blocks(self) -> torch.Tensor:  # the file's blocks [N, J, bytes]
        return kernels.unrepack(self.qweight, self.qtype, self.out_features)

    def dequantize(self, dtype=torch.float32):
        return kernels.dequantize(self.blocks(), self.qtype).to(dtype)

    def rows(self, ids):  # (T,) -> (T, K)
        ids = torch.as_tensor(ids).reshape(-1).long()
        if kernels.available():
            return torch.ops.camelid.quant_rows(self.qweight, self.qtype, ids, self.out_features)
        return kernels.packed_rows(self.qweight, self.qtype, ids)

    def state(self):
        return {"qweight": self.blocks().reshape(self.out_features, -1),
                "ggml_type": torch.tensor([self.qtype], dtype=torch.int32)}


LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
class _BlockFormat:
    """LAYERS' entry for one GGUF block format: from_float as the other layer classes have it."""

    def __init__(self, format: str):
        self.format = format

    def from_float(self, w, bias=None, group_size=32) -> BlockLinear:
        return BlockLinear.from_float(w, bias, group_size, format=self.format)


LAYERS.update({name: _BlockFormat(name) for name in kernels.QTYPES})


class QuantizedEmbedding(nn.Module):
    """Embedding lookup from a quantized [V, C] table. Tied: the lm_head's table, held without
    registering it here, so its tensors are counted, moved and saved once (as lm_head's)."""

    def __init__(self, table: QuantizedLinear, padding_idx=None, tied: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx, self.tied = padding_idx, tied
        self.__dict__["table"] = table
        if not tied:
            self.table = table  # its own table: a submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(ids.reshape(-1).to(self.table.device))  # (B*T, C)
        return rows.to(self.table.dtype).view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dequantize(self.table.dtype)


# ---------------------------------------------------------------------- the transform

def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def _check_args(bits, group_size, format, lm_head_bits):
    format = format or {8: "int8", 4: "int4"}.get(bits)
    if format not in FORMATS or FORMATS[format] != bits:
        raise ValueError(f"unsupported quantization bits={bits!r}, format={format!r}: use bits=8 (int8, or "
                         f"format='q8_0'), bits=4 (int4), bits=4 with format='nf4', 'q4_0', 'q4_1' or 'q4_k', "
                         f"or bits=6 with format='q6_k'")
    if lm_head_bits not in (8, 4):
        raise ValueError(f"lm_head_bits must be 8 or 4, got {lm_head_bits!r}")
    if format in kernels.QTYPES:  # GGUF blocks: 32 weights each, an 8-bit head is Q8_0
        if group_size not in (None, 32):
            raise ValueError(f"{format} blocks hold 32 weights; group_size {group_size!r} does not apply")
        return format, 32, "q8_0" if lm_head_bits == 8 else ("q4_0" if FORMATS[format] > 4 else format)
    if format == "int8" and group_size is not None:
        raise ValueError("int8 has one scale per output channel; group_size applies to int4 and nf4")
    group_size = group_size or {"int8": 32, "int4": 32, "nf4": 64}[format]
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported group_size {group_size!r} for {format}: use one of {GROUP_SIZES}")
    head = "int8" if lm_head_bits == 8 else ("int4" if format == "int8" else format)
    return format, group_size, head


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None, format: str | None = None,
             lm_head_bits: int = 8, embeddings: bool = True) -> nn.Module:
    """Replace every linear layer by its quantized form, in place; returns the model (frozen, eval).
    group_size: int4 32 (default) / 64 / 128 / 256, or the NF4 block (default 64). lm_head_bits: 8
    or 4 (the layers' format). embeddings: serve the embedding from a quantized table too (the
    lm_head's when tied). A rejected argument or layer shape raises before anything changes."""
    format, group_size, head = _check_args(bits, group_size, format, lm_head_bits)
    if is_quantized(model):
        raise ValueError(f"the model is already quantized ({quantization_summary(model)}); quantize a float model")
    linears = {name: m for name, m in model.named_modules() if name and hasattr(m, "in_features")  # nn.Linear,
               and hasattr(m, "out_features") and not isinstance(m, QuantizedLinear)}  # PackedLinear alike
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and "lm_head" in linears
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    emb = emb if embeddings and isinstance(emb, nn.Embedding) else None
    fmts = {name: head if name == "lm_head" else format for name in linears}
    fmts = {name: K_FALLBACK[f] if f in K_FALLBACK and linears[name].in_features % 256 else f
            for name, f in fmts.items()}
    inputs = [(name, m.in_features, fmts[name]) for name, m in linears.items()]
    if emb is not None:
        head_emb = K_FALLBACK[head] if head in K_FALLBACK and emb.embedding_dim % 256 else head
        inputs += [("model.embed_tokens", emb.embedding_dim, head_emb)]
    bad = [f"{name} ({k})" for name, k, fmt in inputs if fmt != "int8" and k % group_size]
    if bad:
        fit = [g for g in GROUP_SIZES if all(k % g == 0 for _, k, fmt in inputs if fmt != "int8")]
        raise ValueError(f"group_size {group_size} does not divide the input size of {', '.join(bad[:6])}"
                         f"{' ...' if len(bad) > 6 else ''}; group sizes that fit this model: {fit or 'none'}")
    with torch.no_grad():
        for name, m in linears.items():
            w = m.dense_tensor() if hasattr(m, "dense_tensor") else m.weight  # packed / tiled: their dense weight
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, LAYERS[fmts[name]].from_float(w, m.bias, group_size))
        if emb is not None:
            table = model.lm_head if tied else LAYERS[head_emb].from_float(emb.weight, None, group_size)
            model.model.embed_tokens = QuantizedEmbedding(table, emb.padding_idx, tied=tied)
    model.quantization_config = quantization_summary(model)
    return model.requires_grad_(False).eval()  # frozen: adapters (LoRA) bring their own parameters


def quantization_summary(model: nn.Module) -> dict:
    """{"format", "bits", "group_size", "lm_head"}; format "mixed" with a count per kind when the
    layers (lm_head aside) differ, as a GGUF with several types can make them."""
    kinds = {name: (m.format, getattr(m, "group_size", None)) for name, m in model.named_modules()
             if isinstance(m, QuantizedLinear)}
    kinds.pop("model.embed_tokens.table", None)  # an untied table takes the lm_head's format
    head = kinds.pop("lm_head", None)
    head = head and head[0] + (f"_g{head[1]}" if head[1] else "")
    if len(set(kinds.values())) == 1:
        fmt, g = next(iter(kinds.values()))
        return {"format": fmt, "bits": FORMATS[fmt], "group_size": g, "lm_head": head}
    counts = [f + (f"_g{g}" if g else "") for f, g in kinds.values()]
    return {"format": "mixed", "layers": {k: counts.count(k) for k in sorted(set(counts))}, "lm_head": head}


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of parameters and buffers, each storage once (tied and shared tensors)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        if getattr(t, "is_mkldnn", False):  # oneDNN-packed: no storage to share
            seen[id(t)] = t.numel() * t.element_size()
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def layer_from_state(prefix: str, tensors: dict, dtype, device) -> QuantizedLinear:
    take = lambda key: tensors.pop(f"{prefix}.{key}").to(device)  # noqa: E731
    q, bias = take("qweight"), tensors.pop(f"{prefix}.bias", None)
    bias = None if bias is None else bias.to(device)
    if f"{prefix}.ggml_type" in tensors:
        qtype = int(tensors.pop(f"{prefix}.ggml_type").reshape(-1)[0])
        if qtype not in kernels.NAMES:
            raise ValueError(f"ggml_type {qtype} is not one of {kernels.QTYPES}")
        n, k = q.shape[0], q.shape[1] // kernels.FILE_BYTES[qtype] * kernels.BLOCK[qtype]
        return BlockLinear(kernels.file_blocks(q.cpu(), n, k, qtype), qtype, bias, dtype)
    if f"{prefix}.scales_and_zeros" in tensors:
        sz = take("scales_and_zeros").float()  # (G, N, 2)
        return Int4Linear(unpack_nibbles(q), sz[..., 0].t(), sz[..., 1].t(), bias, dtype, device)
    if f"{prefix}.scales" in tensors:
        return Int8Linear(q, take("scales"), take("zeros"), bias, dtype)
    if f"{prefix}.absmax" in tensors:
        return NF4Linear(unpack_nibbles(q), take("absmax"), bias, dtype)
    raise KeyError("no scales, scales_and_zeros or absmax beside its qweight")
