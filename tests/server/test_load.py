"""Load: 16 clients submit 2,000 runs while 30 simulated agents heartbeat and complete them.

A benchmark, not a timed assertion: the figures (runs/s, p50/p99 of the run endpoint) are
printed and written to ``out/server/load.json``; what is asserted is correctness under load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ROOT, ServerProcess
from .load import check, run_load

# 2,000 runs against one server: `make test-all`, not CI (the crash test, in CI, runs the same
# load and checks the same exactly-once completion, with a SIGKILL in the middle).
pytestmark = pytest.mark.slow

CAPACITY = 2


def _report(name: str, figures: dict[str, float]) -> None:
    out = ROOT / "out" / "server"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{name}: {figures}")


def test_two_thousand_runs_complete_exactly_once_within_capacity(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "10", demo_agents=30)
    server.start()
    try:
        result = run_load(server, runs=2000, clients=16, capacity=CAPACITY)
    finally:
        server.stop()
    assert len(result.accepted) == 2000 and result.refused == 0
    summary = check(server, result, CAPACITY)
    _report("load", {**result.figures(), **summary})
