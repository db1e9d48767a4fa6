"""From engine events to responses: each choice's text (the incremental detokenizer and the one
StopMatcher of camelid.text.streaming), whole JSON answers or server-sent events, and clients
that go away (their requests are cancelled: the engine frees the slots at its next step).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from camelid.generation.engine import Engine, EngineStopped, Event, QueueFull
from camelid.generation.sampling import SamplingParams
from camelid.serve import protocol
from camelid.serve.protocol import APIError
from camelid.text.streaming import IncrementalDecoder, StopMatcher

DISCONNECT_POLL = 0.5  # seconds between checks that the client is still there


@dataclass
class Server:
    """What every request needs: the engine, the tokenizer, the served name and the limits."""
    engine: Engine
    tokenizer: object
    model_name: str
    limit: int  # the largest max_tokens a request may ask for
    vocab_size: int
    eos: list[int]  # the ids that end a choice
    started: float = field(default_factory=time.time)
    counters: dict = field(default_factory=lambda: {"http_errors": 0, "disconnects": 0})


# ---------------------------------------------------------------------- one choice

class Choice:
    """One generated sequence: engine events -> text deltas, with stop strings cut off (text that
    could begin a stop string is held back until it cannot)."""

    def __init__(self, index: int, tokenizer, stop: list[str], prompt_ids=None, prompt_text: str | None = None):
        self.index = index
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(stop)
        self.tokens: list[int] = []
        self.logprobs: list[Event] = []
        self.finish_reason: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None
        self.prompt_ids = prompt_ids or []
        self.prompt_text = prompt_text  # echoed before the answer (completions with echo)
        self.prompt_lp = None  # the prompt tokens' logprobs, from the first event (echo + logprobs)
        self.lp_decoder, self.lp_offset = IncrementalDecoder(tokenizer), 0  # text_offset of streamed logprobs
        self.echoed = False

    @property
    def text(self) -> str:
        return self.stops.text

    def feed(self, e: Event) -> str:
        """The text that may be sent now."""
        piece = ""
        if e.prompt_logprobs is not None:
            self.prompt_lp = e.prompt_logprobs
        if e.token is not None and self.finish_reason is None:
            self.tokens.append(e.token)
            self.logprobs.append(e)
            piece = self.decoder.add(e.token)
        if e.finish_reason is not None and self.finish_reason is None:
            piece += self.decoder.flush()
            self.finish_reason = e.finish_reason  # "abort": the server ended it (shutting down), as vLLM says
        delta, hit = self.stops.feed(piece, final=self.finish_reason is not None)
        if hit:
            self.finish_reason = "stop"
        return delta


def submit(server: Server, prompt_ids, n_tokens: int, params: SamplingParams, opts: dict, logprobs,
           constraint=None, prompts=None, adapter: int = 0) -> list[Choice]:
    """Submit the request's n choices to the engine (seed + i for choice i); all or none.
    prompts: a batch of (ids, text to echo or None) instead of prompt_ids; prompt p's choices are
    indexed p * n + i, as OpenAI numbers them."""
    engine, choices = server.engine, []
    loop = asyncio.get_running_loop()
    echo = prompts is not None and opts.get("echo", False)
    try:
        for k, (ids, text) in enumerate(prompts or [(prompt_ids, None)]):
            for i in range(opts["n"]):
                c = Choice(k * opts["n"] + i, server.tokenizer, opts["stop"], ids,
                           (text if text is not None else server.tokenizer.decode(ids)) if echo else None)
                p = (params if params.seed is None or i == 0
                     else SamplingParams(**{**params.__dict__, "seed": params.seed + i}))
                c.handle = engine.submit(ids, n_tokens, p, server.eos, logprobs=logprobs,
                                         emit=lambda e, q=c.queue: loop.call_soon_threadsafe(q.put_nowait, e),
                                         constraint=constraint() if constraint else None,
                                         prompt_logprobs=logprobs if echo and logprobs is not None else None,
                                         adapter=adapter)
                choices.append(c)
    except QueueFull as e:
        for c in choices:
            engine.cancel(c.handle)
        raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", headers={"Retry-After": "1"})
    except EngineStopped as e:
        raise APIError(503, str(e), type="server_error")
    except ValueError as e:
        raise APIError(400, str(e))
    return choices


async def follow(server: Server, request, choice: Choice):
    """(text delta, event) of one choice until it ends; cancels it when the client goes away
    (checked twice a second) or a stop string matched."""
    checked = time.monotonic()
    while True:
        try:
            e = await asyncio.wait_for(choice.queue.get(), timeout=DISCONNECT_POLL)
        except asyncio.TimeoutError:
            e = None
        if time.monotonic() - checked > DISCONNECT_POLL or e is None:
            checked = time.monotonic()
            if await request.is_disconnected():
                server.counters["disconnects"] += 1
                server.engine.cancel(choice.handle)
                return
        if e is None:
            continue
        delta = choice.feed(e)
        yield delta, e
        if choice.finish_reason is not None:
            if e.finish_reason is None:
                server.engine.cancel(choice.handle)  # a stop string: free the slot now
            return


# ---------------------------------------------------------------------- one response

class Reply:
    """The response to one (chat) completion request over its choices: a JSON body, the whole
    answer as events (tool calls are known only at the end), or events as tokens arrive."""

    def __init__(self, server: Server, request, choices: list[Choice], prompt_len: int, chat: bool, logprobs: bool,
                 include_usage: bool, tool_mode=None):
        self.server, self.request, self.choices = server, request, choices
        self.prompt_len, self.chat, self.logprobs, self.include_usage = prompt_len, chat, logprobs, include_usage
        self.tool_mode = tool_mode
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        self.chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, choice_list, **extra) -> str:
        return protocol.sse({"id": self.id, "object": self.chunk_kind, "created": self.created,
                             "model": self.server.model_name, "choices": choice_list, **extra})

    def usage(self) -> dict:
        return protocol.usage(self.prompt_len, sum(len(c.tokens) for c in self.choices))

    def event_logprobs(self, c: Choice, events, whole: bool = False):
        """The logprobs object of these events of choice c: of the whole choice (whole), or the
        next of a stream (c keeps where its text has got to); an echoed prompt's tokens first."""
        if self.chat:
            return protocol.chat_logprobs(self.server.tokenizer, events)
        first = whole or not c.lp_decoder.ids
        decoder = IncrementalDecoder(self.server.tokenizer) if whole else c.lp_decoder
        prompt = (c.prompt_ids, c.prompt_lp or []) if c.prompt_text is not None and first else None
        lp, end = protocol.text_logprobs(self.server.tokenizer, events, 0 if whole else c.lp_offset, decoder, prompt)
        if not whole:
            c.lp_offset = end
        return lp

    async def finished(self) -> list[dict]:
        """Run every choice to its end; their response objects."""
        for c in self.choices:
            async for _ in follow(self.server, self.request, c):
                pass
        out = []
        for c in self.choices:
            lp = self.event_logprobs(c, c.logprobs, whole=True) if self.logprobs else None
            if self.chat:
                msg, reason = protocol.message(c.text, c.finish_reason, self.tool_mode)
                out.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": reason})
            else:
                out.append({"index": c.index, "text": (c.prompt_text or "") + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        return out

    def body(self, out: list[dict]) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.server.model_name,
                "choices": out, "usage": self.usage()}

    def whole(self, out: list[dict]):
        """Finished chat choices as events: each one's whole message, then its finish_reason."""
        for o in out:
            msg = o["message"]
            delta = {"role": "assistant", "content": msg["content"]}
            if msg.get("tool_calls"):
                delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(msg["tool_calls"])]
            yield self.chunk([{"index": o["index"], "delta": delta, "logprobs": o["logprobs"], "finish_reason": None}])
            yield self.chunk([{"index": o["index"], "delta": {}, "logprobs": None, "finish_reason": o["finish_reason"]}])
        if self.include_usage:
            yield self.chunk([], usage=self.usage())
        yield protocol.DONE

    async def events(self):
        """Each choice's deltas as they come (choices interleaved), each one's closing chunk, usage
        when asked, [DONE]. Whatever ends the stream (the client too) cancels what still runs."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(c):
            try:
                async for delta, e in follow(self.server, self.request, c):
                    await merged.put((c, delta, e))
            finally:
                await merged.put((c, None, None))

        chat, tasks = self.chat, []
        try:
            if chat:
                for c in self.choices:
                    yield self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}])
            tasks = [asyncio.create_task(pump(c)) for c in self.choices]
            open_ = len(self.choices)
            while open_:
                c, delta, e = await merged.get()
                if e is None:  # this choice has ended: its closing chunk
                    open_ -= 1
                    if c.finish_reason is not None:
                        yield self.chunk([{"index": c.index, **({"delta": {}} if chat else {"text": ""}),
                                           "logprobs": None, "finish_reason": c.finish_reason}])
                    continue
                lp = self.event_logprobs(c, [e]) if self.logprobs and e.token is not None else None
                if c.prompt_text is not None and e.token is not None and not c.echoed:  # echo: the prompt first
                    delta, c.echoed = c.prompt_text + delta, True
                if delta or lp:
                    yield self.chunk([{"index": c.index, **({"delta": {"content": delta}} if chat else {"text": delta}),
                                       "logprobs": lp, "finish_reason": None}])
            if self.include_usage:
                yield self.chunk([], usage=self.usage())
            yield protocol.DONE
        finally:  # also when the client went away and the response was cancelled
            for c in self.choices:
                if c.finish_reason is None:
                    self.server.engine.cancel(c.handle)
            for t in tasks:
                t.cancel()


async def respond(server: Server, request, body: dict, prompt_ids, chat: bool, logprobs, top_logprobs,
                  constraint=None, tool_mode=None, prompts=None, echo: bool = False, adapter: int = 0):
    """Check the generation fields, submit the choices, and answer: JSON, or an event stream.
    prompts: a completions batch of (ids, text), in place of prompt_ids; echo: the prompt comes
    back before each answer (with its tokens' logprobs when logprobs are asked)."""
    from fastapi.responses import JSONResponse, StreamingResponse

    params, opts = protocol.sampling_fields(body, server.vocab_size)
    opts["echo"] = echo
    if tool_mode is not None and tool_mode[0] not in ("none", "auto"):
        opts["stop"] = []  # a forced call is decoded under its schema, which ends it: a stop string would cut it
    context = server.engine.context
    batch = prompts or [(prompt_ids, None)]
    longest = max(len(ids) for ids, _ in batch)
    n_tokens = protocol.max_tokens(body, longest, default=context - longest if chat else 16,
                                   limit=server.limit, context=context)
    n_tokens = min(n_tokens, server.limit)
    choices = submit(server, prompt_ids, n_tokens, params, opts, top_logprobs if logprobs else None, constraint,
                     prompts, adapter)
    reply = Reply(server, request, choices, sum(len(ids) for ids, _ in batch), chat, logprobs,
                  opts["include_usage"], tool_mode)
    with_tools = tool_mode is not None and tool_mode[0] != "none"
    if not opts["stream"] or with_tools:  # a tool call is known only at the end: streamed whole
        out = await reply.finished()
        if not opts["stream"]:
            return JSONResponse(reply.body(out))
        return StreamingResponse(reply.whole(out), media_type="text/event-stream")
    return StreamingResponse(reply.events(), media_type="text/event-stream")
