"""The OpenAI wire protocol, without the web framework: a request body -> checked generation
parameters (every bad field an APIError naming it, never a 500), and the shapes of what comes
back (messages, logprobs, usage, errors, server-sent event chunks).

    400 the body is not JSON / not an object / nested too deep, or a field is invalid
    404 unknown model        413 body too large
"""

from __future__ import annotations

import json
import math

from camelid.generation.sampling import MAX_TOP_LOGPROBS, SamplingParams
from camelid.text import tool_calls as tools

MAX_BODY = 1 << 20  # bytes
MAX_DEPTH = 32  # JSON nesting
MAX_N = 8
MAX_STOP = 4  # stop strings, as OpenAI
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type, headers or {}

    def body(self) -> dict:
        """The OpenAI-shaped error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


# ---------------------------------------------------------------------- the body

async def read_body(request) -> dict:
    """The parsed JSON object of a request, read in chunks up to MAX_BODY bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"the body is larger than {MAX_BODY} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise APIError(413, f"the body is larger than {MAX_BODY} bytes")
    return parse_body(bytes(raw))


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
    bad = _unencodable(body)
    if bad is not None:
        raise APIError(400, f"{bad} holds a lone UTF-16 surrogate (an escape such as \\ud800 with no pair): "
                            f"it is not text and no tokenizer can read it", bad)
    return body


def _unencodable(body: dict) -> str | None:
    """The path of the first string (key or value) that is not valid Unicode text, or None. JSON
    lets a body spell a lone surrogate as an escape; checked once here, at the edge, so nothing
    deeper (tokenizers, templates, tool parsing) ever meets one."""
    stack = [(body, "")]
    while stack:
        v, path = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, c in items:
            where = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
            where = where.lstrip(".")
            for text in ((k, c) if isinstance(k, str) else (c,)):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        return where
            stack.append((c, where))
    return None


# ---------------------------------------------------------------------- request fields

def field(body, name, kinds, default=None, check=None, want=None):
    """body[name], checked to be one of `kinds` (bool is not an int here) and to pass `check`."""
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


def check_model(body: dict, model_name: str, adapters=()) -> int:
    """The request's model: 0 for the served model, i for the i-th LoRA adapter (by its name, as
    vLLM chooses adapters); 404 for any other name."""
    name = body.get("model")
    if not isinstance(name, str):
        raise APIError(400, "'model' is required and must be a string", "model")
    if name == model_name:
        return 0
    if name in adapters:
        return list(adapters).index(name) + 1
    served = ", ".join(repr(n) for n in [model_name, *adapters])
    raise APIError(404, f"the model {name!r} does not exist; this server serves {served}", "model",
                   type="not_found_error")


def sampling_fields(body: dict, vocab_size: int) -> tuple[SamplingParams, dict]:
    """SamplingParams and the other generation fields of a (chat) completion request."""
    num = (int, float)
    temperature = field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    freq = field(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    pres = field(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    seed = field(body, "seed", (int,), None, lambda v: -(2**63) <= v < 2**63, "a 64-bit integer")
    bias = field(body, "logit_bias", (dict,), None)
    if bias is not None:
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
        bad = [k for k, v in bias.items() if not 0 <= k < vocab_size or not -100 <= v <= 100]
        if bad:
            raise APIError(400, f"'logit_bias' has token {bad[0]} outside [0, {vocab_size}) or a bias outside "
                                f"[-100, 100]", "logit_bias")
    n = field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = field(body, "stream", (bool,), False)
    options = field(body, "stream_options", (dict,), None)
    include_usage = bool(options and options.get("include_usage"))
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature, top_p=top_p, frequency_penalty=freq,
                            presence_penalty=pres, logit_bias=bias or None, seed=seed)
    return params, {"n": n, "stop": stop or [], "stream": stream, "include_usage": include_usage}


def max_tokens(body: dict, prompt_len: int, default: int, limit: int, context: int) -> int:
    """max_completion_tokens (or max_tokens), at most `limit`, and fitting the context with the prompt."""
    n = field(body, "max_completion_tokens", (int,), None)
    n = field(body, "max_tokens", (int,), None) if n is None else n
    n = default if n is None else n
    if n < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {n}", "max_tokens")
    if n > limit:
        raise APIError(400, f"'max_tokens' {n} exceeds this server's limit {limit}", "max_tokens")
    if prompt_len + n > context:
        raise APIError(400, f"this model's context length is {context} tokens; the prompt has "
                            f"{prompt_len} and max_tokens asks for {n} more", "max_tokens",
                       type="context_length_exceeded")
    return n


MAX_PROMPTS = 64  # prompts in one /v1/completions request


def completion_request(body: dict, tokenizer) -> tuple[list[list[int]], list[str | None], int | None, bool]:
    """/v1/completions: each prompt's token ids and text as given (None for ids), the number of
    top logprobs (None: no logprobs), and echo. `prompt` is a string, a list of token ids, or a
    batch: a list of strings or of token-id lists (lm-eval's API models send batches)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' must be a non-empty string, a list of token ids, or a list of at most "
                            f"{MAX_PROMPTS} of either", "prompt")
    ids, texts = [], []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if p == "":
            raise APIError(400, f"'{where}' is empty", "prompt")
        if isinstance(p, str):
            ids.append(tokenizer.encode(p))
            texts.append(p)
        elif _is_ids(p):
            ids.append(p)
            texts.append(None)
        else:
            raise APIError(400, f"'{where}' must be a non-empty string or a non-empty list of token ids", "prompt")
    if body.get("best_of", 1) not in (1, None) or body.get("suffix"):
        raise APIError(400, "best_of and suffix are not supported")
    echo = field(body, "echo", (bool,), False)
    return ids, texts, field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "an integer in [0, 5]"), echo


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def tokenize(body: dict, tokenizer, context: int) -> dict:
    """POST /tokenize: {"prompt" (vLLM) or "content" (llama-server): text, "add_special_tokens"} or
    {"messages", "add_generation_prompt"} (rendered by the chat template) -> the token ids."""
    special = field(body, "add_special_tokens", (bool,), None)
    special = field(body, "add_special", (bool,), True) if special is None else special
    if "messages" in body:
        messages = _messages(body.get("messages"))
        gen = field(body, "add_generation_prompt", (bool,), True)
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
        except ValueError as e:
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages")
    else:
        text = body.get("prompt", body.get("content"))
        if not isinstance(text, str):
            raise APIError(400, "'prompt' (or 'content') must be a string, or give 'messages'", "prompt")
        ids = tokenizer.encode(text, add_special_tokens=special)
    out = {"count": len(ids), "max_model_len": context, "tokens": ids}
    if field(body, "return_token_strs", (bool,), False) or field(body, "with_pieces", (bool,), False):
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize(body: dict, tokenizer) -> dict:
    """POST /detokenize: {"tokens": [ids]} -> the text, as "prompt" (vLLM) and "content" (llama-server)."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    bad = [t for t in ids if not 0 <= t < len(tokenizer)]
    if bad:
        raise APIError(400, f"'tokens' holds {bad[0]}, outside the vocabulary [0, {len(tokenizer)})", "tokens")
    text = tokenizer.decode(ids)
    return {"prompt": text, "content": text}


def chat_request(body: dict, tokenizer) -> dict:
    """/v1/chat/completions: the rendered prompt's ids, logprobs, top_logprobs, the constraint
    factory (response_format or a required tool call) and the tool mode (tool_choice, tools)."""
    messages = _messages(body.get("messages"))
    constraint = response_format(body.get("response_format"), tokenizer)
    lp = field(body, "logprobs", (bool,), False)
    top = field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
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
                                      "json_schema": {"schema": tools.call_schema(tool_list, choice)}}, tokenizer)
    render_tools = tool_list if choice != "none" and tools.supports_tools(tokenizer.chat_template) else None
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=render_tools)
    except ValueError as e:  # the template refused the conversation, or has no template
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages")
    return {"prompt_ids": ids, "logprobs": lp, "top_logprobs": top, "constraint": constraint,
            "tool_mode": (choice, tool_list)}


