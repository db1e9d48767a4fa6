"""The engine's runner: the only caller of the model. It owns the paged KV cache (core/cache.py
PagedKVCache) and each request's decoding state, and carries out the scheduler's Steps: each
prefill chunk (a row alone, through the PyTorch layers), then one decode step of every decoding
row (one call; row by row inside it), then the next-token step (generation/step.py) of each row
whose token is new.

A step's rows are laid out as a left-padded batch over a shared clock t (the longest row's
length): row b's token i sits at slot t - len_b + i, and the view maps slots to its blocks.

Under tensor parallelism (camelid.transforms.tp) rank 0 runs the engine and its runner tells
every forward to the other ranks, whose runners replay them on their shards of the same block
pool (`follow`); only rank 0 samples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from camelid.core.cache import model_paged_cache
from camelid.generation.scheduler import Event, Handle, Step
from camelid.generation.sampling import logprobs
from camelid.generation.step import Decoding, next_tokens


@dataclass
class _Row:
    """A request's decoding state: its rules and its text so far (prompt + generated)."""
    decoding: Decoding
    ids: torch.Tensor  # long [1, T]
    n_prompt: torch.Tensor  # long [1]


class Runner:
    def __init__(self, model, num_blocks: int, block_size: int, kv_cache: str | None = None):
        self.model = model
        self.device = model.device
        self.cache = model_paged_cache(model, num_blocks, block_size, kv_cache)
        self.tp = getattr(model, "tp_world", 1) > 1
        self.leader = not self.tp or model.tp_rank == 0
        self.rows: dict[int, _Row] = {}  # request id -> decoding state (kept across a preemption)
        self.routing = getattr(model.model, "adapter_routing", None)  # multi-LoRA (transforms/multi_lora.py)

    def execute(self, step: Step) -> tuple[list[Event | None], list[Event | None]]:
        """Run `step`: one Event (or None: no new token) per chunk and per decode row, in order."""
        for rid in step.release:
            self.rows.pop(rid, None)
        chunk_events = []
        for c in step.chunks:
            h = c.h
            every = h.prompt_logprobs is not None
            logits = self.prefill(h.prompt[c.start:c.end], c.start, list(h.blocks), every, h.adapter)
            scored = self._prompt_logprobs(h, c.start, c.end, logits) if every else None
            logits = logits[:, -1]
            if c.sample:
                self.rows[h.rid] = _Row(Decoding.make(h.params, self.model.config.vocab_size, logits.device, h.eos,
                                                      h.min_tokens, h.logprobs),
                                        torch.tensor([h.prompt], device=logits.device),
                                        torch.tensor([len(h.prompt)], device=logits.device))
            event = self._next_isolated(h, logits) if c.sample else None
            if scored is not None:
                event = event or Event()
                event.prompt_logprobs = scored
            chunk_events.append(event)
        decode_events = []
        if step.decode:
            logits = [None] * len(step.decode)
            # rows without an adapter in one call (the fused step), rows with one in another (the PyTorch layers)
            for group in ([i for i, h in enumerate(step.decode) if h.adapter == 0],
                          [i for i, h in enumerate(step.decode) if h.adapter != 0]):
                if group:
                    hs = [step.decode[i] for i in group]
                    out = self.decode([step.inputs[i] for i in group], [h.computed for h in hs],
                                      [list(h.blocks) for h in hs], [h.adapter for h in hs])
                    for j, i in enumerate(group):
                        logits[i] = out[j:j + 1]
            decode_events = [self._next_isolated(h, logits[i]) if s else None
                             for i, (h, s) in enumerate(zip(step.decode, step.sample))]
        return chunk_events, decode_events

    @staticmethod
    def _prompt_logprobs(h: Handle, start: int, end: int, logits: torch.Tensor) -> list:
        """(logprob, top n) of each prompt token in (start, min(end + 1, P)) given those before it,
        from the chunk's logits [1, end - start, V] (log-softmax of the raw logits, in float32)."""
        nxt = torch.tensor(h.prompt[start + 1:end + 1], device=logits.device)
        chosen, values, ids = logprobs(logits[0, :len(nxt)], nxt, h.prompt_logprobs)
        if values is None:
            return [(c, []) for c in chosen.tolist()]
        return [(c, list(zip(i, v))) for c, i, v in zip(chosen.tolist(), ids.tolist(), values.tolist())]

    def _next_isolated(self, h: Handle, logits: torch.Tensor) -> Event:
        """One row's token, or an error Event for that row alone: a request's own sampling values
        (say, a distribution they make non-finite) must never fail the other rows of the step."""
        try:
            return self._next(h, logits)
        except (ValueError, RuntimeError) as e:
            return Event(finish_reason="error", error=f"{type(e).__name__}: {e}")

    def _next(self, h: Handle, logits: torch.Tensor) -> Event:
        row = self.rows[h.rid]
        choice = next_tokens(row.decoding, logits, row.ids, torch.ones_like(row.ids), row.n_prompt,
                             len(h.generated), h.constraint)
        row.ids = torch.cat([row.ids, choice.tokens[:, None]], dim=1)
        event = Event(token=int(choice.tokens[0]))
        if choice.logprobs is not None:
            event.logprob = float(choice.logprobs[0])
            event.top_logprobs = ([] if choice.top_logprobs is None else
                                  list(zip(choice.top_ids[0].tolist(), choice.top_logprobs[0].tolist())))
        return event

    # ------------------------------------------------------------------ the model (told under TP)
    def prefill(self, tokens: list[int], start: int, blocks: list[int], every: bool = False,
                adapter: int = 0) -> torch.Tensor:
        """A prompt's tokens at positions [start, start + len) into its blocks, the row alone,
        attending to its tokens before them; the logits [1, 1 or len (every), V]."""
        self._tell("prefill", tokens, start, blocks, every)
        end = start + len(tokens)
        ids = torch.tensor([tokens], device=self.device)
        with self._adapters([adapter]):
            return self.model(ids, attention_mask=torch.ones(1, end, dtype=torch.long, device=self.device),
                              cache=self.cache.view([blocks], [0], decode=False),
                              cache_position=torch.arange(start, end, device=self.device),
                              logits_to_keep=0 if every else 1).logits

    def decode(self, inputs: list[int], lengths: list[int], blocks: list[list[int]],
               adapters: list[int] | None = None) -> torch.Tensor:
        """One decode step: row i feeds inputs[i] as its token lengths[i]; logits [n, V]."""
        self._tell("decode", inputs, lengths, blocks)
        t = max(lengths)
        starts = [t - n for n in lengths]
        ids = torch.tensor([[x] for x in inputs], device=self.device)
        mask = (torch.arange(t + 1, device=self.device) >= torch.tensor(starts, device=self.device)[:, None]).long()
        with self._adapters(adapters):
            return self.model(ids, attention_mask=mask, cache=self.cache.view(blocks, starts, decode=True),
                              cache_position=torch.tensor([t], device=self.device), logits_to_keep=1).logits[:, -1]

    @contextmanager
    def _adapters(self, rows: list[int] | None):
        """Each row's LoRA adapter for one forward (0 or None: the base model)."""
        if self.routing is None or not rows or not any(rows):
            yield
            return
        self.routing.rows = rows
        try:
            yield
        finally:
            self.routing.rows = None

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
