"""Decode steps in one native call per layer: model -> model.

    model = fused_decode(model)   # model.model.fused_decode (camelid/kernels/csrc/layer.cpp)

A decode step (a few new tokens per row; a float32 or bfloat16 model and KVCache, float32 inside) then runs every
layer in one torch.ops.camelid.decode_layers call, one OpenMP team for the whole step: RMSNorm, the q/k/v product, RoPE, the cache
write, attention over the row's own keys, the output product and residual, RMSNorm, gate/up,
SiLU * up, down and residual, with no Python or small torch ops in between. Measured on the
default model (2 threads, AMD EPYC, Q4_1): the PyTorch layer spent ~220 us per layer outside the
matrix kernels; one native call per layer ~25 us; one call for all layers less (bench/cpu.py). Everything else (prefill,
speculative verification, training, masks with holes, ALiBi) runs the PyTorch layer, which stays
the reference (tests/test_kernels.py compares the two).

Applies to layers whose products are BlockLinear (GGUF blocks) or TiledLinear (float tiles), q/k/v
and gate/up fused (camelid.transforms.fuse) or, where their formats differ, side by side, with no
bias and SiLU. A layer changed afterwards (LoRA attached, unfused) is noticed and runs the PyTorch
layer.
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
    if isinstance(layer, FusedLinear):
        layer = layer._modules["inner"]
    return layer._buffers.get("qweight") if type(layer) is BlockLinear else layer._parameters.get("weight")


PRODUCTS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn", "o_proj", ()),
            ("mlp", "gate_up_proj", ("gate_proj", "up_proj")), ("mlp", "down_proj", ()))


def _products(layer: nn.Module) -> tuple:
    """The modules of each of the layer's four products: the fused one, or its parts in order
    (q, k, v in formats that do not fuse: a Q4_K_M file's Q6_K v beside Q4_K q and k). Read
    through _modules: nn.Module's __getattr__ would cost more than the check is worth, every step."""
    out = []
    for owner, fused, parts in PRODUCTS:
        mods = {k: _base(m) for k, m in layer._modules[owner]._modules.items()}
        one = mods.get(fused)
        out.append((one,) if one is not None or not parts else tuple(mods.get(n) for n in parts))
    return tuple(out)


def _base(m: nn.Module) -> nn.Module:
    """The base product under a multi-LoRA wrapper (the fused step runs the rows without adapters)."""
    return m._modules["base"] if type(m).__name__ == "MultiLoRALinear" else m


class FusedStep:
    """What one decoder layer gives the fused step; `ready()` is False once the layer changed."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.products = _products(layer)
        self.norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        self.versions = tuple(w._version for w in self.norms)
        self.norms32 = tuple(w.detach().float() for w in self.norms)  # the same tensors when float32
        self.weights = tuple(tuple(_kind(m) for m in p) for p in self.products)  # (tensor, kind) per part

    def ready(self) -> bool:
        """The layer still holds what this step was built from: the same modules, tensors and norms."""
        for now, then, weights in zip(_products(self.layer), self.products, self.weights):
            if len(now) != len(then) or any(a is not b or _current(a) is not w
                                            for a, b, (w, _) in zip(now, then, weights)):
                return False
        layer = self.layer._modules
        return (layer["input_layernorm"]._parameters["weight"] is self.norms[0]
                and layer["post_attention_layernorm"]._parameters["weight"] is self.norms[1]
                and all(c is w or w._version == v  # a float32 copy: its source not changed in place
                        for w, c, v in zip(self.norms, self.norms32, self.versions)))


class FusedDecode:
    """Every decoder layer of a decode step as one torch.ops.camelid.decode_layers call."""

    def __init__(self, model: nn.Module):
        config, attn = model.config, model.model.layers[0].self_attn
        self.steps = [FusedStep(layer) for layer in model.model.layers]
        args = []
        for i in range(4):  # per product: every layer's parts' tensors, their kinds (and part counts)
            parts = [w for s in self.steps for w in s.weights[i]]
            args += [[w for w, _ in parts], [k for _, k in parts]]
            if i in (0, 2):
                args.append([len(s.weights[i]) for s in self.steps])
        self.args = ([s.norms32[0] for s in self.steps], [s.norms32[1] for s in self.steps],
                     model.model.layers[0].input_layernorm.variance_epsilon, *args)
        self.shape = (attn.num_heads, attn.num_kv_heads, config.intermediate_size, attn.scale)

    def ready(self) -> bool:
        return all(s.ready() for s in self.steps)

    def __call__(self, x, cache, slots, key_start, cos, sin):
        """x [B*T, C] float32 -> after every layer; K/V written into cache at slots [T]."""
        paged = getattr(cache, "block_table", None)  # a PagedView: the op reads and writes through its blocks
        return torch.ops.camelid.decode_layers(x, *self.args, cache.k, cache.v, slots, key_start, cos, sin, *self.shape,
                                               paged, cache.block_size if paged is not None else 0)


def can_fuse_decode(layer: nn.Module, config) -> bool:
    return (all(m is not None and _kind(m) is not None for p in _products(layer) for m in p)
            and config.hidden_act in ("silu", "swish") and not config.alibi and layer.self_attn.head_dim % 16 == 0)


def fused_decode(model: nn.Module) -> nn.Module:
    """Give the model its one-call decode step, in place, when every decoder layer qualifies (a
    no-op without camelid's kernels, or when one layer does not: the steps run the PyTorch layers)."""
    if kernels.available() and all(can_fuse_decode(layer, model.config) for layer in model.model.layers):
        eps = {layer.input_layernorm.variance_epsilon for layer in model.model.layers}
        eps |= {layer.post_attention_layernorm.variance_epsilon for layer in model.model.layers}
        if len(eps) == 1:
            model.model.fused_decode = FusedDecode(model)
    return model
