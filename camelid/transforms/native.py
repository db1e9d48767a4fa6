"""Decode steps in one native call per layer: model -> model.

    model = fused_decode(model)   # model.model.fused_decode (camelid/kernels/csrc/layer.cpp)

A decode step (a few new tokens per row, float32 activations, a float32 KVCache) then runs every
layer in one torch.ops.camelid.decode_layers call, one OpenMP team for the whole step: RMSNorm, the q/k/v product, RoPE, the cache
write, attention over the row's own keys, the output product and residual, RMSNorm, gate/up,
SiLU * up, down and residual, with no Python or small torch ops in between. Measured on the
default model (2 threads, AMD EPYC, Q4_1): the PyTorch layer spent ~220 us per layer outside the
matrix kernels; one native call per layer ~25 us; one call for all layers less (bench/cpu.py). Everything else (prefill,
speculative verification, training, masks with holes, ALiBi) runs the PyTorch layer, which stays
the reference (tests/test_kernels.py compares the two).

Applies to layers whose q/k/v and gate/up are fused (camelid.transforms.fuse) and whose four
products are BlockLinear (GGUF blocks) or TiledLinear (float tiles), with no bias and SiLU. A
layer changed afterwards (LoRA attached, unfused) is noticed and runs the PyTorch layer.
"""

from __future__ import annotations

import torch
from torch import nn

import camelid.kernels as kernels
from camelid.transforms.fuse import FusedLinear
from camelid.transforms.packed import TiledLinear
from camelid.transforms.quantize import BlockLinear


def _kind(layer: nn.Module) -> tuple[torch.Tensor, int] | None:
    """(the kernel's weight tensor, its kind) of a product camelid's decode layer can run."""
    if isinstance(layer, FusedLinear):
        layer = layer.inner
    if getattr(layer, "bias", None) is not None:
        return None
    if type(layer) is BlockLinear:
        return layer.qweight, layer.qtype
    if type(layer) is TiledLinear:
        return layer.weight, layer.kind
    return None


def _current(layer: nn.Module):
    return layer._buffers.get("qweight") if type(layer) is BlockLinear else layer._parameters.get("weight")


class FusedStep:
    """What one decoder layer gives the fused step; `ready()` is False once the layer changed."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer = layer
        self.modules = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        self.norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        self.weights = tuple(_kind(m) for m in self.modules)  # (tensor, kind) per product

    def ready(self) -> bool:
        """The layer still holds what this step was built from (read through _modules/_parameters:
        nn.Module's __getattr__ would cost more than the check is worth, every step)."""
        layer, m = self.layer._modules, self.modules
        attn, mlp = layer["self_attn"]._modules, layer["mlp"]._modules
        return (attn["qkv_proj"] is m[0] and attn["o_proj"] is m[1] and mlp["gate_up_proj"] is m[2]
                and mlp["down_proj"] is m[3] and layer["input_layernorm"]._parameters["weight"] is self.norms[0]
                and layer["post_attention_layernorm"]._parameters["weight"] is self.norms[1]
                and self.norms[0].dtype == torch.float32 and _current(m[0]._modules["inner"]) is self.weights[0][0])


class FusedDecode:
    """Every decoder layer of a decode step as one torch.ops.camelid.decode_layers call."""

    def __init__(self, model: nn.Module):
        config, attn = model.config, model.model.layers[0].self_attn
        self.steps = [FusedStep(layer) for layer in model.model.layers]
        cols = list(zip(*(s.weights for s in self.steps)))  # per product: ((tensor, kind) per layer)
        self.args = ([s.norms[0] for s in self.steps], [s.norms[1] for s in self.steps],
                     model.model.layers[0].input_layernorm.variance_epsilon,
                     *(x for col in cols for x in ([w for w, _ in col], [k for _, k in col])))
        self.shape = (attn.num_heads, attn.num_kv_heads, config.intermediate_size, attn.scale)

    def ready(self) -> bool:
        return all(s.ready() for s in self.steps)

    def __call__(self, x, cache, slots, key_start, cos, sin):
        """x [B*T, C] float32 -> after every layer; K/V written into cache at slots [T]."""
        return torch.ops.camelid.decode_layers(x, *self.args, cache.k, cache.v, slots, key_start, cos, sin, *self.shape)


def can_fuse_decode(layer: nn.Module, config) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    return (getattr(attn, "qkv_proj", None) is not None and getattr(mlp, "gate_up_proj", None) is not None
            and all(_kind(m) is not None for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
            and config.hidden_act in ("silu", "swish") and not config.alibi and attn.head_dim % 16 == 0)


def fused_decode(model: nn.Module) -> nn.Module:
    """Give the model its one-call decode step, in place, when every decoder layer qualifies (a
    no-op without camelid's kernels, or when one layer does not: the steps run the PyTorch layers)."""
    if kernels.available() and all(can_fuse_decode(layer, model.config) for layer in model.model.layers):
        eps = {layer.input_layernorm.variance_epsilon for layer in model.model.layers}
        eps |= {layer.post_attention_layernorm.variance_epsilon for layer in model.model.layers}
        if len(eps) == 1:
            model.model.fused_decode = FusedDecode(model)
    return model
