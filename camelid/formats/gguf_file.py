"""A GGUF parser that checks every count, length and offset against the bytes present.

Why not `gguf.GGUFReader` alone: it trusts the counts in the file, so a crafted header (an
array length of 2^62, a string longer than the file, a tensor offset past the end) makes it
allocate without bound, hang, or silently truncate. This parser validates each of them before
reading or allocating anything, then hands tensor bytes (a zero-copy memory map) to the `gguf`
package's own dequantizers.

Layout (GGUF v2/v3, little-endian):
  "GGUF" u32 version | u64 n_tensors | u64 n_kv | n_kv x (string key, u32 type, value)
  | n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
  | padding to `general.alignment` (default 32) | tensor data, each at data_start + offset
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a bound keeps a crafted file from recursing

# value type -> (struct format, numpy dtype); 8 = string, 9 = array
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated or unsupported. The message names the file and field."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (slowest first): reversed GGUF dims
    type: GGMLQuantizationType
    data: np.ndarray  # raw bytes (uint8), a view into the memory map

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """Parsed metadata (`fields`: key -> python value) and tensors of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap of an empty file
            raise GGUFError(f"{self.path}: empty file, not GGUF") from None
        self._buf = memoryview(self._map)
        self._pos = 0
        self.fields: dict[str, object] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        try:
            self._parse()
        except BaseException:
            self.close()  # do not keep the file mapped (or open on Windows) after rejecting it
            raise

    # ------------------------------------------------------------------ primitive reads
    def _fail(self, what: str):
        raise GGUFError(f"{self.path}: {what} (at byte {self._pos} of {len(self._buf)})")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self._buf) - self._pos:
            self._fail(f"{what} needs {n} bytes but the file ends first (truncated or corrupt)")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        n = self._scalar("<Q", f"length of {what}")
        raw = self._take(n, f"{what} (declared {n} bytes)")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not valid UTF-8")

    def _value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype][0], what)
        if vtype == STRING:
            return self._string(what)
        if vtype == ARRAY:
            etype = self._scalar("<I", f"element type of {what}")
            count = self._scalar("<Q", f"element count of {what}")
            if etype in _SCALARS:
                fmt, dtype = _SCALARS[etype]
                raw = self._take(count * struct.calcsize(fmt), f"{what} ({count} elements)")
                return np.frombuffer(raw, dtype=dtype).tolist()
            if etype == STRING:
                if count * 8 > len(self._buf) - self._pos:  # each string needs >= 8 bytes of length
                    self._fail(f"{what} declares {count} strings, more than the file can hold")
                return [self._string(f"{what}[{i}]") for i in range(count)]
            if etype == ARRAY:
                if depth + 1 >= MAX_NESTING:
                    self._fail(f"{what} nests arrays more than {MAX_NESTING} deep")
                if count * 12 > len(self._buf) - self._pos:
                    self._fail(f"{what} declares {count} nested arrays, more than the file can hold")
                return [self._value(ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            self._fail(f"{what} has unknown array element type {etype}")
        self._fail(f"{what} has unknown value type {vtype}")

    # ------------------------------------------------------------------ structure
    def _parse(self) -> None:
        if bytes(self._take(4, "magic")) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic; expected b'GGUF')")
        version = self._scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors = self._scalar("<Q", "tensor count")
        n_kv = self._scalar("<Q", "metadata count")
        # every key-value needs >= 12 bytes (key length + type), every tensor info >= 24
        if n_kv * 12 + n_tensors * 24 > len(self._buf) - self._pos:
            self._fail(f"header declares {n_kv} metadata entries and {n_tensors} tensors, more than the "
                       f"{len(self._buf) - self._pos} bytes after it can hold (truncated or corrupt)")
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.fields:
                self._fail(f"duplicate metadata key {key!r}")
            vtype = self._scalar("<I", f"type of {key}")
            self.fields[key] = self._value(vtype, key)

        infos = []
        for i in range(n_tensors):
            name = self._string(f"tensor name #{i}")
            n_dims = self._scalar("<I", f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                self._fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = [self._scalar("<Q", f"dimension {d} of {name}") for d in range(n_dims)]
            ttype = self._scalar("<I", f"type of {name}")
            offset = self._scalar("<Q", f"data offset of {name}")
            infos.append((name, dims, ttype, offset))

        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            self._fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        size = len(self._buf)
        expected = 0  # ggml's rule: each tensor's data right after the one before, padded to the alignment
        for name, dims, ttype, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown GGML type {ttype}") from None
            if any(d <= 0 or d >= 2**40 for d in dims):
                raise GGUFError(f"{self.path}: tensor {name!r} has impossible dimensions {dims}")
            n = int(np.prod(dims, dtype=object))
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise GGUFError(f"{self.path}: tensor {name!r} row length {dims[0]} is not a multiple of "
                                f"the {qtype.name} block size {block}")
            nbytes = n // block * type_size
            start = data_start + offset
            if offset % alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} is not a multiple of the "
                                f"alignment {alignment}")
            if offset != expected:
                raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} "
                                f"{'overlaps the tensor before it' if offset < expected else 'leaves a gap'}: "
                                f"ggml expects {expected} (each tensor's data after the last, padded to {alignment})")
            expected = offset + -(-nbytes // alignment) * alignment
            if start + nbytes > size:
                raise GGUFError(f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies past the "
                                f"end of the file ({size} bytes; truncated or corrupt)")
            row_bytes = dims[0] // block * type_size
            raw = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=start)
            shape = tuple(reversed(dims))
            self.tensors[name] = GGUFTensor(name, shape, qtype, raw.reshape(*shape[:-1], row_bytes))

    def close(self) -> None:
        self.tensors.clear()
        for release in (self._buf.release, self._map.close):
            try:
                release()
            except BufferError:  # a caller still holds a zero-copy tensor; the map closes with it
                pass
