"""The Anthropic Messages API beside the OpenAI routes: POST /v1/messages and
/v1/messages/count_tokens, as the official `anthropic` client and coding agents speak it.

    system (a string or text blocks), messages of role user / assistant whose content is a string
    or blocks (text, tool_use from the assistant, tool_result from the user), a final assistant
    message continued from where it ends (a prefill), max_tokens (required), stop_sequences,
    temperature / top_p / top_k, tools (name, description, input_schema) and tool_choice
    (auto / any / tool / none), stream (message_start, content_block_start, ping,
    content_block_delta (text_delta, input_json_delta), content_block_stop, message_delta,
    message_stop).

A request is checked here under Anthropic's field names (every bad field a 400 naming it, in
Anthropic's error shape), then turned into the conversation the chat template renders and run
by the same engine, stop matcher and tool-call decoding as /v1/chat/completions (protocol.py,
stream.py): a required tool call is decoded under its JSON schema, so it always parses.
"""

from __future__ import annotations

import json
import uuid

from camelid.generation.sampling import SamplingParams
from camelid.serve import protocol
from camelid.serve.protocol import APIError, field
from camelid.serve.stream import Server, follow, submit

ROLES = ("user", "assistant")
MAX_STOP_SEQUENCES = 16
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(e: APIError) -> dict:
    """Anthropic's error object: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


# ---------------------------------------------------------------------- the request

def _text_blocks(blocks, where: str) -> str:
    """The text of a system prompt or tool result given as text blocks."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and b.get("type") == "text"
                                               and isinstance(b.get("text"), str) for b in blocks):
        raise APIError(400, f"{where}: must be a string or a list of text blocks", where)
    return "".join(b["text"] for b in blocks)


def conversation(body: dict) -> tuple[list[dict], str | None]:
    """The checked system + messages as chat-template messages (OpenAI's shape: tool_use blocks
    as assistant tool_calls, tool_result blocks as role "tool"), and the final assistant
    message's text when the conversation ends with one (the answer continues it)."""
    out = []
    if body.get("system") is not None:
        system = _text_blocks(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: must be a non-empty list of {role, content}", "messages")
    prefill = None
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise APIError(400, f"{where}: must be an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            hint = " (the system prompt goes in the top-level 'system' field)" if role == "system" else ""
            raise APIError(400, f"{where}.role: must be 'user' or 'assistant', got {role!r:.40}{hint}", f"{where}.role")
        last = i == len(messages) - 1
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise APIError(400, f"{where}.content: must be a string or a list of content blocks", f"{where}.content")
        if not blocks or all(b.get("type") == "text" and b.get("text") == "" for b in blocks if isinstance(b, dict)):
            if not (last and role == "assistant"):
                raise APIError(400, f"{where}.content: must be non-empty (only a final assistant message may be "
                                    f"empty)", f"{where}.content")
            continue
        text, calls, results = [], [], []
        for j, b in enumerate(blocks):
            at = f"{where}.content.{j}"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                if not b["text"] and len(blocks) > 1:
                    raise APIError(400, f"{at}.text: text content blocks must be non-empty", f"{at}.text")
                text.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not isinstance(
                        b.get("input"), dict):
                    raise APIError(400, f"{at}: a tool_use block needs id, name (strings) and input (an object)", at)
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise APIError(400, f"{at}.tool_use_id: must be a string", f"{at}.tool_use_id")
                result = _text_blocks(b.get("content", ""), f"{at}.content")
                if b.get("is_error"):
                    result = f"Error: {result}"
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
            elif kind in ("image", "document"):
                raise APIError(400, f"{at}: {kind} blocks are not supported: this model reads text", f"{at}.type")
            else:
                allowed = "text, tool_use" if role == "assistant" else "text, tool_result"
                raise APIError(400, f"{at}.type: a {role} message's blocks are {allowed}; got {kind!r:.40}",
                               f"{at}.type")
        if last and role == "assistant" and not calls:
            prefill = "".join(text)
            if prefill != prefill.rstrip():
                raise APIError(400, f"{where}.content: the final assistant content cannot end with trailing "
                                    f"whitespace", f"{where}.content")
            continue
        out.extend(results)
        if text or calls:
            out.append({"role": role, "content": "".join(text) if text else None, **({"tool_calls": calls}
                                                                                   if calls else {})})
    return out, prefill


def _tools(body: dict) -> tuple[list[dict] | None, object]:
    """Anthropic tools / tool_choice as OpenAI's (the shapes camelid.text.tool_calls checks)."""
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, {"type": "none"}, {"type": "auto"}):
            raise APIError(400, "tool_choice: needs 'tools'", "tool_choice")
        return None, None
    if not isinstance(tools, list):
        raise APIError(400, "tools: must be a list of {name, description, input_schema}", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"), dict):
            raise APIError(400, f"tools.{i}: a tool needs a name and an input_schema object", f"tools.{i}")
        fn = {"name": t["name"], "parameters": t["input_schema"]}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is None or kind == "auto":
        return out, "auto"
    if kind == "any":
        return out, "required"
    if kind == "none":
        return out, "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return out, {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice: must be {type: auto | any | none} or {type: tool, name}", "tool_choice")


def prompt(body: dict, tokenizer) -> dict:
    """The rendered prompt's ids and the tool mode and constraint of a /v1/messages body (or of
    count_tokens): the chat route's own rendering, on the translated conversation."""
    messages, prefill = conversation(body)
    if not messages:
        raise APIError(400, "messages: the conversation has no user message", "messages")
    tools, choice = _tools(body)
    chat = {"messages": messages, **({"tools": tools, "tool_choice": choice} if tools is not None else {})}
    r = protocol.chat_request(chat, tokenizer)
    if prefill:
        if r["tool_mode"][0] not in ("none", "auto"):
            raise APIError(400, "messages: a final assistant message cannot be continued with a forced tool call",
                           "messages")
        r["prompt_ids"] = r["prompt_ids"] + tokenizer.encode(prefill, add_special_tokens=False, parse_special=False)
    return r


def sampling(body: dict) -> tuple[SamplingParams, list[str], bool]:
    num = (int, float)
    temperature = field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    top_p = field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = field(body, "top_k", (int,), 0, lambda v: v >= 0, "a non-negative integer")
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"stop_sequences: must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings",
                       "stop_sequences")
    stream = field(body, "stream", (bool,), False)
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature, top_p=top_p, top_k=top_k)
    return params, stop or [], stream


