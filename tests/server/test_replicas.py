"""Several server replicas on one PostgreSQL (DESIGN section 11).

16 clients and 30 simulated agents are spread over three replicas; what is asserted is read
from the database's own history (:func:`~tests.server.load.check`): every accepted run completed
exactly once, no agent ever held more reservations than slots, every slot was given back. The
lost-race rate (reservations refused because another replica took the slot first, per
placement) is a measurement, written to ``out/server/replicas.json``, not an assertion.
"""

from __future__ import annotations

import time
from pathlib import Path

from scoring.server import db

from .conftest import new_database, wait_for
from .load import check, run_load
from .replicas import dispatch_figures, replicas
from .test_load import CAPACITY, _report


def test_three_replicas_complete_every_run_once_within_capacity(
    postgres: str, tmp_path: Path
) -> None:
    with replicas(tmp_path, new_database(postgres), 3) as servers:
        result = run_load(servers, runs=3000, clients=16, capacity=CAPACITY, deadline_s=60,
                          drain_s=50)  # fmt: skip
    assert len(result.accepted) == 3000 and result.refused == 0
    summary = check(servers[0], result, CAPACITY)
    figures = dispatch_figures(servers)
    assert figures["placements"] >= 3000  # every run was placed by some replica's loop
    _report("replicas", {**result.figures(), **summary, **figures})


def test_a_killed_replica_loses_nothing_the_others_finish_its_queue(
    postgres: str, tmp_path: Path
) -> None:
    with replicas(tmp_path, new_database(postgres), 3) as servers:
        victim = servers[1]
        result = run_load(servers, runs=1500, clients=16, capacity=CAPACITY, kill_after=500,
                          on_kill=victim.kill, deadline_s=60, drain_s=50)  # fmt: skip
        assert victim.proc is not None and victim.proc.returncode == -9
    assert len(result.accepted) == 1500
    summary = check(servers[0], result, CAPACITY)
    _report("replicas_kill", {**result.figures(), **summary, **dispatch_figures(servers)})


def test_a_replica_places_on_an_agent_it_only_knows_from_another_replica(
    postgres: str, tmp_path: Path
) -> None:
    """An agent heartbeats once, to the first replica only; the first replica stops; a run
    submitted to the second is placed on the agent: the second replica learnt the heartbeat from
    the database (it started before the agent's first heartbeat, so not at start-up)."""
    from scoring.server.agent import FakeAgent

    from .conftest import example_body, upload

    with replicas(tmp_path, new_database(postgres), 2, agents=1) as (first, second):
        agent_id, key = next(iter(first.demo["agent_keys"].items()))
        agent = FakeAgent(first.url, key, agent_id, task_seconds=30.0)
        try:
            agent.step()  # one heartbeat, to the first replica only
        finally:
            agent.close()
        first.stop()
        t0 = time.monotonic()
        with second.client() as client:
            r = client.post(f"/r/workflows/{first.demo['workflow_id']}/run",
                            json=example_body(upload(client)))  # fmt: skip
            assert r.status_code == 202, r.text
            task = r.json()["task_id"]
            wait_for(lambda: client.get(f"/r/tasks/{task}").json()["agent_id"] == agent_id,
                     timeout=10, every=0.02)  # fmt: skip
        took = time.monotonic() - t0
    print(f"\nplaced by the replica that never heard the agent after {took:.2f} s")


def test_fleets_converge_on_heartbeats_reservations_and_completions(
    postgres: str, tmp_path: Path
) -> None:
    """Two replicas' states in this process: what one hears, the other's Fleet takes from the
    database in one poll; its running count is the committed reservations plus its own
    placements in flight."""
    import json
    from uuid import UUID

    from sqlalchemy import update

    from scoring.server.app import build_state
    from scoring.server.auth import Principal
    from scoring.server.config import Settings
    from scoring.server.heartbeats import heartbeat
    from scoring.server.replicas import sync_fleet

    url = new_database(postgres)
    a = build_state(Settings(database=url, files_dir=str(tmp_path / "a"),
                             demo=str(tmp_path / "a.json"), demo_agents=1))  # fmt: skip
    b = build_state(Settings(database=url, files_dir=str(tmp_path / "b"),
                             demo=str(tmp_path / "b.json"), demo_agents=1))  # fmt: skip
    try:
        demo = json.loads((tmp_path / "a.json").read_text())
        agent_id = next(iter(demo["agent_keys"]))
        who = Principal("agent", UUID(demo["team_id"]), agent_id=agent_id)
        seen: dict[str, tuple[object, float]] = {}
        assert agent_id not in b.fleet
        body = {"status": "idle", "gpu_capacity": 2, "running_count": 0, "labels": ["gpu"],
                "region": "us-east", "vram_gb": 24}  # fmt: skip
        heartbeat(a, who, body)
        assert sync_fleet(b, seen) == 1
        got = b.fleet.get(agent_id)
        assert (got.gpu_capacity, got.running_count, got.labels) == (2, 0, frozenset({"gpu"}))
        assert got.last_heartbeat == a.fleet.get(agent_id).last_heartbeat
        assert sync_fleet(b, seen) == 0  # nothing new

        def reserved(n: int) -> None:  # what another replica's committed placements leave
            with a.database.begin() as conn:
                conn.execute(update(db.agents).where(db.agents.c.id == agent_id)
                             .values(running_count=n))  # fmt: skip

        reserved(2)
        assert sync_fleet(b, seen) == 1 and b.fleet.get(agent_id).running_count == 2
        reserved(1)  # a completion recorded elsewhere
        b.pending[agent_id] += 1  # and one placement of b's own being committed: still 2
        assert sync_fleet(b, seen) == 0 and b.fleet.get(agent_id).running_count == 2
        b.pending.clear()
        assert sync_fleet(b, seen) == 1 and b.fleet.get(agent_id).running_count == 1
        time.sleep(0.01)
        heartbeat(a, who, {**body, "labels": ["gpu", "comfyui"]})  # a changed record
        assert sync_fleet(b, seen) == 1
        assert b.fleet.get(agent_id).labels == frozenset({"gpu", "comfyui"})
        assert b.fleet.get(agent_id).running_count == 1
    finally:
        a.database.dispose()
        b.database.dispose()
