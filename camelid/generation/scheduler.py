"""The engine's scheduler: requests, slots, token budgets, the waiting queue and the cache layout,
as Python numbers. It never calls the model and holds no tensor: it hands the runner one Plan at a
time (cache moves, then a prefill or a decode step) and takes back one Event per row.

The KV cache has one row (slot) per running request and one shared clock t, the next slot index
every row writes. A request's tokens sit right-aligned in its row, in slots [start, t), with
nothing attended before `start`: to the model, the batch is a left-padded batch, which it already
computes row by row exactly as each row alone (attention_plan in core/masks.py; packed linears on
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

from camelid.generation.sampling import SamplingParams, check_top_n, make_logits_processor


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
    constraint: object | None = None  # camelid.generation.grammar.JsonConstraint: mask(scores), advance(token)


@dataclass
class Plan:
    """What the runner does next: the cache operations `ops`, in order, then one forward: the
    prefill of one joining request (its prompt into slots [t - P, t) of its row), or a decode step
    of rows 0..n-1 (each row's last token at slot t; row i attends to slots [starts[i], t])."""
    ops: list[tuple]  # ("move", src, dst, lo, hi) | ("shift", lo, hi, d)
    rows: list[Handle]  # the joining request, or the running rows in slot order
    t: int
    starts: list[int]  # the first used slot of each row in `rows`
    prefill: bool


class Scheduler:
    def __init__(self, vocab_size: int, max_batch: int, max_queue: int, context: int,
                 max_total_tokens: int | None = None):
        self.vocab_size, self.max_batch, self.max_queue, self.context = vocab_size, max_batch, max_queue, context
        self.max_total_tokens = max_total_tokens  # prompt + max_tokens over every admitted request
        self.booked = 0  # that sum now
        self.accepting = True
        self.waiting: queue.Queue[Handle] = queue.Queue()
        self.slots: list[Handle | None] = [None] * max_batch
        self.starts: list[int | None] = [None] * max_batch  # first used cache slot of each row in use
        self.t = 0
        self._ops: list[tuple] = []  # cache operations for the next plan
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "tokens": 0, "prompt_tokens": 0,
                      "errors": 0, "ttft_sum": 0.0, "ttft_count": 0, "steps": 0}

    # ------------------------------------------------------------------ requests in
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, eos_token_ids=(),
               min_tokens: int = 0, logprobs: int | None = None, emit: Callable[[Event], None] = lambda e: None,
               constraint=None) -> Handle:
        """Queue a request; raises ValueError (bad request), QueueFull or EngineStopped."""
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"length {self.context}")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        handle = Handle(list(prompt), max_tokens, params or SamplingParams(), frozenset(eos_token_ids), min_tokens,
                        logprobs, emit, constraint=constraint)
        make_logits_processor(handle.params, self.vocab_size)  # validates the parameters now
        if logprobs is not None:
            check_top_n(logprobs, self.vocab_size)
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
        return handle

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def all(self) -> list[Handle]:
        return [h for h in self.slots if h is not None] + list(self.waiting.queue)

    def finish(self, h: Handle, reason: str, error: str | None = None) -> None:
        if h.done:
            return
        h.done = True
        with self._lock:
            self.booked -= len(h.prompt) + h.max_tokens
        if h.slot is not None:
            self.slots[h.slot] = self.starts[h.slot] = None
        self.stats["finished" if reason in ("stop", "length") else "aborted"] += 1
        h.emit(Event(finish_reason=reason, error=error))

    def fail_all(self, error: str) -> None:
        """A step raised (a bug, out of memory): every request ends with the error; the cache is empty."""
        self.stats["errors"] += 1
        for h in self.all():
            self.finish(h, "error", error=error)
        while not self.waiting.empty():
            self.waiting.get_nowait()
        self.slots, self.starts = [None] * self.max_batch, [None] * self.max_batch
        self.t, self._ops = 0, []

    # ------------------------------------------------------------------ schedule
    def abort_cancelled(self) -> None:
        for h in self.slots:
            if h is not None and h.cancelled:
                self.finish(h, "abort")

    def compact(self) -> None:
        """Running rows first: the highest running row moves into the lowest free slot (only its
        used slots are copied), so a decode step computes exactly the running rows."""
        while True:
            live = [b for b, h in enumerate(self.slots) if h is not None]
            hole = self.slots.index(None) if None in self.slots else len(self.slots)
            if not live or live[-1] < hole:
                return
            src, dst = live[-1], hole
            self._ops.append(("move", src, dst, self.starts[src], self.t))
            h = self.slots[src]
            self.slots[dst], self.slots[src], h.slot = h, None, dst
            self.starts[dst], self.starts[src] = self.starts[src], None

    def next_prefill(self) -> Plan | None:
        """The next waiting request that can join now (a free slot, room in the cache), or None."""
        while None in self.slots and not self.waiting.empty():
            h = self.waiting.queue[0]
            if h.cancelled:
                self.waiting.get_nowait()
                self.finish(h, "abort")
                continue
            P = len(h.prompt)
            if not self._room(P):
                return None  # wait for running requests to finish
            self.waiting.get_nowait()
            b = self.slots.index(None)
            h.slot, self.slots[b], self.starts[b] = b, h, self.t - P
            return self._plan([h], prefill=True)
        return None

    def next_decode(self) -> Plan | None:
        """One decode step of every running row, or None when none runs."""
        if not self.running:
            return None
        if self.t + 1 > self.context:
            self._shift(-min(self._starts()))
        self.compact()  # a row that finished while admitting left a hole
        plan = self._plan(self.slots[:self.running], prefill=False)
        self.t += 1
        return plan

    def _plan(self, rows: list[Handle], prefill: bool) -> Plan:
        ops, self._ops = self._ops, []
        return Plan(ops, rows, self.t, [self.starts[h.slot] for h in rows], prefill)

    def _starts(self) -> list[int]:
        return [s for s in self.starts if s is not None]

    def _shift(self, d: int) -> None:
        """Move every row's used slots [lowest start, t) by d (right if > 0, left if < 0)."""
        self._ops.append(("shift", min(self._starts(), default=self.t), self.t, d))
        self.starts = [None if s is None else s + d for s in self.starts]
        self.t += d

    def _room(self, P: int) -> bool:
        """Make slots [t - P, t] available for a new prompt of P tokens, shifting rows if needed."""
        starts = self._starts()
        if not starts:
            self.t = P
            return True
        if self.t + 1 > self.context:  # the clock is at the end: move everything left
            self._shift(-min(starts))
        if self.t < P:
            if self.t + (P - self.t) + 1 > self.context:
                return False
            self._shift(P - self.t)
        return self.t + 1 <= self.context

    # ------------------------------------------------------------------ update
    def update(self, plan: Plan, events: list[Event]) -> None:
        """Take the runner's token of each row of `plan`: report it, end the rows that are done."""
        if plan.prefill:
            self.stats["prompt_tokens"] += len(plan.rows[0].prompt)
        else:
            self.stats["steps"] += 1
        for h, event in zip(plan.rows, events):
            if h.cancelled and not plan.prefill:
                self.finish(h, "abort")
            else:
                self._accept(h, event)

    def _accept(self, h: Handle, event: Event) -> None:
        if event.error is not None:  # this row's own step failed (runner._next_isolated)
            self.finish(h, "error", error=event.error)
            return
        token = event.token
        if h.constraint is not None:
            try:
                h.constraint.advance(token)
            except ValueError as e:
                self.finish(h, "error", error=str(e))
                return
        h.generated.append(token)
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
            self.stats["ttft_sum"] += h.first_token_at - h.submitted
            self.stats["ttft_count"] += 1
        self.stats["tokens"] += 1
        h.emit(event)
        if token in h.eos:
            self.finish(h, "stop")
        elif len(h.generated) >= h.max_tokens:
            self.finish(h, "length")
