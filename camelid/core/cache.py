"""The KV cache: static per-layer key/value buffers that the caller allocates and passes in.

Slot s of a row holds the key/value of that row's s-th token (padding included), so one slot
index (`cache_position`) is shared by the whole batch while RoPE positions stay per row.
The cache's storage dtype may differ from the dtype attention computes in: a model whose linears
are GGUF blocks keeps float16 keys and values by default (model.cache_dtype, set by the loader), as
llama.cpp does for the same file (half of float32's bytes: decode at batch 8 reads less than half
the KV bytes per step). Int8KVCache stores int8 codes with one scale per token and head (a quarter
of float32's bytes).

    cache = model_cache(model, batch_size, max_seq_len)          # the model's default kind
    cache = model_cache(model, batch_size, max_seq_len, "int8")  # or "float16", "bfloat16", "float32"
"""

from __future__ import annotations

import torch

from camelid.core.config import LlamaConfig


def per_layer(device, num_layers: int) -> list:
    """One device for every layer, or a list with one per layer (a model placed with device_map)."""
    if isinstance(device, (list, tuple)):
        if len(device) != num_layers:
            raise ValueError(f"got {len(device)} cache devices for {num_layers} layers")
        return list(device)
    return [device] * num_layers


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer: where its KV cache must live."""
    return [layer.input_layernorm.weight.device for layer in model.model.layers]


class KVCache:
    """dtype: what attention computes in (update() returns it); storage: what the cache holds
    (default: dtype). device: one device, or one per layer (cache.layer_devices(model) for a
    device-mapped model)."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 storage: torch.dtype | None = None):
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache needs a positive batch_size and max_seq_len, got "
                             f"{batch_size} and {max_seq_len}")
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)  # (B, Hkv, S, D)
        devices = per_layer(device, config.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=storage or dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=storage or dtype, device=d) for d in devices]
        self.batch_size, self.max_seq_len, self.dtype = batch_size, max_seq_len, dtype

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at `slots` [T]; return the first kv_len slots of the layer (as
        stored: a half-precision cache's prefill attends to the rounded keys its decode steps read)."""
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        keys, values = self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        return (keys, values) if keys.dtype == self.dtype else (keys.to(self.dtype), values.to(self.dtype))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (finished sequences stop costing compute)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.batch_size = rows.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Int8KVCache(KVCache):
    """Keys and values as int8 codes, symmetric per (row, head, slot): x ~= code * scale with
    scale = max|x| / 127, so |x - x~| <= scale / 2. update() returns the first kv_len slots
    dequantized to the compute dtype (attention reads floats; the cache holds bytes)."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__(config, batch_size, max_seq_len, dtype, device, storage=torch.int8)
        scale_shape = (batch_size, config.num_key_value_heads, max_seq_len, 1)
        devices = per_layer(device, config.num_hidden_layers)
        self.k_scale = [torch.ones(scale_shape, device=d) for d in devices]
        self.v_scale = [torch.ones(scale_shape, device=d) for d in devices]

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., D] -> (int8 codes [..., D], float32 scales [..., 1])."""
        x = x.float()
        scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale

    def update(self, layer, slots, k, v, kv_len):
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.quantize(x)
            codes[layer].index_copy_(2, slots, q)
            scales[layer].index_copy_(2, slots, s)
        return tuple((codes[layer][:, :, :kv_len].float() * scales[layer][:, :, :kv_len]).to(self.dtype)
                     for codes, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.k_scale = [t.index_select(0, rows) for t in self.k_scale]
        self.v_scale = [t.index_select(0, rows) for t in self.v_scale]

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.k_scale + self.v_scale)


FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = [None, "int8", *FLOATS]


def make_cache(kind: str | None, config: LlamaConfig, batch_size: int, max_seq_len: int,
               dtype: torch.dtype = torch.float32, device=None) -> KVCache:
    """A cache by kind: None (keys and values in `dtype`), "int8", or a float dtype's name."""
    if kind not in KINDS:
        raise ValueError(f"cache_dtype must be one of {KINDS}, got {kind!r}")
    if kind == "int8":
        return Int8KVCache(config, batch_size, max_seq_len, dtype=dtype, device=device)
    return KVCache(config, batch_size, max_seq_len, dtype=dtype, device=device, storage=FLOATS.get(kind))


def model_cache(model, batch_size: int, max_seq_len: int, kind: str | None = None) -> KVCache:
    """The cache generate, the engine and speculative decoding give `model`: `kind`, else the
    model's own default (model.cache_dtype), on the devices of its layers."""
    kind = kind if kind is not None else getattr(model, "cache_dtype", None)
    return make_cache(kind, model.config, batch_size, max_seq_len, dtype=model.dtype, device=layer_devices(model))


class PagedKVCache:
    """A pool of fixed-size blocks per layer, shared by every request of an engine: block n of
    layer l holds the keys of `block_size` consecutive tokens of one request ([NB, Hkv, bs, D]),
    and a request's block table lists its blocks in order (vLLM's layout). The pool is allocated
    empty (torch.empty): the memory a block takes is touched only when a request first writes it.
    A call reads and writes the pool through a PagedView of the rows it computes.

    kind: None (keys in `dtype`), a float dtype's name, or "int8" (codes + one scale per token and head)."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device=None, kind: str | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a paged KV cache needs positive num_blocks and block_size, got {num_blocks} and "
                             f"{block_size}")
        if kind not in KINDS:
            raise ValueError(f"cache_dtype must be one of {KINDS}, got {kind!r}")
        shape = (num_blocks, config.num_key_value_heads, block_size, config.head_dim)  # (NB, Hkv, bs, D)
        storage = torch.int8 if kind == "int8" else FLOATS.get(kind, dtype)
        devices = per_layer(device, config.num_hidden_layers)
        self.k = [torch.empty(shape, dtype=storage, device=d) for d in devices]
        self.v = [torch.empty(shape, dtype=storage, device=d) for d in devices]
        self.quantized = kind == "int8"
        if self.quantized:
            self.k_scale = [torch.empty(shape[:3] + (1,), device=d) for d in devices]
            self.v_scale = [torch.empty(shape[:3] + (1,), device=d) for d in devices]
        self.num_blocks, self.block_size, self.dtype, self.kind = num_blocks, block_size, dtype, kind

    def view(self, blocks: list[list[int]], starts: list[int], decode: bool) -> "PagedView":
        return PagedView(self, blocks, starts, decode)

    def block_nbytes(self) -> int:
        """Bytes one block takes over every layer (keys, values and int8 scales)."""
        tensors = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes()


class PagedView:
    """The KVCache interface over rows of a paged cache, as a left-padded batch: row b's slot s holds its
    token s - starts[b] (slots before starts[b] are padding, never attended), in block
    blocks[b][(s - starts[b]) // block_size]. So the model computes a step exactly as it computes a
    left-padded batch (row by row, core/masks.py); the fused decode op reads the same mapping.
    decode: the call is a decode step the fused op may run (a prefill chunk runs the PyTorch layers, so a
    prompt prefilled in chunks gets the bits it gets in one piece)."""

    def __init__(self, pool: PagedKVCache, blocks: list[list[int]], starts: list[int], decode: bool):
        width = max(len(b) for b in blocks)
        dev = pool.k[0].device
        self.pool, self.decode, self.block_size = pool, decode, pool.block_size
        self.block_table = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.long)  # (B, nb)
        self.starts = torch.tensor(starts, dtype=torch.long)
        self.k, self.v, self.dtype = pool.k, pool.v, pool.dtype
        self.batch_size = len(blocks)
        self.max_seq_len = int(self.starts.max()) + width * pool.block_size
        self._table = self.block_table.to(dev)
        self._starts = self.starts.to(dev)
        self._read: tuple | None = None  # (kv_len, blocks, offsets) of the gather, shared by the layers

    def _where(self, slots: torch.Tensor):
        """(block, offset, valid) [B, len(slots)] of each row's slots."""
        tok = slots.to(self._starts.device)[None, :] - self._starts[:, None]
        valid = tok >= 0
        tok = tok.clamp(min=0)
        return self._table.gather(1, tok // self.block_size), tok % self.block_size, valid

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at `slots` [T] of each row; return slots [0, kv_len) of every row
        [B, Hkv, kv_len, D] in the compute dtype (padding slots hold any value: they are never read)."""
        blk, off, valid = self._where(slots)
        blk, off = blk[valid], off[valid]
        p = self.pool
        news = [x.transpose(1, 2)[valid] for x in (k, v)]  # (N, Hkv, D) of the rows' real tokens
        if p.quantized:
            for codes, scales, x in ((p.k, p.k_scale, news[0]), (p.v, p.v_scale, news[1])):
                q, s = Int8KVCache.quantize(x)
                codes[layer][blk, :, off] = q
                scales[layer][blk, :, off] = s
        else:
            p.k[layer][blk, :, off] = news[0].to(p.k[layer].dtype)
            p.v[layer][blk, :, off] = news[1].to(p.v[layer].dtype)
        if self._read is None or self._read[0] != kv_len:
            rb, ro, _ = self._where(torch.arange(kv_len, device=self._starts.device))
            self._read = (kv_len, rb, ro)
        _, rb, ro = self._read
        if p.quantized:
            return tuple((codes[layer][rb, :, ro].float() * scales[layer][rb, :, ro]).to(self.dtype).transpose(1, 2)
                         for codes, scales in ((p.k, p.k_scale), (p.v, p.v_scale)))
        return tuple(t[layer][rb, :, ro].to(self.dtype).transpose(1, 2) for t in (p.k, p.v))  # (B, Hkv, S, D)


def model_paged_cache(model, num_blocks: int, block_size: int, kind: str | None = None) -> PagedKVCache:
    """The engine's block pool for `model` (kind as model_cache's), on the devices of its layers."""
    kind = kind if kind is not None else getattr(model, "cache_dtype", None)
    return PagedKVCache(model.config, num_blocks, block_size, dtype=model.dtype, device=layer_devices(model), kind=kind)
