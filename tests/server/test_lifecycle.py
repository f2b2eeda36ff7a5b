"""Tasks survive their agents (DESIGN section 10.1), through a real server process.

An agent process killed with SIGKILL mid-task, an agent that heartbeats but never starts, one
that stops listing a running task, a presumed-dead agent that comes back, cancels in every
state, and ``Idempotency-Key`` across a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from scoring.server import db
from scoring.server.agent import FakeAgent

from .conftest import (
    ROOT,
    ServerProcess,
    example_body,
    new_database,
    task_status,
    upload,
    wait_for,
)

HEARTBEAT = {"status": "idle", "gpu_capacity": 1, "labels": ["gpu", "comfyui"]}


def beat(server: ServerProcess, agent_id: str, running: list[str] | None = None,
         **fields: Any) -> dict[str, Any]:  # fmt: skip
    """One heartbeat of ``agent_id``; returns the answer (``tasks``, ``cancel``)."""
    body: dict[str, Any] = {**HEARTBEAT, **fields}
    if running is not None:
        body["running"] = running
    key = server.demo["agent_keys"][agent_id]
    r = httpx.post(f"{server.url}/agents/heartbeat", json=body,
                   headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def agent_call(server: ServerProcess, agent_id: str, task_id: str, what: str,
               body: dict[str, Any] | None = None) -> httpx.Response:  # fmt: skip
    key = server.demo["agent_keys"][agent_id]
    return httpx.post(f"{server.url}/agents/tasks/{task_id}/{what}", json=body or {},
                      headers={"Authorization": f"Bearer {key}"})  # fmt: skip


def submit(server: ServerProcess, client: httpx.Client, **headers: str) -> str:
    r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run",
                    json=example_body(upload(client)), headers=headers)  # fmt: skip
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


status = task_status


def reserved(server: ServerProcess) -> dict[str, int]:
    """Each agent's reservations in the database, and the tasks really holding a slot."""
    database = db.Database(server.database)
    with database.read() as conn:
        counts = dict(conn.execute(select(db.agents.c.id, db.agents.c.running_count)).all())
        held = dict(
            conn.execute(
                select(db.tasks.c.agent_id, func.count())
                .where(db.tasks.c.status.in_(("dispatched", "running")))
                .group_by(db.tasks.c.agent_id)
            ).all()
        )
    database.dispose()
    return {a: counts[a] - held.get(a, 0) for a in counts} | {"_held": sum(held.values())}


def error_code(r: httpx.Response) -> str:
    return str(r.json()["errors"][0]["code"])


