"""camelid's import layers: data flows one way (file -> config + tensors -> model -> transforms ->
generation -> programs). Every module's imports are parsed (ast, so imports inside functions count
too) and each module is mapped to its layer by its folder. A module may import its own layer or any
lower one, never a higher one nor a sibling, and no two modules may import each other, directly or
round a longer circle.

    python tests/test_layers.py        # prints the layer table, the circles and the upward imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "camelid"

# Lowest first. Names on one line are siblings: neither may import the other.
LAYERS = [
    ["atomic", "distributed", "kernels"],        # write files whole; process groups; native CPU kernels
    ["core"],                                    # what a Llama is: config, rope, masks, cache, model
    ["formats", "transforms"],                   # files <-> (config, tensors) | model -> model
    ["load"],                                    # the one composition of the two
    ["text"],                                    # tokenizers, chat templates, streaming, tool calls
    ["generation"],                              # samplers, the decode step, generate, engine
    ["hf_compat"],                               # transformers' surface on the model
    ["serve", "train", "evaluate", "export"],   # the libraries behind the programs
    ["commands", "integrations"],                # one file per CLI program | camelid inside Ray Serve
    ["cli", "__init__"],                         # the dispatcher and the package's front door
]
RANK = {name: (i, name) for i, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> tuple[int, str]:
    """'camelid.core.model' -> the rank and name of 'core'."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in RANK:
        raise KeyError(f"{module}: no layer for {top!r}; add it to LAYERS")
    return RANK[top]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The camelid modules `module` imports (resolving relative imports and `from pkg import mod`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        (rank, name) = layer_of(m)
        for d in sorted(deps):
            drank, dname = layer_of(d)
            if drank > rank or (drank == rank and dname != name):
                bad.append(f"{m} ({name}) imports {d} ({dname})")
    return bad


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_circles():
    assert circles(graph()) == []


def test_no_upward_or_sideways_imports():
    assert upward(graph()) == []


def test_the_checker_sees_a_violation():
    """The checks themselves can fail: a core module importing the loader is caught as both."""
    g = graph()
    g["camelid.core.model"] = g["camelid.core.model"] | {"camelid.load"}
    g["camelid.load"] = g["camelid.load"] | {"camelid.core.model"}
    assert "camelid.core.model (core) imports camelid.load (load)" in upward(g)
    assert any({"camelid.core.model", "camelid.load"} <= set(c) for c in circles(g))


if __name__ == "__main__":
    g = graph()
    by_layer: dict[str, list[str]] = {}
    for m in g:
        by_layer.setdefault(layer_of(m)[1], []).append(m)
    for names in LAYERS:
        for name in names:
            mods = by_layer.get(name, [])
            lines = sum(len(modules()[m].read_text().splitlines()) for m in mods)
            print(f"{name:12} {len(mods):3} modules {lines:6} lines")
    c, u = circles(g), upward(g)
    print(f"circles: {len(c)}")
    for comp in c:
        print("  " + " <-> ".join(comp))
    print(f"upward or sideways imports: {len(u)}")
    for line in u:
        print("  " + line)
