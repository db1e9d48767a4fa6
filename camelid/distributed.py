"""Tensor parallelism on torch.distributed: a model -> model transform that keeps each rank's shard.

    torchrun --nproc-per-node 2 my_script.py      # gloo on CPU, NCCL on GPUs
    dist.init_process_group("gloo")
    model = tensor_parallel(LlamaForCausalLM.from_pretrained(path, pack=False))
    model.generate(ids, max_new_tokens=32)         # every rank runs it; every rank gets the same tokens

The plan of the design docs (Megatron-style): q/k/v and gate/up are split by output rows
(column parallel: no communication), o_proj and down_proj by input columns (row parallel: one
all-reduce each), so each decoder layer costs two all-reduces. Attention heads go to ranks in
blocks; with more ranks than KV heads each KV head is replicated on the ranks whose query heads
use it (PaddleNLP's assign_kv_heads). The embedding and lm_head are split by vocabulary rows
when the vocabulary divides evenly (the lookup sums partial rows, the logits are all-gathered),
and stay whole on every rank otherwise.

                 rank 0          rank 1
    x ─┬─ q/k/v[rows 0] ─ attn ─ o[:, cols 0] ─┐
       └─ q/k/v[rows 1] ─ attn ─ o[:, cols 1] ─┴─ all_reduce(sum) ─ + bias ─> same on every rank
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TPError(ValueError):
    """A model that cannot be split over this world size."""


def _rank_world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise TPError("tensor_parallel needs torch.distributed initialised (torchrun, or dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def head_plan(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[slice, slice]:
    """(query heads, KV heads) of `rank`. KV heads are split when world divides them and
    replicated (rank r keeps head r * Hkv // world) when world is a multiple of them."""
    if num_heads % world:
        raise TPError(f"world size {world} does not divide num_attention_heads {num_heads}")
    q = num_heads // world
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise TPError(f"world size {world} does not divide num_key_value_heads {num_kv_heads}")
        kv = num_kv_heads // world
        return slice(rank * q, (rank + 1) * q), slice(rank * kv, (rank + 1) * kv)
    if world % num_kv_heads:
        raise TPError(f"world size {world} is neither a divisor nor a multiple of num_key_value_heads "
                      f"{num_kv_heads}: KV heads can be neither split nor replicated evenly")
    head = rank * num_kv_heads // world
    return slice(rank * q, (rank + 1) * q), slice(head, head + 1)


def check_plan(config, world: int) -> None:
    """Raise TPError before any weight is touched when `config` cannot be split over `world`."""
    if config.alibi:
        raise TPError("tensor parallelism of ALiBi models is not supported (per-head slopes would need splitting)")
    for r in range(world):
        head_plan(config.num_attention_heads, config.num_key_value_heads, world, r)
    if config.intermediate_size % world:
        raise TPError(f"world size {world} does not divide intermediate_size {config.intermediate_size}")


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W[:, cols]^T) + b: the partial products of every rank summed."""

    def __init__(self, linear: nn.Linear, cols: slice, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/world) of the table; ids elsewhere look up zeros; the sum over ranks
    is the full lookup."""

    def __init__(self, emb: nn.Embedding, start: int, stop: int, group):
        super().__init__()
        self.group, self.start, self.stop = group, start, stop
        self.weight = nn.Parameter(emb.weight.detach()[start:stop].contiguous(), requires_grad=False)
        self.num_embeddings, self.embedding_dim, self.padding_idx = emb.num_embeddings, emb.embedding_dim, emb.padding_idx

    def forward(self, ids):
        local = (ids >= self.start) & (ids < self.stop)
        y = F.embedding((ids - self.start).clamp(0, self.stop - self.start - 1), self.weight)
        y = y * local[..., None].to(y.dtype)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered into the full [.., V] (gather=True) or
    left as the local shard (gather=False, for a loss that knows the split)."""

    def __init__(self, linear: nn.Linear, start: int, stop: int, group, gather: bool = True):
        super().__init__()
        self.group, self.gather, self.start, self.stop = group, gather, start, stop
        self.weight = nn.Parameter(linear.weight.detach()[start:stop].contiguous(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.gather:
            return y
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    out = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None,
                    device="meta", dtype=linear.weight.dtype)
    out.weight = nn.Parameter(linear.weight.detach()[rows].contiguous(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach()[rows].contiguous(), requires_grad=False)
    return out


def tensor_parallel(model, group=None, gather_logits: bool = True):
    """Keep this rank's shard of every layer (in place) and return the model. The model's config
    becomes the rank-local one (heads per rank), the whole one stays in model.tp_config."""
    from .fuse import is_fused, unfuse
    from .packed import is_packed, unpack
    from .quantize import is_quantized

    rank, world = _rank_world(group)
    config = model.config
    check_plan(config, world)
    if is_quantized(model):
        raise TPError("tensor_parallel takes a float model; quantize after splitting")
    if is_packed(model):
        unpack(model)
    if is_fused(model):
        unfuse(model)
    D, I = config.head_dim, config.intermediate_size
    q_heads, kv_heads = head_plan(config.num_attention_heads, config.num_key_value_heads, world, rank)
    q_rows, kv_rows = slice(q_heads.start * D, q_heads.stop * D), slice(kv_heads.start * D, kv_heads.stop * D)
    i_rows = slice(rank * I // world, (rank + 1) * I // world)
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.q_proj, a.k_proj, a.v_proj = _rows(a.q_proj, q_rows), _rows(a.k_proj, kv_rows), _rows(a.v_proj, kv_rows)
            a.o_proj = RowParallelLinear(a.o_proj, q_rows, group)
            a.num_heads, a.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
            m.gate_proj, m.up_proj = _rows(m.gate_proj, i_rows), _rows(m.up_proj, i_rows)
            m.down_proj = RowParallelLinear(m.down_proj, i_rows, group)
        V = config.vocab_size
        if V % world == 0:
            start, stop = rank * V // world, (rank + 1) * V // world
            tied = config.tie_word_embeddings
            model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, start, stop, group)
            model.lm_head = VocabParallelLMHead(model.lm_head, start, stop, group, gather=gather_logits)
            if tied:  # one shard, shared, as the whole table was
                model.lm_head.weight = model.model.embed_tokens.weight
    local = copy.copy(config)  # the dataclass fields as they are: head_dim stays explicit
    local.num_attention_heads, local.num_key_value_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
    model.tp_config, model.config = config, local
    model.tp_rank, model.tp_world = rank, world
    return model.requires_grad_(False).eval()


def resident_weight_bytes(model) -> int:
    """Bytes of the weights this process holds (a tied table once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------- launching

def _entry(rank, fn, world, port, backend, args):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, nproc: int, *args) -> None:
    """Run fn(rank, world, *args) in `nproc` fresh processes joined in one process group (NCCL
    when there is a GPU per process, gloo otherwise), as torchrun would; fn must be importable."""
    import socket

    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_entry, args=(fn, nproc, port, backend, args), nprocs=nproc, start_method="spawn")
    except mp.ProcessRaisedException as e:  # the failing rank's traceback is in the message
        raise RuntimeError(f"a tensor-parallel rank failed:\n{e}") from None
