"""The fleet: O(1) updates by agent id, round trips, errors, and atomic dispatch under threads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring import Agent, AgentStatus, DispatchRequest, Fleet, pick_agent
from scoring import reference as R
from scoring.layout import COLUMNS
from tests.strategies import NOW, agent_lists, agents, requests

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

TEAM = "11111111-1111-4111-8111-111111111111"


def make(agent_id: str, **fields) -> Agent:
    base = dict(agent_id=agent_id, team_id=TEAM, status="idle", labels={"comfyui"},
                last_heartbeat=NOW, gpu_capacity=2)  # fmt: skip
    return Agent(**{**base, **fields})


@given(agent_lists())
def test_every_agent_reads_back_as_it_went_in(fleet_agents):
    fleet = Fleet.from_agents(fleet_agents)
    assert len(fleet) == len(fleet_agents)
    by_id = {a.agent_id: a for a in fleet_agents}  # rows follow the layout, not the input
    assert {a.agent_id: a for a in fleet.agents()} == by_id and len(fleet.agents()) == len(by_id)
    for agent in fleet_agents:
        assert fleet.get(agent.agent_id) == agent and agent.agent_id in fleet
        assert fleet.cached_models(agent.agent_id) == agent.cached_models
    rows = list(range(len(fleet_agents)))[::-1]
    assert fleet.agent_ids_at(rows) == [fleet.agent_id_at(r) for r in rows]
    assert fleet.agent_ids_at(rows[:1]) == [fleet.agent_id_at(r) for r in rows[:1]]


def test_duplicate_agent_id_is_an_error():
    with pytest.raises(ValueError, match="duplicate agent_id 'a'"):
        Fleet.from_agents([make("a"), make("b"), make("a")])


def test_unknown_agent_id_is_an_error_for_every_update():
    fleet = Fleet.from_agents([make("a")])
    for call in (
        lambda: fleet.heartbeat("ghost", NOW),
        lambda: fleet.heartbeat_many(["a", "ghost"], NOW),
        lambda: fleet.remove("ghost"),
        lambda: fleet.get("ghost"),
        lambda: fleet.release("ghost"),
    ):
        with pytest.raises(KeyError, match="ghost"):
            call()


def test_heartbeat_updates_time_status_and_count_in_place():
    fleet = Fleet.from_agents([make("a"), make("b")])
    columns_before = fleet.columns
    fleet.heartbeat("a", datetime.fromtimestamp(NOW + 5, UTC), status="busy", running_count=1)
    a = fleet.get("a")
    assert (a.last_heartbeat, a.status, a.running_count) == (NOW + 5, AgentStatus.BUSY, 1)
    assert fleet.get("b") == make("b")
    assert fleet.columns is columns_before  # nothing was rebuilt


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"at": float("nan")}, ValueError), ({"at": "soon"}, ValueError),
     ({"at": NOW, "status": "asleep"}, ValueError), ({"at": NOW, "running_count": -1}, ValueError),
     ({"at": NOW, "running_count": 1.5}, ValueError)],
    ids=["nan-time", "text-time", "bad-status", "negative-count", "float-count"],
)  # fmt: skip
def test_bad_heartbeat_is_rejected_and_changes_nothing(kwargs, error):
    fleet = Fleet.from_agents([make("a")])
    with pytest.raises(error):
        fleet.heartbeat("a", **kwargs)
    assert fleet.get("a") == make("a")


def test_heartbeat_many_writes_all_or_nothing():
    fleet = Fleet.from_agents([make(f"a{i}") for i in range(5)])
    fleet.heartbeat_many(["a1", "a3"], [NOW + 1, NOW + 2], status=["busy", "syncing"],
                         running_count=[1, 2])  # fmt: skip
    assert fleet.get("a1").status is AgentStatus.BUSY and fleet.get("a3").running_count == 2
    assert fleet.get("a3").last_heartbeat == NOW + 2 and fleet.get("a0") == make("a0")
    before = fleet.agents()
    with pytest.raises(ValueError):
        fleet.heartbeat_many(["a0", "a1"], NOW + 9, running_count=[1, 99_999])
    with pytest.raises(KeyError):
        fleet.heartbeat_many(["a0", "nobody"], NOW + 9)
    assert fleet.agents() == before


def test_remove_moves_the_last_row_and_keeps_every_other_record():
    fleet = Fleet.from_agents([make(f"a{i}", running_count=i % 2) for i in range(4)])
    fleet.remove("a1")
    assert sorted(fleet) == ["a0", "a2", "a3"]
    assert fleet.get("a3") == make("a3", running_count=1)
    fleet.remove("a3")  # now the last row
    fleet.upsert(make("a9"))
    assert sorted(fleet) == ["a0", "a2", "a9"] and len(fleet) == 3


def test_bitsets_widen_past_64_labels_and_models_without_losing_any():
    first = make("first", labels={"comfyui", "gpu"}, cached_models={"m-0"})
    fleet = Fleet.from_agents([first])
    # 64 labels, the most one agent may carry (DESIGN section 3); with "gpu" of the first agent
    # the fleet knows 65, one more than a bitset word holds.
    wide = make("wide", labels={f"l{i}" for i in range(63)} | {"comfyui"},
                cached_models={f"m-{i}" for i in range(130)})  # fmt: skip
    fleet.upsert(wide)
    assert fleet.columns.labels.shape[1] == 2 and fleet.columns.cached_models.shape[1] == 3
    assert fleet.get("first") == first and fleet.get("wide") == wide
    request = DispatchRequest(team_id=TEAM, required_labels={"l62"}, required_models={"m-129"})
    decision = pick_agent(fleet, request, now=NOW)
    assert decision.agent_id == "wide" and decision.factors["warm"] == 1.0


def test_bytes_per_agent_within_the_64_byte_goal():
    fleet = Fleet.from_agents([make(f"a{i}") for i in range(100)])
    assert fleet.nbytes_per_agent() <= 64


def test_release_gives_back_a_slot_and_idles_an_empty_busy_agent():
    fleet = Fleet.from_agents([make("a", status="busy", running_count=1)])
    fleet.release("a")
    assert fleet.get("a").running_count == 0 and fleet.get("a").status is AgentStatus.IDLE
    fleet.release("a")  # never below zero
    assert fleet.get("a").running_count == 0


def test_dispatch_reserves_the_slot_it_picked():
    fleet = Fleet.from_agents([make("a", gpu_capacity=1)])
    request = DispatchRequest(team_id=TEAM)
    first = fleet.dispatch(request, now=NOW)
    assert first.agent_id == "a" and first.factors["load"] == 1.0
    assert fleet.get("a").running_count == 1 and fleet.get("a").status is AgentStatus.BUSY
    second = fleet.dispatch(request, now=NOW)
    assert second.agent_id is None and second.rejected["capacity"] == 1


def test_concurrent_dispatches_never_overfill_an_agent():
    capacities = [1, 2, 3, 1, 4, 2, 1, 3]
    fleet = Fleet.from_agents([make(f"a{i}", gpu_capacity=c) for i, c in enumerate(capacities)])
    placed: list[str | None] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(w: int) -> None:
        start.wait()
        for t in range(20):
            d = fleet.dispatch(DispatchRequest(team_id=TEAM, tie_key=f"{w}-{t}"), now=NOW)
            with lock:
                placed.append(d.agent_id)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 80 attempts, 17 slots: exactly 17 placements, each agent filled to, never past, capacity
    assert sum(p is not None for p in placed) == sum(capacities)
    for i, capacity in enumerate(capacities):
        assert placed.count(f"a{i}") == capacity == fleet.get(f"a{i}").running_count


@st.composite
def operations(draw):
    """A fleet, then a random sequence of upserts, removes and heartbeats."""
    start = draw(agent_lists(max_size=20))
    ops = []
    for k in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["upsert", "remove", "heartbeat"]))
        ops.append((kind, draw(agents(f"agent-{draw(st.integers(0, 25)):03d}")), k))
    return start, ops


@given(operations(), st.data())
def test_updates_match_a_plain_model_of_the_fleet(scenario, data):
    start, ops = scenario
    fleet, model = Fleet.from_agents(start), {a.agent_id: a for a in start}
    for kind, agent, k in ops:
        if kind == "upsert":
            fleet.upsert(agent)
            model[agent.agent_id] = agent
        elif agent.agent_id in model and kind == "remove":
            fleet.remove(agent.agent_id)
            del model[agent.agent_id]
        elif agent.agent_id in model:
            status = list(AgentStatus)[k % 5]
            count = k % 3
            fleet.heartbeat(agent.agent_id, NOW - k, status=status, running_count=count)
            model[agent.agent_id] = model[agent.agent_id].model_copy(
                update={"last_heartbeat": NOW - k, "status": status, "running_count": count}
            )
    assert {a.agent_id: a for a in fleet.agents()} == model
    request = data.draw(requests(sorted(model)))
    got = pick_agent(fleet, request, now=NOW)
    expected = R.pick_agent(list(model.values()), request, now=NOW)
    assert (got.agent_id, got.score, got.rejected) == (
        expected.agent_id,
        expected.score,
        expected.rejected,
    )


def test_columns_have_the_documented_dtypes():
    columns = Fleet.from_agents([make("a")]).columns
    for column in COLUMNS:
        assert getattr(columns, column.name).dtype == column.dtype, column.name
    assert columns.team.dtype == np.int32 and columns.labels.dtype == np.uint64
    # VRAM in quarter GB and failure rates in 1/32768 steps keep an agent within 64 bytes
    assert columns.gpu_capacity.dtype == np.uint16 and columns.vram_gb.dtype == np.uint16


def test_vram_and_failure_rate_keep_the_precision_the_fleet_stores():
    # 23.9 GB is kept as 23.75 (down to the quarter GB: never more than the agent has)
    agent = make("a", vram_gb=23.9, failure_rate=0.1)
    assert agent.vram_gb == 23.75 and agent.failure_rate == 3277 / 32768  # 0.1 * 32768 = 3276.8
    assert Fleet.from_agents([agent]).get("a") == agent


def test_reserve_takes_a_slot_of_a_chosen_agent_and_refuses_a_full_one():
    fleet = Fleet.from_agents([make("a", gpu_capacity=1)])
    fleet.reserve("a")
    assert fleet.get("a").running_count == 1 and fleet.get("a").status is AgentStatus.BUSY
    with pytest.raises(ValueError, match="no free slot"):
        fleet.reserve("a")
    assert fleet.get("a").running_count == 1
    with pytest.raises(KeyError):
        fleet.reserve("ghost")


def test_heartbeat_reports_cached_models_past_one_bitset_word():
    fleet = Fleet.from_agents([make("a", cached_models={"m-0"}), make("b")])
    many = {f"m-{i}" for i in range(100)}
    fleet.heartbeat("a", NOW + 1, cached_models=many)
    assert fleet.get("a").cached_models == many and fleet.get("b") == make("b")
    request = DispatchRequest(team_id=TEAM, required_models={"m-99"})
    assert pick_agent(fleet, request, now=NOW).factors["warm"] == 1.0
    fleet.heartbeat("a", NOW + 2, cached_models=[])
    assert fleet.get("a").cached_models == frozenset()
