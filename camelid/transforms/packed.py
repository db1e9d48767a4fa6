"""CPU inference layout: nn.Linear -> TiledLinear, the weight in 16-row tiles for camelid's own
float kernel (camelid/kernels: batch-invariant by construction, float32 or bfloat16 weights,
float32 sums), or, where camelid's kernels are not built, PackedLinear: the weight reordered into
oneDNN's blocked layout once, every product through oneDNN's linear (inductor's CPU kernel).
The oneDNN figures and the reason for its two-row trick:

Why, measured on the default model's 211 linear weights at 2 threads (bench/generate.py shows
the end-to-end effect):

    matmul steps/s (one step = every weight once)   M=1    M=2    M=8
    torch.nn.functional.linear (MKL), [out,in]      29.8   18.7   18.8
    ... weights stored column-major                 38.4   25.1   20.4
    oneDNN, packed                                  63.0   60.2   56.4

and, as important, a row's result does not depend on how many rows are multiplied with it (MKL's
sgemm rounds rows of 1-3 differently from rows of 4+; packed oneDNN gives the same bits for any
M >= 2, for every Llama shape tried up to 32000x4096, so one row is run as two). That is what
makes batched generation batch-invariant; tests/test_packed.py and tests/test_generate.py check it. Packed weights are inference-only: frozen, with no gradient. `model.train()` on a packed
model raises; load with `pack=False` or call `unpack(model)` to train.

    model = pack(model)      # in place; a no-op off CPU or where oneDNN is missing
    model = unpack(model)    # plain nn.Linear again (dense weights that can be trained)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import camelid.kernels as kernels

PACKED_DTYPES = (torch.float32, torch.bfloat16)
F32_TILES, BF16_TILES = 0, 30  # the kernels' weight kinds (csrc/layer.cpp)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pack(w: torch.Tensor) -> torch.Tensor:
    # batch_size is oneDNN's hint for the row count it tunes the layout for (2: see forward).
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 2)


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight Parameter holds the oneDNN-packed tensor (so
    parameters(), dtype, device and counts still work); state_dict() yields the dense weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(self._layout(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    # the two layout hooks: dense [out, in] -> what `weight` holds, and back
    @staticmethod
    def _layout(w: torch.Tensor) -> torch.Tensor:
        return _pack(w)

    def dense_tensor(self) -> torch.Tensor:
        return self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the packed weight's {self.weight.dtype}")
        if torch.is_grad_enabled() and x.requires_grad:  # oneDNN's op has no backward: keep dx correct
            return F.linear(x, self.dense_tensor(), self.bias)
        if x.numel() == x.shape[-1]:  # one row: oneDNN takes another path that rounds differently
            # for in_features > 1024 (measured); two rows (the second a copy, dropped) give every
            # row count the same bits: that is batch invariance, for about 5% of a decode step.
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(1, -1).expand(2, -1), self.weight, self.bias,
                                                   "none", [], "")
            return y[:1].reshape(*x.shape[:-1], -1)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight.dtype, device="meta")
        linear.weight = nn.Parameter(self.dense_tensor())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("this model's linear weights are packed for CPU inference and cannot be "
                               "trained; load it with pack=False or call camelid.transforms.packed.unpack(model) first")
        return super().train(False)

    def _apply(self, fn, recurse=True):  # .to(...) / .float() / .cuda(): go through the dense weight
        w = fn(self.dense_tensor())
        if w.device.type != "cpu" or w.dtype not in PACKED_DTYPES:
            raise RuntimeError("a packed model stays on the CPU in float32/bfloat16: call "
                               "camelid.transforms.packed.unpack(model) before moving it or changing its dtype")
        self.weight = nn.Parameter(self._layout(w), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_tensor()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        w = state_dict[prefix + "weight"]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(w.shape)}, expected "
                              f"{(self.out_features, self.in_features)}")
            return
        self.weight = nn.Parameter(self._layout(w.to(self.weight.dtype)), requires_grad=False)
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias = nn.Parameter(state_dict[prefix + "bias"].detach().to(self.bias.dtype), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


class TiledLinear(PackedLinear):
    """A frozen linear layer for camelid's own float kernel (camelid/kernels/csrc/dense.cpp): the
    weight Parameter holds [ceil(N/16), K, 16] tiles in float32 or bfloat16; sums are float32
    whatever the weight's dtype (bfloat16 weights are converted exactly), and a row's result never
    depends on the batch (no two-row trick needed). state_dict yields the dense weight."""

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        return kernels.tile(w.contiguous())

    def dense_tensor(self) -> torch.Tensor:
        return kernels.untile(self.weight.detach(), self.out_features)

    @property
    def kind(self) -> int:  # the kernels' weight kind
        return BF16_TILES if self.weight.dtype == torch.bfloat16 else F32_TILES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dense_tensor().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = kernels.dense_linear(x.reshape(-1, self.in_features).float().contiguous(), self.weight, self.out_features)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tiled {str(self.weight.dtype).removeprefix('torch.')}")


def bf16_supported() -> bool:
    """oneDNN's bfloat16 linear needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU
    its weight reorder fails, so bfloat16 models stay unpacked there."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in PACKED_DTYPES:
        return False
    return kernels.available() or (available() and (p.dtype != torch.bfloat16 or bf16_supported()))


def pack(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear by a PackedLinear in place (a tied lm_head gets its own packed copy;
    the embedding keeps the dense one). Returns the model, in eval mode."""
    if not can_pack(model):
        return model
    layer = TiledLinear if kernels.available() else PackedLinear  # camelid's kernel, else oneDNN's
    model.eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, layer(child))
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and not embed.weight.is_contiguous():  # no longer shared with lm_head: rows
        embed.weight = nn.Parameter(embed.weight.detach().contiguous(), requires_grad=False)  # read fastest
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Every PackedLinear back to a trainable nn.Linear, in place. A tied lm_head is re-tied."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                setattr(module, child_name, child.dense())
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear, a PackedLinear or a TiledLinear as an ordinary tensor."""
    return module.dense_tensor() if isinstance(module, PackedLinear) else module.weight
