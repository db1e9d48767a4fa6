"""Fully sharded data-parallel training on torch.distributed (FSDP2 `fully_shard`): what the trainer
does when it runs in a process group of several ranks.

    torchrun --nproc-per-node 4 -m camelid.cli finetune ...   # or: camelid finetune --nproc 4 ...

Each decoder layer is one FSDP unit (its weights all-gathered just before it runs and freed after;
gradients reduce-scattered), the rest (embedding, final norm, lm_head) is the root unit, so a rank
keeps 1/world of every weight, gradient and optimizer state. Frozen weights (a LoRA base) are
sharded the same way and simply get no gradient.

Checkpoints are torch.distributed.checkpoint (DCP) folders: every rank writes its own shards and
the metadata records each tensor's global shape, so a checkpoint saved at one world size loads at
any other (including a single process without a process group), resharding as it reads.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

SHARDED = "sharded"  # the DCP folder inside a checkpoint


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def meta_copy(model: nn.Module) -> nn.Module:
    """The same module tree with every parameter and buffer on the meta device (no memory): the
    shape into which a gathered full state dict is loaded to save it in the usual formats."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def contiguous(model: nn.Module) -> nn.Module:
    """Give every parameter a row-major layout (FSDP shards by rows of the memory; the GGUF loader
    stores linear weights column-major for faster decode). Tied parameters stay one parameter."""
    done = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = p if p.is_contiguous() else nn.Parameter(p.detach().contiguous(),
                                                                        requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return model


def shard_model(model: nn.Module, mp_policy=None) -> nn.Module:
    """fully_shard each decoder layer, then the root (embedding, norm, lm_head; a tied lm_head is
    the embedding's tensor, so it stays in one unit). In place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    contiguous(model)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _state(model: nn.Module, optimizer, trainable_only: bool) -> dict:
    """{"model": ..., "optim": ...} sharded state dicts, keyed by the names of model.state_dict().
    trainable_only keeps the weights that train (StateDictOptions.ignore_frozen_params would look
    the frozen ones up by parameter name, and a LoRA layer saves its base as q_proj.weight, not
    q_proj.base.weight)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    if trainable_only:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return {"model": model_state, "optim": optim_state}


def save_sharded(model: nn.Module, optimizer, directory, trainable_only: bool = False) -> None:
    """Every rank writes its shards of the weights (only the trainable ones when trainable_only:
    a LoRA run saves the adapter, not the frozen base) and of the optimizer state."""
    dcp.save(_state(model, optimizer, trainable_only), checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer, directory, trainable_only: bool = False) -> None:
    """Read a DCP checkpoint written at any world size into this (sharded or plain) model and optimizer."""
    state = _state(model, optimizer, trainable_only)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not trainable_only))


def gather_full(model: nn.Module, template: nn.Module) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of a sharded model on rank 0, None on the others; every rank
    must call it (the weights are all-gathered). template: meta_copy(model) taken before sharding."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = copy.deepcopy(template)
    plain.load_state_dict(state, assign=True)
    if plain.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain.eval()


def all_sum(value: float, device=None) -> float:
    """A float summed over the ranks (every rank gets the total; device: a CUDA one under NCCL)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float: under FSDP2 it is a DTensor holding the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
