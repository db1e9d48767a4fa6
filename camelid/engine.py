"""Continuous batching: requests join and leave a running batch between decode steps.

    engine = Engine(model, max_batch=8, max_queue=64)
    engine.start()                                   # a background thread runs the steps
    handle = engine.submit(prompt_ids, max_tokens=64, params=SamplingParams(), eos_token_ids=[2],
                           emit=callback)            # callback(Event) per token, then a final one
    engine.cancel(handle)                            # e.g. the client went away: slot freed next step
    engine.stop()

The KV cache has one row (slot) per running request and one shared clock t, the next slot index
every row writes. A request's tokens sit right-aligned in its row, in slots [start, t), with the
attention mask 0 before `start`: to the model, the batch is a left-padded batch, which it already
computes row by row exactly as each row alone (attention_plan in model.py; packed linears on
CPU give every row the same bits at any batch size). So greedy output does not depend on what
else is running.

    slot:   0  1  2  3  4  5  6  7  8        t = 9
    row 0   .  .  a  a  a  a  a  a  a        started at 2
    row 1   .  .  .  .  .  .  b  b  b        joined later (prefill alone into slots 6..8)
    row 2   (free)

Running rows are kept first (a finished row's slot is refilled by moving the last running row
into it), so a decode step computes exactly the running rows. A new request is prefilled alone
into its row, between decode steps. If its prompt is longer than t, every row shifts right; when
t reaches the end of the cache, every row shifts left by the smallest start. Moves and shifts copy
only used slots and change no value: RoPE positions count real tokens.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import KVCache, layer_devices
from .sampling import SamplingParams, logprobs as token_logprobs, make_generator, make_logits_processor, make_sampler


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue: try again later (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


@dataclass
class Event:
    """One generated token (token is not None), or the end of a request (finish_reason set)."""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass
class Handle:
    """A submitted request and its running state (the engine thread owns the state)."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    eos: frozenset
    min_tokens: int
    logprobs: int | None
    emit: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    slot: int | None = None
    constraint: object | None = None  # camelid.grammar.JsonConstraint: mask(scores), advance(token)


