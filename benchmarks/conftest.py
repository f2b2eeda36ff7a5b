"""Benchmark fixtures: the size ladder, one seeded workload per size (built once per session),
and the engine's answers that every implementation must match before it is timed.

``--sizes 100,1000`` picks rungs of the ladder; ``--quick`` shrinks the fleet-level measures so the
whole module runs in seconds (tests/test_peers.py runs it so with ``--benchmark-disable``).
"""

from __future__ import annotations

import pytest

from benchmarks.registry import SIZES, cached_workload
from scoring.models import DEFAULT_POLICY

SLOW_FROM = 1_000_000  # rungs at least this large are marked slow (fleet build ~45 s alone)


def pytest_addoption(parser):
    group = parser.getgroup("scoring benchmarks")
    sizes = ",".join(map(str, SIZES))
    group.addoption("--sizes", default=sizes, help="comma-separated fleet sizes of the ladder")
    group.addoption("--quick", action="store_true", help="tiny fleet-level measures (smoke run)")


def selected_sizes(config) -> list[int]:
    return [int(s.replace("_", "")) for s in config.getoption("--sizes").split(",") if s]


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        params = [
            pytest.param(n, marks=pytest.mark.slow) if n >= SLOW_FROM else n
            for n in selected_sizes(metafunc.config)
        ]
        metafunc.parametrize("size", params, ids=lambda n: f"{n:_}", scope="session")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def policy():
    return DEFAULT_POLICY


@pytest.fixture(scope="session")
def workload(size):
    """The seeded workload of ``size`` agents, built once per session; never modified."""
    return cached_workload(size)
