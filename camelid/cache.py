"""The KV cache: static per-layer key/value buffers that the caller allocates and passes in.

Slot s of a row holds the key/value of that row's s-th token (padding included), so one slot
index (`cache_position`) is shared by the whole batch while RoPE positions stay per row.
"""

from __future__ import annotations

import torch

from .config import LlamaConfig


class KVCache:
    def __init__(self, config: LlamaConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache needs a positive batch_size and max_seq_len, got "
                             f"{batch_size} and {max_seq_len}")
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)  # (B, Hkv, S, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at `slots` [T]; return the first kv_len slots of the layer."""
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (finished sequences stop costing compute)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.batch_size = rows.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
