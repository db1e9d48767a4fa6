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
