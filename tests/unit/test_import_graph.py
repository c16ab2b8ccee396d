"""The package's import graph runs one way (issue 16): no cycles, counting imports made inside
functions and under TYPE_CHECKING too, and no arrow from a lower floor back up to a higher one.
Read from the source files with ast, so a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mailappliance"


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mailappliance"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name].update(t for t in targets if t in modules and t != name)
        edges.setdefault(name, set())
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def _arrows(edges, source: str, target: str) -> list[tuple[str, str]]:
    def under(name, prefix):
        return name == prefix or name.startswith(prefix + ".")
    return sorted((a, b) for a in edges for b in edges[a] if under(a, source) and under(b, target))


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_ground_floor_imports_nothing_of_ours():
    edges = _graph()
    for floor in ("mailappliance.envelope", "mailappliance.fileops"):
        assert edges[floor] == set(), floor


def test_no_arrow_runs_back_up_the_message_path():
    edges = _graph()
    for source, target in [("mailappliance.delivery", "mailappliance.queue"),
                           ("mailappliance.smtp.client", "mailappliance.delivery"),
                           ("mailappliance.access", "mailappliance.smtp"),
                           ("mailappliance.queue", "mailappliance.smtp"),
                           ("mailappliance.delivery", "mailappliance.service"),
                           ("mailappliance.queue", "mailappliance.service")]:
        assert _arrows(edges, source, target) == [], (source, target)


def test_the_check_sees_a_cycle_when_there_is_one():
    # The detector itself: a two-module loop and a three-module loop are both reported.
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": set()}
    assert sorted(_cycles(edges)) == [["a", "b"], ["c", "d", "e"]]
