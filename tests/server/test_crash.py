"""Crash: SIGKILL the server in the middle of the load, start it again on the same database.

Every run that was answered 202 still exists and completes exactly once (DESIGN section 10),
and every slot is given back, although the agents do not retry a start whose answer the kill
lost: a task the server recorded as started but its agent dropped is queued again once the
agent's heartbeats stop listing it (DESIGN section 10.1).
"""

from __future__ import annotations

from pathlib import Path

from .conftest import ServerProcess
from .load import check, run_load
from .test_load import CAPACITY, _report


def test_killed_server_loses_no_accepted_run_and_runs_none_twice(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "10", demo_agents=30)
    server.start()
    try:
        result = run_load(server, runs=2000, clients=16, capacity=CAPACITY, kill_after=700,
                          retry_start=False)  # fmt: skip
    finally:
        server.stop()
    assert len(result.accepted) == 2000
    summary = check(server, result, CAPACITY)
    _report("crash", {**result.figures(), **summary})
