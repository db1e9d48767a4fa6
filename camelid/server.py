"""An OpenAI-compatible HTTP server on FastAPI + uvicorn, over the continuous-batching engine.

    camelid serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] [--max-batch 8] [--max-queue 64]

Routes: GET /health (no key needed), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (JSON, or server-sent events ending with `data: [DONE]` when "stream": true),
GET /metrics (Prometheus text). Errors are OpenAI-shaped JSON, never a 500 for bad input:

    400 the body is not JSON / not an object / nested too deep, or a field is invalid
    401 missing or wrong API key (compared in constant time; every route but /health)
    404 unknown route or model        413 body too large        429 queue full (Retry-After)
    503 shutting down

A client that disconnects has its requests cancelled: the engine frees their slots at its next
step. On SIGTERM uvicorn stops accepting connections and the engine finishes what is running.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.

import asyncio
import hmac
import json
import math
import time
import uuid

from . import tools
from .engine import Engine, EngineStopped, Event, QueueFull
from .sampling import MAX_TOP_LOGPROBS, SamplingParams
from .tokenizer import IncrementalDecoder

MAX_BODY = 1 << 20  # bytes
MAX_DEPTH = 32  # JSON nesting
MAX_N = 8
MAX_STOP = 4  # stop strings, as OpenAI


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type, headers or {}


def _depth(x, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping at limit + 1 (iterative: no recursion to exhaust)."""
    stack, deepest = [(x, 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the JSON body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    if _depth(body, MAX_DEPTH) > MAX_DEPTH:
        raise APIError(400, f"the JSON body is nested deeper than {MAX_DEPTH} levels")
    return body


# ---------------------------------------------------------------------- request fields

def _field(body, name, kinds, default=None, check=None, want=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise APIError(400, f"'{name}' must be {want or ' or '.join(k.__name__ for k in kinds)}, got {v!r:.80}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a finite number, got {v}", name)
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' must be {want}, got {v!r:.80}", name)
    return v


def sampling_fields(body: dict, vocab_size: int) -> tuple[SamplingParams, dict]:
    """SamplingParams and the other generation fields of a (chat) completion request."""
    num = (int, float)
    temperature = _field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    freq = _field(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    pres = _field(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    seed = _field(body, "seed", (int,), None, lambda v: -(2**63) <= v < 2**63, "a 64-bit integer")
    bias = _field(body, "logit_bias", (dict,), None)
    if bias is not None:
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
        bad = [k for k, v in bias.items() if not 0 <= k < vocab_size or not -100 <= v <= 100]
        if bad:
            raise APIError(400, f"'logit_bias' has token {bad[0]} outside [0, {vocab_size}) or a bias outside "
                                f"[-100, 100]", "logit_bias")
    n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), None)
    include_usage = bool(options and options.get("include_usage"))
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature, top_p=top_p, frequency_penalty=freq,
                            presence_penalty=pres, logit_bias=bias or None, seed=seed)
    return params, {"n": n, "stop": stop or [], "stream": stream, "include_usage": include_usage}


# ---------------------------------------------------------------------- one choice

class Choice:
    """One generated sequence: engine events -> text deltas, with stop strings cut off (text that
    could begin a stop string is held back until it cannot)."""

    def __init__(self, index: int, tokenizer, stop: list[str]):
        self.index, self.stop = index, stop
        self.decoder = IncrementalDecoder(tokenizer)
        self.text, self.sent = "", 0
        self.tokens: list[int] = []
        self.logprobs: list[Event] = []
        self.finish_reason: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None

    def feed(self, e: Event) -> str:
        """The text that may be sent now."""
        if e.token is not None and self.finish_reason is None:
            self.tokens.append(e.token)
            self.logprobs.append(e)
            self.text += self.decoder.add(e.token)
        if e.finish_reason is not None and self.finish_reason is None:
            self.text += self.decoder.flush()
            self.finish_reason = "stop" if e.finish_reason in ("stop", "abort") else e.finish_reason
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        ready = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:ready], ready
        return delta


# ---------------------------------------------------------------------- the app

def create_app(model, tokenizer, model_name: str = "camelid", api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_tokens_limit: int | None = None, context: int | None = None,
               max_total_tokens: int | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, context=context, max_total_tokens=max_total_tokens)
    limit = max_tokens_limit or engine.context
    eos = tokenizer.eos_token_ids
    started = time.time()
    counters = {"http_errors": 0, "disconnects": 0}

    async def lifespan(app):
        engine.start()
        yield
        engine.stop(drain=True, timeout=30)

    app = FastAPI(title="camelid", lifespan=lifespan)
    app.state.engine = engine

    def error(e: APIError):
        counters["http_errors"] += 1
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if request.url.path != "/health" and api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                   type="authentication_error")
            return await call_next(request)
        except APIError as e:
            return error(e)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(404)
    async def not_found(request, e):
        return error(APIError(404, f"no route {request.method} {request.url.path}", type="not_found_error"))

    @app.exception_handler(405)
    async def not_allowed(request, e):
        return error(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            raise APIError(413, f"the body is larger than {MAX_BODY} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise APIError(413, f"the body is larger than {MAX_BODY} bytes")
        return parse_body(bytes(raw))

    def check_model(body):
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError(400, "'model' is required and must be a string", "model")
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           type="not_found_error")

    def max_tokens(body, prompt_len, default):
        n = _field(body, "max_completion_tokens", (int,), None)
        n = _field(body, "max_tokens", (int,), None) if n is None else n
        n = default if n is None else n
        if n < 1:
            raise APIError(400, f"'max_tokens' must be at least 1, got {n}", "max_tokens")
        if n > limit:
            raise APIError(400, f"'max_tokens' {n} exceeds this server's limit {limit}", "max_tokens")
        if prompt_len + n > engine.context:
            raise APIError(400, f"this model's context length is {engine.context} tokens; the prompt has "
                                f"{prompt_len} and max_tokens asks for {n} more", "max_tokens",
                           type="context_length_exceeded")
        return n

    def start(prompt_ids, n_tokens, params, opts, logprobs, constraint=None):
        choices = []
        loop = asyncio.get_running_loop()
        try:
            for i in range(opts["n"]):
                c = Choice(i, tokenizer, opts["stop"])
                p = params if params.seed is None or i == 0 else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                c.handle = engine.submit(prompt_ids, n_tokens, p, eos, logprobs=logprobs,
                                         emit=lambda e, q=c.queue: loop.call_soon_threadsafe(q.put_nowait, e),
                                         constraint=constraint() if constraint else None)
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

    async def run(request, choice: Choice):
        """(text delta, event) of one choice until it ends; cancels it when the client goes away
        (checked twice a second) or a stop string matched."""
        checked = time.monotonic()
        while True:
            try:
                e = await asyncio.wait_for(choice.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                e = None
            if time.monotonic() - checked > 0.5 or e is None:
                checked = time.monotonic()
                if await request.is_disconnected():
                    counters["disconnects"] += 1
                    engine.cancel(choice.handle)
                    return
            if e is None:
                continue
            delta = choice.feed(e)
            yield delta, e
            if choice.finish_reason is not None:
                if e.finish_reason is None:
                    engine.cancel(choice.handle)  # a stop string: free the slot now
                return

    def usage(prompt_len, choices):
        done = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}

    def token_text(t):
        return tokenizer.decode([t])

    def chat_logprobs(c: Choice):
        return {"content": [{"token": token_text(e.token), "logprob": e.logprob, "bytes": list(token_text(e.token).encode()),
                             "top_logprobs": [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                                              for t, lp in (e.top_logprobs or [])]} for e in c.logprobs]}

    def text_logprobs(c: Choice):
        return {"tokens": [token_text(e.token) for e in c.logprobs], "token_logprobs": [e.logprob for e in c.logprobs],
                "top_logprobs": [{token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in c.logprobs],
                "text_offset": []}

    def message(c: Choice, tool_mode):
        """The chat message of a finished choice: content, or tool_calls when the answer is a call."""
        choice, tool_list = tool_mode or ("none", [])
        calls = None
        if choice not in ("none", "auto") and c.finish_reason == "stop":
            call = json.loads(c.text)  # decoded under the call's schema: it parses
            calls = tools.as_tool_calls([call])
        elif choice == "auto":
            calls = tools.parse_tool_calls(c.text, tool_list)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": c.text}, c.finish_reason

    async def respond(request, body, prompt_ids, chat: bool, logprobs, top_logprobs, constraint=None, tool_mode=None):
        params, opts = sampling_fields(body, model.config.vocab_size)
        n_tokens = max_tokens(body, len(prompt_ids), default=engine.context - len(prompt_ids) if chat else 16)
        n_tokens = min(n_tokens, limit)
        choices = start(prompt_ids, n_tokens, params, opts, top_logprobs if logprobs else None, constraint)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice_list, **extra):
            return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                                          "choices": choice_list, **extra}) + "\n\n"

        with_tools = tool_mode is not None and tool_mode[0] != "none"
        if not opts["stream"] or with_tools:  # a tool call is known only at the end: streamed whole
            for c in choices:
                async for _ in run(request, c):
                    pass
            out = []
            for c in choices:
                lp = (chat_logprobs(c) if chat else text_logprobs(c)) if logprobs else None
                if chat:
                    msg, reason = message(c, tool_mode)
                    out.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": reason})
                else:
                    out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
            if not opts["stream"]:
                return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_name,
                                     "choices": out, "usage": usage(len(prompt_ids), choices)})

            def whole():
                for o in out:
                    msg = o["message"]
                    delta = {"role": "assistant", "content": msg["content"]}
                    if msg.get("tool_calls"):
                        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(msg["tool_calls"])]
                    yield chunk([{"index": o["index"], "delta": delta, "logprobs": o["logprobs"], "finish_reason": None}])
                    yield chunk([{"index": o["index"], "delta": {}, "logprobs": None, "finish_reason": o["finish_reason"]}])
                if opts["include_usage"]:
                    yield chunk([], usage=usage(len(prompt_ids), choices))
                yield "data: [DONE]\n\n"

            return StreamingResponse(whole(), media_type="text/event-stream")

        async def events():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(c):
                try:
                    async for delta, e in run(request, c):
                        await merged.put((c, delta, e))
                finally:
                    await merged.put((c, None, None))

            tasks = []
            try:
                if chat:
                    for c in choices:
                        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                tasks = [asyncio.create_task(pump(c)) for c in choices]
                open_ = len(choices)
                while open_:
                    c, delta, e = await merged.get()
                    if e is None:  # this choice has ended: its closing chunk
                        open_ -= 1
                        if c.finish_reason is not None:
                            yield chunk([{"index": c.index, **({"delta": {}} if chat else {"text": ""}),
                                          "logprobs": None, "finish_reason": c.finish_reason}])
                        continue
                    lp = None
                    if logprobs and e.token is not None:
                        one = Choice(c.index, tokenizer, [])
                        one.logprobs = [e]
                        lp = chat_logprobs(one) if chat else text_logprobs(one)
                    if delta or lp:
                        yield chunk([{"index": c.index, **({"delta": {"content": delta}} if chat else {"text": delta}),
                                      "logprobs": lp, "finish_reason": None}])
                if opts["include_usage"]:
                    yield chunk([], usage=usage(len(prompt_ids), choices))
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away and the response was cancelled
                for c in choices:
                    if c.finish_reason is None:
                        engine.cancel(c.handle)
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine._accepting else "shutting down"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "camelid"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", "prompt")
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")
        if body.get("echo") or body.get("best_of", 1) not in (1, None) or body.get("suffix"):
            raise APIError(400, "echo, best_of and suffix are not supported")
        lp = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
        return await respond(request, body, ids, chat=False, logprobs=lp is not None, top_logprobs=lp or 0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        roles = ("system", "developer", "user", "assistant", "tool")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in roles:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(roles)}", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
                m = dict(m, content="".join(p["text"] for p in content))
                messages[i] = m
            elif not isinstance(content, str) and not (m["role"] == "assistant" and content is None):
                raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            if m["role"] == "developer":
                messages[i] = dict(m, role="system")
        constraint = response_format(body.get("response_format"))
        lp = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                     f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        try:
            tool_list = tools.check_tools(body.get("tools"))
            choice = tools.check_choice(body.get("tool_choice"), tool_list)
            if choice != "none":
                messages = tools.tool_messages(messages, tool_list, tokenizer.chat_template)
        except (tools.ToolError, KeyError, TypeError, ValueError) as e:
            raise APIError(400, f"tools: {e}", "tools")
        if choice not in ("none", "auto"):  # a call is required: decode it under its JSON schema
            if constraint is not None:
                raise APIError(400, "response_format cannot be combined with a required tool call", "tool_choice")
            constraint = response_format({"type": "json_schema",
                                          "json_schema": {"schema": tools.call_schema(tool_list, choice)}})
        render_tools = tool_list if choice != "none" and tools.supports_tools(tokenizer.chat_template) else None
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=render_tools)
        except ValueError as e:  # the template refused the conversation, or has no template
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages")
        return await respond(request, body, ids, chat=True, logprobs=lp, top_logprobs=top, constraint=constraint,
                             tool_mode=(choice, tool_list))

    def response_format(fmt):
        """A factory of JsonConstraint for json_object / json_schema (one per choice), or None."""
        if fmt is None or fmt == {"type": "text"}:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(400, "'response_format.type' must be text, json_object or json_schema", "response_format")
        from .grammar import ConstraintError, JsonConstraint, compile_schema

        schema = None
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                               "response_format")
            schema = spec.get("schema", {})
        try:
            grammar = compile_schema(schema)
            JsonConstraint(tokenizer, grammar=grammar)  # fails now, not in the engine thread
        except ConstraintError as e:
            raise APIError(400, str(e), "response_format")
        return lambda: JsonConstraint(tokenizer, grammar=grammar)

    @app.get("/metrics")
    async def metrics():
        s = engine.stats
        lines = [
            ("camelid_queue_depth", "gauge", "requests waiting for a slot", engine.waiting.qsize()),
            ("camelid_running_sequences", "gauge", "sequences in the running batch", engine.running),
            ("camelid_requests_total", "counter", "requests accepted by the engine", s["requests"]),
            ("camelid_requests_finished_total", "counter", "requests ended by stop or length", s["finished"]),
            ("camelid_requests_aborted_total", "counter", "requests cancelled (disconnect, stop string)", s["aborted"]),
            ("camelid_generated_tokens_total", "counter", "tokens generated", s["tokens"]),
            ("camelid_prompt_tokens_total", "counter", "prompt tokens prefilled", s["prompt_tokens"]),
            ("camelid_time_to_first_token_seconds_sum", "counter", "summed time to first token", s["ttft_sum"]),
            ("camelid_time_to_first_token_seconds_count", "counter", "requests with a first token", s["ttft_count"]),
            ("camelid_engine_errors_total", "counter", "engine steps that failed", s["errors"]),
            ("camelid_http_errors_total", "counter", "error responses", counters["http_errors"]),
            ("camelid_client_disconnects_total", "counter", "clients that left mid-request", counters["disconnects"]),
            ("camelid_generation_tokens_per_second", "gauge", "tokens generated per second since start",
             s["tokens"] / max(time.time() - started, 1e-9)),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_queue: int = 64, model_name: str | None = None, adapter: str | None = None,
          max_tokens_limit: int | None = None, max_total_tokens: int | None = None, context: int | None = 4096,
          nproc: int = 1) -> None:
    """Load `model` (name or path; the default model when None) and serve it until SIGTERM/SIGINT.
    nproc > 1: tensor parallel over that many processes; rank 0 serves, the others follow."""
    options = dict(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                   model_name=model_name, max_tokens_limit=max_tokens_limit, max_total_tokens=max_total_tokens,
                   context=context)
    if nproc > 1:
        from .distributed import check_plan, launch
        from .formats import checkpoint_config

        if adapter is not None:
            raise ValueError("--nproc serves a float model: merge the adapter first (camelid merge-lora)")
        check_plan(checkpoint_config(model), nproc)
        launch(_serve_rank, nproc, model, options, timeout=7 * 24 * 3600)
        return
    _serve(model, adapter=adapter, **options)


