"""Chat templates: Jinja2 in an immutable sandbox, with limits on time, output and growth.

A chat template comes from the checkpoint (tokenizer_config.json, chat_template.jinja, or GGUF
metadata), i.e. from whoever published the file. The sandbox blocks attribute escapes
(`''.__class__.__mro__`); on top of it, rendering is bounded:
  time    a trace hook aborts rendering past `timeout` seconds (loops that print nothing included)
  output  rendering stops once it has produced `max_output` characters
  growth  `*`, `**`, `+` and `%` on strings/lists, macro and function arguments, namespace values
          and width-taking filters are checked against `max_output` before they run, so a
          template cannot build a gigabyte string in one expression or by repeated doubling.
The environment matches the one transformers renders with (trim_blocks, lstrip_blocks,
loopcontrols, tojson, raise_exception, strftime_now), so prompts are identical.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_OUTPUT = 1_000_000  # characters
TIMEOUT = 2.0  # seconds


class ChatTemplateError(ValueError):
    """The template is invalid, raised an exception, or exceeded a limit."""


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers) rendered as its plain content."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


class _BoundedNamespace(Namespace):
    def __setitem__(self, key, value):
        if _size(value) > MAX_OUTPUT:
            raise ChatTemplateError(f"chat template grew namespace value {key!r} past {MAX_OUTPUT} items")
        super().__setitem__(key, value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise ChatTemplateError(f"chat template computes {left!r} ** {right!r}, too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_OUTPUT:
                    raise ChatTemplateError(f"chat template repeats a sequence {n} times, past the output limit")
        result = super().call_binop(context, operator, left, right)
        if _size(result) > MAX_OUTPUT:
            raise ChatTemplateError(f"chat template built a value of {_size(result)} items, past the limit")
        return result

    def call(self, context, obj, *args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            if _size(value) > MAX_OUTPUT:
                raise ChatTemplateError("chat template passed a value past the output limit to a call")
        return super().call(context, obj, *args, **kwargs)


def _bounded_filter(name, original):
    @functools.wraps(original)  # keeps Jinja's pass_environment marker (truncate, wordwrap)
    def check(*args, **kwargs):
        for v in list(args[1:]) + list(kwargs.values()):  # args[0]: the value, or the environment
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_OUTPUT:
                raise ChatTemplateError(f"chat template filter {name} asked for width {v}")
        return original(*args, **kwargs)
    return check


def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_Generation, "jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise ChatTemplateError(f"chat template raised: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    for name in ("center", "indent", "wordwrap", "truncate"):
        env.filters[name] = _bounded_filter(name, env.filters[name])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _BoundedNamespace
    return env


_ENV = _environment()
_CACHE: dict[str, jinja2.Template] = {}


def compile_template(source: str) -> jinja2.Template:
    if source not in _CACHE:
        try:
            _CACHE[source] = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {e} (line {e.lineno})") from None
    return _CACHE[source]


def render_chat(template: str, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                max_output: int = MAX_OUTPUT, timeout: float = TIMEOUT, **variables) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) as the model's prompt text."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    compiled = compile_template(template)
    context = dict(variables, messages=list(messages), tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt)
    deadline = time.monotonic() + timeout

    def tracer(frame, event, arg):  # per-line time check, installed only while rendering
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"chat template took longer than {timeout} s to render")
        return tracer

    out, size = [], 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > max_output:
                raise ChatTemplateError(f"chat template output exceeds {max_output} characters")
            out.append(chunk)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply") from None
    except Exception as e:  # any error inside the template is the template's problem
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
    return "".join(out)


def named_templates(value) -> dict[str, str]:
    """A tokenizer's chat_template as {name: template}: a string is the "default" one; a list of
    {"name": ..., "template": ...} (as several published models ship tokenizer_config.json) or a
    dict keeps its names. Anything else is a ValueError naming the field."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"chat_template must be a string or a list of {{'name': ..., 'template': ...}}, "
                     f"got {type(value).__name__}")


def pick_template(templates: dict[str, str], chosen: str | None = None, tools=None) -> str:
    """Which template renders, as transformers picks it: `chosen` (a template's text, or one of the
    names), else "tool_use" when tools are given and there is one, else "default"."""
    if chosen is not None:
        return templates.get(chosen, chosen)
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ValueError("this tokenizer has no chat_template; pass chat_template=...")
    raise ValueError(f"this tokenizer has several chat templates ({', '.join(templates)}) and none is named "
                     f"'default': pass chat_template=<one of the names>")
