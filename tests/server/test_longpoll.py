"""Long-polled heartbeats (``POST /agents/heartbeat?wait=S``, DESIGN section 12), through a real
server process: a task submitted during the wait is answered at once; waiting heartbeats hold
neither a worker thread nor a database connection; a shutdown ends them at once."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess, example_body, upload

WAIT_S = 20.0  # every wait below would last this long if nothing ended it


def _report(agent_id: str, held: list[str] | None = None) -> dict[str, Any]:
    return {"status": "idle", "gpu_capacity": 1, "running_count": 0,
            "labels": ["gpu", "comfyui"], "region": "us-east", "vram_gb": 24,
            "running": held or []}  # fmt: skip


def _beat(server: ServerProcess, agent_id: str, wait: float) -> tuple[float, dict[str, Any]]:
    """One heartbeat of ``agent_id`` asking to wait ``wait`` seconds; (seconds it took, answer)."""
    key = server.demo["agent_keys"][agent_id]
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/agents/heartbeat", params={"wait": wait},
                   json=_report(agent_id), headers={"Authorization": f"Bearer {key}"},
                   timeout=WAIT_S + 30)  # fmt: skip
    assert r.status_code == 200, r.text
    return time.monotonic() - t0, r.json()


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose heartbeat timeout (60 s) lets a heartbeat wait up to 30 s, with two
    worker threads for database calls and 40 agent keys."""
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "60", "--threads", "2",
                           demo_agents=40)  # fmt: skip
    server.start()
    yield server
    server.stop()


def test_a_waiting_heartbeat_is_answered_with_a_task_submitted_during_the_wait(
    polled: ServerProcess,
) -> None:
    agent = "gpu-node-01"
    _beat(polled, agent, 0)  # known to the dispatcher, nothing to do yet
    with polled.client() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        body = example_body(upload(client))
        waiting = pool.submit(_beat, polled, agent, WAIT_S)
        time.sleep(1.0)  # the heartbeat is waiting in the server now
        assert not waiting.done()
        r = client.post(f"/r/workflows/{polled.demo['workflow_id']}/run", json=body)
        assert r.status_code == 202, r.text
        submitted = time.monotonic()
        took, answer = waiting.result(timeout=WAIT_S + 30)
        answered = time.monotonic()
    assert [t["task_id"] for t in answer["tasks"]] == [r.json()["task_id"]]
    assert answer["tasks"][0]["attempt"] == 1
    # Woken by the dispatch, not by the end of the wait (which would be 19 s after the submit).
    assert answered - submitted < WAIT_S / 4, (took, answered - submitted)


def test_a_wait_ends_with_nothing_after_its_seconds(polled: ServerProcess) -> None:
    took, answer = _beat(polled, "gpu-node-02", 1.5)
    assert answer == {"tasks": [], "cancel": []}
    assert took >= 1.4


def test_a_wait_over_the_limit_is_refused(polled: ServerProcess) -> None:
    key = polled.demo["agent_keys"]["gpu-node-01"]
    for bad in ("31", "-1", "soon", "nan"):
        r = httpx.post(f"{polled.url}/agents/heartbeat", params={"wait": bad},
                       json=_report("gpu-node-01"),
                       headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 400, (bad, r.text)


def test_waiting_heartbeats_hold_no_worker_thread_and_no_database_connection(
    polled: ServerProcess,
) -> None:
    """30 heartbeats wait while the server has 2 worker threads and a pool of 5 (+10)
    database connections: submissions, status reads and other heartbeats are still answered
    at once, and the waits go on."""
    agents = [f"gpu-node-{i:02d}" for i in range(3, 33)]
    with polled.client() as client, concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
        body = example_body(upload(client))
        waits = [pool.submit(_beat, polled, agent, WAIT_S) for agent in agents]
        time.sleep(2.0)
        assert not any(w.done() for w in waits)
        t0 = time.monotonic()
        ids = []
        for _ in range(20):
            r = client.post(f"/r/workflows/{polled.demo['workflow_id']}/run", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
            assert client.get(f"/r/tasks/{ids[-1]}").status_code == 200
        _beat(polled, "gpu-node-40", 0)  # another agent heartbeats meanwhile
        elapsed = time.monotonic() - t0
        # Every call above was answered while the 30 heartbeats waited (had each held a thread
        # or a connection, they would have waited for the heartbeats' 20 s).
        assert elapsed < WAIT_S / 2, elapsed
        # The waiting agents got the other runs, woken one by one as they were dispatched.
        answers = [w.result(timeout=WAIT_S + 30)[1] for w in waits]
    handed = sorted(t["task_id"] for a in answers for t in a["tasks"])
    assert len(handed) == len(set(handed)) >= 19


def test_a_shutdown_ends_waiting_heartbeats_at_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "60", demo_agents=5)
    server.start()
    agents = [f"gpu-node-{i:02d}" for i in range(1, 6)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            waits = [pool.submit(_beat, server, agent, WAIT_S) for agent in agents]
            time.sleep(1.5)
            assert not any(w.done() for w in waits)
            t0 = time.monotonic()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            answers = [w.result(timeout=WAIT_S + 30) for w in waits]
            server.proc.wait(timeout=WAIT_S + 30)
            stopped = time.monotonic() - t0
    finally:
        server.stop()
    assert all(a == {"tasks": [], "cancel": []} for _, a in answers)
    assert all(took < WAIT_S / 2 for took, _ in answers), [t for t, _ in answers]
    assert stopped < WAIT_S / 2, stopped
    # uvicorn ends a graceful shutdown by raising the signal it caught again
    assert server.proc.returncode in (0, -signal.SIGTERM)
