"""Chat templates: Jinja2 in an immutable sandbox, in a child process, with budgets on growth.

A chat template comes from the checkpoint (tokenizer_config.json, chat_template.jinja, or GGUF
metadata), i.e. from whoever published the file. The sandbox blocks attribute escapes
(`''.__class__.__mro__`); on top of it, rendering is bounded:
  time    rendering runs in a child process (a small Python with jinja2 only, started once and
          reused); past `timeout` seconds it is killed and replaced, so not even one long C call
          can outlast the limit. Its address space is capped (WORKER_MEMORY).
  output  rendering stops once it has produced `max_output` characters
  growth  the size of every value a template builds is counted before it is built, against
          MAX_OUTPUT: `*`, `+`, `%`, `~` on strings and lists, `*` and `**` on integers (their bits),
          str.format and printf widths, the join, replace, indent, format, string, tojson, sum and
          width-taking filters, macro and function arguments, namespace values, and every `{{ }}`
          output (a list's text is counted before it is made). So no single expression can build
          a gigabyte string, and repeated doubling stops at the limit.
Where no child process can be started (or CAMELID_TEMPLATE_PROCESS=0), rendering runs here, with a
trace hook for the time limit (which a single C call can outlast; the budgets still hold).
The environment matches the one transformers renders with (trim_blocks, lstrip_blocks,
loopcontrols, tojson, raise_exception, strftime_now), so prompts are identical.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import select
import string
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_OUTPUT = 1_000_000  # characters
MAX_INT_BITS = 1 << 16  # an integer a template computes (about 19,700 digits)
TIMEOUT = 2.0  # seconds
WORKER_MEMORY = 1 << 30  # bytes of address space for the rendering process


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


def _text_size(value, budget: int = MAX_OUTPUT) -> int:
    """About how many characters str(value) has (strings inside containers count their length;
    escapes in a repr can add a small constant factor), counted without building it and
    stopping once past `budget`."""
    total, stack = 0, [value]
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 30103 // 100000 + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 32
    return total


def _refuse(what: str, size: int) -> None:
    raise ChatTemplateError(f"chat template {what} of about {size} characters, past the limit of {MAX_OUTPUT}")


def _check_text(value, what: str) -> None:
    if not isinstance(value, str) and (n := _text_size(value)) > MAX_OUTPUT:
        _refuse(what, n)


_PRINTF = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")


def _check_format(fmt: str, args, kwargs=None, printf: bool = True) -> None:
    """Widths and precisions of a printf or str.format string, and the text of its arguments,
    before it is formatted."""
    values = list(args.values() if isinstance(args, dict) else args if isinstance(args, (tuple, list)) else [args])
    values += list((kwargs or {}).values())
    size = len(fmt) + sum(_text_size(v) for v in values)
    if printf:
        specs = [n for m in _PRINTF.finditer(fmt) for n in m.groups() if n]
    else:
        try:
            specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
        except ValueError:
            specs = []  # the formatting itself reports a bad format
        specs = [n for spec in specs for n in re.findall(r"\d+|\{", spec)]
    for n in specs:
        if n in ("*", "{"):  # the width is an argument
            size += max([v for v in values if isinstance(v, int) and not isinstance(v, bool)] or [0])
        else:
            size += int(n) if len(n) <= 9 else 10**9
    if size > MAX_OUTPUT:
        _refuse("formats a string", size)


def _int_bits(operator: str, left, right) -> int:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right)):
        return 0
    if operator == "*":
        return left.bit_length() + right.bit_length()
    if operator == "**" and right > 0 and abs(left) > 1:
        return left.bit_length() * right
    return 0


class _BoundedNamespace(Namespace):
    def __setitem__(self, key, value):
        if _size(value) > MAX_OUTPUT:
            raise ChatTemplateError(f"chat template grew namespace value {key!r} past {MAX_OUTPUT} items")
        super().__setitem__(key, value)


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b ~ ...` through the environment's counted join instead of jinja's str_join."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat_counted((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def concat_counted(self, parts) -> str:
        size = sum(len(p) if isinstance(p, str) else _text_size(p) for p in parts)
        if size > MAX_OUTPUT:
            _refuse("concatenates (~) a string", size)
        return "".join(map(str, parts))

    def call_binop(self, context, operator, left, right):
        if (bits := _int_bits(operator, left, right)) > MAX_INT_BITS:
            raise ChatTemplateError(f"chat template computes an integer of about {bits} bits ({operator}), "
                                    f"past the limit of {MAX_INT_BITS}")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise ChatTemplateError(f"chat template computes {left!r} ** {right!r}, too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_OUTPUT:
                    raise ChatTemplateError(f"chat template repeats a sequence {n} times, past the output limit")
        if operator == "+" and _size(left) and _size(right) and (n := _size(left) + _size(right)) > MAX_OUTPUT:
            _refuse("adds (+) a value", n)
        if operator == "%" and isinstance(left, str):
            _check_format(left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            if _size(value) > MAX_OUTPUT:
                raise ChatTemplateError("chat template passed a value past the output limit to a call")
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, mapping = value.__self__, value.__name__ == "format_map"

        def checked(*args, **kwargs):
            _check_format(fmt, args[0] if mapping and args else args, kwargs, printf=False)
            return wrapped(*args, **kwargs)
        return checked


def _bounded_filter(name, original):
    @functools.wraps(original)  # keeps Jinja's pass_environment marker (truncate, wordwrap)
    def check(*args, **kwargs):
        for v in list(args[1:]) + list(kwargs.values()):  # args[0]: the value, or the environment
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_OUTPUT:
                raise ChatTemplateError(f"chat template filter {name} asked for width {v}")
        return original(*args, **kwargs)
    return check


def _counted_filters(env) -> None:
    """The filters whose output can be much larger than their input, each sized first."""
    f = dict(env.filters)

    @jinja2.pass_eval_context
    def join(eval_ctx, value, d="", attribute=None):
        value = list(value)
        size = sum(_text_size(v) for v in value) + len(str(d)) * max(len(value) - 1, 0)
        if size > MAX_OUTPUT:
            _refuse("joins a string", size)
        return f["join"](eval_ctx, value, d, attribute)

    @jinja2.pass_eval_context
    def replace(eval_ctx, s, old, new, count=None):
        s, old, new = str(s), str(old), str(new)
        hits = s.count(old) if old else len(s) + 1
        hits = min(hits, count) if isinstance(count, int) and count >= 0 else hits
        if (size := len(s) + hits * (len(new) - len(old))) > MAX_OUTPUT:
            _refuse("replaces into a string", size)
        return f["replace"](eval_ctx, s, old, new, count)

    def indent(s, width=4, first=False, blank=False):
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        if (size := len(str(s)) + (str(s).count("\n") + 1) * max(pad, 0)) > MAX_OUTPUT:
            _refuse("indents a string", size)
        return f["indent"](s, width, first, blank)

    def format_(value, *args, **kwargs):
        _check_format(str(value), kwargs or args)
        return f["format"](value, *args, **kwargs)

    def string_(value):
        _check_text(value, "makes a string")
        return f["string"](value)

    @jinja2.pass_environment
    def sum_(environment, iterable, attribute=None, start=0):
        iterable = list(iterable)
        if _size(start) or isinstance(start, (list, tuple, str)):
            size = _size(start) + sum(_size(v) for v in iterable)
            if size > MAX_OUTPUT:
                _refuse("sums a value", size)
        return f["sum"](environment, iterable, attribute, start)

    for name in ("center", "wordwrap", "truncate"):
        env.filters[name] = _bounded_filter(name, f[name])
    env.filters.update(join=join, replace=replace, indent=indent, format=format_, string=string_, sum=sum_)


def _finalize(value):
    """Every `{{ }}` output: a container's text is sized before str() builds it."""
    _check_text(value, "outputs a value")
    return value


