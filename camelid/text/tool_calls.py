"""Tool (function) calling for chat completions, in OpenAI's request and response shapes.

    tools = check_tools(body["tools"])                      # validated [{"type": "function", "function": {...}}]
    messages = tool_messages(messages, tools, template)     # tools described where the template cannot
    schema = call_schema(tools, tool_choice)                # "required" / a named function: the JSON a call is
    calls = parse_tool_calls(text, tools)                   # "auto": a call the model chose to write, or None

With tool_choice "required" or a named function, the answer is decoded under a JSON schema
({"name": <one of the tools>, "arguments": <its parameters>}, camelid.generation.grammar), so every model
returns a well-formed call. With "auto" the model answers freely, and a call is recognised when
the answer is one (a JSON object naming a tool, bare or inside <tool_call> tags, the shapes chat
templates teach). A template that has no tools section gets the tools as a system message.
"""

from __future__ import annotations

import json
import re
import uuid

TOOL_CALL_TAGS = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A malformed tools / tool_choice field (HTTP 400)."""


def check_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > 128:
        raise ToolError("'tools' must be a list of at most 128 function tools")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}} "
                            f"with a name of letters, digits, _ or - (at most 64)")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn["name"] in names:
            raise ToolError(f"tools[{i}]: the function name {fn['name']!r} is used twice")
        names.add(fn["name"])
    return tools


def check_choice(choice, tools: list[dict]):
    """'none' | 'auto' | 'required' | a function name (from {"type": "function", "function": {"name"}})."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs 'tools'")
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
        raise ToolError("'tool_choice' must be none, auto, required, or {'type': 'function', 'function': {'name': "
                        "<one of the tools>}}")
    return name


def call_schema(tools: list[dict], choice: str) -> dict:
    """The JSON schema of one call to `choice` (a name) or to any tool ("required")."""
    chosen = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    options = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": _closed(fn.get("parameters"))},
                "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _closed(parameters: dict | None) -> dict:
    """The arguments' schema with only the declared properties allowed unless it says otherwise
    (as OpenAI's strict mode): an open object would let a model add keys until max_tokens."""
    schema = dict(parameters or {"type": "object"})
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_messages(messages: list[dict], tools: list[dict], template: str | None) -> list[dict]:
    """Messages a template without a tools section can render: the tools as a system message,
    assistant tool calls and tool results as plain text."""
    if not tools or supports_tools(template):
        return messages
    spec = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    note = (f"You can call these functions: {spec}\nTo call one, answer with only a JSON object: "
            '{"name": <function name>, "arguments": <arguments object>}.')
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    for m in out:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            m["content"] = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            del m["tool_calls"]
    return out


def as_tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
            for c in calls]


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """OpenAI tool_calls for an answer that is a call (or several), else None."""
    names = {t["function"]["name"] for t in tools}
    pieces = TOOL_CALL_TAGS.findall(text) or [text.strip()]
    calls = []
    for piece in pieces:
        try:
            value = json.loads(piece)
        except ValueError:
            return None
        for call in value if isinstance(value, list) else [value]:
            if not isinstance(call, dict) or call.get("name") not in names:
                return None
            args = call.get("arguments", call.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            calls.append({"name": call["name"], "arguments": args})
    return as_tool_calls(calls) if calls else None
