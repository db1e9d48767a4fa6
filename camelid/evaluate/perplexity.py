"""Perplexity of a model on a token sequence, with a sliding window.

Every token after the first is scored exactly once. Each window scores `stride` new tokens and
feeds the model up to `context` tokens, so a scored token sees at least context - stride tokens
before it (except near the start). The default stride, context // 2, scores the second half of
each window, as llama.cpp's perplexity tool does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # tokens scored

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def _windows(n: int, context: int, stride: int | None):
    """(begin, start, end) of each window: feed ids[begin:end], score targets ids[start:end]."""
    stride = stride or context // 2
    if context < 2 or not 0 < stride < context:
        raise ValueError(f"need context >= 2 and 0 < stride < context, got context={context}, stride={stride}")
    if n < 2:
        raise ValueError("perplexity needs at least two tokens")
    for start in range(1, n, stride):
        end = min(start + stride, n)
        yield max(0, end - context), start, end


@torch.inference_mode()
def perplexity(model, ids, context: int = 512, stride: int | None = None, logits_fn=None) -> Perplexity:
    """`ids`: a 1-D sequence of token ids. `logits_fn(window [1, T]) -> logits [1, T, V]` defaults
    to `model(window).logits`, so any causal LM (a transformers one too) can be scored the same way."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    logits_fn = logits_fn or (lambda x: model(x).logits)
    device = getattr(model, "device", torch.device("cpu"))
    nll, scored = 0.0, 0
    for begin, start, end in _windows(ids.numel(), context, stride):
        logits = logits_fn(ids[begin:end][None].to(device))[0, :-1].float()  # predicts ids[begin+1:end]
        first = start - begin - 1
        nll += F.cross_entropy(logits[first:], ids[start:end].to(logits.device), reduction="sum").item()
        scored += end - start
    return Perplexity(nll=nll, tokens=scored)


@dataclass
class Divergence:
    """A model against a reference on the same tokens (llama.cpp's perplexity --kl-divergence)."""
    kl: float  # summed KL(reference || model) over the scored positions (nats)
    same_top: int  # positions where both models' most likely token agree
    model: Perplexity
    reference: Perplexity

    @property
    def mean_kl(self) -> float:
        return self.kl / self.model.tokens

    @property
    def top1_agreement(self) -> float:
        return self.same_top / self.model.tokens


def kl_per_position(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) in nats at each position: sum over the vocabulary (last axis) of
    p_ref * (log p_ref - log p), from log-probabilities [..., V]."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)


@torch.inference_mode()
def kl_divergence(model, reference, ids, context: int = 512, stride: int | None = None) -> Divergence:
    """Mean KL divergence of `model`'s next-token distribution from `reference`'s, top-1 agreement,
    and both perplexities, over the same sliding windows as `perplexity` (what quantization costs)."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(f"the models' vocabularies differ ({model.config.vocab_size} vs "
                         f"{reference.config.vocab_size}): their distributions cannot be compared")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    kl, same, nll, ref_nll, scored = 0.0, 0, 0.0, 0.0, 0
    for begin, start, end in _windows(ids.numel(), context, stride):
        first, targets = start - begin - 1, ids[start:end]
        logp = model(ids[begin:end][None].to(model.device)).logits[0, first:-1].float().log_softmax(-1).cpu()
        ref = reference(ids[begin:end][None].to(reference.device)).logits[0, first:-1].float().log_softmax(-1).cpu()
        kl += float(kl_per_position(ref, logp).sum())
        same += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(logp.gather(-1, targets[:, None]).sum())
        ref_nll -= float(ref.gather(-1, targets[:, None]).sum())
        scored += end - start
    return Divergence(kl, same, Perplexity(nll, scored), Perplexity(ref_nll, scored))
