"""``GET /metrics``: scraped during a load, its counters agree with the database."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, assign
from scoring.server import db
from scoring.server.agent import FakeAgent
from scoring.server.metrics import Metrics

from . import load
from .conftest import ROOT, ServerProcess, example_body, upload, wait_for
from .test_agents import beat

RUN_ROUTE = "/api/v1/r/workflows/{workflowId}/run"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess) -> Samples:
    """Every sample of ``GET /metrics`` by name and labels."""
    r = httpx.get(server.url.removesuffix("/api/v1") + "/metrics", timeout=10.0)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def events(server: ServerProcess, status: str, detail: str | None = None) -> int:
    e = db.task_events
    query = select(func.count()).where(e.c.status == status)
    if detail is not None:
        query = query.where(e.c.detail.like(detail))
    database = db.Database(server.database)
    with database.read() as conn:
        n = int(conn.execute(query).scalar_one())
    database.dispose()
    return n


def failing_first(*args: Any, **kwargs: Any) -> FakeAgent:
    agent = FakeAgent(*args, **kwargs)
    agent.fail_every = 3 if agent.agent_id == "gpu-node-01" else 0
    return agent


def test_counters_agree_with_the_database_after_a_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gpu-node-01 fails every 3rd task: each is queued again (cause "failure") and, excluded
    # from gpu-node-01, completes on another agent.
    monkeypatch.setattr(load, "FakeAgent", failing_first)
    server = ServerProcess(tmp_path, demo_agents=3)
    server.start()
    during: list[Samples] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            during.append(scrape(server))
            stop.wait(0.25)

    try:
        team = server.demo["team_id"]
        with server.client() as client:  # queued before any agent reports
            body = example_body(upload(client))
            early = [client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
                     for _ in range(5)]  # fmt: skip
        assert {r.status_code for r in early} == {202}
        waiting = scrape(server)
        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            result = load.run_load(server, runs=120, clients=4, capacity=2, task_seconds=0.02,
                                   deadline_s=60, drain_s=30)  # fmt: skip
        finally:
            stop.set()
            thread.join()
        wait_for(lambda: events(server, "completed") == 125)
        after = scrape(server)
    finally:
        server.stop()
    assert total(waiting, "scoring_queued_runs", team=team) == 5
    assert len(during) >= 2  # scraped while the load ran

    assert total(after, "scoring_placements_total") == events(server, "dispatched")
    failures = events(server, "queued", "attempt %: failed")
    assert failures > 0
    assert total(after, "scoring_requeues_total", cause="failure") == failures
    assert total(after, "scoring_requeues_total", cause="agent_lost") == 0
    assert total(after, "scoring_queued_runs") == 0  # nothing queued, as in the database
    assert total(after, "scoring_lost_races_total") == 0  # one process: no races
    assert total(after, "scoring_cold_placements_total") == 0  # the demo needs no models
    # Fleet by status: the three agents, none stale
    assert (
        total(after, "scoring_agents") == 3 and total(after, "scoring_agents", status="stale") == 0
    )
    assert total(after, "scoring_dispatch_round_seconds_count") > 0
    # request latency by route template: every accepted run, and no raw path as a label
    runs = total(after, "scoring_request_seconds_count", method="POST", route=RUN_ROUTE,
                 status="202")  # fmt: skip
    assert runs == len(result.accepted) + 5
    routes = {dict(ls)["route"] for (n, ls) in after if n == "scoring_request_seconds_count"}
    assert "/api/v1/agents/tasks/{taskId}/complete" in routes
    assert not any(task in route for task in result.accepted for route in routes)


def test_a_lost_agent_is_counted(server: ServerProcess) -> None:
    """The server fixture's heartbeat timeout is 2 s: gpu-node-01 falls silent with a task."""
    beat(server, "gpu-node-01")
    with server.client() as client:
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run",
                        json=example_body(upload(client)))  # fmt: skip
        assert r.status_code == 202, r.text
    wait_for(lambda: beat(server, "gpu-node-01"))
    wait_for(lambda: events(server, "queued", "attempt %: agent_lost") == 1, timeout=20)
    samples = scrape(server)
    assert total(samples, "scoring_requeues_total", cause="agent_lost") == 1
    assert total(samples, "scoring_requeues_total", cause="failure") == 0
    assert total(samples, "scoring_agents", status="stale") == 1


def test_deferrals_and_cold_placements_are_counted() -> None:
    team = uuid.uuid4()
    agents = [Agent(agent_id=name, team_id=team, status="idle", labels={"comfyui"},
                    last_heartbeat=100.0, gpu_capacity=1, cached_models=cached)
              for name, cached in (("warm", {"m"}), ("cold", set()))]  # fmt: skip
    fleet = Fleet.from_agents(agents)
    needs_m = DispatchRequest(team_id=team, required_models={"m"}, submitted_at=100.0)
    needs_none = DispatchRequest(team_id=team, submitted_at=100.0)
    requests = [needs_m, needs_m, needs_none]
    decisions = assign(fleet, requests, ScoringPolicy(locality_wait_s=60), 100.0)
    # the first takes the warm agent, the second waits for it, the third takes the cold agent
    assert [(d.agent_id, d.deferred) for d in decisions] == [
        ("warm", False), (None, True), ("cold", False)
    ]  # fmt: skip
    metrics = Metrics()
    metrics.decided(requests, decisions)
    assert (metrics.deferrals._value.get(), metrics.cold_placements._value.get()) == (1, 0)
    # needing "m", the third loads it cold; a placement the database refused is not counted
    requests[2] = needs_m
    metrics.decided(requests, decisions)
    metrics.decided(requests, decisions, lost=[2])
    assert (metrics.deferrals._value.get(), metrics.cold_placements._value.get()) == (3, 1)


def test_the_dashboard_queries_only_exported_metrics(tmp_path: Path) -> None:
    from scoring.server.app import create_app
    from scoring.server.config import Settings

    app = create_app(Settings(database=f"sqlite:///{tmp_path / 'db.sqlite'}",
                              files_dir=str(tmp_path / "files")))  # fmt: skip

    async def get(*paths: str) -> list[httpx.Response]:  # in process, without the lifespan
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(path) for path in paths]

    health, answer = asyncio.run(get("/api/v1/health", "/metrics"))
    app.state.server.database.dispose()
    assert health.status_code == 200
    families = list(text_string_to_metric_families(answer.text))
    # a family's samples, and the family itself (a gauge of no team has no sample yet)
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "scoring.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bscoring_\w+", target["expr"])
    }
    assert len(queried) >= 9
    assert queried <= exported, queried - exported
