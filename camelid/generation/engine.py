"""Continuous batching: requests join and leave a running batch between decode steps.

    engine = Engine(model, max_batch=8, max_queue=64)
    engine.start()                                   # a background thread runs the steps
    handle = engine.submit(prompt_ids, max_tokens=64, params=SamplingParams(), eos_token_ids=[2],
                           emit=callback)            # callback(Event) per token, then a final one
    engine.cancel(handle)                            # e.g. the client went away: slot freed next step
    engine.begin_shutdown(grace=30)                  # SIGTERM: refuse new requests, abort the rest at 30 s
    engine.stop()

The engine is a loop over two parts (as vLLM v1 splits it):
  - the Scheduler (generation/scheduler.py): requests, KV blocks (generation/blocks.py: block
    tables, prefix caching), budgets and the queue, as Python numbers; it never calls the model.
  - the Runner (generation/runner.py): the only caller of the model; it owns the paged KV cache
    and runs each Step (prefill chunks, one decode step, then the next-token step of each row).
A step is schedule -> execute -> update: every running row's next token and the prefill chunks of
joining requests (at most max_prefill_chunk tokens), so a long prompt never stalls the streams.

    Engine(model, kv_cache_memory="512MiB" | "65536tokens", max_prefill_chunk=256, prefix_caching=True,
           kv_cache="int8" | "float16" | ...)
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from camelid.generation.runner import Runner
from camelid.generation.sampling import SamplingParams
from camelid.generation.scheduler import EngineStopped, Event, Handle, QueueFull, Scheduler

__all__ = ["Engine", "EngineStopped", "Event", "Handle", "QueueFull"]


def kv_blocks(model, kv_cache_memory, block_size: int, kind: str | None) -> int | None:
    """The number of KV blocks a budget buys: kv_cache_memory is bytes (an int, or "512MiB", "2GB"),
    tokens ("65536tokens"), or None (the engine's default: max_batch x context tokens)."""
    if kv_cache_memory is None:
        return None
    from camelid.core.cache import PagedKVCache

    n, unit = parse_budget(kv_cache_memory)
    if unit == "tokens":
        blocks = n // block_size
    else:
        one = PagedKVCache(model.config, 1, block_size, model.dtype, "meta",
                           kind if kind is not None else getattr(model, "cache_dtype", None))
        blocks = n // one.block_nbytes()
    if blocks < 1:
        raise ValueError(f"kv_cache_memory {kv_cache_memory!r} holds no KV block of {block_size} tokens")
    return blocks


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(value) -> tuple[int, str]:
    """(n, "bytes" | "tokens") of 1073741824, "1GiB", "512MB", "65536tokens"."""
    import re

    if isinstance(value, int) and not isinstance(value, bool):
        n, unit = value, "bytes"
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        u = m.group(2).lower() if m else None
        if m is None or (u not in _UNITS and u not in ("t", "tok", "tokens")):
            raise ValueError(f"kv_cache_memory must be bytes (1073741824, 512MiB, 2GB) or tokens (65536tokens), "
                             f"got {value!r}")
        n, unit = (int(float(m.group(1)) * _UNITS[u]), "bytes") if u in _UNITS else (int(float(m.group(1))), "tokens")
    if n <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {value!r}")
    return n, unit


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 max_total_tokens: int | None = None, kv_cache_memory=None, block_size: int = 16,
                 max_prefill_chunk: int = 256, prefix_caching: bool = True, kv_cache: str | None = None,
                 adapters: dict | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.config = model.config
        self.context = min(context or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.max_batch, self.max_queue, self.max_total_tokens = max_batch, max_queue, max_total_tokens
        num_blocks = kv_blocks(model, kv_cache_memory, block_size, kv_cache)
        if num_blocks is not None and num_blocks * block_size < self.context:
            raise ValueError(f"kv_cache_memory {kv_cache_memory!r} holds {num_blocks * block_size} tokens, fewer than "
                             f"one request of the context length {self.context}: raise kv_cache_memory or lower "
                             f"the context")
        self.scheduler = Scheduler(self.config.vocab_size, max_batch, max_queue, self.context, max_total_tokens,
                                   num_blocks, block_size, max_prefill_chunk, prefix_caching)
        self.routing = None
        if adapters:  # name -> LoRA folder, chosen per request (camelid.transforms.multi_lora)
            from camelid.transforms.multi_lora import attach_adapters

            self.routing = attach_adapters(self.model, adapters)
            self.scheduler.adapters = len(self.routing.names)
        self.runner = Runner(self.model, self.scheduler.blocks.num_blocks, block_size, kv_cache)
        self._between: list = []  # (fn, done event, result box): run by the engine thread between steps
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None
        self._reset = False

    # ------------------------------------------------------------------ the caller's side
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, eos_token_ids=(),
               min_tokens: int = 0, logprobs: int | None = None, emit: Callable[[Event], None] = lambda e: None,
               constraint=None, prompt_logprobs: int | None = None, adapter: int = 0) -> Handle:
        """Queue a request; raises ValueError (bad request), QueueFull or EngineStopped.
        prompt_logprobs=n: the first token's Event carries each prompt token's logprob (Scheduler.submit);
        adapter: the index of a loaded LoRA adapter (adapter_index(name)), 0 the base model."""
        handle = self.scheduler.submit(prompt, max_tokens, params, eos_token_ids, min_tokens, logprobs, emit,
                                       constraint, prompt_logprobs, adapter)
        self._wake.set()
        return handle

    @property
    def adapter_names(self) -> list[str]:
        return list(self.routing.names) if self.routing is not None else []

    def adapter_index(self, name: str) -> int:
        """The index of a loaded adapter; ValueError naming the ones there are."""
        if name not in self.adapter_names:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(self.adapter_names) or 'none'})")
        return self.routing.index(name)

    def load_adapter(self, name: str, directory, timeout: float = 120) -> int:
        """Load a LoRA adapter while the engine runs (between two steps); its index."""
        def load():
            from camelid.transforms.multi_lora import attach_adapters

            if self.routing is None:
                self.routing = attach_adapters(self.model)
                self.runner.routing = self.routing
            index = self.routing.add(name, directory)
            self.scheduler.adapters = len(self.routing.names)
            return index

        if self._thread is None or not self._thread.is_alive():
            return load()
        done, box = threading.Event(), []
        self._between.append((load, done, box))
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError(f"loading adapter {name!r} did not finish in {timeout} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def cancel(self, handle: Handle) -> None:
        """End a request at the next step (its slot is freed; it gets an "abort" event)."""
        handle.cancelled = True
        self._wake.set()

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def stats(self) -> dict:
        return self.scheduler.stats

    @property
    def booked(self) -> int:
        return self.scheduler.booked

    @property
    def accepting(self) -> bool:
        return self.scheduler.accepting

    _accepting = accepting  # the name camelid.serve read before the split

    @property
    def cache(self):
        return self.runner.cache

    def start(self) -> "Engine":
        """Start the engine thread (a second call while it runs changes nothing)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="camelid-engine", daemon=True)
            self._thread.start()
        return self

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new requests now; let the running and waiting ones go on for `grace` seconds,
        then end every one still unfinished with an "abort" event (a server's streams then close
        with a final chunk instead of being cut). Returns at once; a second call changes nothing."""
        self.scheduler.accepting = False
        if self._deadline is None:
            self._deadline = threading.Timer(max(0.0, grace), self.abort_all)
            self._deadline.daemon = True
            self._deadline.start()

    def abort_all(self) -> None:
        """End every running and waiting request at the next step ("abort" events)."""
        for h in self.scheduler.all():
            h.cancelled = True
        self._wake.set()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the running and waiting ones (drain) or abort them."""
        self.scheduler.accepting = False
        if not drain:
            self.abort_all()
        if self._deadline is not None:
            self._deadline.cancel()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.runner.tp and self.runner.leader:
            self.runner.stop_followers()

    def follow(self) -> None:
        """Ranks > 0 of a tensor-parallel engine: replay rank 0's operations until it stops."""
        self.runner.follow()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            while self._between:
                fn, done, box = self._between.pop(0)
                try:
                    box.append(fn())
                except Exception as e:  # a bad adapter folder: the caller gets the error, the engine goes on
                    box.append(e)
                done.set()
            if not self.running and self.waiting.empty():
                if self._stop.is_set():
                    return
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                if self._reset:
                    self._reset = False
                    self.scheduler.reset_prefix_cache()
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # a bug or an out-of-memory: fail the requests, keep serving
                self.scheduler.fail_all(f"{type(e).__name__}: {e}")
                self.runner.rows.clear()

    def step(self) -> None:
        """schedule -> execute -> update: the decode token of every running row and the prefill
        chunks the budget allows, in one step."""
        step = self.scheduler.schedule()
        if step is not None:
            t = time.perf_counter()
            events = self.runner.execute(step)
            self.scheduler.observe(step, time.perf_counter() - t)
            self.scheduler.update(step, *events)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (takes effect between steps)."""
        self._reset = True
        self._wake.set()

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
