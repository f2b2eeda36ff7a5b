"""The layout keeps its promises: imports run one way, and the kernels agree with the layout."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import scoring
from scoring import _kernels as K
from scoring.layout import COLUMNS, QUERY_FIELDS, Columns, Query

PACKAGE = Path(scoring.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str | None:
    """The module of ``scoring`` that ``name`` denotes (a submodule, else its package)."""
    while name:
        path = PACKAGE.parent / name.replace(".", "/")
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Every module of ``scoring`` and the modules of ``scoring`` it imports (anywhere in it)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target.split(".")[0] == "scoring" and (resolved := _resolve(target)):
                    if resolved != module:
                        edges.add(resolved)
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def test_the_graph_sees_the_known_imports():
    graph = import_graph()
    assert "scoring.fleet" in graph["scoring.pick"]
    assert "scoring._kernels" in graph["scoring.pick"]
    assert "scoring.models" in graph["scoring.fleet"]


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_no_module_imports_itself_through_others(module):
    graph = import_graph()
    assert module not in _reaches(graph, module), f"{module} is on an import cycle"


def test_the_fleet_never_imports_the_pick():
    reached = _reaches(import_graph(), "scoring.fleet")
    assert not reached & {"scoring.pick", "scoring.assign", "scoring.query", "scoring"}


def test_kernel_tuples_and_flat_entry_follow_the_declared_layout():
    assert Columns._fields == tuple(c.name for c in COLUMNS)
    assert Query._fields == tuple(f.name for f in QUERY_FIELDS)
    flat = inspect.signature(getattr(K._pick_flat, "py_func", K._pick_flat)).parameters
    columns = [c.name for c in COLUMNS]
    scratch = ["counts", "labels_and"]
    assert list(flat) == [*columns, *scratch, *(f"q_{f.name}" for f in QUERY_FIELDS)]