def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                              extensions=[_Generation, "jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise ChatTemplateError(f"chat template raised: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        size = _text_size(x)
        if isinstance(indent, int) and not isinstance(indent, bool) and indent > 0:
            size += indent * _text_size(x) * _depth(x)  # each item's line, indented per level
        elif isinstance(indent, str):
            size += len(indent) * _text_size(x) * _depth(x)
        if size > MAX_OUTPUT:
            _refuse("writes JSON", size)
        out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        if len(out) > MAX_OUTPUT:  # escapes: at most a few times the counted size
            _refuse("writes JSON", len(out))
        return out

    env.filters["tojson"] = tojson
    _counted_filters(env)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _BoundedNamespace
    return env


def _depth(value, limit: int = 64) -> int:
    """Nesting depth of lists and dicts (at most `limit`)."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, (list, tuple)):
                nxt.extend(v)
        level = nxt
    return depth


_ENV = _environment()
_CACHE: dict[str, jinja2.Template] = {}


def compile_template(source: str) -> jinja2.Template:
    if source not in _CACHE:
        try:
            _CACHE[source] = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {e} (line {e.lineno})") from None
    return _CACHE[source]


def _render(template: str, context: dict, max_output: int, timeout: float | None) -> str:
    """Render here. timeout: a trace-hook deadline (None: none; the child process runs without,
    since its parent kills it at the deadline)."""
    compiled = compile_template(template)
    tracer, previous = None, sys.gettrace()
    if timeout is not None:
        deadline = time.monotonic() + timeout

        def tracer(frame, event, arg):  # per-line time check, installed only while rendering
            if time.monotonic() > deadline:
                raise ChatTemplateError(f"chat template took longer than {timeout} s to render")
            return tracer
    out, size = [], 0
    if tracer is not None:
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
    except MemoryError:
        raise ChatTemplateError(f"chat template needs more memory than rendering has "
                                f"({WORKER_MEMORY >> 20} MiB)") from None
    except Exception as e:  # any error inside the template is the template's problem
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        if tracer is not None:
            sys.settrace(previous)
    return "".join(out)


# ---------------------------------------------------------------------- the rendering process

def _send(stream, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _worker_main() -> None:
    """The child: read (template, context, max_output) pickles from the parent, answer JSON."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    except (ImportError, ValueError, OSError):
        pass
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(b"R")
    out.flush()
    while len(head := inp.read(8)) == 8:
        template, context, max_output = pickle.loads(inp.read(int.from_bytes(head, "little")))
        try:
            reply = {"text": _render(template, context, max_output, None)}
        except ChatTemplateError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"chat template needs more memory than rendering has ({WORKER_MEMORY >> 20} MiB)"}
        _send(out, json.dumps(reply).encode())


