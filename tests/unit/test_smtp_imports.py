"""The import arrows of smtp/ and access/ run one way (issue 16): no cycles, no imports of our
own modules hidden inside functions (the old way to dodge a cycle), access never imports smtp,
and the sans-IO cores and SessionAuth never import the Twisted protocol or its factory."""

from __future__ import annotations

import ast
from pathlib import Path

import mailappliance

ROOT = Path(mailappliance.__file__).parent
PACKAGES = ("smtp", "access")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    p = ROOT.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported mailappliance module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 \
                and (node.module or "").startswith("mailappliance"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if _is_module(sub) else node.module, id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import")
        elif isinstance(node, ast.Import):
            out.extend((a.name, id(node) in top) for a in node.names
                       if a.name.startswith("mailappliance"))
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            graph[_module_name(path)] = _imports(path)
    return graph


def test_the_graph_is_read_from_the_real_files():
    graph = _graph()
    # A sanity anchor, so an empty or misparsed graph cannot pass the tests below.
    assert ("mailappliance.smtp.protocol", True) in graph["mailappliance.smtp.service"]
    assert ("mailappliance.smtp.submission", True) in graph["mailappliance.smtp.protocol"]


def test_no_function_level_imports_of_our_modules():
    hidden = [(mod, target) for mod, edges in _graph().items()
              for target, top in edges if not top]
    assert hidden == []


def test_no_import_cycles_in_smtp_and_access():
    full = _graph()
    graph = {mod: {t for t, _ in edges if t in full} for mod, edges in full.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_access_never_imports_smtp():
    back = [(mod, t) for mod, edges in _graph().items() if mod.startswith("mailappliance.access")
            for t, _ in edges if t.startswith("mailappliance.smtp")]
    assert back == []


def test_only_the_service_imports_the_protocol_and_nothing_imports_the_service():
    graph = _graph()
    users_of = {target: sorted(m for m, edges in graph.items() if target in {t for t, _ in edges})
                for target in ("mailappliance.smtp.protocol", "mailappliance.smtp.service")}
    assert users_of == {"mailappliance.smtp.protocol": ["mailappliance.smtp.service"],
                        "mailappliance.smtp.service": []}
