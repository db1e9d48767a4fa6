"""Two models on the same tokens, side by side: where do they first part ways?

    c = compare(a, b, input_ids, attention_mask)   # a: the reference, b: the model under test
    print(c.table(threshold=1e-4))                 # every hidden state, the logits, top-1, KL(a || b)
    c.first_divergence(1e-4)                       # the first state whose relative L2 error exceeds 1e-4

a and b are any causal LMs whose forward takes (input_ids, attention_mask=, position_ids=,
output_hidden_states=True) and returns `.logits` and `.hidden_states`: camelid models in any
format and after any transform (packed, int8 / int4 / nf4, LoRA), or a transformers model as an
oracle. hidden_states[0] is the embedding output, [i] the output of decoder layer i - 1, and the
last one is after the final norm (transformers' convention, which camelid follows).

Every figure is over the real tokens only: padded positions (attention_mask 0) are dropped before
anything is measured. With a mask, both models get the positions transformers' generate derives
from it (real tokens count 0, 1, 2, ...), so a model that does not derive them itself sees the same.

Notation: B batch, T tokens per row, N real tokens, C hidden_size, V vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from camelid.evaluate.perplexity import kl_per_position

ARCHITECTURE_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size")
# How far apart a state is, by metric; "cosine" counts as 1 - cosine similarity.
METRICS = ("max_abs", "mean_abs", "rel_l2", "cosine")


@dataclass
class Diff:
    """How far b's tensor is from a's, over the real tokens."""
    name: str  # "embed_tokens", "layers.3" (output of decoder layer 3), "layers.29+norm", "logits"
    max_abs: float  # max |b - a| over every element
    mean_abs: float  # mean |b - a|
    rel_l2: float  # ||b - a|| / ||a||, over all real tokens at once
    cosine: float  # cosine similarity of a's and b's vector at each token, averaged over tokens

    def divergence(self, metric: str = "rel_l2") -> float:
        return 1.0 - self.cosine if metric == "cosine" else getattr(self, metric)


@dataclass
class Comparison:
    layers: list[Diff]  # one per hidden state: embed_tokens, layers.0, ..., layers.{L-1}+norm
    logits: Diff
    top1_agreement: float  # fraction of real tokens where both models' most likely next token agree
    kl_mean: float  # KL(a || b) of the next-token distributions, nats, mean over real tokens
    kl_max: float  # ... and at the worst token
    tokens: int  # N, the real tokens compared

    def first_divergence(self, threshold: float, metric: str = "rel_l2") -> Diff | None:
        """The first hidden state, then the logits, whose divergence exceeds `threshold`: the first
        place two implementations part ways. None when every one stays within it."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return next((d for d in [*self.layers, self.logits] if d.divergence(metric) > threshold), None)

    def to_dict(self, threshold: float | None = None, metric: str = "rel_l2") -> dict:
        out = asdict(self)
        if threshold is not None:
            first = self.first_divergence(threshold, metric)
            out["first_divergence"] = {"threshold": threshold, "metric": metric,
                                       "name": first.name if first is not None else None}
        return out

    def table(self, threshold: float | None = None, metric: str = "rel_l2") -> str:
        """One row per hidden state and one for the logits, then top-1 agreement and KL; with a
        threshold, the first divergent row is marked and named."""
        first = self.first_divergence(threshold, metric) if threshold is not None else None
        width = max(len(d.name) for d in [*self.layers, self.logits])
        lines = [f"{'state':<{width}}  {'max|b-a|':>10}  {'mean|b-a|':>10}  {'rel L2':>10}  {'cosine':>10}"]
        for d in [*self.layers, self.logits]:
            mark = "  <- first divergence" if d is first else ""
            lines.append(f"{d.name:<{width}}  {d.max_abs:>10.3g}  {d.mean_abs:>10.3g}  {d.rel_l2:>10.3g}  "
                         f"{d.cosine:>10.6f}{mark}")
        lines.append(f"top-1 agreement {100 * self.top1_agreement:.2f}% of {self.tokens} tokens; "
                     f"KL(a || b) mean {self.kl_mean:.3g} nats, max {self.kl_max:.3g}")
        if threshold is not None:
            where = first.name if first is not None else "none (every state within it)"
            lines.append(f"first divergence ({metric} > {threshold:g}): {where}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- measuring

def check_same_architecture(a, b) -> None:
    """The fields that must agree for a layer-by-layer comparison, checked before any forward."""
    for field in ARCHITECTURE_FIELDS:
        va, vb = getattr(a.config, field), getattr(b.config, field)
        if va != vb:
            raise ValueError(f"the models' {field} differ (a: {va}, b: {vb}): they cannot be compared "
                             f"layer by layer")


def diff(name: str, a: torch.Tensor, b: torch.Tensor) -> Diff:
    """a, b (N, C): one vector per real token."""
    a, b = a.double(), b.double()
    d = b - a
    norm = a.norm()
    rel_l2 = float(d.norm() / norm) if norm > 0 else (0.0 if not d.any() else math.inf)
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (N,)
    # equal vectors are 1 exactly (rounding could say 1 - 2e-16; zero vectors would say NaN)
    cosine = torch.where((a == b).all(-1), 1.0, cosine.nan_to_num(0.0))
    return Diff(name, float(d.abs().max()), float(d.abs().mean()), rel_l2, float(cosine.mean()))


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _forward(model, input_ids, attention_mask, position_ids, name: str, expected_states: int):
    kwargs = {} if attention_mask is None else dict(attention_mask=attention_mask.to(_device(model)),
                                                    position_ids=position_ids.to(_device(model)))
    out = model(input_ids.to(_device(model)), output_hidden_states=True, **kwargs)
    states = getattr(out, "hidden_states", None)
    if states is None or len(states) != expected_states:
        got = "none" if states is None else len(states)
        raise ValueError(f"model {name} returned {got} hidden states, expected {expected_states} "
                         f"(embeddings + one per layer)")
    return out


@torch.inference_mode()
def compare(a, b, input_ids, attention_mask=None) -> Comparison:
    """Run `a` (the reference) and `b` on the same tokens and measure how far b is from a at every
    hidden state and at the logits. input_ids [B, T] (or [T]); attention_mask [B, T], 1 for real
    tokens and 0 for padding, or None when every token is real. Models run as they are: put them
    in eval mode if dropout is configured."""
    check_same_architecture(a, b)
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: there is nothing to compare")
    position_ids = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 1 (real token) and 0 (padding)")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        real = attention_mask.bool().cpu()
    else:
        real = torch.ones(input_ids.shape, dtype=torch.bool)
    if not bool(real.any()):
        raise ValueError("attention_mask marks no real token: there is nothing to compare")

    L = a.config.num_hidden_layers
    out_a = _forward(a, input_ids, attention_mask, position_ids, "a", L + 1)
    out_b = _forward(b, input_ids, attention_mask, position_ids, "b", L + 1)

    def at_real(x):  # (B, T, ...) -> (N, ...), float64 on the CPU
        return x[real.to(x.device)].double().cpu()

    names = ["embed_tokens", *(f"layers.{i}" for i in range(L - 1)), f"layers.{L - 1}+norm"]
    layers = [diff(n, at_real(x), at_real(y)) for n, x, y in zip(names, out_a.hidden_states, out_b.hidden_states)]
    logits_a, logits_b = at_real(out_a.logits), at_real(out_b.logits)  # (N, V)
    kl = kl_per_position(logits_a.log_softmax(-1), logits_b.log_softmax(-1))  # (N,)
    top1 = (logits_a.argmax(-1) == logits_b.argmax(-1)).double().mean()
    return Comparison(layers=layers, logits=diff("logits", logits_a, logits_b), top1_agreement=float(top1),
                      kl_mean=float(kl.mean()), kl_max=float(kl.max()), tokens=int(real.sum()))
