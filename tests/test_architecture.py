"""The layout keeps its promises: imports run one way, and the kernels agree with the layout."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import scoring
from scoring import _kernels as K
from scoring.layout import COLUMNS, PER_CALL, QUERY_FIELDS, Columns, Query

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


def test_kernel_tuples_follow_the_declared_layout():
    assert Columns._fields == tuple(c.name for c in COLUMNS)
    assert Query._fields == tuple(f.name for f in QUERY_FIELDS)
    entry = inspect.signature(getattr(K._pick_records, "py_func", K._pick_records)).parameters
    assert list(entry) == ["c", "counts", "labels_and", "fixed", "now", "tie_key_hash"]
    assert [f.name for f in QUERY_FIELDS[-PER_CALL:]] == ["now", "tie_key_hash"]


# --- every rule in one place (DESIGN section 5) ---------------------------------------------------

#: Columns that only a filter or a factor reads: a kernel that names one restates a rule.
RULE_COLUMNS = ("status", "last_heartbeat", "gpu_capacity", "vram_gb", "region", "gpu_model",
                "cached_models", "opt_pos")  # fmt: skip


def test_the_generated_combinations_are_those_of_the_tables():
    from scoring import rules

    assert rules.GENERATED.read_text() == rules.generated_source()


@pytest.mark.parametrize("module", ["_kernels", "_assign_kernels"])
def test_no_kernel_restates_a_filter_or_a_factor(module):
    # the kernels read the columns of the rules only through scoring.rules (and the functions
    # generated from its tables); running_count and failure_rate they read for reservations and
    # for the scan's bound, team for the pool's parts, labels for the explanation's label AND
    source = (PACKAGE / f"{module}.py").read_text()
    named = {c for c in RULE_COLUMNS if f"c.{c}" in source}
    assert not named, f"{module} reads {sorted(named)} itself"


def test_reason_counts_are_sized_from_the_reasons():
    from scoring import rules

    assert K.N_COUNTS == len(rules.REASONS) + 1 and K.SKIPPED == len(rules.REASONS)
    assert np.dtype(rules.MASK).itemsize * 8 >= K.N_COUNTS
    assert K.N_LANE_WORDS * 4 >= K.N_COUNTS  # four 16-bit lanes a word