def max_tokens(body: dict, prompt_len: int, limit: int, context: int) -> int:
    n = body.get("max_tokens")
    if n is None:
        raise APIError(400, "max_tokens: Field required", "max_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise APIError(400, f"max_tokens: must be an integer of at least 1, got {n!r:.40}", "max_tokens")
    if n > limit:
        raise APIError(400, f"max_tokens: {n} exceeds this server's limit {limit}", "max_tokens")
    if prompt_len + n > context:
        raise APIError(400, f"prompt is too long: {prompt_len} tokens + max_tokens {n} > the context length "
                            f"{context}", "max_tokens")
    return n


# ---------------------------------------------------------------------- the answer

def blocks_of(text: str, finish_reason: str | None, tool_mode) -> tuple[list[dict], str]:
    """The content blocks of a finished answer and its stop_reason (before stop sequences)."""
    msg, reason = protocol.message(text, finish_reason, tool_mode)
    if msg.get("tool_calls"):
        return [{"type": "tool_use", "id": "toolu_" + call["id"][5:], "name": call["function"]["name"],
                 "input": json.loads(call["function"]["arguments"])} for call in msg["tool_calls"]], "tool_use"
    return [{"type": "text", "text": msg["content"]}], "max_tokens" if reason == "length" else "end_turn"


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class Answer:
    """One /v1/messages answer: the engine's one choice, as a message or as Anthropic's events."""

    def __init__(self, server: Server, request, choice, prompt_len: int, tool_mode):
        self.server, self.request, self.choice, self.prompt_len = server, request, choice, prompt_len
        self.tool_mode = tool_mode
        self.id = "msg_" + uuid.uuid4().hex[:24]

    def usage(self, output_tokens: int) -> dict:
        return {"input_tokens": self.prompt_len, "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

    def stop(self, reason: str) -> tuple[str, str | None]:
        stops = self.choice.stops
        if stops.hit and reason != "tool_use":
            return "stop_sequence", stops.matched
        return reason, None

    def head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.server.model_name}

    async def finished(self) -> dict:
        async for _ in follow(self.server, self.request, self.choice):
            pass
        content, reason = blocks_of(self.choice.text, self.choice.finish_reason, self.tool_mode)
        reason, sequence = self.stop(reason)
        return {**self.head(), "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": self.usage(len(self.choice.tokens))}

    def start(self) -> str:
        return _event("message_start", {"message": {**self.head(), "content": [], "stop_reason": None,
                                                    "stop_sequence": None, "usage": self.usage(0)}})

    def end(self, reason: str, sequence: str | None) -> str:
        return (_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                         "usage": {"output_tokens": len(self.choice.tokens)}})
                + _event("message_stop", {}))

    async def whole(self):
        """A finished answer as events (a tool call is known only at its end)."""
        try:
            message = await self.finished()
            yield self.start()
            for i, b in enumerate(message["content"]):
                if b["type"] == "text":
                    yield _event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
                    yield _event("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": b["text"]}})
                else:
                    yield _event("content_block_start", {"index": i, "content_block": {**b, "input": {}}})
                    yield _event("content_block_delta", {"index": i, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(b["input"], ensure_ascii=False)}})
                yield _event("content_block_stop", {"index": i})
            yield self.end(message["stop_reason"], message["stop_sequence"])
        finally:
            if self.choice.finish_reason is None:
                self.server.engine.cancel(self.choice.handle)

    async def events(self):
        """Text deltas as the tokens come."""
        try:
            yield self.start()
            yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            yield _event("ping", {})
            async for delta, _ in follow(self.server, self.request, self.choice):
                if delta:
                    yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": delta}})
            yield _event("content_block_stop", {"index": 0})
            reason = "max_tokens" if self.choice.finish_reason == "length" else "end_turn"
            yield self.end(*self.stop(reason))
        finally:  # also when the client went away
            if self.choice.finish_reason is None:
                self.server.engine.cancel(self.choice.handle)


async def respond(server: Server, request, body: dict, adapter: int = 0):
    from fastapi.responses import JSONResponse, StreamingResponse

    params, stop, stream = sampling(body)
    r = prompt(body, server.tokenizer)
    ids, tool_mode = r["prompt_ids"], r["tool_mode"]
    n = max_tokens(body, len(ids), server.limit, server.engine.context)
    forced = tool_mode[0] not in ("none", "auto")
    (choice,) = submit(server, ids, n, params, {"n": 1, "stop": [] if forced else stop}, None, r["constraint"],
                       adapter=adapter)
    answer = Answer(server, request, choice, len(ids), tool_mode)
    if not stream:
        return JSONResponse(await answer.finished())
    with_tools = tool_mode[0] != "none"
    return StreamingResponse(answer.whole() if with_tools else answer.events(), media_type="text/event-stream")


def count_tokens(server: Server, body: dict) -> dict:
    return {"input_tokens": len(prompt(body, server.tokenizer)["prompt_ids"])}
