"""Fused projections: one product for the linear layers that read the same input.

    fuse(model)    q/k/v -> self_attn.qkv_proj, gate/up -> mlp.gate_up_proj, in place
    unfuse(model)  back to the separate layers (e.g. before attaching LoRA adapters)

Measured on the default model with int4 g32 layers (2 threads): the 150 q/k/v/gate/up products
of a decode step take 10.4-11.0 ms as separate calls and 6.5-8.2 ms fused, because each call of
torch's int kernels has a fixed cost (casts in and out, dispatch) that does not scale with its
rows. oneDNN-packed float32 layers gain nothing (27.0 ms vs 27.0 ms for 30 layers), so
`load_pretrained` fuses quantized models only.

A fused model saves under the original names (state_dict splits the rows back), so its files
are what transformers and camelid read. Fusable: nn.Linear and the quantized layers of
camelid.transforms.quantize (int8, int4, nf4) whose parts share a format and group size.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.transforms.quantize import QuantizedLinear, layer_from_state

GROUPS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


SHARED = {"ggml_type"}  # the same for every part: not split or stacked


def _rows_dim(key: str) -> int:
    return 1 if key == "scales_and_zeros" else 0  # (G, N, 2); every other tensor is (N, ...)


def _stack(states: list[dict], key: str) -> torch.Tensor:
    return states[0][key] if key in SHARED else torch.cat([s[key] for s in states], _rows_dim(key))


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(layer, QuantizedLinear):
        state = dict(layer.state())
    elif hasattr(layer, "dense_tensor"):  # packed or tiled (camelid.transforms.packed): the dense weight
        state = {"weight": layer.dense_tensor()}
    else:
        state = {"weight": layer.weight.detach()}
    if layer.bias is not None:
        state["bias"] = layer.bias.detach()
    return state


def _build(like: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    if isinstance(like, QuantizedLinear):
        return layer_from_state("w", {f"w.{k}": v for k, v in state.items()}, like.dtype, like.device)
    w, b = state["weight"], state.get("bias")
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    layer.weight = nn.Parameter(w, requires_grad=like.weight.requires_grad)
    if b is not None:
        layer.bias = nn.Parameter(b, requires_grad=like.bias.requires_grad)
    return layer


def _fusable(parts: list[nn.Module]) -> bool:
    kinds = {(type(p), getattr(p, "group_size", None), getattr(p, "format", None)) for p in parts}
    return len(kinds) == 1 and (type(parts[0]) is nn.Linear or isinstance(parts[0], QuantizedLinear))


class FusedLinear(nn.Module):
    """Several linear layers on one input, their rows stacked in `inner`; returns the parts' outputs."""

    def __init__(self, parts: list[nn.Module], names: tuple[str, ...]):
        super().__init__()
        states = [_state(p) for p in parts]
        self.names, self.sizes = names, [p.out_features for p in parts]
        self.inner = _build(parts[0], {k: _stack(states, k) for k in states[0]})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)

    def parts(self) -> list[nn.Module]:
        state = _state(self.inner)
        pieces = {k: [v] * len(self.sizes) if k in SHARED else v.split(self.sizes, _rows_dim(k))
                  for k, v in state.items()}
        return [_build(self.inner, {k: pieces[k][i].contiguous() for k in state}) for i in range(len(self.sizes))]

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False, **kwargs):
        """The parts' tensors under their own names beside this module (q_proj.weight, ...)."""
        destination = {} if destination is None else destination
        parent = prefix.rsplit(".", 2)[0] + "." if prefix.count(".") > 1 else ""
        for name, part in zip(self.names, self.parts()):
            part.state_dict(destination=destination, prefix=f"{parent}{name}.", keep_vars=keep_vars)
        return destination


def fuse(model: nn.Module) -> nn.Module:
    """Fuse every attention's q/k/v and every MLP's gate/up whose layers can be fused; in place."""
    for module in list(model.modules()):
        for owner_name, (fused_name, names) in GROUPS.items():
            owner = getattr(module, owner_name, None)
            if owner is None or getattr(owner, fused_name, None) is not None:
                continue
            parts = [getattr(owner, n, None) for n in names]
            if any(p is None for p in parts) or not _fusable(parts):
                continue
            with torch.no_grad():
                setattr(owner, fused_name, FusedLinear(parts, names))
            for n in names:
                delattr(owner, n)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Every FusedLinear back to its separate layers, in place."""
    for module in list(model.modules()):
        for owner_name, (fused_name, _) in GROUPS.items():
            owner = getattr(module, owner_name, None)
            fused = getattr(owner, fused_name, None) if owner is not None else None
            if isinstance(fused, FusedLinear):
                with torch.no_grad():
                    for name, part in zip(fused.names, fused.parts()):
                        setattr(owner, name, part)
                delattr(owner, fused_name)
                setattr(owner, fused_name, None)
    return model


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedLinear) for m in model.modules())
