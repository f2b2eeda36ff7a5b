"""The same server on PostgreSQL (``--database postgresql+psycopg://...``).

On PostgreSQL writers are not serialised by the server, so this load exercises the conditional
updates (the reservation on the agent's row, each task transition) under real concurrency.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ServerProcess, example_body, new_database, upload, wait_for
from .load import check, run_load

# The example and a load on PostgreSQL: `make test-all`, not CI (the replica tests, in CI, run
# the server on PostgreSQL under load too).
pytestmark = pytest.mark.slow


def test_example_request_and_a_concurrent_load_on_postgresql(postgres: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "10", demo_agents=10,
                           database=new_database(postgres))  # fmt: skip
    server.start()
    try:
        with server.client() as client:
            r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run",
                            json=example_body(upload(client)))  # fmt: skip
            assert r.status_code == 202, r.text
            first = r.json()["task_id"]
        result = run_load(server, runs=400, clients=8, capacity=2)
        with server.client() as client:
            wait_for(lambda: client.get(f"/r/tasks/{first}").json()["task_status"] == "completed")
    finally:
        server.stop()
    result.accepted.add(first)
    check(server, result, capacity=2)
