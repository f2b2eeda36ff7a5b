"""The cold-placement experiments (:mod:`scoring.research.emulate`): their ``score`` rule restates
``scoring.assign`` and is tested equal to it; every rule keeps the simulation's invariants."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import Agent, AgentStatus, DispatchRequest, Fleet, assign, models
from scoring.research.emulate import ColdRule
from scoring.sim import compare
from scoring.sim.catalog import policy_names
from scoring.sim.view import FleetView
from tests import test_sim_core as core
from tests.strategies import NOW, agent_lists, policies, requests

COLD = ("cold:score", "cold:spare")
waits = st.sampled_from([0.0, 1.0, 5.0, 30.0])
# a negative age is a stamp after now (a client's clock ahead): never young, whatever the wait
ages = st.sampled_from([0.0, 0.5, 1.0, 4.999, 5.0, 29.0, 30.0, 100.0, -5.0])


@st.composite
def queues(draw, max_agents: int = 20, max_requests: int = 10):
    """``(agents, requests oldest first, policy)`` with mixed ages, retries and a deferral cap."""
    agents = draw(agent_lists(0, max_agents))
    ids = [a.agent_id for a in agents]
    queue = []
    for _ in range(draw(st.integers(0, max_requests))):
        r = draw(requests(ids))
        queue.append(r.model_copy(update={"submitted_at": NOW - draw(ages)}))
    queue.sort(key=lambda r: r.submitted_at)  # stable, as assign orders a queue
    policy = draw(policies()).model_copy(
        update={
            "locality_wait_s": draw(waits),
            "deferrals_per_slot": draw(st.sampled_from([1, 1, 2, models.MAX_SLOTS])),
        }
    )
    return agents, queue, policy


def _cold_rule(agents, policy) -> ColdRule:
    """The ``score`` rule, its view of the agents as the fleet reports them."""
    rule = ColdRule(policy, rule="score")
    view = FleetView()
    for a in agents:
        view.connect(a.agent_id, a.gpu_capacity, a.region, 3, 0, a.community_opt_in,
                     a.cached_models)  # fmt: skip
        view.agents[a.agent_id].running = a.running_count
    rule.bind(view, lambda a, b: 0.0)
    return rule


@settings(max_examples=300, deadline=None)
@given(queues())
def test_the_score_rule_is_assign(queue):
    """Places, defers (with ``deferrals_per_slot``'s cap) and counts free eligible agents as
    ``assign`` does, request by request, and leaves the same slots taken."""
    agents, reqs, policy = queue
    engine, emulated = Fleet.from_agents(agents), Fleet.from_agents(agents)
    expected = [(d.agent_id, d.deferred, d.eligible) for d in assign(engine, reqs, policy, NOW)]
    rule = _cold_rule(agents, policy)
    got = rule.decide(emulated, reqs, [r.submitted_at for r in reqs], NOW)
    assert got == expected
    running = lambda f: sorted((a.agent_id, a.running_count) for a in f.agents())  # noqa: E731
    assert running(emulated) == running(engine)


def test_the_cap_defers_one_run_per_busy_warm_slot():
    """Three young runs of one kind, one warm agent busy with one run, no other agent warm:
    ``deferrals_per_slot`` 1 defers the oldest and loads the two others cold at once."""
    team = uuid.UUID(int=1)
    common = {"team_id": team, "last_heartbeat": NOW, "labels": {"comfyui"}}
    warm = Agent(agent_id="warm", status=AgentStatus.BUSY, gpu_capacity=1, running_count=1,
                 cached_models={"m"}, **common)  # fmt: skip
    cold = Agent(agent_id="cold", status=AgentStatus.IDLE, gpu_capacity=2, **common)
    runs = [
        DispatchRequest(team_id=team, required_models={"m"}, tie_key=f"r{i}", submitted_at=at)
        for i, at in enumerate((NOW - 3, NOW - 2, NOW - 1))
    ]
    policy = models.ScoringPolicy(locality_wait_s=60.0, deferrals_per_slot=1)
    rule = _cold_rule([warm, cold], policy)
    got = rule.decide(Fleet.from_agents([warm, cold]), runs, [r.submitted_at for r in runs], NOW)
    assert got == [(None, True, 1), ("cold", False, 1), ("cold", False, 1)]


def test_the_family_is_registered_by_importing_research():
    assert {"cold:score", "cold:lru", "cold:spare"} <= set(policy_names())


@pytest.fixture(scope="module")
def cold_runs():
    return compare(core.SMALL, COLD)


@pytest.mark.parametrize("policy", COLD)
def test_cold_rules_keep_the_simulations_invariants(cold_runs, policy):
    core.test_same_seed_same_metrics(cold_runs, policy)
    core.test_every_task_completes_exactly_once_or_is_reported(cold_runs, policy)
    core.test_no_policy_runs_a_task_outside_its_pool(cold_runs, policy)