class _RowCache:
    """The KVCache interface over rows [first, last) of the engine's cache (views: writes go through)."""

    def __init__(self, cache: KVCache, first: int, last: int):
        self.k = [t[first:last] for t in cache.k]
        self.v = [t[first:last] for t in cache.v]
        self.batch_size, self.max_seq_len = last - first, cache.max_seq_len

    update = KVCache.update


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 max_total_tokens: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.config = model.config
        self.context = min(context or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_total_tokens = max_total_tokens  # prompt + max_tokens over every admitted request
        self.booked = 0  # that sum now
        self._lock = threading.Lock()
        self.cache = KVCache(self.config, max_batch, self.context, dtype=model.dtype, device=layer_devices(model))
        self.mask = torch.zeros(max_batch, self.context, dtype=torch.long, device=model.device)
        self.slots: list[Handle | None] = [None] * max_batch
        self.t = 0
        # Tensor parallel (camelid.distributed): rank 0 decides and tells the other ranks every
        # cache operation and forward pass, which they replay on their shards (follow()).
        self.tp = getattr(model, "tp_world", 1) > 1
        self.leader = not self.tp or model.tp_rank == 0
        self.waiting: queue.Queue[Handle] = queue.Queue()
        self._state: dict[int, dict] = {}  # slot -> sampling state
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "tokens": 0, "prompt_tokens": 0,
                      "errors": 0, "ttft_sum": 0.0, "ttft_count": 0, "steps": 0}

    # ------------------------------------------------------------------ the caller's side
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, eos_token_ids=(),
               min_tokens: int = 0, logprobs: int | None = None, emit: Callable[[Event], None] = lambda e: None,
               constraint=None) -> Handle:
        """Queue a request; raises ValueError (bad request), QueueFull or EngineStopped."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"length {self.context}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        handle = Handle(list(prompt), max_tokens, params or SamplingParams(), frozenset(eos_token_ids), min_tokens,
                        logprobs, emit, constraint=constraint)
        make_logits_processor(handle.params, self.config.vocab_size)  # validates the parameters now
        if logprobs is not None:
            token_logprobs(torch.zeros(1, self.config.vocab_size), torch.zeros(1, dtype=torch.long), logprobs)
        cost = len(prompt) + max_tokens
        if self.max_total_tokens is not None and cost > self.max_total_tokens:
            raise ValueError(f"prompt + max_tokens ({cost}) exceeds the server's total token limit "
                             f"{self.max_total_tokens}")
        with self._lock:
            if self.waiting.qsize() >= self.max_queue + self.slots.count(None):  # free slots take the first ones
                raise QueueFull(f"{self.waiting.qsize()} requests are waiting (max_queue {self.max_queue})")
            if self.max_total_tokens is not None and self.booked + cost > self.max_total_tokens:
                raise QueueFull(f"{self.booked} tokens are booked by running and waiting requests "
                                f"(max_total_tokens {self.max_total_tokens})")
            self.booked += cost
            self.stats["requests"] += 1
            self.waiting.put(handle)
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        """End a request at the next step (its slot is freed; it gets an "abort" event)."""
        handle.cancelled = True
        self._wake.set()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="camelid-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the running and waiting ones (drain) or abort them."""
        self._accepting = False
        if not drain:
            for h in self._all():
                h.cancelled = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.tp and self.leader:
            self._tell("stop")

    def _all(self) -> list[Handle]:
        return [h for h in self.slots if h is not None] + list(self.waiting.queue)

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            if not self.running and self.waiting.empty():
                if self._stop.is_set():
                    return
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # a bug or an out-of-memory: fail the requests, keep serving
                self.stats["errors"] += 1
                for h in self._all():
                    self._finish(h, "error", error=f"{type(e).__name__}: {e}")
                while not self.waiting.empty():
                    self.waiting.get_nowait()
                self._state.clear()
                self.slots = [None] * self.max_batch
                self._reset(0)

    def step(self) -> None:
        """Free finished slots, admit waiting requests (prefill), then one decode step for all."""
        for b, h in enumerate(self.slots):
            if h is not None and h.cancelled:
                self._finish(h, "abort")
        self._compact()
        self._admit()
        if not self.running:
            return
        self._decode()

    def _finish(self, h: Handle, reason: str, error: str | None = None) -> None:
        if h.done:
            return
        h.done = True
        with self._lock:
            self.booked -= len(h.prompt) + h.max_tokens
        if h.slot is not None:
            self.slots[h.slot] = None
            self._free(h.slot)
            self._state.pop(h.slot, None)
        self.stats["finished" if reason in ("stop", "length") else "aborted"] += 1
        h.emit(Event(finish_reason=reason, error=error))

    # ------------------------------------------------------------------ cache operations (replayed under TP)
    def _tell(self, op: str, *args) -> None:
        if self.tp and self.leader:
            import torch.distributed as dist

            dist.broadcast_object_list([(op, args)], src=0)

    def follow(self) -> None:
        """Ranks > 0 of a tensor-parallel engine: replay rank 0's operations until it stops."""
        import torch.distributed as dist

        with torch.inference_mode():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                op, args = box[0]
                if op == "stop":
                    return
                getattr(self, f"_{op}")(*args)

    def _free(self, b: int) -> None:
        self._tell("free", b)
        self.mask[b].zero_()

    def _reset(self, t: int) -> None:
        self._tell("reset", t)
        self.mask.zero_()
        self.t = t

    def _prefill(self, b: int, prompt: list[int]) -> torch.Tensor:
        """The prompt of row b into slots [t - P, t); its last logits [1, V]."""
        self._tell("prefill", b, prompt)
        P = len(prompt)
        self.mask[b].zero_()
        self.mask[b, self.t - P:self.t] = 1
        ids = torch.tensor([prompt], device=self.model.device)
        return self.model(ids, attention_mask=self.mask[b:b + 1, :self.t], cache=_RowCache(self.cache, b, b + 1),
                          cache_position=torch.arange(self.t - P, self.t, device=ids.device),
                          logits_to_keep=1).logits[:, -1]

    def _step(self, last: list[int]) -> torch.Tensor:
        """One decode step of rows 0..n-1 (their last tokens); logits [n, V]."""
        self._tell("step", last)
        n = len(last)
        ids = torch.tensor([[t] for t in last], device=self.model.device)
        self.mask[:n, self.t] = 1
        logits = self.model(ids, attention_mask=self.mask[:n, :self.t + 1], cache=_RowCache(self.cache, 0, n),
                            cache_position=torch.tensor([self.t], device=ids.device), logits_to_keep=1).logits[:, -1]
        self.t += 1
        return logits

    def _move(self, src: int, dst: int) -> None:
        """Row src's used slots and mask into row dst."""
        self._tell("move", src, dst)
        lo = int(self.mask[src, :self.t].argmax())
        for t in self.cache.k + self.cache.v:
            t[dst, :, lo:self.t] = t[src, :, lo:self.t]
        self.mask[dst] = self.mask[src]
        self.mask[src].zero_()

    def _shift(self, d: int) -> None:
        """Move every row's used slots [lowest start, t) by d (right if > 0, left if < 0)."""
        self._tell("shift", d)
        lo, hi = min(self._starts(), default=self.t), self.t
        for t in self.cache.k + self.cache.v:
            t[:, :, lo + d:hi + d] = t[:, :, lo:hi].clone()
        window = self.mask[:, lo:hi].clone()
        self.mask.zero_()
        self.mask[:, lo + d:hi + d] = window
        self.t += d

    def _compact(self) -> None:
        """Running rows first: the highest running row moves into the lowest free slot (only its
        used slots are copied), so a decode step computes exactly the running rows."""
        while True:
            live = [b for b, h in enumerate(self.slots) if h is not None]
            hole = self.slots.index(None) if None in self.slots else len(self.slots)
            if not live or live[-1] < hole:
                return
            src, dst = live[-1], hole
            self._move(src, dst)
            h = self.slots[src]
            self.slots[dst], self.slots[src], h.slot = h, None, dst
            self._state[dst] = self._state.pop(src)

    def _starts(self) -> list[int]:
        """The first used slot of every row in use (read from the mask: the same on every rank)."""
        used = self.mask[:, :self.t].any(-1).nonzero().flatten().tolist()
        return [int(self.mask[b, :self.t].argmax()) for b in used]

    def _room(self, P: int) -> bool:
        """Make slots [t - P, t] available for a new prompt of P tokens, shifting rows if needed."""
        starts = self._starts()
        if not starts:
            self._reset(P)
            return True
        if self.t + 1 > self.context:  # the clock is at the end: move everything left
            self._shift(-min(starts))
            starts = self._starts()
        if self.t < P:
            if self.t + (P - self.t) + 1 > self.context:
                return False
            self._shift(P - self.t)
        return self.t + 1 <= self.context

    def _admit(self) -> None:
        while None in self.slots and not self.waiting.empty():
            h = self.waiting.queue[0]
            if h.cancelled:
                self.waiting.get_nowait()
                self._finish(h, "abort")
                continue
            P = len(h.prompt)
            if not self._room(P):
                return  # wait for running requests to finish
            self.waiting.get_nowait()
            b = self.slots.index(None)
            h.slot, self.slots[b] = b, h
            logits = self._prefill(b, h.prompt)
            ids = torch.tensor([h.prompt], device=logits.device)
            self._state[b] = {"process": make_logits_processor(h.params, self.config.vocab_size),
                              "sample": make_sampler(h.params), "rng": make_generator(h.params.seed, ids.device),
                              "logits": logits, "tokens": ids}
            self.stats["prompt_tokens"] += P
            self._emit_next(h, b)

    def _emit_next(self, h: Handle, b: int) -> None:
        """Sample this row's next token from its pending logits and report it; finish if done."""
        st = self._state[b]
        tokens = st["tokens"]
        mask = torch.ones_like(tokens)
        n_prompt = torch.tensor([len(h.prompt)], device=tokens.device)
        scores = st["process"](st["logits"].float(), tokens, mask, n_prompt)
        if len(h.generated) < h.min_tokens and h.eos:
            scores = scores.clone()
            scores[:, sorted(h.eos)] = float("-inf")
        if h.constraint is not None:
            scores = h.constraint.mask(scores)
        nxt = st["sample"](scores, st["rng"])
        token = int(nxt[0])
        if h.constraint is not None:
            try:
                h.constraint.advance(token)
            except ValueError as e:
                self._finish(h, "error", error=str(e))
                return
        event = Event(token=token)
        if h.logprobs is not None:
            chosen, values, ids = token_logprobs(st["logits"], nxt, h.logprobs)
            event.logprob = float(chosen[0])
            event.top_logprobs = list(zip(ids[0].tolist(), values[0].tolist())) if values is not None else []
        h.generated.append(token)
        st["tokens"] = torch.cat([tokens, nxt[:, None]], dim=1)
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
            self.stats["ttft_sum"] += h.first_token_at - h.submitted
            self.stats["ttft_count"] += 1
        self.stats["tokens"] += 1
        h.emit(event)
        if token in h.eos:
            self._finish(h, "stop")
        elif len(h.generated) >= h.max_tokens:
            self._finish(h, "length")

    def _decode(self) -> None:
        if self.t + 1 > self.context:
            self._shift(-min(self._starts()))
        self._compact()  # a row that finished while admitting left a hole
        live = list(range(self.running))  # rows 0..n-1 (compact)
        logits = self._step([self.slots[b].generated[-1] for b in live])
        self.stats["steps"] += 1
        for b in live:
            h = self.slots[b]
            if h.cancelled:
                self._finish(h, "abort")
                continue
            self._state[b]["logits"] = logits[b:b + 1]
            self._emit_next(h, b)

    # ------------------------------------------------------------------ a blocking convenience
    def generate(self, prompt: list[int], max_tokens: int, **kwargs) -> tuple[list[int], str]:
        """Submit and wait: (tokens, finish_reason). The engine must be started."""
        done = threading.Event()
        out: list[int] = []
        reason: list[str] = []

        def emit(e: Event):
            if e.token is not None:
                out.append(e.token)
            if e.finish_reason is not None:
                reason.append(e.finish_reason if e.error is None else f"error: {e.error}")
                done.set()

        self.submit(prompt, max_tokens, emit=emit, **kwargs)
        done.wait()
        return out, reason[0]
