"""The import layers hold: no module of shimmy/, sdk/ or daemon/ imports itself back through
another (no circle, whether the import is at module level or inside a function), and nothing
in daemon/ imports the client SDK in sdk/, nor anything in sdk/ or daemon/ the benchmark.

The graph is read from the source with ``ast``, not by importing, so a lazy import inside a
function counts as much as one at the top of the file.  Imports under ``if TYPE_CHECKING:`` are
left out: they never run, and name a type for the checker only (a subscription is annotated
with the channel that made it, while only the channel imports the subscription)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> the package it is installed as (pyproject.toml [tool.setuptools.package-dir]).
PACKAGES = {"shimmy": "shimmy", "sdk": "shimmy.sdk", "daemon": "shimmy.daemon"}


def modules() -> dict[str, Path]:
    """Every module of the three folders, by its installed dotted name."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """The test of ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        type_only = {id(n) for block in ast.walk(tree)
                     if isinstance(block, ast.If) and _is_type_checking(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    bases = [".".join(base + ([node.module] if node.module else []))]
                else:
                    bases = [node.module or ""]
                names = [alias.name for alias in node.names]
            else:
                continue
            for base in bases:
                # `from pkg import mod` imports the submodule pkg.mod; `from mod import name`
                # imports mod.
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
                targets.update(subs)
                if len(subs) < len(names) or not names:
                    while base and base not in known:
                        base = base.rpartition(".")[0]
                    if base:
                        targets.add(base)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_project():
    graph = import_graph()
    # The reader is alive: the SDK channel imports the ring and the client connection.
    assert {"shimmy.ring", "shimmy.sdk.client"} <= graph["shimmy.sdk.channel"]
    assert "shimmy.daemon.server" in graph


def test_no_import_circle():
    assert cycles(import_graph()) == []


def arrows(graph: dict[str, set[str]], src_prefix: str, dst_prefix: str) -> list[tuple[str, str]]:
    return sorted((src, dst) for src, dsts in graph.items() if src.startswith(src_prefix)
                  for dst in dsts if dst.startswith(dst_prefix))


def test_the_daemon_never_imports_the_sdk():
    graph = import_graph()
    assert arrows(graph, "shimmy.daemon", "shimmy.sdk") == []
    # Nor through a core module (the recorder once took the daemon's /metrics into the SDK).
    # The package ``shimmy/__init__.py`` itself exports the SDK, so these are explicit imports.
    reached: set[str] = set()
    todo = [m for m in graph if m.startswith("shimmy.daemon")]
    while todo:
        for dst in graph[todo.pop()] - reached:
            reached.add(dst)
            todo.append(dst)
    assert sorted(m for m in reached if m.startswith("shimmy.sdk")) == []


def test_neither_sdk_nor_daemon_imports_the_benchmark():
    graph = import_graph()
    assert arrows(graph, "shimmy.sdk", "shimmy.bench") == []
    assert arrows(graph, "shimmy.daemon", "shimmy.bench") == []
