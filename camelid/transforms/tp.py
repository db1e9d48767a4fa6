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
    """Raise TPError before any weight is touched when `config` cannot be split over `world`,
    naming the world sizes that can."""
    if config.alibi:
        raise TPError("tensor parallelism of ALiBi models is not supported (per-head slopes would need splitting)")
    try:
        _check_split(config, world)
    except TPError as e:
        sizes = [n for n in range(2, 65) if _splits(config, n)]
        works = (f"this model splits over {', '.join(map(str, sizes[:8]))} processes" if sizes
                 else "this model cannot be split over 2 to 64 processes: run it on one")
        raise TPError(f"{e}; {works}") from None


def _check_split(config, world: int) -> None:
    for r in range(world):
        head_plan(config.num_attention_heads, config.num_key_value_heads, world, r)
    if config.intermediate_size % world:
        raise TPError(f"world size {world} does not divide intermediate_size {config.intermediate_size}")


def _splits(config, world: int) -> bool:
    try:
        _check_split(config, world)
        return True
    except TPError:
        return False


class RowParallelLinear(nn.Module):
    """y = all_reduce(x @ W_shard^T) + b: the partial products of every rank summed (W_shard holds
    this rank's input columns)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the table; ids elsewhere look up zeros; the sum over ranks is the
    full lookup."""

    def __init__(self, weight: torch.Tensor, start: int, num_embeddings: int, padding_idx, group):
        super().__init__()
        self.group, self.start, self.stop = group, start, start + weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, weight.shape[1], padding_idx

    def forward(self, ids):
        local = (ids >= self.start) & (ids < self.stop)
        y = F.embedding((ids - self.start).clamp(0, self.stop - self.start - 1), self.weight)
        y = y * local[..., None].to(y.dtype)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered into the full [.., V] (gather=True) or
    left as the local shard (gather=False, for a loss that knows the split)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group, gather: bool = True):
        super().__init__()
        self.group, self.gather = group, gather
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], vocab_size

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.gather:
            return y
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def shard_plan(config, rank: int, world: int) -> dict[str, tuple[int, slice]]:
    """What `rank` keeps of each checkpoint tensor: name -> (dim, slice); a name not listed is
    kept whole. One plan serves both splitting a loaded model and reading only the shard."""
    D, I, V = config.head_dim, config.intermediate_size, config.vocab_size
    q_heads, kv_heads = head_plan(config.num_attention_heads, config.num_key_value_heads, world, rank)
    q, kv = slice(q_heads.start * D, q_heads.stop * D), slice(kv_heads.start * D, kv_heads.stop * D)
    inter = slice(rank * I // world, (rank + 1) * I // world)
    plan = {}
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            plan[f"{a}.{name}.weight"] = plan[f"{a}.{name}.bias"] = (0, rows)
        for name in ("gate_proj", "up_proj"):
            plan[f"{m}.{name}.weight"] = plan[f"{m}.{name}.bias"] = (0, inter)
        plan[f"{a}.o_proj.weight"], plan[f"{m}.down_proj.weight"] = (1, q), (1, inter)
    if V % world == 0:  # otherwise embedding and lm_head stay whole on every rank
        plan["model.embed_tokens.weight"] = plan["lm_head.weight"] = (0, slice(rank * V // world, (rank + 1) * V // world))
    return plan


def _sliced(t: torch.Tensor, spec) -> torch.Tensor:
    if spec is None:
        return t
    dim, sl = spec
    return (t[sl] if dim == 0 else t[:, sl]).contiguous()


def tensor_parallel(model, group=None, gather_logits: bool = True, source=None):
    """Keep this rank's shard of every layer (in place) and return the model. source(name, spec)
    supplies a tensor's shard (default: sliced from the model's own weights; the sharded loader
    reads it from the checkpoint instead). The model's config becomes the rank-local one (heads
    per rank); the whole one stays in model.tp_config."""
    from camelid.transforms.fuse import is_fused, unfuse
    from camelid.transforms.packed import is_packed, unpack
    from camelid.transforms.quantize import is_quantized

    rank, world = _rank_world(group)
    config = model.config
    check_plan(config, world)
    if is_quantized(model):
        raise TPError("tensor_parallel takes a float model; quantize after splitting")
    if is_packed(model):
        unpack(model)
    if is_fused(model):
        unfuse(model)
    plan = shard_plan(config, rank, world)
    state = dict(model.named_parameters(remove_duplicate=False))
    if source is None:
        def source(name, spec):
            return _sliced(state[name].detach(), spec)

    def take(name):
        return source(name, plan.get(name)) if name in state else None

    def column(prefix):  # a column-parallel nn.Linear holding this rank's output rows
        w, b = take(f"{prefix}.weight"), take(f"{prefix}.bias")
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
        layer.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            layer.bias = nn.Parameter(b, requires_grad=False)
        return layer

    q_heads, kv_heads = head_plan(config.num_attention_heads, config.num_key_value_heads, world, rank)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a, m, pa, pm = layer.self_attn, layer.mlp, f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            a.q_proj, a.k_proj, a.v_proj = column(f"{pa}.q_proj"), column(f"{pa}.k_proj"), column(f"{pa}.v_proj")
            a.o_proj = RowParallelLinear(take(f"{pa}.o_proj.weight"), take(f"{pa}.o_proj.bias"), group)
            a.num_heads, a.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
            m.gate_proj, m.up_proj = column(f"{pm}.gate_proj"), column(f"{pm}.up_proj")
            m.down_proj = RowParallelLinear(take(f"{pm}.down_proj.weight"), take(f"{pm}.down_proj.bias"), group)
        for name in ("model.norm.weight", *(f"model.layers.{i}.{n}.weight" for i in range(config.num_hidden_layers)
                                            for n in ("input_layernorm", "post_attention_layernorm"))):
            module, _, attr = name.rpartition(".")
            model.get_submodule(module)._parameters[attr] = nn.Parameter(take(name), requires_grad=False)
        emb = model.model.embed_tokens
        if "model.embed_tokens.weight" in plan:
            start = plan["model.embed_tokens.weight"][1].start
            model.model.embed_tokens = VocabParallelEmbedding(take("model.embed_tokens.weight"), start,
                                                              config.vocab_size, emb.padding_idx, group)
            head = model.model.embed_tokens.weight if config.tie_word_embeddings else take("lm_head.weight")
            model.lm_head = VocabParallelLMHead(head, config.vocab_size, group, gather=gather_logits)
            if config.tie_word_embeddings:  # one shard, shared, as the whole table was
                model.lm_head.weight = model.model.embed_tokens.weight
        else:
            emb.weight = nn.Parameter(take("model.embed_tokens.weight"), requires_grad=False)
            if config.tie_word_embeddings:
                model.lm_head.weight = emb.weight
            else:
                model.lm_head.weight = nn.Parameter(take("lm_head.weight"), requires_grad=False)
    local = copy.copy(config)  # the dataclass fields as they are: head_dim stays explicit
    local.num_attention_heads, local.num_key_value_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
    model.tp_config, model.config = config, local
    model.tp_rank, model.tp_world = rank, world
    return model.requires_grad_(False).eval()


def resident_weight_bytes(model) -> int:
    """Bytes of the weights this process holds (a tied table once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
