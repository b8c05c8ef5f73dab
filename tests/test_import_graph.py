"""The map's floors, checked: no module imports a higher floor, and no import circle.

Every `import` / `from ... import` in quantkit/ counts, at module level and inside
functions alike (a lazy import is still a dependency), except those under
`if TYPE_CHECKING:`. Floors are written once, below, lowest first; a module sits
on the floor of the longest prefix listed for it. Modules on one floor may import
each other, but never in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "quantkit"

# Lowest first. A module may import its own floor and lower ones only.
FLOORS: list[tuple[str, ...]] = [
    ("quantkit", "quantkit.errors", "quantkit.interrupts", "quantkit._lazy", "quantkit.files"),  # root: only __version__
    ("quantkit.kernels",),  # Triton kernels + their torch references; kernels.numerics: shared definitions
    ("quantkit.quant", "quantkit.recipe"),  # argument types (quant.args), tensor primitives, recipes
    # the adapter table: model knowledge as data (layouts, sizes from the config, vLLM's fused groups), read by
    # export and everything above; models.moe: the per-expert module the adapter swaps in
    ("quantkit.models.adapter", "quantkit.models.moe"),
    ("quantkit.export",),
    ("quantkit.models",),
    ("quantkit.calib.capture", "quantkit.calib.data", "quantkit.calib.activations"),  # tools the methods use
    ("quantkit.methods",),
    ("quantkit.calib",),  # the layer-wise pipeline (runs the methods), resume, static-scale pass
    ("quantkit.eval", "quantkit.sensitivity"),
    ("quantkit.runtime",),
    ("quantkit.plan", "quantkit.api", "quantkit.run", "quantkit.validate"),  # run: one recipe run, end to end
    ("quantkit.cli", "quantkit.__main__"),
]

# Edges still present that another slice of issue 20 removes; each names why it is allowed here.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def floor_of(module: str, floors=FLOORS) -> int:
    best, level = -1, None
    for i, names in enumerate(floors):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, level = len(n), i
    if level is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {Path(__file__).name}")
    return level


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of `known` that `module` imports anywhere in its body (functions included)."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:  # the longest known module that `name` lies in
        while name:
            if name in known:
                return name
            name = name.rpartition(".")[0]
        return None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:  # only the else branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                if (m := resolve(a.name)) is not None:
                    out.add(m)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:  # `from pkg import mod` imports the submodule pkg.mod
                m = resolve(f"{src}.{a.name}") if f"{src}.{a.name}" in known else resolve(src)
                if m is not None:
                    out.add(m)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the quantkit modules it imports (AST only: nothing is executed)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {m: _imports(ast.parse(p.read_text(encoding="utf-8"), str(p)), m, p.name == "__init__.py", known)
            for m, p in files.items()}


def upward_edges(graph: dict[str, set[str]], floors=FLOORS, allowed=frozenset()) -> list[str]:
    """One line per import of a higher floor."""
    out = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            if (src, dst) in allowed:
                continue
            fs, fd = floor_of(src, floors), floor_of(dst, floors)
            if fd > fs:
                out.append(f"{src} (floor {fs}: {floors[fs][0]}) imports {dst} (floor {fd}: {floors[fd][0]})")
    return out


def circles(graph: dict[str, set[str]], allowed=frozenset()) -> list[str]:
    """One line per import circle (a strongly connected component of 2+ modules), as a path."""
    edges = {m: {d for d in ds if (m, d) not in allowed and d in graph} for m, ds in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan; the graph is small (about 150 modules)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:  # show the shortest cycle through the component's first module (breadth-first)
        members, start = set(comp), comp[0]
        came: dict[str, str] = {}
        frontier = [start]
        while start not in came:
            nxt = []
            for v in frontier:
                for d in sorted(edges[v] & members):
                    if d not in came:
                        came[d] = v
                        nxt.append(d)
            frontier = nxt
        path = [start]
        while came[path[-1]] != start:
            path.append(came[path[-1]])
        out.append(" -> ".join([start] + path[::-1]))
    return out


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what} (floors in {Path(__file__).name}):\n  " + "\n  ".join(problems)


def test_every_module_has_a_floor():
    for m in import_graph():
        floor_of(m)


def test_no_upward_import():
    problems = upward_edges(import_graph(), allowed=KNOWN_EXCEPTIONS)
    assert not problems, _report(problems, "upward import(s)")


def test_no_import_circle():
    problems = circles(import_graph(), allowed=KNOWN_EXCEPTIONS)
    assert not problems, _report(problems, "import circle(s)")


def test_known_exceptions_still_exist():
    """An exception whose edge is gone must be deleted, so it cannot hide a new one later."""
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in KNOWN_EXCEPTIONS if b not in graph.get(a, set())]
    assert not stale, f"remove from KNOWN_EXCEPTIONS (the import is gone): {', '.join(stale)}"


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_checker_reports_synthetic_upward_edge_and_circle(tmp_path):
    """The checks can fail: a fake package with a lazy upward import and a circle is reported."""
    root = tmp_path / "quantkit"
    _write(root, "__init__.py", "")
    _write(root, "kernels/__init__.py", "")
    _write(root, "kernels/k.py", "def f():\n    from quantkit.quant import core  # lazy, still counts\n")
    _write(root, "quant/__init__.py", "")
    _write(root, "quant/core.py", "from . import other\n")
    _write(root, "quant/other.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quantkit.cli import app\n"
                                   "import quantkit.quant.core\n")
    _write(root, "cli/__init__.py", "")
    _write(root, "cli/app.py", "from quantkit.kernels.k import f\n")
    graph = import_graph(root)
    assert graph["quantkit.kernels.k"] == {"quantkit.quant.core"}
    assert graph["quantkit.quant.other"] == {"quantkit.quant.core"}  # the TYPE_CHECKING import is skipped
    up = upward_edges(graph)
    assert up == ["quantkit.kernels.k (floor 1: quantkit.kernels) imports quantkit.quant.core (floor 2: quantkit.quant)"]
    assert circles(graph) == ["quantkit.quant.core -> quantkit.quant.other -> quantkit.quant.core"]
    assert upward_edges(graph, allowed={("quantkit.kernels.k", "quantkit.quant.core")}) == []
    with pytest.raises(AssertionError, match="quantkit.nowhere is on no floor"):
        floor_of("quantkit.nowhere", FLOORS[1:])
