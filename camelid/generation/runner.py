"""The engine's runner: the only caller of the model. It owns the KV cache (one row per slot) and
each running row's decoding state, and carries out the scheduler's Plans: cache moves and shifts,
the prefill of a joining row or a decode step of rows 0..n-1, then the next-token step
(generation/step.py) of every row in the plan.

Under tensor parallelism (camelid.transforms.tp) rank 0 runs the engine and its runner tells
every cache operation and forward to the other ranks, whose runners replay them on their shards
(`follow`); only rank 0 samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camelid.core.cache import KVCache, model_cache
from camelid.generation.scheduler import Event, Handle, Plan
from camelid.generation.step import Decoding, next_tokens


class _RowCache:
    """The KVCache interface over rows [first, last) of the engine's cache (views: writes go through)."""

    def __init__(self, cache: KVCache, first: int, last: int):
        self.k = [t[first:last] for t in cache.k]
        self.v = [t[first:last] for t in cache.v]
        self.batch_size, self.max_seq_len, self.dtype = last - first, cache.max_seq_len, cache.dtype

    update = KVCache.update


@dataclass
class _Row:
    """A running row's decoding state: its rules and its text so far (prompt + generated)."""
    decoding: Decoding
    ids: torch.Tensor  # long [1, T]
    n_prompt: torch.Tensor  # long [1]


class Runner:
    def __init__(self, model, max_batch: int, context: int):
        self.model = model
        self.device = model.device
        self.cache = model_cache(model, max_batch, context)
        self.tp = getattr(model, "tp_world", 1) > 1
        self.leader = not self.tp or model.tp_rank == 0
        self.rows: dict[int, _Row] = {}  # slot -> decoding state (moves with the row)

    def execute(self, plan: Plan) -> list[Event]:
        """Run `plan`; one token Event per row of it, in order."""
        for op, *args in plan.ops:
            getattr(self, op)(*args)
        if plan.prefill:
            h = plan.rows[0]
            logits = self.prefill(h.slot, h.prompt, plan.t)
            self.rows[h.slot] = _Row(Decoding.make(h.params, self.model.config.vocab_size, logits.device, h.eos,
                                                   h.min_tokens, h.logprobs),
                                     torch.tensor([h.prompt], device=logits.device),
                                     torch.tensor([len(h.prompt)], device=logits.device))
        else:
            logits = self.decode([h.generated[-1] for h in plan.rows], plan.starts, plan.t)
        return [self._next_isolated(h, logits[i:i + 1]) for i, h in enumerate(plan.rows)]

    def _next_isolated(self, h: Handle, logits: torch.Tensor) -> Event:
        """One row's token, or an error Event for that row alone: a request's own sampling values
        (say, a distribution they make non-finite) must never fail the other rows of the step."""
        try:
            return self._next(h, logits)
        except (ValueError, RuntimeError) as e:
            return Event(finish_reason="error", error=f"{type(e).__name__}: {e}")

    def _next(self, h: Handle, logits: torch.Tensor) -> Event:
        row = self.rows[h.slot]
        choice = next_tokens(row.decoding, logits, row.ids, torch.ones_like(row.ids), row.n_prompt,
                             len(h.generated), h.constraint)
        row.ids = torch.cat([row.ids, choice.tokens[:, None]], dim=1)
        event = Event(token=int(choice.tokens[0]))
        if choice.logprobs is not None:
            event.logprob = float(choice.logprobs[0])
            event.top_logprobs = ([] if choice.top_logprobs is None else
                                  list(zip(choice.top_ids[0].tolist(), choice.top_logprobs[0].tolist())))
        return event

    # ------------------------------------------------------------------ the model and the cache (told under TP)
    def prefill(self, b: int, prompt: list[int], t: int) -> torch.Tensor:
        """The prompt of row b into slots [t - P, t), alone; its last logits [1, V]."""
        self._tell("prefill", b, prompt, t)
        P = len(prompt)
        mask = torch.zeros(1, t, dtype=torch.long, device=self.device)
        mask[:, t - P:] = 1
        ids = torch.tensor([prompt], device=self.device)
        return self.model(ids, attention_mask=mask, cache=_RowCache(self.cache, b, b + 1),
                          cache_position=torch.arange(t - P, t, device=self.device), logits_to_keep=1).logits[:, -1]

    def decode(self, last: list[int], starts: list[int], t: int) -> torch.Tensor:
        """One decode step of rows 0..n-1 (their last tokens at slot t, row i attending to slots
        [starts[i], t]); logits [n, V]."""
        self._tell("decode", last, starts, t)
        n = len(last)
        ids = torch.tensor([[x] for x in last], device=self.device)
        mask = (torch.arange(t + 1, device=self.device) >= torch.tensor(starts, device=self.device)[:, None]).long()
        return self.model(ids, attention_mask=mask, cache=_RowCache(self.cache, 0, n),
                          cache_position=torch.tensor([t], device=self.device), logits_to_keep=1).logits[:, -1]

    def move(self, src: int, dst: int, lo: int, hi: int) -> None:
        """Row src's slots [lo, hi) into row dst (and its decoding state)."""
        self._tell("move", src, dst, lo, hi)
        for t in self.cache.k + self.cache.v:
            t[dst, :, lo:hi] = t[src, :, lo:hi]
        if src in self.rows:
            self.rows[dst] = self.rows.pop(src)

    def shift(self, lo: int, hi: int, d: int) -> None:
        """Every row's slots [lo, hi) to [lo + d, hi + d)."""
        self._tell("shift", lo, hi, d)
        for t in self.cache.k + self.cache.v:
            t[:, :, lo + d:hi + d] = t[:, :, lo:hi].clone()

    # ------------------------------------------------------------------ tensor parallel
    def _tell(self, op: str, *args) -> None:
        if self.tp and self.leader:
            import torch.distributed as dist

            dist.broadcast_object_list([(op, args)], src=0)

    def stop_followers(self) -> None:
        self._tell("stop")

    def follow(self) -> None:
        """Ranks > 0: replay rank 0's operations until it stops."""
        import torch.distributed as dist

        with torch.inference_mode():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                op, args = box[0]
                if op == "stop":
                    return
                getattr(self, op)(*args)