def _serve_rank(rank, world, model, options):
    from .distributed import load_tensor_parallel

    llm = load_tensor_parallel(model)
    if rank == 0:
        _serve(model, llm=llm, **options)
    else:
        Engine(llm, max_batch=options["max_batch"], context=options["context"]).follow()  # rank 0's cache shapes


def _serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
           max_queue: int = 64, model_name: str | None = None, adapter: str | None = None,
           max_tokens_limit: int | None = None, max_total_tokens: int | None = None, context: int | None = 4096,
           llm=None) -> None:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise RuntimeError("camelid serve needs FastAPI and uvicorn: pip install 'camelid[serve]'")
    import uvicorn

    from .model import LlamaForCausalLM
    from .tokenizer import Tokenizer

    if llm is None:
        llm = LlamaForCausalLM.from_pretrained(model, pack=adapter is None)
    if adapter is not None:
        from .lora import load_adapter, merge_and_unload
        from .packed import can_pack, pack

        merge_and_unload(load_adapter(llm, adapter))
        if can_pack(llm):
            pack(llm)
    tokenizer = Tokenizer.from_pretrained(model)
    name = model_name or (str(model) if model is not None else "smollm2-135m-instruct")
    app = create_app(llm, tokenizer, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     max_tokens_limit=max_tokens_limit, max_total_tokens=max_total_tokens, context=context)
    engine = app.state.engine
    print(f"camelid serve: {name}, {max_batch} slots x {engine.context} tokens of KV cache "
          f"({engine.cache.nbytes() / 2**20:.0f} MiB)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
