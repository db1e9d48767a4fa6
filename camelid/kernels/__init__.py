"""camelid's own CPU kernels (C++ in csrc/, registered as torch.ops.camelid.*), their weight
layouts, and the pure-PyTorch references they are tested against.

    quant_linear(x, packed, qtype, n)   x [M, K] float32 @ W^T, W in GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks
    dense_linear(x, tiled, n)           x [M, K] float32 @ W^T, W float32 or bfloat16
    repack(raw, qtype) / unrepack       the file's blocks [N, K/32, bytes] <-> the kernels' tiles
    tile(w) / untile                    [N, K] <-> [ceil(N/16), K, 16]
    argmax(x)                           x.argmax(-1), as torch's, for float32 rows (greedy decoding)

Quantized products quantize x per block of 32 to int8 (ggml's Q8 form) and take integer dot
products against the weights' codes (AVX-512 VNNI vpdpbusd, AVX2 maddubs), 16 output rows per
tile, so one broadcast activation word feeds 16 rows. Every path (AVX-512, AVX2, portable) does the
same integer and float32 operations in the same order for each output, so the paths agree to the
bit and a row's result never depends on the batch it is in (batch invariance by construction).

Build: compiled on first use with torch's cpp_extension (the C++ compiler and ninja) into
$CAMELID_HOME/kernels/<key>/ (default ~/.cache/camelid), key = hash of the sources, torch and
Python versions, so a fresh process only loads the cached library (~20 ms). Not built by pip: a
setup.py extension needs torch in pip's isolated build environment, which makes pip resolve torch
anew (a multi-GB CUDA download on a CPU machine) unless every install says --no-build-isolation.
The README's set-up command builds once (`python -m camelid.kernels`). Where it cannot be built
(no compiler, another architecture) `available()` is False after a one-line warning and camelid
runs its pure-PyTorch paths; CAMELID_KERNELS=0 chooses that on purpose. CAMELID_ISA=avx512, avx2 or
scalar caps the instruction set (tests force each path with `forced_isa`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from camelid.kernels import kquants

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("kernels.h", "codes.h", "quant.cpp", "kquant.cpp", "amx.cpp", "dense.cpp", "layer.cpp", "ops.cpp")]
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-Wno-maybe-uninitialized"]
LDFLAGS = ["-fopenmp"]  # libgomp.so.1: at run time the copy torch has loaded already
ISAS = {0: "scalar", 1: "avx2", 2: "avx512", 3: "amx"}
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = 2, 3, 6, 7, 8, 12, 14  # GGML type ids
QTYPES = {"q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1, "q8_0": Q8_0, "q4_k": Q4_K, "q6_k": Q6_K}
NAMES = {v: k for k, v in QTYPES.items()}
BLOCK = {Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q8_0: 32, Q4_K: 256, Q6_K: 256}  # weights per file block
FILE_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q4_K: 144, Q6_K: 210}  # one block in the file
# 16 rows x one block in the kernels' tiles
TILE_BYTES = {Q4_0: 288, Q4_1: 320, Q5_0: 352, Q5_1: 384, Q8_0: 544, Q4_K: 2368, Q6_K: 3360}
HEADER = {Q4_0: 2, Q4_1: 4, Q5_0: 2, Q5_1: 4, Q8_0: 2}  # bytes of scales (f16 d, m) opening a 32-weight file block
FIVE = (Q5_0, Q5_1)  # a 4-byte plane of fifth bits follows the scales
TILE = 16

_state: dict = {}


def _home() -> Path:
    return Path(os.environ.get("CAMELID_HOME") or Path.home() / ".cache" / "camelid")


def _key() -> str:
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {CFLAGS} {LDFLAGS}".encode())
    return h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Compile the library if its cached copy is missing; returns the .so path (raises on failure)."""
    directory = _home() / "kernels" / _key()
    built = sorted(directory.glob("camelid_kernels*.so"), key=lambda p: p.stat().st_mtime)
    if built:
        return built[-1]
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    # copies: load() appends to the lists it is given (which would change _key() in this process)
    load("camelid_kernels", [str(p) for p in SOURCES if p.suffix == ".cpp"], extra_cflags=list(CFLAGS),
         extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False, verbose=verbose)
    _state["loaded"] = True  # load() has loaded it into this process
    return sorted(directory.glob("camelid_kernels*.so"), key=lambda p: p.stat().st_mtime)[-1]


