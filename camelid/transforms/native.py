"""Decode steps in one native call per layer: model -> model.

    model = fused_decode(model)   # each decoder layer gets a `fused_step` (camelid/kernels/csrc/layer.cpp)

A decode step (one new token per row, float32 activations, a float32 KVCache) then runs each
layer as one torch.ops.camelid.decode_layer call: RMSNorm, the q/k/v product, RoPE, the cache
write, attention over the row's own keys, the output product and residual, RMSNorm, gate/up,
SiLU * up, down and residual, with no Python or small torch ops in between. Measured on the
default model (2 threads): ~220 us of a layer's decode time was outside the matrix kernels in the
PyTorch layer; the fused layer spends ~XX us there (bench/cpu.py). Everything else (prefill,
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
    """A decoder layer's decode step as one native call; `ready()` is False once the layer changed."""

    def __init__(self, layer: nn.Module, config):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer = layer
        self.modules = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj,
                        layer.input_layernorm, layer.post_attention_layernorm)
        self.heads, self.kv_heads = attn.num_heads, attn.num_kv_heads
        self.inter, self.scale = config.intermediate_size, attn.scale
        self.eps = layer.input_layernorm.variance_epsilon
        (wqkv, kqkv), (wo, ko), (wgu, kgu), (wd, kd) = (_kind(m) for m in self.modules[:4])
        self.weights = (self.modules[4].weight, self.modules[5].weight, self.eps, wqkv, kqkv, wo, ko, wgu, kgu, wd, kd)
        self.shape = (self.heads, self.kv_heads, self.inter, self.scale)

    def ready(self) -> bool:
        """The layer still holds what this step was built from (read through _modules/_parameters:
        nn.Module's __getattr__ would cost more than the check is worth, every step)."""
        layer, m, w = self.layer._modules, self.modules, self.weights
        attn, mlp = layer["self_attn"]._modules, layer["mlp"]._modules
        return (attn["qkv_proj"] is m[0] and attn["o_proj"] is m[1] and mlp["gate_up_proj"] is m[2]
                and mlp["down_proj"] is m[3] and layer["input_layernorm"]._parameters["weight"] is w[0]
                and layer["post_attention_layernorm"]._parameters["weight"] is w[1]
                and w[0].dtype == torch.float32 and _current(m[0]._modules["inner"]) is w[3])

    def __call__(self, x, k_cache, v_cache, slot: int, key_start, cos, sin):
        return torch.ops.camelid.decode_layer(x, *self.weights, k_cache, v_cache, slot, key_start, cos, sin, *self.shape)


def can_fuse_decode(layer: nn.Module, config) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    return (getattr(attn, "qkv_proj", None) is not None and getattr(mlp, "gate_up_proj", None) is not None
            and all(_kind(m) is not None for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
            and config.hidden_act in ("silu", "swish") and not config.alibi and attn.head_dim % 16 == 0)


def fused_decode(model: nn.Module) -> nn.Module:
    """Give every decoder layer that qualifies its one-call decode step, in place (a no-op
    without camelid's kernels)."""
    if not kernels.available():
        return model
    for layer in model.model.layers:
        if can_fuse_decode(layer, model.config):
            layer.fused_step = FusedStep(layer, model.config)
    return model
