"""The shape of the code, checked from its imports: no cycles, CLI verbs as leaves, layers pointing one way
(cli → library → converters/runtimes → core), and every backend implementing the protocols callers use."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edgellm": "edgellm", "converters": "edgellm.converters", "runtimes": "edgellm.runtimes"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """Project modules `name` imports, at module level or inside functions (both make a dependency)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    return found


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring package __init__
    re-exports (`edgellm` itself lazily re-exports the API: importing it is importing the core)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def without_package_roots(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    roots = {"edgellm", "edgellm.converters", "edgellm.runtimes", "edgellm.server", "edgellm.deploy",
             "edgellm.package"}
    return {k: {d for d in v if d not in roots} for k, v in graph.items()}


def test_no_import_cycles():
    assert cycles(without_package_roots(GRAPH)) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def verbs() -> list[str]:
    from edgellm.cli import VERBS

    return [f"edgellm.cli.{v}" for v in VERBS]


def test_cli_verbs_never_import_each_other():
    vs = set(verbs())
    bad = {v: sorted(GRAPH[v] & vs) for v in vs if GRAPH[v] & vs}
    assert bad == {}


def test_every_verb_module_exists_and_has_a_command():
    import importlib

    for v in verbs():
        assert hasattr(importlib.import_module(v), "command"), v


@pytest.mark.parametrize("layer", ["edgellm.converters", "edgellm.runtimes"])
def test_lower_layers_never_import_the_cli_or_the_server(layer):
    bad = {m: sorted(d for d in deps if d.startswith(("edgellm.cli", "edgellm.server")))
           for m, deps in GRAPH.items() if m.startswith(layer)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_runtimes_never_import_converters():
    bad = {m: sorted(d for d in deps if d.startswith("edgellm.converters"))
           for m, deps in GRAPH.items() if m.startswith("edgellm.runtimes")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


def test_backends_implement_the_protocols(llm):
    from edgellm.runtimes.base import Backend, BatchBackend
    from edgellm.runtimes.llamacpp import LlamaCppBackend

    assert isinstance(llm.backend, Backend) and isinstance(llm.backend, BatchBackend)
    for cls in (LlamaCppBackend, _onnx_backend()):
        missing = [m for m in _protocol_members(Backend) if not hasattr(cls, m) and m not in _instance_attrs(cls)]
        assert missing == [], (cls.__name__, missing)
    assert all(hasattr(LlamaCppBackend, m) for m in _protocol_members(BatchBackend))


def _onnx_backend():
    from edgellm.runtimes.onnx_backend import OnnxBackend

    return OnnxBackend


def _protocol_members(proto) -> list[str]:
    return sorted(set(proto.__dict__.get("__annotations__", {})) | {
        k for k, v in proto.__dict__.items() if not k.startswith("_") and (callable(v) or isinstance(v, property))})


def _instance_attrs(cls) -> set[str]:
    """Attributes a backend sets in __init__ (name, device, fingerprint, capabilities)."""
    src = ast.parse(Path(__import__(cls.__module__, fromlist=["x"]).__file__).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(src):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    names.add(sub.attr)
                if isinstance(sub, ast.Assign):
                    names |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
    return names


def test_dependency_graph_is_not_empty():
    edges = defaultdict(int)
    for deps in GRAPH.values():
        for d in deps:
            edges[d] += 1
    assert edges["edgellm.errors"] > 10 and len(GRAPH) > 60