def _messages(messages) -> list:
    """The checked messages: text content parts joined, "developer" read as "system"."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
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
    return messages


def response_format(fmt, tokenizer):
    """A factory of JsonConstraint for json_object / json_schema (one per choice), or None."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "'response_format.type' must be text, json_object or json_schema", "response_format")
    from camelid.generation.grammar import ConstraintError, JsonConstraint, compile_schema

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


# ---------------------------------------------------------------------- response shapes

def usage(prompt_len: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
            "total_tokens": prompt_len + completion_tokens}


def chat_logprobs(tokenizer, events) -> dict:
    """The chat logprobs object of engine events (each a token, its logprob and top logprobs)."""
    def text(t):
        return tokenizer.decode([t])

    return {"content": [{"token": text(e.token), "logprob": e.logprob, "bytes": list(text(e.token).encode()),
                         "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                          for t, lp in (e.top_logprobs or [])]} for e in events]}


def text_logprobs(tokenizer, events, start: int = 0, decoder=None, prompt=None) -> tuple[dict, int]:
    """The (legacy) completions logprobs object of engine events: tokens, token_logprobs,
    top_logprobs and text_offset (where each token's text begins in the choice's text, counted from
    `start`; `decoder` an IncrementalDecoder that has seen the text before), and the offset after
    the last token. prompt: (ids, the engine's prompt logprobs) of an echoed prompt, whose first
    token has no logprob."""
    from camelid.text.streaming import IncrementalDecoder

    def text(t):
        return tokenizer.decode([t])

    decoder = decoder or IncrementalDecoder(tokenizer)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    rows = []
    if prompt is not None:
        ids, lps = prompt
        rows = [(ids[0], None, None)] + [(t, lp, top) for t, (lp, top) in zip(ids[1:], lps)]
    rows += [(e.token, e.logprob, e.top_logprobs or []) for e in events]
    offset = start
    for t, lp, top in rows:
        out["tokens"].append(text(t))
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else {text(i): v for i, v in top})
        out["text_offset"].append(offset)
        offset += len(decoder.add(t))
    return out, offset


def message(text: str, finish_reason: str | None, tool_mode) -> tuple[dict, str | None]:
    """The chat message of a finished choice and its finish_reason: content, or tool_calls when
    the answer is a call."""
    choice, tool_list = tool_mode or ("none", [])
    calls = None
    if choice not in ("none", "auto") and finish_reason == "stop":
        call = json.loads(text)  # decoded under the call's schema: it parses
        calls = tools.as_tool_calls([call])
    elif choice == "auto":
        calls = tools.parse_tool_calls(text, tool_list)
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


def sse(data) -> str:
    """One server-sent event."""
    return "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n"


DONE = sse("[DONE]")