@pytest.fixture
def lifecycle_server(tmp_path: Path) -> Any:
    """Heartbeat timeout 2 s, start timeout 2 s."""
    proc = ServerProcess(tmp_path, "--heartbeat-timeout", "2", "--start-timeout", "2")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """:func:`lifecycle_server` on SQLite, then on PostgreSQL (a replica, polling the others'
    changes from the database)."""
    database = None
    if request.param == "postgresql":
        database = new_database(request.getfixturevalue("postgres"))
    proc = ServerProcess(tmp_path, "--heartbeat-timeout", "2", "--start-timeout", "2",
                         database=database)  # fmt: skip
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_task_of_a_killed_agent_process_runs_again_elsewhere_and_completes_once(
    tmp_path: Path,
) -> None:
    timeout = 3.0
    server = ServerProcess(tmp_path, "--heartbeat-timeout", str(timeout))
    server.start()
    agent_log = open(tmp_path / "agent.log", "wb")
    dead = subprocess.Popen(
        [sys.executable, "-m", "scoring.server.agent", "--demo", str(server.demo_path),
         "--agent", "gpu-node-01", "--task-seconds", "600", "--interval", "0.2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=agent_log,
        stderr=agent_log,
    )  # fmt: skip
    stop = threading.Event()
    survivor = FakeAgent(server.url, server.demo["agent_keys"]["gpu-node-02"], "gpu-node-02",
                         capacity=1, task_seconds=0.3)  # fmt: skip
    thread = threading.Thread(target=survivor.run, args=(stop, 0.2), daemon=True)
    try:
        with server.client() as client:
            task_id = submit(server, client)
            wait_for(lambda: status(client, task_id)["task_status"] == "running", timeout=60)
            assert status(client, task_id)["agent_id"] == "gpu-node-01"
            dead.send_signal(signal.SIGKILL)
            dead.wait(timeout=10)
            killed_at = time.time()
            thread.start()  # the second agent reports from now on
            done = wait_for(
                lambda: (s := status(client, task_id))["task_status"] == "completed" and s,
                timeout=30,
            )
            assert done["agent_id"] == "gpu-node-02"
            attempts = [(a["attempt"], a["agent_id"], a["outcome"]) for a in done["attempts"]]
            assert attempts == [(1, "gpu-node-01", "agent_lost"), (2, "gpu-node-02", "completed")]
            # Dispatched again within the heartbeat timeout plus one dispatch round (1 s) and
            # the sweep's period (0.5 s), counted from the kill (the last heartbeat was before).
            database = db.Database(server.database)
            with database.read() as conn:
                redispatched = conn.execute(
                    select(db.task_events.c.at).where(
                        db.task_events.c.task_id == task_id,
                        db.task_events.c.status == "dispatched",
                        db.task_events.c.agent_id == "gpu-node-02",
                    )
                ).scalar_one()
                slots = conn.execute(
                    select(db.agents.c.running_count).where(db.agents.c.id == "gpu-node-01")
                ).scalar_one()
            database.dispose()
            assert redispatched - killed_at <= timeout + 1.5
            assert slots == 0  # the dead agent's slot is free in the database
            # The dead agent comes back and reports its old attempt: fenced off.
            late = agent_call(server, "gpu-node-01", task_id, "complete",
                              {"status": "completed", "attempt": 1,
                               "outputs": {"images": ["outputs/stale.png"]}})  # fmt: skip
            assert late.status_code == 409 and error_code(late) == "stale_attempt"
            late = agent_call(server, "gpu-node-01", task_id, "complete",
                              {"status": "completed", "outputs": {"images": ["x"]}})  # fmt: skip
            assert late.status_code == 409 and error_code(late) == "stale_attempt"
            outputs = client.get(f"/r/tasks/{task_id}/result").json()["outputs"]
            assert outputs["agent_id"] == "gpu-node-02"
            assert survivor.completed == [task_id]
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        survivor.close()
        if dead.poll() is None:
            dead.kill()
        agent_log.close()
        server.stop()


def test_agent_that_never_starts_loses_the_task_after_the_start_timeout(
    lifecycle_server: ServerProcess,
) -> None:
    server = lifecycle_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        # gpu-node-02 reports busy (its one slot taken): it fits the run, but not now
        beat(server, "gpu-node-02", running=[], running_count=1)
        task_id = submit(server, client)
        offered = wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert [(t["task_id"], t["attempt"]) for t in offered] == [(task_id, 1)]
        # Keeps heartbeating (alive) but never starts: queued again after 2 s, and the agent
        # that did not start it is excluded from the next attempts (gpu-node-02, alive and
        # busy, could take it: the exclusion stands).
        gone = wait_for(
            lambda: (
                beat(server, "gpu-node-01", running=[])
                and beat(server, "gpu-node-02", running=[], running_count=1)
                and (s := status(client, task_id))["attempts"][0]["outcome"] == "start_timeout"
                and s
            ),
            timeout=15,
        )
        assert gone["task_status"] == "queued"
        assert gone["attempts"][0]["agent_id"] == "gpu-node-01"
        assert beat(server, "gpu-node-01", running=[])["tasks"] == []
        # Another agent takes it as attempt 2; the first one's start is stale.
        got = wait_for(lambda: beat(server, "gpu-node-02", running=[])["tasks"])
        assert [(t["task_id"], t["attempt"]) for t in got] == [(task_id, 2)]
        stale = agent_call(server, "gpu-node-01", task_id, "start", {"attempt": 1})
        assert stale.status_code == 409 and error_code(stale) == "stale_attempt"
        assert (
            agent_call(server, "gpu-node-02", task_id, "start", {"attempt": 2}).status_code == 200
        )
    assert reserved(server) == {"gpu-node-01": 0, "gpu-node-02": 0, "_held": 1}


def test_a_running_task_its_agent_stops_listing_is_queued_again_after_one_heartbeat(
    lifecycle_server: ServerProcess,
) -> None:
    server = lifecycle_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        task_id = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert (
            agent_call(server, "gpu-node-01", task_id, "start", {"attempt": 1}).status_code == 200
        )
        # Listed: nothing happens.
        for _ in range(3):
            assert beat(server, "gpu-node-01", running=[task_id]) == {"tasks": [], "cancel": []}
        assert status(client, task_id)["task_status"] == "running"
        # Not listed once: one heartbeat of grace (the start's answer may have been in flight).
        beat(server, "gpu-node-01", running=[])
        assert status(client, task_id)["task_status"] == "running"
        # Listed again: the grace starts over.
        beat(server, "gpu-node-01", running=[task_id])
        beat(server, "gpu-node-01", running=[])
        assert status(client, task_id)["task_status"] == "running"
        # Not listed twice in a row: queued again as a new attempt, the slot freed.
        answer = beat(server, "gpu-node-01", running=[])
        assert answer["cancel"] == []
        after = status(client, task_id)
        assert after["attempts"][0]["outcome"] == "not_listed"
        assert after["task_status"] in ("queued", "dispatched")
        # Not counted against max_attempts, nor excluding the agent: it may take it again.
        again = wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert [(t["task_id"], t["attempt"]) for t in again] == [(task_id, 2)]
        # An agent listing a task that is not its current attempt, or one the server does not
        # know, is told to drop it.
        other = "00000000-0000-7000-8000-000000000001"
        answer = beat(server, "gpu-node-02", running=[task_id, other])
        assert sorted(answer["cancel"]) == sorted([task_id, other])


def test_a_task_held_by_an_agent_that_went_silent_is_queued_again_even_running(
    any_server: ServerProcess,
) -> None:
    server = any_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        task_id = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert agent_call(server, "gpu-node-01", task_id, "start").status_code == 200
        # gpu-node-01 goes silent while running the task; gpu-node-02 reports.
        got = wait_for(lambda: beat(server, "gpu-node-02", running=[])["tasks"], timeout=20,
                       every=0.2)  # fmt: skip
        assert [(t["task_id"], t["attempt"]) for t in got] == [(task_id, 2)]
        # gpu-node-01 comes back, still listing it: told to drop it, and fenced off.
        answer = beat(server, "gpu-node-01", running=[task_id])
        assert answer["cancel"] == [task_id]
        late = agent_call(server, "gpu-node-01", task_id, "complete", {"status": "completed"})
        assert late.status_code == 409 and error_code(late) == "stale_attempt"
        assert status(client, task_id)["task_status"] == "dispatched"
    assert reserved(server) == {"gpu-node-01": 0, "gpu-node-02": 0, "_held": 1}


def test_cancel_in_every_state(any_server: ServerProcess) -> None:
    server = any_server
    with server.client() as client:

        def cancel(task_id: str) -> httpx.Response:
            return client.post(f"/r/tasks/{task_id}/cancel")

        # Queued (no agent reports yet): cancelled at once, never dispatched.
        queued = submit(server, client)
        r = cancel(queued)
        assert (r.status_code, r.json()["task_status"]) == (200, "cancelled")
        assert cancel(queued).json()["task_status"] == "cancelled"  # repeating is harmless
        result = client.get(f"/r/tasks/{queued}/result")
        assert result.status_code == 409 and error_code(result) == "task_cancelled"
        # Dispatched: cancelled at once, the slot freed; the agent is told if it lists it.
        beat(server, "gpu-node-01", running=[])
        dispatched = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert cancel(dispatched).json()["task_status"] == "cancelled"
        assert beat(server, "gpu-node-01", running=[dispatched])["cancel"] == [dispatched]
        start = agent_call(server, "gpu-node-01", dispatched, "start")
        assert start.status_code == 409 and error_code(start) == "stale_attempt"
        assert reserved(server)["gpu-node-01"] == 0
        # Running: marked, then cancelled at the agent's next heartbeat, which says so.
        running = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert agent_call(server, "gpu-node-01", running, "start").status_code == 200
        r = cancel(running)
        assert (r.status_code, r.json()["task_status"]) == (200, "running")
        assert status(client, running)["cancel_requested"] is True
        answer = beat(server, "gpu-node-01", running=[running])
        assert answer["cancel"] == [running]
        after = status(client, running)
        assert after["task_status"] == "cancelled"
        assert [a["outcome"] for a in after["attempts"]] == ["cancelled"]
        done = agent_call(server, "gpu-node-01", running, "complete", {"status": "completed"})
        assert done.status_code == 409 and error_code(done) == "stale_attempt"
        # Completed: not cancellable.
        finished = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        assert agent_call(server, "gpu-node-01", finished, "complete",
                          {"status": "completed", "outputs": {}}).status_code == 200  # fmt: skip
        r = cancel(finished)
        assert r.status_code == 409 and error_code(r) == "not_cancellable"
        # Unknown and malformed ids: 404.
        assert cancel("00000000-0000-7000-8000-000000000000").status_code == 404
        assert cancel("nope").status_code == 404
    assert reserved(server) == {"gpu-node-01": 0, "gpu-node-02": 0, "_held": 0}


def test_failed_attempts_are_kept_and_the_task_fails_after_max_attempts(
    lifecycle_server: ServerProcess,
) -> None:
    server = lifecycle_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        task_id = submit(server, client)  # gpu-node-01, the only agent in the fleet
        for agent in ("gpu-node-01", "gpu-node-02"):
            offered = wait_for(lambda a=agent: beat(server, a, running=[])["tasks"])  # type: ignore[misc]
            beat(server, "gpu-node-02", running=[])  # in the fleet from here on
            attempt = offered[0]["attempt"]
            r = agent_call(server, agent, task_id, "complete",
                           {"status": "failed", "attempt": attempt,
                            "outputs": {"error": "CUDA out of memory"}})  # fmt: skip
            assert r.status_code == 200

        # Both agents excluded after failing it: no other agent could take it, so the
        # exclusions are lifted and the third (last) attempt goes to one of them again.
        def offered_to_either() -> tuple[str, list[dict[str, Any]]] | None:
            for a in ("gpu-node-01", "gpu-node-02"):
                if got := beat(server, a, running=[])["tasks"]:
                    return a, got
            return None

        agent, third = wait_for(offered_to_either)
        assert [(t["task_id"], t["attempt"]) for t in third] == [(task_id, 3)]
        r = agent_call(server, agent, task_id, "complete",
                       {"status": "failed", "attempt": 3, "outputs": {}})  # fmt: skip
        assert r.status_code == 200
        final = status(client, task_id)
        assert final["task_status"] == "failed"  # max_attempts (3) reached: the task ended
        assert [(a["attempt"], a["agent_id"], a["outcome"]) for a in final["attempts"]] == [
            (1, "gpu-node-01", "failed"),
            (2, "gpu-node-02", "failed"),
            (3, agent, "failed"),
        ]


def test_idempotency_key_answers_the_first_run_even_after_a_restart(
    any_server: ServerProcess,
) -> None:
    server = any_server
    with server.client() as client:
        key = upload(client)
        url = f"/r/workflows/{server.demo['workflow_id']}/run"
        body = example_body(key)
        first = client.post(url, json=body, headers={"Idempotency-Key": "order-42"})
        again = client.post(url, json=body, headers={"Idempotency-Key": "order-42"})
        assert (first.status_code, again.status_code) == (202, 202)
        assert first.json() == again.json()
        other = client.post(url, json={**body, "submitter_region": "eu-west"},
                            headers={"Idempotency-Key": "order-42"})  # fmt: skip
        assert other.status_code == 422 and error_code(other) == "idempotency_key_reused"
        for bad in ("", "x" * 256, "tab\there", "é".encode()):
            r = client.post(url, json=body, headers={"Idempotency-Key": bad})
            assert r.status_code == 400 and error_code(r) == "invalid_idempotency_key", bad
        # Without a key, two submits are two runs.
        assert client.post(url, json=body).json() != client.post(url, json=body).json()
    server.stop()
    server.start()
    with server.client() as client:
        after = client.post(url, json=body, headers={"Idempotency-Key": "order-42"})
        assert (after.status_code, after.json()) == (202, first.json())
    database = db.Database(server.database)
    with database.read() as conn:
        n = conn.execute(
            select(func.count()).where(db.tasks.c.idempotency_key == "order-42")
        ).scalar_one()
    database.dispose()
    assert n == 1


def test_concurrent_submits_with_one_key_make_one_task(any_server: ServerProcess) -> None:
    server = any_server
    with server.client() as client:
        body = example_body(upload(client))
    url = f"{server.url}/r/workflows/{server.demo['workflow_id']}/run"
    headers = {"Authorization": f"Bearer {server.demo['api_key']}", "Idempotency-Key": "same"}
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(url, json=body, headers=headers, timeout=30))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [202] * 8
    assert len({r.json()["task_id"] for r in answers}) == 1


