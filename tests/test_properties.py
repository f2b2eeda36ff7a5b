"""Metamorphic properties and invariants of the engine's pick."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, pick_agent
from scoring import reference as R
from scoring.models import FACTORS
from tests.strategies import NOW, REGIONS, TEAMS, scenarios

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

REASONS_TO_FAIL = ["stale", "status", "pool", "labels", "capacity", "vram", "excluded"]


def _pick(agents, request, policy):
    return pick_agent(Fleet.from_agents(agents), request, policy, now=NOW)


@given(scenarios())
def test_pick_is_always_eligible(scenario):
    agents, request, policy = scenario
    decision = _pick(agents, request, policy)
    if decision.agent_id is not None:
        chosen = next(a for a in agents if a.agent_id == decision.agent_id)
        assert R.reject_reasons(chosen, request, policy, NOW) == []
        assert 0.0 <= decision.score <= 1.0
        assert all(0.0 <= x <= 1.0 for x in decision.factors.values())
    else:
        assert decision.eligible == 0


@given(scenarios())
def test_team_pool_never_picks_another_teams_agent(scenario):
    agents, request, policy = scenario
    request = request.model_copy(update={"target_pool": "team"})
    decision = _pick(agents, request, policy)
    if decision.agent_id is not None:
        chosen = next(a for a in agents if a.agent_id == decision.agent_id)
        assert chosen.team_id == request.team_id


@given(scenarios())
def test_community_pool_never_picks_a_foreign_agent_that_did_not_opt_in(scenario):
    agents, request, policy = scenario
    request = request.model_copy(update={"target_pool": "community"})
    decision = _pick(agents, request, policy)
    if decision.agent_id is not None:
        chosen = next(a for a in agents if a.agent_id == decision.agent_id)
        assert chosen.team_id == request.team_id or chosen.community_opt_in


@given(scenarios(), st.randoms(use_true_random=False))
def test_shuffling_the_fleet_does_not_change_the_pick(scenario, rnd):
    agents, request, policy = scenario
    shuffled = list(agents)
    rnd.shuffle(shuffled)
    first, second = _pick(agents, request, policy), _pick(shuffled, request, policy)
    assert (first.agent_id, first.score) == (second.agent_id, second.score)


@given(scenarios(), st.integers(-8, 8))
def test_scaling_all_weights_does_not_change_the_pick(scenario, exponent):
    # A power of two scales every product and the sum exactly, so the scores are bit-identical;
    # another factor could round an exact tie apart, which is float arithmetic, not a bug.
    agents, request, policy = scenario
    factor = 2.0**exponent
    weights = {f: policy.weights[f] * factor for f in FACTORS}
    scaled = ScoringPolicy.model_validate({**policy.model_dump(), "weights": weights})
    assert _pick(agents, request, policy).agent_id == _pick(agents, request, scaled).agent_id


@given(scenarios(), st.sampled_from(REASONS_TO_FAIL))
def test_adding_an_ineligible_agent_does_not_change_the_pick(scenario, reason):
    agents, request, policy = scenario
    if reason == "excluded":  # excluding an id that no agent has yet changes nothing before
        request = request.model_copy(update={"exclude_agents": request.exclude_agents | {"new"}})
    newcomer = _perfect_agent_failing(reason, request, policy)
    before = _pick(agents, request, policy)
    after = _pick([*agents, newcomer], request, policy)
    assert (after.agent_id, after.score, after.eligible) == (
        before.agent_id,
        before.score,
        before.eligible,
    )
    assert after.rejected[reason] == before.rejected[reason] + 1


def _perfect_agent_failing(reason, request, policy):
    """An agent whose every factor is 1.0 (or neutral), failing exactly one filter."""
    fields = dict(
        agent_id="new",
        team_id=request.team_id,
        status="idle",
        labels=request.required_labels | {request.tool_type},
        last_heartbeat=NOW,
        gpu_capacity=8,
        running_count=0,
        region=request.submitter_region,
        vram_gb=1000.0,
        gpu_model=request.preferred_gpu,
        cached_models=request.required_models,
    )
    match reason:
        case "stale":
            fields["last_heartbeat"] = NOW - policy.heartbeat_timeout_s - 1
        case "status":
            fields["status"] = "unhealthy"
        case "pool":
            other = TEAMS[0] if request.team_id != TEAMS[0] else TEAMS[1]
            fields.update(team_id=other, community_opt_in=False)
        case "labels":
            fields["labels"] = frozenset()
        case "capacity":
            fields["running_count"] = 8
        case "vram":
            assume(request.min_vram_gb is not None)  # only a request with a minimum rejects
            fields["vram_gb"] = None  # unknown VRAM fails any minimum
    return Agent(**fields)


@given(scenarios(), st.data())
def test_region_never_rejects_an_agent(scenario, data):
    agents, request, policy = scenario
    moved = [
        a.model_copy(update={"region": data.draw(st.sampled_from([None, *REGIONS]))})
        for a in agents
    ]
    elsewhere = request.model_copy(
        update={"submitter_region": data.draw(st.sampled_from([None, *REGIONS]))}
    )
    before = _pick(agents, request, policy)
    after = _pick(moved, elsewhere, policy)
    assert (before.eligible, before.rejected) == (after.eligible, after.rejected)


@given(scenarios(min_agents=1))
def test_unknown_region_scores_neutral(scenario):
    agents, request, policy = scenario
    request = request.model_copy(update={"submitter_region": None})
    decision = _pick(agents, request, policy)
    if decision.agent_id is not None:
        assert decision.factors["region"] == 0.5


def test_tie_break_spreads_evenly_across_tasks():
    """Ten identical agents: over 2,000 tie keys each wins about a tenth of the ties."""
    team = "00000000-0000-0000-0000-000000000001"
    agents = [
        Agent(
            agent_id=f"twin-{i}",
            team_id=team,
            status="idle",
            labels={"comfyui"},
            last_heartbeat=NOW,
            gpu_capacity=1,
        )
        for i in range(10)
    ]
    fleet = Fleet.from_agents(agents)
    rnd = random.Random(7)
    wins = dict.fromkeys((a.agent_id for a in agents), 0)
    for _ in range(2000):
        key = f"{rnd.getrandbits(64):016x}"
        request = DispatchRequest(team_id=team, tie_key=key)
        wins[pick_agent(fleet, request, now=NOW).agent_id] += 1
    # Binomial(2000, 0.1): mean 200, sd 13.4; 140..260 is beyond 4.4 sd on either side.
    assert all(140 <= w <= 260 for w in wins.values()), wins
