"""Attention plans and positions: how each row and query of a call attends, built outside the
model and passed in, so every driver (forward, speculative verification, export, the engine)
runs the model's one decoder-layer loop with a plan of its own.

Notation: B batch, T query tokens in this call, S key/value slots (past + current), H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camelid.core.rope import alibi_bias


@dataclass
class AttentionGroup:
    """One attention call: rows `rows` of the batch, queries [query_start, query_end) of the call,
    keys at cache slots [key_start, key_end). A left-padded row attends only to its own keys with
    only its real queries: the kernel sees exactly the shapes and values it sees for that row
    alone, so batched output is bit-identical to unbatched. One call per row: torch's CPU flash
    kernel splits one-query work differently for 1 and for several rows (measured: different last
    bits), so rows never share a call. The cost is B small calls per layer instead of one.
    `mask`/`is_causal` are for the group's own shapes; None ends mean "to the end"."""
    rows: slice  # this row, r:r+1 (a view, no copy)
    key_start: int
    query_start: int
    mask: torch.Tensor | None
    is_causal: bool
    whole: bool = False  # a batch of one with no padding: one call on q, k, v as they are
    query_end: int | None = None
    key_end: int | None = None
    causal: bool = False  # each query sees exactly its row's keys from key_start up to its own slot


QUERY_TILE = 64  # inference: queries attend in tiles of this many at fixed positions (see attention_plan)


def attention_plan(attention_mask: torch.Tensor | None, slots: torch.Tensor, kv_len: int, batch: int,
                   alibi: torch.Tensor | None = None, split_rows: bool = True) -> list[AttentionGroup]:
    """The plan of an HF-style call (what `forward` builds).

    attention_mask: [B, >= kv_len] 1 for real tokens, 0 for padding (HF convention), or None; or,
    for several documents packed in one row, document numbers 1, 2, ... (0 padding): a token then
    sees only earlier tokens of its own document.
    slots: [T] consecutive cache slots of the query tokens (the last T of the kv_len slots).
    Key slot j is visible to query slot i when j <= i and j is not padding. Masks are built only
    where needed: plain causal when queries and keys coincide, nothing for one query.
    alibi: the per-head slopes of an ALiBi model, folded into an additive float mask.
    A mask with holes (not left padding) gets one group with a [B, 1, T, S] mask in which a
    padding query sees itself, so no row is all -inf (that would make NaNs; it is never read).
    split_rows=False (training, where batch invariance buys nothing): an unpadded batch is one call.
    """
    T = slots.shape[0]
    if attention_mask is not None and attention_mask.dtype != torch.bool and bool((attention_mask[:, :kv_len] > 1).any()):
        return [_masked_group(attention_mask[:, :kv_len].to(slots.device), slots, kv_len, alibi)]  # documents
    if attention_mask is None or bool(attention_mask[:, :kv_len].all()):
        pads = [0] * batch
    else:
        valid = attention_mask[:, :kv_len].to(device=slots.device, dtype=torch.bool)  # (B, S)
        lead = (~valid).long().cumprod(-1).sum(-1)  # leading padding of each row
        if not bool((valid.sum(-1) == kv_len - lead).all()):
            return [_masked_group(valid.long(), slots, kv_len, alibi)]
        pads = lead.tolist()
    if not split_rows and not any(pads):
        pads, batch = [0], 1  # one group over every row: the same shapes, B rows at once
    groups, first = [], int(slots[0])
    for r, p in enumerate(pads):
        q0 = max(0, p - first)
        if q0 >= T:
            continue  # every query of this row is padding
        rows = slice(r, r + 1) if split_rows or any(pads) else slice(None)
        tile = QUERY_TILE if split_rows else T
        a = q0
        while a < T:  # tiles of queries at whole multiples of `tile` in the row's own positions
            b = min(T, a + tile - (first + a - p) % tile)
            Tq, S = b - a, first + b - p
            mask, is_causal = None, Tq == S and Tq > 1
            if alibi is not None or Tq not in (1, S):
                mask = _tril(Tq, S, slots.device)
            if alibi is not None:
                bias = alibi_bias(alibi, slots[a:b] - p, S)  # (1, H, Tq, S)
                mask, is_causal = bias.masked_fill(~mask, float("-inf")), False
            whole = batch == 1 and p == 0 and a == 0 and b == T
            groups.append(AttentionGroup(rows, p, a, mask, is_causal, whole=whole, causal=alibi is None,
                                         query_end=None if b == T else b, key_end=None if b == T else p + S))
            a = b
    return groups


def _tril(Tq: int, S: int, device) -> torch.Tensor:
    """(1, 1, Tq, S): the last Tq of S slots as queries, each seeing the keys up to its own."""
    return torch.ones(Tq, S, dtype=torch.bool, device=device).tril(S - Tq)[None, None]


def _masked_group(docs, slots, kv_len, alibi) -> AttentionGroup:
    """docs (B, S): document number of each key slot, 0 for padding (a 0/1 mask is one document)."""
    k_slots = torch.arange(kv_len, device=slots.device)
    visible = k_slots[None, :] <= slots[:, None]  # (T, S)
    same = (docs[:, slots, None] == docs[:, None, :]) & (docs[:, None, :] > 0)  # (B, T, S)
    mask = ((visible[None] & same) | (k_slots[None, :] == slots[:, None])[None])[:, None]  # (B, 1, T, S)
    if alibi is not None:
        mask = alibi_bias(alibi, slots, kv_len).masked_fill(~mask, float("-inf"))
    return AttentionGroup(slice(None), 0, 0, mask, False, whole=True)


def decode_step_plan(start: int, T: int, alibi: torch.Tensor | None, device) -> list[AttentionGroup]:
    """Query i of a one-row call at slots start..start+T-1 sees keys [0, start + i], alone, exactly
    as a one-token decode step at slot start + i does (speculative verification)."""
    pos = torch.arange(start, start + T, device=device)
    return [AttentionGroup(slice(0, 1), 0, i, None if alibi is None else alibi_bias(alibi, pos[i:i + 1], start + i + 1),
                           False, query_end=i + 1, key_end=start + i + 1, causal=alibi is None) for i in range(T)]


def dense_plan(mask: torch.Tensor) -> list[AttentionGroup]:
    """One call for every row with a full [B, 1|H, T, S] mask (export's traced graph)."""
    return [AttentionGroup(slice(None), 0, 0, mask, is_causal=False, whole=True)]


def positions_from_mask(attention_mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, T] of a left-padded batch: the count of real tokens before each one; of
    packed documents (numbers > 1 in the mask): the count of earlier tokens of the same document."""
    mask = attention_mask.long()
    if attention_mask.dtype != torch.bool and bool((mask > 1).any()):
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        starts = torch.ones_like(mask, dtype=torch.bool)
        starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
        return (idx - torch.where(starts, idx, 0).cummax(-1).values)[:, slots]
    pos = mask.cumsum(-1) - 1
    return pos.clamp(min=0)[:, slots]