def test_comfy_cloud_run_is_refused_without_a_cloud_key(lifecycle_server: ServerProcess) -> None:
    server = lifecycle_server
    with server.client() as client:
        body = {**example_body(upload(client)), "dispatch_target": "comfy_cloud"}
        body.pop("target_pool")
        body.pop("submitter_region")
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
    assert r.status_code == 400 and error_code(r) == "comfy_cloud_not_configured"


FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


@pytest.fixture
def stepped_clock_server(tmp_path: Path) -> Any:
    """A server whose wall clock the test can step (libfaketime, Debian's ``faketime``: the
    offset in ``clock.txt`` is read at every call; the monotonic clock is left alone)."""
    if not FAKETIME.exists():
        message = f"{FAKETIME} is missing (Debian's faketime package)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    offset = tmp_path / "clock.txt"
    offset.write_text("+0\n")
    env = {"LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    proc = ServerProcess(tmp_path, "--heartbeat-timeout", "2", env=env)
    proc.start()
    try:
        yield proc, offset
    finally:
        proc.stop()


def test_a_clock_stepped_back_keeps_no_silent_agent_fresh(stepped_clock_server: Any) -> None:
    server, offset = stepped_clock_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        task_id = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        offset.write_text("-3600\n")  # the machine's clock steps back an hour
        # gpu-node-01 falls silent: within the heartbeat timeout (by the server's own receive
        # times) its task goes to gpu-node-02, and new runs never go to it.
        got = wait_for(lambda: beat(server, "gpu-node-02", running=[])["tasks"], timeout=15,
                       every=0.2)  # fmt: skip
        assert [(t["task_id"], t["attempt"]) for t in got] == [(task_id, 2)]
        assert status(client, task_id)["attempts"][0]["outcome"] == "agent_lost"
        fresh = submit(server, client)
        more = {"running": [task_id], "gpu_capacity": 2}
        got = wait_for(lambda: beat(server, "gpu-node-02", **more)["tasks"][1:])
        assert [t["task_id"] for t in got] == [fresh]
        assert status(client, fresh)["attempts"][0]["agent_id"] == "gpu-node-02"


def test_an_agent_that_lost_its_completions_answer_is_not_told_to_drop_it(
    lifecycle_server: ServerProcess,
) -> None:
    """The completion was committed but its answer lost (a replica killed mid-request): the agent
    still lists the task and reports it again, answered 200, never ``cancel``."""
    server = lifecycle_server
    with server.client() as client:
        beat(server, "gpu-node-01", running=[])
        task_id = submit(server, client)
        wait_for(lambda: beat(server, "gpu-node-01", running=[])["tasks"])
        done = {"status": "completed", "attempt": 1, "outputs": {"images": []}}
        assert agent_call(server, "gpu-node-01", task_id, "complete", done).status_code == 200
        assert beat(server, "gpu-node-01", running=[task_id])["cancel"] == []
        assert agent_call(server, "gpu-node-01", task_id, "complete", done).status_code == 200
        # Another agent listing it is told to drop it.
        assert beat(server, "gpu-node-02", running=[task_id])["cancel"] == [task_id]
