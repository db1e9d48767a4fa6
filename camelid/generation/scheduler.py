"""The engine's scheduler: requests, KV blocks, token budgets and the waiting queue, as Python
numbers. It never calls the model and holds no tensor: each step it hands the runner one Step (the
prefill chunks of joining requests and one decode step of every running one) and takes back one
Event per row (vLLM v1's schedule -> execute -> update).

Every request has a block table (generation/blocks.py): the KV blocks of the paged cache that hold
its tokens, allocated as tokens arrive and given back when it ends. A prompt is prefilled in chunks
of at most max_prefill_chunk tokens, one chunk per step beside the decode rows, so a long prompt
never pauses the running streams for more than one chunk (beside decoding rows, a chunk is sized
from the measured costs of a decode step and of a prompt token so that it takes at most STALL
decode steps: chunk_budget); its first full blocks may already be in
the cache (prefix caching), and then its prefill starts after them.

Greedy output does not depend on what else runs (batch invariance): a chunk starts at a multiple of
CHUNK_ALIGN tokens and runs the PyTorch layers, whose per-token bits are then those of the whole
prompt in one call (the linear kernels tile rows by 16 from a call's first row, attention tiles
queries by QUERY_TILE at fixed positions, core/masks.py), so a prefix hit also ends at a multiple
of CHUNK_ALIGN; decode steps run
each row alone inside one call; a cached block holds the bits the prompt's own prefill would give.
When the blocks run out, the request admitted last is preempted: its blocks go back (a later
prefix hit may find them again) and it waits at the head of the queue. When it runs again its
prompt is prefilled again, then its generated tokens are fed back one decode step at a time
(replayed, their logits unused), so its cache holds the same bits it held before.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from camelid.core.masks import QUERY_TILE
from camelid.generation.blocks import BlockManager
from camelid.generation.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, Histogram
from camelid.generation.sampling import SamplingParams, check_top_n, make_logits_processor

ROW_ALIGN = 16  # block sizes are multiples of this (the linear kernels' row tile)
CHUNK_ALIGN = math.lcm(ROW_ALIGN, QUERY_TILE)  # chunk starts (and prefix hits) are multiples of this
STALL = 2.0  # beside decoding rows, a step's prefill takes at most this many decode steps' time


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else old + weight * (new - old)


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
    # with the first token of a request that asked for prompt_logprobs: per prompt token after the
    # first, (its logprob, [(id, logprob)] of the most likely) given the tokens before it
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


_ids = itertools.count()


@dataclass(eq=False)  # compared by identity: two requests alike are still two
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
    last_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    constraint: object | None = None  # camelid.generation.grammar.JsonConstraint: mask(scores), advance(token)
    rid: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)  # its KV blocks, in token order
    computed: int = 0  # tokens of prompt + generated whose keys and values are in its blocks
    preemptions: int = 0
    prompt_logprobs: int | None = None  # top-n of each prompt token's logprobs wanted (None: none)
    adapter: int = 0  # its LoRA adapter (camelid.transforms.multi_lora; 0: the base model)
    prompt_lp: list | None = None  # what the prefill chunks found, by position (kept across a preemption)

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def salt(self) -> bytes:
        """What its KV blocks depend on besides the tokens (the adapter)."""
        return b"" if self.adapter == 0 else b"lora%d:" % self.adapter


@dataclass
class Chunk:
    """Prompt tokens [start, end) of one request into its blocks; `sample`: the chunk ends the
    prompt and its last logits give the request's first token."""
    h: Handle
    start: int
    end: int
    sample: bool


@dataclass
class Step:
    """What the runner does next: each chunk (a row alone), then one decode step of `decode`, row i
    feeding token inputs[i] at position lengths[i]; sample[i] False while a preempted row replays."""
    chunks: list[Chunk]
    decode: list[Handle]
    inputs: list[int]
    sample: list[bool]
    release: list[int]  # requests ended since the last step: the runner drops their state


class _Waiting(deque):
    def qsize(self) -> int:
        return len(self)

    def empty(self) -> bool:
        return not self


