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


@torch.inference_mode()
def perplexity(model, ids, context: int = 512, stride: int | None = None, logits_fn=None) -> Perplexity:
    """`ids`: a 1-D sequence of token ids. `logits_fn(window [1, T]) -> logits [1, T, V]` defaults
    to `model(window).logits`, so any causal LM (a transformers one too) can be scored the same way."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    stride = stride or context // 2
    if context < 2 or not 0 < stride < context:
        raise ValueError(f"need context >= 2 and 0 < stride < context, got context={context}, stride={stride}")
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    logits_fn = logits_fn or (lambda x: model(x).logits)
    device = getattr(model, "device", torch.device("cpu"))
    N, nll, scored = ids.numel(), 0.0, 0
    for start in range(1, N, stride):  # score targets ids[start:end]
        end = min(start + stride, N)
        begin = max(0, end - context)
        logits = logits_fn(ids[begin:end][None].to(device))[0, :-1].float()  # predicts ids[begin+1:end]
        first = start - begin - 1
        nll += F.cross_entropy(logits[first:], ids[start:end].to(logits.device), reduction="sum").item()
        scored += end - start
    return Perplexity(nll=nll, tokens=scored)
