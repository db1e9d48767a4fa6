"""Several LoRA adapters on one served model, chosen per row of a batch (vLLM's multi-LoRA, in
Punica's shape): model -> model. The base layers stay as they are (quantized, packed, fused);
each targeted product gets a wrapper that adds, to the rows that asked for an adapter, that
adapter's low-rank update s * B (A x).

    routing = attach_adapters(model, {"sql": "adapters/sql", "chat": "adapters/chat"})  # in place
    routing.names                   # ["sql", "chat"]: adapter i + 1 (0 is the base model)
    routing.rows = [1, 0, 2]        # per batch row of the next forward (set by the engine's runner)
    logits = model(...)
    routing.rows = None             # every row the base model again
    routing.add("code", "adapters/code")

Adapters may differ in rank, alpha and target modules; an adapter saved for q_proj / v_proj finds
them inside a fused qkv_proj. A row's update is computed on that row alone, in 16-row tiles from
its first token (as the linear kernels tile rows), so its bits do not depend on the other rows of
the batch nor on how its prompt was chunked. The fused decode step (transforms/native.py) runs the
base products only: the runner gives it the rows without an adapter, and the PyTorch layers the
others (core/model.py skips it while routing.active).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camelid.transforms.fuse import FusedLinear
from camelid.transforms.lora import LINEAR_NAMES, adapter_tensors, read_adapter_config

TILE = 16  # rows per tile of an adapter's update


class AdapterRouting:
    """The adapters' names and which adapter each row of the next forward uses (0: none)."""

    def __init__(self, model: nn.Module):
        self.model, self.names, self.rows = model, [], None
        self.wrappers: dict[str, MultiLoRALinear] = {}
        self.folders: dict[str, Path] = {}

    @property
    def active(self) -> bool:
        return self.rows is not None and any(self.rows)

    def index(self, name: str) -> int:
        return self.names.index(name) + 1

    def add(self, name: str, directory) -> int:
        """Load the adapter in `directory` (saved by camelid or peft) as `name`; its index. Every
        tensor is checked against its layer before any is attached."""
        directory = Path(directory)
        if name in self.names and self.folders[name] == directory.resolve():
            return self.index(name)  # the same adapter again
        if not isinstance(name, str) or not name or name in self.names:
            raise ValueError(f"adapter name {name!r} is empty or already loaded (from {self.folders.get(name)})")
        config = read_adapter_config(directory)
        tensors = adapter_tensors(directory)
        r, alpha = config["r"], config["lora_alpha"]
        scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        plan = []  # (product name, part index, A, B)
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            layer = key[:-len(".lora_A.weight")]
            A, B = tensors[key], tensors.get(f"{layer}.lora_B.weight")
            if B is None:
                raise ValueError(f"{directory}: {layer}.lora_B.weight is missing")
            product, part, (n_in, n_out) = self._find(layer, directory)
            if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
                raise ValueError(f"{directory}: {layer} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                                 f"the model needs ({r}, {n_in}) and ({n_out}, {r}) (an adapter of another rank or "
                                 f"base model?)")
            plan.append((product, part, A, B))
        if not plan:
            raise ValueError(f"{directory}: the adapter holds no lora_A / lora_B tensors")
        extra = sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        if extra:
            raise ValueError(f"{directory}: unexpected tensors {', '.join(extra[:4])}")
        self.names.append(name)
        self.folders[name] = directory.resolve()
        index = len(self.names)
        for product, part, A, B in plan:
            wrapper = self.wrappers.get(product) or self._wrap(product)
            wrapper.adapters.setdefault(index, []).append(
                (part, A.float().contiguous(), B.float().contiguous(), scaling))
        return index

    def _find(self, layer: str, directory) -> tuple[str, int | None, tuple[int, int]]:
        """(the module to wrap, the part index inside a fused product or None, (in, out) features)."""
        parent, _, leaf = layer.rpartition(".")
        try:
            owner = self.model.get_submodule(parent)
        except AttributeError:
            owner = None
        if owner is not None and leaf in owner._modules:
            m = owner._modules[leaf]
            m = m.base if isinstance(m, MultiLoRALinear) else m
            return layer, None, (m.in_features, m.out_features)
        for fused_name, m in (owner._modules.items() if owner is not None else ()):
            inner = m.base if isinstance(m, MultiLoRALinear) else m
            if isinstance(inner, FusedLinear) and leaf in inner.names:
                i = inner.names.index(leaf)
                return f"{parent}.{fused_name}", i, (inner.inner.in_features, inner.sizes[i])
        raise ValueError(f"{directory}: the adapter's layer {layer} is not in the model (its linear layers are "
                         f"named {', '.join(LINEAR_NAMES)})")

    def _wrap(self, product: str) -> "MultiLoRALinear":
        parent, _, leaf = product.rpartition(".")
        owner = self.model.get_submodule(parent)
        wrapper = MultiLoRALinear(owner._modules[leaf], self)
        setattr(owner, leaf, wrapper)
        self.wrappers[product] = wrapper
        return wrapper


class MultiLoRALinear(nn.Module):
    """A base product (plain, or fused returning its parts) plus per-row adapter updates."""

    def __init__(self, base: nn.Module, routing: AdapterRouting):
        super().__init__()
        self.base = base
        self.routing = routing  # not a submodule: a plain attribute
        self.adapters: dict[int, list[tuple[int | None, torch.Tensor, torch.Tensor, float]]] = {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)  # in_features, out_features, names, sizes, ...

    def forward(self, x: torch.Tensor):
        y = self.base(x)
        rows = self.routing.rows
        if not rows or not any(a in self.adapters for a in rows):
            return y
        parts = list(y) if isinstance(y, tuple) else [y]
        parts = [p.clone() for p in parts]
        for b, a in enumerate(rows):
            for part, A, B, s in self.adapters.get(a, ()):
                p = parts[part or 0]
                p[b] = p[b] + (_tiled(x[b], A, B) * s).to(p.dtype)
        return tuple(parts) if isinstance(y, tuple) else parts[0]


def _tiled(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B (A x) of one row's tokens x [T, K] in float32, tile by tile of TILE tokens (zero-padded):
    every token's bits come from a product of the same shape wherever it sits."""
    T, K = x.shape
    pad = -T % TILE
    xt = F.pad(x.float(), (0, 0, 0, pad)).view(-1, TILE, K)
    n = xt.shape[0]
    h = torch.bmm(xt, A.t().expand(n, -1, -1))
    return torch.bmm(h, B.t().expand(n, -1, -1)).reshape(-1, B.shape[0])[:T]


def attach_adapters(model: nn.Module, adapters: dict | None = None) -> AdapterRouting:
    """Give `model` per-row LoRA adapters (name -> folder), in place; the routing the engine sets."""
    if getattr(model, "tp_world", 1) > 1:
        raise ValueError("multi-LoRA serving under tensor parallelism is not supported: merge the adapter or "
                         "serve on one process")
    routing = getattr(model.model, "adapter_routing", None)
    if routing is None:
        routing = AdapterRouting(model)
        model.model.adapter_routing = routing
    for name, directory in (adapters or {}).items():
        routing.add(name, directory)
    return routing