class Scheduler:
    def __init__(self, vocab_size: int, max_batch: int, max_queue: int, context: int,
                 max_total_tokens: int | None = None, num_blocks: int | None = None, block_size: int = ROW_ALIGN,
                 max_prefill_chunk: int = 256, prefix_caching: bool = True):
        if block_size < ROW_ALIGN or block_size % ROW_ALIGN:
            raise ValueError(f"block_size must be a positive multiple of {ROW_ALIGN}, got {block_size}")
        if max_prefill_chunk < CHUNK_ALIGN:
            raise ValueError(f"max_prefill_chunk must be at least {CHUNK_ALIGN} tokens, got {max_prefill_chunk}")
        self.vocab_size, self.max_batch, self.max_queue, self.context = vocab_size, max_batch, max_queue, context
        self.max_total_tokens = max_total_tokens  # prompt + max_tokens over every admitted request
        self.max_prefill_chunk = max_prefill_chunk - max_prefill_chunk % CHUNK_ALIGN
        num_blocks = num_blocks or -(-max_batch * context // block_size)  # the static cache's capacity
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.booked = 0  # that sum now
        self.adapters = 0  # LoRA adapters loaded (a request's adapter is 0..adapters)
        self.accepting = True
        self.waiting = _Waiting()
        self.rows: list[Handle] = []  # admitted (prefilling or decoding), in admission order
        self._release: list[int] = []
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "tokens": 0, "prompt_tokens": 0,
                      "errors": 0, "ttft_sum": 0.0, "ttft_count": 0, "steps": 0, "preemptions": 0,
                      "prefix_queries": 0, "prefix_hits": 0, "peak_blocks": 0}
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.decode_cost: float | None = None  # seconds of a decode step (running mean, observe())
        self.token_cost: float | None = None  # seconds per prompt token of a prefill chunk

    # ------------------------------------------------------------------ requests in
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, eos_token_ids=(),
               min_tokens: int = 0, logprobs: int | None = None, emit: Callable[[Event], None] = lambda e: None,
               constraint=None, prompt_logprobs: int | None = None, adapter: int = 0) -> Handle:
        """Queue a request; raises ValueError (bad request), QueueFull or EngineStopped.
        prompt_logprobs=n: the first token's Event also carries every prompt token's logprob and
        the n most likely tokens at its position (such a prompt is prefilled whole: no prefix hit)."""
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
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter <= self.adapters:
            raise ValueError(f"adapter {adapter!r} is not loaded ({self.adapters} adapters)")
        handle = Handle(list(prompt), max_tokens, params or SamplingParams(), frozenset(eos_token_ids), min_tokens,
                        logprobs, emit, constraint=constraint, prompt_logprobs=prompt_logprobs, adapter=adapter)
        make_logits_processor(handle.params, self.vocab_size)  # validates the parameters now
        for n in (logprobs, prompt_logprobs):
            if n is not None:
                check_top_n(n, self.vocab_size)
        if prompt_logprobs is not None:
            handle.prompt_lp = [None] * (len(prompt) - 1)
        cost = len(prompt) + max_tokens
        need = self.blocks.blocks_for(cost)
        if need > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens ({cost} tokens) needs {need} KV blocks of "
                             f"{self.blocks.block_size} tokens; the KV cache holds {self.blocks.num_blocks} "
                             f"(raise kv_cache_memory)")
        if self.max_total_tokens is not None and cost > self.max_total_tokens:
            raise ValueError(f"prompt + max_tokens ({cost}) exceeds the server's total token limit "
                             f"{self.max_total_tokens}")
        with self._lock:
            free_slots = self.max_batch - len(self.rows)
            if len(self.waiting) >= self.max_queue + max(0, free_slots):  # free slots take the first ones
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            if self.max_total_tokens is not None and self.booked + cost > self.max_total_tokens:
                raise QueueFull(f"{self.booked} tokens are booked by running and waiting requests "
                                f"(max_total_tokens {self.max_total_tokens})")
            self.booked += cost
            self.stats["requests"] += 1
            self.waiting.append(handle)
        return handle

    @property
    def running(self) -> int:
        return len(self.rows)

    def all(self) -> list[Handle]:
        with self._lock:
            return list(self.rows) + list(self.waiting)

    def finish(self, h: Handle, reason: str, error: str | None = None) -> None:
        if h.done:
            return
        h.done = True
        with self._lock:
            self.booked -= len(h.prompt) + h.max_tokens
        if h in self.rows:
            self.rows.remove(h)
        self.blocks.release(h.blocks)
        h.blocks = []
        self._release.append(h.rid)
        self.stats["finished" if reason in ("stop", "length") else "aborted"] += 1
        self.e2e.observe(time.monotonic() - h.submitted)
        h.emit(Event(finish_reason=reason, error=error))

    def fail_all(self, error: str) -> None:
        """A step raised (a bug, out of memory): every request ends with the error."""
        self.stats["errors"] += 1
        for h in self.all():
            self.finish(h, "error", error=error)
        with self._lock:
            self.waiting.clear()
        self.rows = []

    def reset_prefix_cache(self) -> None:
        self.blocks.reset()

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> Step | None:
        """The next step: every running row's decode token (growing its blocks, preempting the
        last admitted when none are left), then prefill chunks within the chunk budget, admitting
        waiting requests while slots and blocks allow. None when there is nothing to run."""
        for h in list(self.rows):
            if h.cancelled:
                self.finish(h, "abort")
        decode, inputs, sample = [], [], []
        for h in list(self.rows):
            if h not in self.rows or h.computed < len(h.prompt):
                continue
            if not self._grow(h, h.computed + 1):
                continue  # h itself was preempted
            decode.append(h)
            inputs.append((h.prompt + h.generated)[h.computed])
            sample.append(h.computed + 1 == h.tokens)
        chunks, budget = [], self.chunk_budget(bool(decode))
        for h in self.rows:
            if budget < CHUNK_ALIGN:
                break
            if h.computed < len(h.prompt):
                chunk = self._chunk(h, budget)
                if chunk is not None:
                    chunks.append(chunk)
                    budget -= chunk.end - chunk.start
        while budget >= CHUNK_ALIGN and len(self.rows) < self.max_batch and self.waiting:
            h = self.waiting[0]
            if h.cancelled:
                with self._lock:
                    self.waiting.popleft()
                self.finish(h, "abort")
                continue
            chunk = self._admit(h, budget)
            if chunk is None:
                break  # wait for blocks to come back
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        if not chunks and not decode and self.rows:  # every row is prefilling and no block is left
            self._preempt(self.rows[-1])
            return self.schedule()
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.blocks.used)
        release, self._release = self._release, []
        if not chunks and not decode:
            return Step([], [], [], [], release) if release else None
        return Step(chunks, decode, inputs, sample, release)

    # ------------------------------------------------------------------ the chunk budget
    def observe(self, step: Step, seconds: float) -> None:
        """How long `step` took (the engine's clock): the running estimates of a decode step's
        time and of a prompt token's, which size the chunks beside decoding rows."""
        tokens = sum(c.end - c.start for c in step.chunks)
        if step.decode and not tokens:
            self.decode_cost = _ema(self.decode_cost, seconds)
        elif tokens:
            base = (self.decode_cost or 0.0) if step.decode else 0.0
            self.token_cost = _ema(self.token_cost, max(seconds - base, 0.0) / tokens)

    def chunk_budget(self, decoding: bool) -> int:
        """Prompt tokens this step may prefill: max_prefill_chunk when no row decodes; beside
        decoding rows, what keeps the step within STALL decode steps (so their inter-token latency
        stays within 1 + STALL times its own), in multiples of CHUNK_ALIGN, at least one."""
        if not decoding or self.decode_cost is None or self.token_cost is None or self.token_cost <= 0:
            return self.max_prefill_chunk
        fit = int(STALL * self.decode_cost / self.token_cost)
        return max(CHUNK_ALIGN, min(self.max_prefill_chunk, fit - fit % CHUNK_ALIGN))

    def _admit(self, h: Handle, budget: int) -> Chunk | None:
        hits = self.blocks.lookup(h.prompt, h.salt) if h.prompt_logprobs is None else []
        unit = math.lcm(self.blocks.block_size, CHUNK_ALIGN) // self.blocks.block_size
        hits = hits[:len(hits) - len(hits) % unit]  # the prefill goes on from a multiple of CHUNK_ALIGN
        self.blocks.take(hits)
        h.blocks, h.computed = hits, len(hits) * self.blocks.block_size
        chunk = self._chunk(h, budget)
        if chunk is None:
            self.blocks.release(hits)
            h.blocks, h.computed = [], 0
            return None
        self.stats["prefix_queries"] += len(h.prompt)
        self.stats["prefix_hits"] += h.computed
        with self._lock:
            self.waiting.popleft()
        self.rows.append(h)
        return chunk

    def _chunk(self, h: Handle, budget: int) -> Chunk | None:
        """h's next prompt chunk within `budget` tokens (ending at a multiple of CHUNK_ALIGN unless it
        ends the prompt), its blocks allocated; None when they cannot be (nobody is preempted for a
        prefill: the decoding rows go on and give blocks back)."""
        P, start = len(h.prompt), h.computed
        end = min(P, start + budget)
        if end < P:
            end -= end % CHUNK_ALIGN
        if end <= start:
            return None
        new = self.blocks.allocate(self.blocks.blocks_for(end) - len(h.blocks))
        if new is None:
            return None
        h.blocks += new
        return Chunk(h, start, end, sample=end == P and not h.generated)

    def _grow(self, h: Handle, tokens: int) -> bool:
        """Give h blocks for `tokens` tokens, preempting the rows admitted after it (last first) when
        none are left; False when h itself had to go."""
        need = self.blocks.blocks_for(tokens) - len(h.blocks)
        while need > 0:
            new = self.blocks.allocate(need)
            if new is not None:
                h.blocks += new
                return True
            victim = self.rows[-1]
            self._preempt(victim)
            if victim is h:
                return False
        return True

    def _preempt(self, h: Handle) -> None:
        self.rows.remove(h)
        self.blocks.release(h.blocks)
        h.blocks, h.computed = [], 0
        h.preemptions += 1
        self.stats["preemptions"] += 1
        with self._lock:
            self.waiting.appendleft(h)

    # ------------------------------------------------------------------ update
    def update(self, step: Step, chunk_events: list[Event | None], decode_events: list[Event | None]) -> None:
        """Take the runner's results: advance each row, report new tokens, end the rows that are done."""
        bs = self.blocks.block_size
        for c, event in zip(step.chunks, chunk_events):
            h = c.h
            self.stats["prompt_tokens"] += c.end - c.start
            if h.done or h not in self.rows:
                continue
            h.computed = c.end
            self.blocks.register(h.blocks, h.prompt, c.end // bs, h.salt)
            if event is not None and event.prompt_logprobs is not None:  # positions c.start + 1 .. c.end - 1 + 1
                got = event.prompt_logprobs
                h.prompt_lp[c.start:c.start + len(got)] = got
                event = None if event.token is None and event.error is None else event
                if event is not None:
                    event.prompt_logprobs = list(h.prompt_lp)
            if h.cancelled:
                self.finish(h, "abort")
            elif event is not None:
                self._accept(h, event)
        if step.decode:
            self.stats["steps"] += 1
        for h, event in zip(step.decode, decode_events):
            if h.done or h not in self.rows:
                continue
            h.computed += 1
            if h.cancelled:
                self.finish(h, "abort")
            elif event is not None:
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
        now = time.monotonic()
        if h.first_token_at is None:
            h.first_token_at = now
            self.stats["ttft_sum"] += now - h.submitted
            self.stats["ttft_count"] += 1
            self.ttft.observe(now - h.submitted)
        else:
            self.itl.observe(now - h.last_token_at)
        h.last_token_at = now
        self.stats["tokens"] += 1
        h.emit(event)
        if token in h.eos:
            self.finish(h, "stop")
        elif len(h.generated) >= h.max_tokens:
            self.finish(h, "length")
