"""Slot holds (:mod:`scoring.holds`) and the replica registry (:mod:`scoring.server.shares`):
who owns which agent, which free slots a dispatcher holds for warm runs and for their owner, the
requests it places with them held, and the dispatch loop doing so.

Plain unit and property tests on a Fleet, the simulation and a SQLite database; the herding the
holds remove is measured by ``tests/server/herding.py`` on PostgreSQL, what they do to decisions
by ``tests/server/shares_sim.py`` on the trace."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, assign
from scoring.holds import Held, SlotHolds, owner, restrict
from scoring.models import MAX_EXCLUDED
from scoring.server import db, shares
from scoring.sim.simulation import SimConfig, prepare, simulate

from .shares_sim import Replicated, run

TEAM = uuid.UUID(int=7)
ids = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12)


def agent(agent_id: str, running: int = 0, capacity: int = 1, models: set[str] = frozenset()):
    return Agent(agent_id=agent_id, team_id=TEAM, status="busy" if running else "idle",
                 labels={"comfyui"}, last_heartbeat=100.0, gpu_capacity=capacity,
                 running_count=running, cached_models=set(models))  # fmt: skip


def two_replicas(agents: list[str]) -> tuple[str, str, list[str], list[str]]:
    """Replica ids ``a`` and ``b``, and which of ``agents`` each owns."""
    mine = [x for x in agents if owner(x, ("a", "b")) == "a"]
    return "a", "b", mine, [x for x in agents if x not in mine]


# --- ownership ---------------------------------------------------------------------------------


@given(st.sets(ids, min_size=1, max_size=40), st.sets(ids, min_size=2, max_size=6))
def test_every_agent_has_one_owner_among_the_replicas(agents, replicas):
    order = sorted(replicas)
    for a in agents:
        assert owner(a, order) in replicas
        assert owner(a, order) == owner(a, order[::-1])  # not the order given


@given(st.sets(ids, min_size=1, max_size=40), st.sets(ids, min_size=2, max_size=6), st.data())
def test_a_replica_that_goes_moves_only_its_own_agents(agents, replicas, data):
    gone = data.draw(st.sampled_from(sorted(replicas)))
    rest = sorted(replicas - {gone})
    for a in agents:
        before = owner(a, sorted(replicas))
        if before != gone:
            assert owner(a, rest) == before


def test_ownership_spreads_agents_over_replicas():
    counts = Counter(owner(f"gpu-{i}", ("r1", "r2", "r3", "r4")) for i in range(4000))
    assert set(counts) == {"r1", "r2", "r3", "r4"}
    assert min(counts.values()) > 850  # 1,000 each expected; 850 is 4.7 standard deviations off


# --- held slots --------------------------------------------------------------------------------


def test_a_saturated_replica_holds_fresh_slots_for_warm_runs_and_others_for_their_owner():
    names = [f"gpu-{i}" for i in range(12)]
    me, other, mine, theirs = two_replicas(names)
    assert mine and theirs
    full = {names[0], names[1]}
    fleet = Fleet.from_agents([agent(x, running=1 if x in full else 0) for x in names])
    holds = SlotHolds(me, hold_s=1.0, grace_s=1.5)
    holds.update([me, other], saturated=True)
    free = set(names) - full
    assert holds.held(fleet, now=10.0) == (free, set(theirs) - full)
    assert holds.held(fleet, now=10.9) == (free, set(theirs) - full)
    assert holds.held(fleet, now=11.0) == (set(), set(theirs) - full)  # warm runs had their second
    assert holds.held(fleet, now=11.5) == (set(), set())  # the owner had its time: anyone's now


def test_a_slot_freed_again_is_held_again_from_when_it_freed():
    names = [f"gpu-{i}" for i in range(12)]
    me, other, _, theirs = two_replicas(names)
    x = theirs[0]
    fleet = Fleet.from_agents([agent(n) for n in names])
    shares_ = SlotHolds(me, hold_s=0.5, grace_s=1.0)
    shares_.update([me, other], saturated=True)
    assert x in shares_.held(fleet, now=10.0).foreign
    fleet.heartbeat(x, 100.0, running_count=1)  # taken
    assert x not in shares_.held(fleet, now=10.5).foreign
    fleet.heartbeat(x, 100.0, running_count=0)  # free again, first seen so at 12.0
    assert x in shares_.held(fleet, now=12.0).fresh
    assert x not in shares_.held(fleet, now=12.5).fresh
    assert x in shares_.held(fleet, now=12.9).foreign
    assert x not in shares_.held(fleet, now=13.0).foreign


def test_an_agent_its_owner_keeps_busy_stays_held():
    """Seen free at every sync, but its count changes: the owner is using it."""
    names = [f"gpu-{i}" for i in range(12)]
    me, other, _, theirs = two_replicas(names)
    x = theirs[0]
    fleet = Fleet.from_agents([agent(n, capacity=3) for n in names])
    shares_ = SlotHolds(me, hold_s=0.5, grace_s=1.0)
    shares_.update([me, other], saturated=True)
    for k, now in enumerate((10.0, 10.8, 11.6, 12.4)):
        fleet.heartbeat(x, 100.0, running_count=k % 3)
        assert x in shares_.held(fleet, now=now).foreign
    assert x not in shares_.held(fleet, now=13.4).foreign  # unchanged for the grace: anyone's


@pytest.mark.parametrize("replicas", [["a"], ["a", "b"]])
def test_with_slots_to_spare_fresh_slots_are_held_for_warm_runs_but_none_for_owners(replicas):
    names = [f"gpu-{i}" for i in range(12)]
    fleet = Fleet.from_agents([agent(n) for n in names])
    holds = SlotHolds("a")
    holds.update(replicas, saturated=False)
    assert holds.held(fleet, now=10.0) == (set(names), set())
    assert holds.release_at() == 10.0 + holds.hold_s
    assert not holds.held(fleet, now=10.0 + holds.hold_s)
    assert holds.release_at() is None


def test_a_lone_dispatcher_holds_fresh_slots_for_warm_runs_only():
    names = [f"gpu-{i}" for i in range(12)]
    fleet = Fleet.from_agents([agent(n, running=1 if n == "gpu-0" else 0) for n in names])
    holds = SlotHolds("a")
    holds.update(["a"], saturated=True)
    assert holds.held(fleet, now=10.0) == (set(names) - {"gpu-0"}, set())


def test_a_replica_that_goes_hands_its_agents_to_the_others():
    names = [f"gpu-{i}" for i in range(12)]
    me, other, _, theirs = two_replicas(names)
    fleet = Fleet.from_agents([agent(n) for n in names])
    holds = SlotHolds(me)
    holds.update([me, other], saturated=True)
    assert holds.held(fleet, now=10.0).foreign == set(theirs)
    holds.update([me], saturated=True)  # the other one stopped refreshing its row
    assert holds.held(fleet, now=10.1).foreign == set()


# --- requests placed with slots held -----------------------------------------------------------


def test_restrict_excludes_held_agents_but_never_a_warm_one():
    fleet = Fleet.from_agents([agent("warm", models={"sdxl"}), agent("cold"), agent("mine")])
    warm_run = DispatchRequest(team_id=TEAM, required_models={"sdxl"}, tie_key="1")
    any_run = DispatchRequest(team_id=TEAM, tie_key="2")
    excluded = DispatchRequest(team_id=TEAM, exclude_agents={"cold"}, tie_key="3")
    foreign = Held(foreign=frozenset({"warm", "cold"}))
    out = restrict(fleet, [warm_run, any_run, excluded], foreign)
    assert out[0].exclude_agents == {"cold"}  # "warm" has its model: a warm placement stays open
    assert out[1].exclude_agents == {"warm", "cold"}  # no model to be warm for
    assert out[2].exclude_agents == {"warm", "cold"}
    assert [r.tie_key for r in out] == ["1", "2", "3"]
    assert restrict(fleet, out, Held()) == out
    # held for warm runs only: a run with no model to load is not held back
    out = restrict(fleet, [warm_run, any_run], Held(fresh=frozenset({"warm", "cold"})))
    assert out[0].exclude_agents == {"cold"} and out[1].exclude_agents == set()


def test_requests_of_one_template_keep_one_template():
    fleet = Fleet.from_agents([agent(f"gpu-{i}") for i in range(5)])
    runs = [DispatchRequest(team_id=TEAM, tie_key=str(i)) for i in range(4)]
    out = restrict(fleet, runs, Held(foreign=frozenset({"gpu-1", "gpu-3"})))
    assert len({r.template for r in out}) == 1


def test_restrict_keeps_a_request_within_the_exclusion_limit():
    fleet = Fleet.from_agents([agent(f"gpu-{i}") for i in range(MAX_EXCLUDED + 10)])
    run = DispatchRequest(team_id=TEAM, exclude_agents={"gpu-0"})
    held = frozenset(f"gpu-{i}" for i in range(MAX_EXCLUDED + 10))
    (out,) = restrict(fleet, [run], Held(foreign=held))
    assert len(out.exclude_agents) == MAX_EXCLUDED and "gpu-0" in out.exclude_agents


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_assign_with_slots_held_never_takes_a_held_cold_slot(data):
    n = data.draw(st.integers(2, 10))
    models = [data.draw(st.sets(st.sampled_from(["m1", "m2"]))) for _ in range(n)]
    fleet = Fleet.from_agents([agent(f"gpu-{i}", models=models[i]) for i in range(n)])
    held = frozenset(f"gpu-{i}" for i in data.draw(st.sets(st.integers(0, n - 1))))
    runs = [
        DispatchRequest(team_id=TEAM, tie_key=str(k),
                        required_models=data.draw(st.sets(st.sampled_from(["m1", "m2"]))))
        for k in range(data.draw(st.integers(1, 12)))
    ]  # fmt: skip
    policy = ScoringPolicy(locality_wait_s=0.0)
    fresh = data.draw(st.booleans())  # held for warm runs, or for another replica
    decisions = assign(fleet, restrict(fleet, runs, Held(held) if fresh else Held(foreign=held)),
                       policy, now=100.0)  # fmt: skip
    for request, d in zip(runs, decisions, strict=True):
        if d.agent_id in held:  # only where every required model is cached, or none is needed
            needed = request.required_models
            warm = needed and needed <= models[int(d.agent_id[4:])]
            assert warm or (fresh and not needed)
    # the slots left free are held ones or nobody wanted them
    if any(d.agent_id is None for d in decisions):
        assert all(fleet.get(f"gpu-{i}").running_count == 1 or f"gpu-{i}" in held
                   for i in range(n))  # fmt: skip


# --- the registry of live replicas -------------------------------------------------------------


def test_replicas_register_and_expire(tmp_path: Path):
    database = db.Database(f"sqlite:///{tmp_path / 'r.db'}")
    database.create()
    with database.begin() as conn:
        assert shares.heartbeat(conn, "b", 100.0) == ("b",)
        assert shares.heartbeat(conn, "a", 101.0) == ("a", "b")
        assert shares.heartbeat(conn, "a", 102.0) == ("a", "b")
        assert shares.heartbeat(conn, "a", 103.5) == ("a",)  # b unseen for more than TTL_S
        shares.heartbeat(conn, "a", 100.0 + 10 * shares.TTL_S + 1)
        rows = conn.execute(db.replicas.select()).all()
    assert [r.id for r in rows] == ["a"]  # long gone rows are deleted
    with database.read() as conn:
        assert shares.queued_count(conn) == 0
    database.dispose()


# --- what holding costs in the simulation (tests/server/shares_sim.py) --------------------------


def test_one_replica_in_the_simulation_is_the_default_scorer():
    """A lone replica holds what the default scorer holds: the same run, metric for metric."""
    config = SimConfig(n_agents=24, n_tasks=600, load=0.9, seed=3)
    plain = run(config, [1])[1]
    workload, agents = prepare(config)
    alone = simulate(config, Replicated(config, 1), workload, agents)
    drop = {"wall_s", "tasks_per_wall_s"}
    assert {k: v for k, v in alone.metrics.items() if k not in drop} == {
        k: v for k, v in plain.items() if k not in drop
    }


def test_replicas_holding_slots_still_complete_every_task():
    config = SimConfig(n_agents=24, n_tasks=600, load=0.9, seed=3)
    for r, metrics in run(config, [2, 4]).items():
        assert metrics["completed"] == metrics["tasks"] == 600, r
        assert metrics["waiting"] == metrics["in_flight"] == 0, r


# --- the dispatch loop with slots held (in process, on SQLite) ---------------------------------


def test_the_dispatch_loop_leaves_a_fresh_slot_to_its_owner_and_explains_by_the_run(tmp_path):
    """A queued run whose only agent belongs to another replica waits out the grace, with an
    explanation of its own request (the held agent is not one of its exclusions), then runs."""
    import json
    import time as clock

    from scoring.server.app import build_state
    from scoring.server.auth import Principal
    from scoring.server.config import Settings
    from scoring.server.dispatch import Dispatcher
    from scoring.server.heartbeats import heartbeat

    state = build_state(Settings(database=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 files_dir=str(tmp_path / "files"),
                                 demo=str(tmp_path / "demo.json"), demo_agents=1))  # fmt: skip
    try:
        demo = json.loads((tmp_path / "demo.json").read_text())
        agent_id = next(iter(demo["agent_keys"]))
        team = uuid.UUID(demo["team_id"])
        me = "replica-me"
        other = next(f"replica-{k}" for k in range(100) if owner(agent_id, (me, f"replica-{k}"))
                     != me)  # fmt: skip
        state.holds = SlotHolds(me, grace_s=1.0)
        state.holds.update([me, other], saturated=True)  # what a replica's sync thread tells it
        state.free_slots = 0  # a replica: its sync thread judges the queue
        heartbeat(
            state,
            Principal("agent", team, agent_id=agent_id),
            {"status": "idle", "gpu_capacity": 1, "running_count": 0, "labels": ["gpu", "comfyui"]},
        )
        request = DispatchRequest(team_id=team, required_labels={"gpu"})
        now = clock.time()
        with state.database.begin() as conn:
            conn.execute(db.tasks.insert().values(
                id=str(uuid.uuid4()), team_id=str(team), workflow_id=demo["workflow_id"],
                workflow_version=1, dispatch_target="agent", tool_type="comfyui",
                status="queued", agent_id=None, parameters={}, attempts=0, excluded=[],
                request=request.model_dump(mode="json"), explain="queued", outputs=None,
                created_at=now, updated_at=now))  # fmt: skip
        dispatcher = Dispatcher(state)
        assert dispatcher.run_once(now) == 0  # held for its owner
        with state.database.read() as conn:
            (row,) = conn.execute(db.tasks.select()).all()
        assert row.status == "queued"
        assert row.explain == "1/1 agents eligible"  # its own request: nothing excluded
        assert dispatcher.stats["held_slots"] == 1
        assert dispatcher.run_once(now + 0.9) == 0
        assert dispatcher.run_once(now + 1.0) == 1  # the owner had no use for it: anyone's
        with state.database.read() as conn:
            (row,) = conn.execute(db.tasks.select()).all()
        assert (row.status, row.agent_id) == ("dispatched", agent_id)
    finally:
        state.database.dispose()