class _Worker:
    """One rendering process per parent process, started on first use, killed and replaced when
    a render outlasts its deadline. Renders one at a time (a lock)."""

    START_TIMEOUT = 60.0

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.pid = None
        self.broken = os.environ.get("CAMELID_TEMPLATE_PROCESS", "1") == "0"

    def _start(self) -> None:
        code = ("import sys, runpy; sys.path[:] = " + repr(list(sys.path)) +
                "; runpy.run_path(" + repr(__file__) + ", run_name='__camelid_template_worker__')")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0, close_fds=True)
        self.pid = os.getpid()
        if self._read(1, time.monotonic() + self.START_TIMEOUT) != b"R":
            self._kill()
            raise OSError("the chat-template process did not start")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
        self.proc = None

    def _read(self, n: int, deadline: float) -> bytes | None:
        """n bytes from the child by the deadline; None when it ran out (b'' when it died)."""
        fd, got = self.proc.stdout.fileno(), b""
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(got))
            if not chunk:
                return b""
            got += chunk
        return got

    def render(self, template: str, context: dict, max_output: int, timeout: float) -> str | None:
        """The rendered text, or None where no process can render (the caller renders here)."""
        if self.broken:
            return None
        try:
            payload = pickle.dumps((template, context, max_output))
        except Exception:  # values a pickle cannot carry: render here
            return None
        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None or self.pid != os.getpid():
                    self.proc = None  # (a forked child does not share its parent's process)
                    self._start()
                _send(self.proc.stdin, payload)
            except OSError as e:
                self._kill()
                self.broken = True
                warnings.warn(f"camelid: chat templates render in this process ({e}): the time limit cannot "
                              f"stop a single long C call", stacklevel=3)
                return None
            deadline = time.monotonic() + timeout
            head = self._read(8, deadline)
            body = self._read(int.from_bytes(head, "little"), deadline) if head else head
            if not body:
                died = head == b"" or body == b""
                self._kill()
                if died:
                    raise ChatTemplateError("chat template rendering died (its process ended)")
                raise ChatTemplateError(f"chat template took longer than {timeout} s to render")
        reply = json.loads(body)
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return reply["text"]


_WORKER = _Worker()


def render_chat(template: str, messages, add_generation_prompt: bool = False, tools=None, documents=None,
                max_output: int = MAX_OUTPUT, timeout: float = TIMEOUT, **variables) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) as the model's prompt text."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat_template must be a string, got {type(template).__name__}")
    context = dict(variables, messages=list(messages), tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt)
    text = _WORKER.render(template, context, max_output, timeout)
    return text if text is not None else _render(template, context, max_output, timeout)


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


if __name__ == "__camelid_template_worker__":
    _worker_main()
