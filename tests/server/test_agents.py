"""Agents: silent agents lose their unstarted tasks; explanations stay within the team's pool."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select

from scoring.server import db

from .conftest import ServerProcess, add_team, example_body, upload, wait_for

HEARTBEAT = {"status": "idle", "gpu_capacity": 1, "labels": ["gpu", "comfyui"]}


def beat(server: ServerProcess, agent_id: str, body: dict[str, Any] = HEARTBEAT) -> list[str]:
    key = server.demo["agent_keys"][agent_id]
    r = httpx.post(f"{server.url}/agents/heartbeat", json=body,
                   headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return [t["task_id"] for t in r.json()["tasks"]]


def history(server: ServerProcess, task_id: str) -> list[tuple[str, str | None]]:
    database = db.Database(server.database)
    with database.read() as conn:
        rows = conn.execute(
            select(db.task_events.c.status, db.task_events.c.agent_id)
            .where(db.task_events.c.task_id == task_id)
            .order_by(db.task_events.c.id)
        ).all()
    database.dispose()
    return [(r.status, r.agent_id) for r in rows]


def test_unstarted_task_of_a_silent_agent_is_queued_again(server: ServerProcess) -> None:
    with server.client() as client:
        beat(server, "gpu-node-01")
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run",
                        json=example_body(upload(client)))  # fmt: skip
        task_id = r.json()["task_id"]
        # Handed out on every heartbeat until started.
        wait_for(lambda: beat(server, "gpu-node-01") == [task_id])
        assert beat(server, "gpu-node-01") == [task_id]
        # gpu-node-01 goes silent; gpu-node-02 keeps reporting and gets the task.
        got = wait_for(lambda: beat(server, "gpu-node-02"), timeout=20, every=0.2)
        assert got == [task_id]
        status = client.get(f"/r/tasks/{task_id}").json()
        assert (status["task_status"], status["agent_id"]) == ("dispatched", "gpu-node-02")
    with server.client(server.demo["agent_keys"]["gpu-node-01"]) as late:
        # Its attempt ended (agent lost): fenced off, with the reason.
        stale = late.post(f"/agents/tasks/{task_id}/start")
        assert stale.status_code == 409
        assert stale.json()["errors"][0]["code"] == "stale_attempt"
    with server.client(server.demo["agent_keys"]["gpu-node-02"]) as agent:
        assert agent.post(f"/agents/tasks/{task_id}/start").status_code == 200
        assert agent.post(f"/agents/tasks/{task_id}/start").status_code == 200  # idempotent
        done = {"status": "completed", "outputs": {"images": []}}
        assert agent.post(f"/agents/tasks/{task_id}/complete", json=done).status_code == 200
        # A repeated completion (a retry after a lost answer) changes nothing.
        assert agent.post(f"/agents/tasks/{task_id}/complete", json=done).status_code == 200
        failed = agent.post(f"/agents/tasks/{task_id}/complete", json={"status": "failed"})
        assert failed.status_code == 409
    assert history(server, task_id) == [
        ("queued", None),
        ("dispatched", "gpu-node-01"),
        ("queued", "gpu-node-01"),
        ("dispatched", "gpu-node-02"),
        ("running", "gpu-node-02"),
        ("completed", "gpu-node-02"),
    ]


def test_explanation_reveals_nothing_about_other_teams(server: ServerProcess) -> None:
    other = add_team(server, agents=3)
    for agent_id, key in other["agent_keys"].items():
        r = httpx.post(f"{server.url}/agents/heartbeat", json={**HEARTBEAT, "gpu_capacity": 4},
                       headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 200, (agent_id, r.text)
    beat(server, "gpu-node-01", {**HEARTBEAT, "status": "unhealthy"})
    with server.client() as client:
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run",
                        json=example_body(upload(client)))  # fmt: skip
        task_id = r.json()["task_id"]
        explain = wait_for(
            lambda: (
                (e := client.get(f"/r/tasks/{task_id}").json()["explain"]).startswith("0/") and e
            )
        )
    # One own agent, unhealthy; the other team's three agents are not mentioned at all.
    assert explain == "0/1 agents eligible: 1 status"


def test_a_report_over_its_teams_share_of_names_is_a_400_and_not_stored(tmp_path: Any) -> None:
    """One team's agents may use at most ``TEAM_SHARES["cached_models"]`` distinct model names
    at once (scoring.fleet): the report that would pass it is refused with the reason, never a
    500, and the server restarts with what it stored."""
    from scoring.fleet import TEAM_SHARES

    per_agent = 256
    n = TEAM_SHARES["cached_models"] // per_agent + 1
    server = ServerProcess(tmp_path, demo_agents=n)
    server.start()
    try:
        answers = []
        for i in range(n):
            models = [f"model-{i}-{j}" for j in range(per_agent)]
            key = server.demo["agent_keys"][f"gpu-node-{i + 1:02d}"]
            answers.append(httpx.post(f"{server.url}/agents/heartbeat",
                                      json={**HEARTBEAT, "cached_models": models},
                                      headers={"Authorization": f"Bearer {key}"}))  # fmt: skip
        assert [r.status_code for r in answers] == [200] * (n - 1) + [400]
        error = answers[-1].json()["errors"][0]
        assert error["code"] == "invalid_value" and "cached models" in error["message"]
        database = db.Database(server.database)
        with database.read() as conn:
            stored = conn.execute(
                select(db.agents.c.id).where(db.agents.c.record.is_not(None))
            ).scalars().all()  # fmt: skip
        database.dispose()
        assert len(stored) == n - 1
        server.stop()
        server.start()  # the stored reports are restored
        assert beat(server, "gpu-node-01", {**HEARTBEAT, "cached_models": ["m"]}) == []
    finally:
        server.stop()
