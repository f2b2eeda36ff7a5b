"""Fair dispatch under backlog (DESIGN section 10.2), through a real server process.

Team B has 50,000 queued runs that no agent can take (their workflow requires a label no agent
has); team A then submits 200 runs with free agents of its own. Every A run completes, and A's
dispatch latency (submitted -> dispatched, from the status history) is measured beside the same
200 runs on the same server before the backlog existed: a benchmark figure written to
``out/server/backlog-{sqlite,postgresql}.json`` (the goal is a p99 within 1.5x), not an assertion.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert, select

from scoring import DispatchRequest
from scoring.server import db, workflows
from scoring.server.agent import FakeAgent
from scoring.server.demo import demo_workflow

from .conftest import ROOT, ServerProcess, add_team, example_body, new_database, upload, wait_for

BACKLOG = 50_000
RUNS = 200
#: Submissions per second: a quarter of what 4 agents with 2 slots complete with 0.05 s runs.
RATE = 40.0


def _backlog(server: ServerProcess, team_id: str, n: int) -> str:
    """``n`` queued runs of a workflow of team B requiring a label no agent has, written in one
    transaction (submitting them over HTTP would take minutes; the dispatcher reads them from
    the database either way). Returns the workflow id."""
    team = uuid.UUID(team_id)
    workflow = demo_workflow(team, uuid.uuid4()).model_copy(
        update={"slug": "needs-h100", "required_labels": frozenset({"h100"})}
    )
    request = DispatchRequest(team_id=team, required_labels={"h100"}).model_dump(mode="json")
    database = db.Database(server.database)
    now = time.time() - 60.0  # older than every run of team A
    with database.begin() as conn:
        workflows.save(conn, workflow)
        rows = [
            {"id": str(uuid.UUID(int=(int(now * 1000) << 80) | (7 << 76) | i)), "team_id": team_id,
             "workflow_id": str(workflow.id), "workflow_version": 1, "dispatch_target": "agent",
             "tool_type": "comfyui", "status": "queued", "agent_id": None, "parameters": {},
             "request": request, "attempts": 0, "excluded": [], "explain": "", "outputs": None,
             "created_at": now, "updated_at": now, "attempt": 0, "lost": 0, "unlisted": 0,
             "cancel_requested": 0, "history": []}
            for i in range(n)
        ]  # fmt: skip
        conn.execute(insert(db.tasks), rows)
    database.dispose()
    return str(workflow.id)


def _submit_and_wait(server: ServerProcess, body: dict[str, object]) -> list[float]:
    """Submit RUNS runs of team A at RATE a second; returns their dispatch latencies (s) once
    all completed."""
    start = time.monotonic()
    ids = []
    with server.client() as client:
        for i in range(RUNS):  # paced below the agents' capacity: latency, not queueing
            time.sleep(max(0.0, start + i / RATE - time.monotonic()))
            r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
    database = db.Database(server.database)
    t, e = db.tasks, db.task_events

    def all_completed() -> bool:
        with database.read() as conn:
            done = conn.execute(
                select(t.c.id).where(t.c.id.in_(ids), t.c.status == "completed")
            ).all()
        return len(done) == len(ids)

    try:
        wait_for(all_completed, timeout=120, every=0.25)
        with database.read() as conn:
            created = dict(
                conn.execute(select(t.c.id, t.c.created_at).where(t.c.id.in_(ids))).all()
            )
            dispatched = dict(
                conn.execute(
                    select(e.c.task_id, e.c.at).where(
                        e.c.task_id.in_(ids), e.c.status == "dispatched"
                    )
                ).all()
            )
    finally:
        database.dispose()
    return [dispatched[i] - created[i] for i in ids]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_another_teams_unplaceable_backlog_does_not_delay_a_teams_runs(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database = None
    if backend == "postgresql":  # a replica: claims FOR UPDATE SKIP LOCKED, group by group
        database = new_database(request.getfixturevalue("postgres"))
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "10", demo_agents=4,
                           database=database)  # fmt: skip
    server.start()
    stop = threading.Event()
    agents = [
        FakeAgent(server.url, key, agent_id, capacity=2, task_seconds=0.05)
        for agent_id, key in server.demo["agent_keys"].items()
    ]
    threads = [threading.Thread(target=a.run, args=(stop, 0.2), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    try:
        with server.client() as client:
            body = example_body(upload(client))
        before = _submit_and_wait(server, body)
        other = add_team(server)
        _backlog(server, other["team_id"], BACKLOG)
        after = _submit_and_wait(server, body)
        # Team B's runs are all still queued, and explained as having no eligible agent.
        database = db.Database(server.database)
        with database.read() as conn:
            b_status = conn.execute(
                select(db.tasks.c.status).where(db.tasks.c.team_id == other["team_id"]).distinct()
            ).all()
        database.dispose()
        assert [s[0] for s in b_status] == ["queued"]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for a in agents:
            a.close()
        server.stop()
    figures = {
        "database": backend,
        "backlog_runs": BACKLOG,
        "runs": RUNS,
        "p50_ms_without": float(np.percentile(before, 50) * 1000),
        "p99_ms_without": float(np.percentile(before, 99) * 1000),
        "p50_ms_with": float(np.percentile(after, 50) * 1000),
        "p99_ms_with": float(np.percentile(after, 99) * 1000),
    }
    figures["p99_ratio"] = figures["p99_ms_with"] / figures["p99_ms_without"]
    out = ROOT / "out" / "server"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"backlog-{backend}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