def available() -> bool:
    """True when torch.ops.camelid is loaded (built on first call if needed)."""
    if "ok" not in _state:
        _state["ok"] = False
        if os.environ.get("CAMELID_KERNELS", "1") == "0":
            return False
        if sys.platform != "linux" or not _x86():
            warnings.warn("camelid: native CPU kernels are for x86-64 Linux; using the PyTorch paths", stacklevel=2)
            return False
        try:
            lib = build()
            if not _state.get("loaded"):
                torch.ops.load_library(str(lib))
                _state["loaded"] = True
            _register_fakes()
            _state["ok"] = True
        except Exception as e:  # no compiler, a failed build: camelid still works, on torch's kernels
            line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            warnings.warn(f"camelid: native CPU kernels unavailable ({line}); using the PyTorch paths", stacklevel=2)
    return _state["ok"]


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _register_fakes() -> None:
    """Shapes for torch.compile / FakeTensor tracing."""
    lib = torch.library

    @lib.register_fake("camelid::quant_linear")
    def _(x, w, qtype, n):
        return x.new_empty(x.shape[0], n)

    @lib.register_fake("camelid::dense_linear")
    def _(x, w, n):
        return x.new_empty(x.shape[0], n)

    @lib.register_fake("camelid::argmax")
    def _(x):
        return x.new_empty(x.shape[0], dtype=torch.long)

    @lib.register_fake("camelid::quantize_act")
    def _(x, super_blocks=False):
        M, K = x.shape
        return (x.new_empty(M, K, dtype=torch.int8), x.new_empty(M, K // 32),
                x.new_empty(M, K // 32, dtype=torch.int32))


def isa() -> str:
    """The instruction set the kernels run on now: 'avx512', 'avx2' or 'scalar'."""
    return ISAS[int(torch.ops.camelid.isa())] if available() else "none"


def best_isa() -> str:
    return ISAS[int(torch.ops.camelid.best_isa())] if available() else "none"


@contextlib.contextmanager
def forced_isa(name: str):
    """Run the kernels on a lower path (tests), e.g. `with forced_isa("scalar"): ...`."""
    level = {v: k for k, v in ISAS.items()}[name]
    if level > int(torch.ops.camelid.best_isa()):
        raise RuntimeError(f"this CPU has no {name} (best: {best_isa()})")
    torch.ops.camelid.set_isa(level)
    try:
        yield
    finally:
        torch.ops.camelid.set_isa(-1)


# ---------------------------------------------------------------------- the ops

def quant_linear(x: torch.Tensor, packed: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    return torch.ops.camelid.quant_linear(x, packed, qtype, n)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (the first of equal maxima, a NaN row's first NaN), natively for float32 CPU
    rows [..., N]: torch's own CPU argmax is several times slower than reading the row."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 1 and 0 < x.shape[-1] < 2**31 \
            and available():
        return torch.ops.camelid.argmax(x.reshape(-1, x.shape[-1]).contiguous()).reshape(x.shape[:-1])
    return x.argmax(-1)


def dense_linear(x: torch.Tensor, tiled: torch.Tensor, n: int) -> torch.Tensor:
    return torch.ops.camelid.dense_linear(x, tiled, n)


# ---------------------------------------------------------------------- layouts (pure functions)

def file_blocks(raw, n: int, k: int, qtype: int) -> torch.Tensor:
    """A tensor's bytes as the file has them -> uint8 [n, k/32, block bytes], checked."""
    t = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw))  # a writable copy
    t = t.reshape(-1)
    bs, block = FILE_BYTES[qtype], BLOCK[qtype]
    if k % block:
        raise ValueError(f"{NAMES[qtype]}: {k} inputs per row is not a multiple of its {block}-weight blocks")
    if t.dtype != torch.uint8 or t.numel() != n * (k // block) * bs:
        raise ValueError(f"{NAMES[qtype]}: expected {n * (k // block) * bs} bytes for [{n}, {k}], got {t.numel()} "
                         f"of {t.dtype}")
    return t.reshape(n, k // block, bs)


def block_scales(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """The f16 scales of file blocks [N, J, bytes] as float32 [N, J, n] (corrupt-file checks)."""
    if qtype in kquants.TILE_BYTES:
        return kquants.scales(raw, qtype)
    return raw[..., :HEADER[qtype]].contiguous().view(torch.float16).float()


def repack(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """File blocks uint8 [N, J, bs] -> tiles uint8 [ceil(N/16), J, tile bytes] (layout: csrc/kernels.h).
    Rows past N are zero (scale 0: they compute 0 and are never written)."""
    if qtype in kquants.TILE_BYTES:
        return kquants.repack(raw, qtype)
    N, J, bs = raw.shape
    T, h = -(-N // TILE), HEADER[qtype]
    r = torch.nn.functional.pad(raw, (0, 0, 0, 0, 0, T * TILE - N)).view(T, TILE, J, bs).permute(0, 2, 1, 3)
    parts = [r[..., 0:2].reshape(T, J, 2 * TILE)]  # d of the 16 rows
    if h == 4:
        parts.append(r[..., 2:4].reshape(T, J, 2 * TILE))  # m
    five = qtype in FIVE
    codes = r[..., h + 4 * five:]  # [T, J, 16, 16 or 32]
    chunks = codes.shape[-1] // 4  # 4 (Q4, Q5: 16 bytes) or 8 (Q8: 32 bytes)
    parts.append(codes.reshape(T, J, TILE, chunks, 4).transpose(2, 3).reshape(T, J, TILE * codes.shape[-1]))
    if five:  # bit j of the file's 32-bit qh is input j's; plane byte 4r+i, bit g: input 4g+i
        bits = ((r[..., h:h + 4, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(T, J, TILE, 8, 4)
        plane = (bits << torch.arange(8, dtype=torch.uint8).view(8, 1)).sum(-2, dtype=torch.uint8)
        parts.append(plane.reshape(T, J, 4 * TILE))
    return torch.cat(parts, -1).contiguous()


def unrepack(packed: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """The inverse of repack: tiles -> file blocks uint8 [n, J, bs]."""
    if qtype in kquants.TILE_BYTES:
        return kquants.unrepack(packed, qtype, n)
    T, J, _ = packed.shape
    bs, h, five = FILE_BYTES[qtype], HEADER[qtype], qtype in FIVE
    cols = [packed[..., 0:32].reshape(T, J, TILE, 2)]
    if h == 4:
        cols.append(packed[..., 32:64].reshape(T, J, TILE, 2))
    nc = bs - h - 4 * five  # code bytes per row
    codes = packed[..., 16 * h:16 * h + TILE * nc]
    codes = codes.reshape(T, J, nc // 4, TILE, 4).transpose(2, 3).reshape(T, J, TILE, nc)
    if five:
        plane = packed[..., 16 * h + TILE * nc:].reshape(T, J, TILE, 1, 4)
        bits = ((plane >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1).reshape(T, J, TILE, 4, 8)
        cols.append((bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8))  # qh bytes
    blocks = torch.cat(cols + [codes], -1).permute(0, 2, 1, 3).reshape(T * TILE, J, bs)
    return blocks[:n].contiguous()


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """File blocks uint8 [N, J, bs] -> float32 [N, J * block], exactly as ggml defines the formats."""
    if qtype in kquants.TILE_BYTES:
        return kquants.dequantize(raw, qtype)
    N, J, _ = raw.shape
    d = raw[..., 0:2].contiguous().view(torch.float16).float()  # [N, J, 1]
    if qtype == Q8_0:
        return (d * raw[..., 2:].contiguous().view(torch.int8).float()).reshape(N, -1)
    h, five = HEADER[qtype], qtype in FIVE
    qs = raw[..., h + 4 * five:]
    q = torch.cat([qs & 15, qs >> 4], -1)  # [N, J, 32]: byte i holds inputs i and 16 + i
    if five:  # bit j of qh (little-endian) is input j's fifth bit
        q = q | ((raw[..., h:h + 4, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(N, J, 32) << 4
    q = q.float()
    if h == 2:
        return (d * (q - (16 if five else 8))).reshape(N, -1)
    m = raw[..., 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(N, -1)


def packed_rows(packed: torch.Tensor, qtype: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a repacked table as float32 [len(ids), K] (embedding lookups)."""
    ids = ids.reshape(-1).long()
    tiles, rows = ids // TILE, ids % TILE
    blocks = unrepack(packed[tiles], qtype, tiles.numel() * TILE).view(tiles.numel(), TILE, *packed.shape[1:2], -1)
    return dequantize(blocks[torch.arange(ids.numel()), rows], qtype)


def tile(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16] (rows past N zero): element [t, k, r] = w[16t + r, k]."""
    N, K = w.shape
    T = -(-N // TILE)
    return torch.nn.functional.pad(w, (0, 0, 0, T * TILE - N)).view(T, TILE, K).transpose(1, 2).contiguous()


def untile(tiled: torch.Tensor, n: int) -> torch.Tensor:
    T, K, _ = tiled.shape
    return tiled.transpose(1, 2).reshape(T * TILE, K)[:n].contiguous()


# ---------------------------------------------------------------------- references (float64)

def quantize_act_reference(x: torch.Tensor):
    """The kernels' activation quantization in PyTorch: per block of 32, d = amax / 127 (float32),
    codes round-half-even(x * (1 / d)); a block with NaN/Inf gets d = NaN and codes 0."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    finite = torch.isfinite(xb).all(-1, keepdim=True)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where((d != 0) & finite, 1 / d, torch.zeros_like(d))
    q = torch.where(finite, torch.round(xb * inv), torch.zeros_like(xb))
    d = torch.where(finite, d, torch.full_like(d, float("nan")))
    return q.to(torch.int8).reshape(M, K), d[..., 0], q.sum(-1).to(torch.int32)


def quantize_act_k_reference(x: torch.Tensor):
    """The K-quants' activations (ggml's Q8_K) in PyTorch: per 256, d = max / -127 with max the
    element of largest |x| (the first such), codes min(127, round-half-even(x * (-127 / max)));
    d and the code sums are given per block of 32, as the kernels take them."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 256, 256)
    finite = torch.isfinite(xb).all(-1, keepdim=True)
    peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # argmax: the first of equal |x|
    zero = peak == 0
    # tensor / tensor: a number / tensor is reciprocal-then-multiply in torch (another rounding)
    safe = torch.where(zero, torch.ones_like(peak), peak)
    iscale = torch.where(zero | ~finite, torch.zeros_like(peak), torch.full_like(peak, -127.0) / safe)
    q = torch.where(finite, torch.round(xb * iscale).clamp(max=127), torch.zeros_like(xb))
    inv = torch.ones_like(iscale) / torch.where(zero, torch.ones_like(iscale), iscale)
    d = torch.where(finite, torch.where(zero, torch.zeros_like(peak), inv), torch.full_like(peak, float("nan")))
    q32 = q.reshape(M, K // 32, 32)
    return (q.to(torch.int8).reshape(M, K), d.expand(M, K // 256, 8).reshape(M, K // 32),
            q32.sum(-1).to(torch.int32))


def reference_quant_linear(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """What quant_linear computes, in float64 from the same quantized activations: the float32
    kernels may differ from it only by float32 rounding of the per-block sums."""
    q, d, _ = (quantize_act_k_reference if qtype in kquants.TILE_BYTES else quantize_act_reference)(x)
    M, K = x.shape
    xq = (q.double().view(M, K // 32, 32) * d.double()[..., None]).reshape(M, K)
    return xq @ dequantize(raw, qtype).double().t()


def main(argv=None) -> int:
    """python -m camelid.kernels [-v]: build now (the README's set-up runs it), say what runs."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        lib = build(verbose="-v" in argv)
    except Exception as e:
        print(f"camelid kernels: not built ({e}); camelid will use its PyTorch paths", file=sys.stderr)
        return 0  # optional: set-up commands go on
    print(f"camelid kernels: {lib} ({'loaded, running ' + isa() if available() else 'not loadable'})")
    return 0
