"""A template's kept kernel arguments (``scoring.pick.Bound``) follow every change of the fleet.

``pick_agent`` builds a template's arguments on its first pick and reuses them while
``Fleet.version`` stays (the fleet forgets them all when it moves); these cases change the fleet
in each way that moves rows, indexes, columns or names, and check each pick against the full scan
and the plain-Python reference.
"""

from __future__ import annotations

import pytest

from scoring import DispatchRequest, Fleet, ScoringPolicy, pick_agent
from scoring import reference as R
from scoring.pick import decide
from tests.test_worked_examples import EQUAL, NOW, OTHER, agent, request

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels


def _check(fleet: Fleet, req: DispatchRequest, policy: ScoringPolicy = EQUAL):
    """The pick, after checking it against the full scan and the reference; and whether it
    used arguments kept from an earlier pick."""
    kept = fleet.pick_cache.get(req.template_id)
    reused = kept is not None and kept.policy is policy
    got = pick_agent(fleet, req, policy, now=NOW)
    with fleet.lock:
        assert decide(fleet, req, policy, NOW, full_scan=True) == got
    expected = R.pick_agent(fleet.agents(), req, policy, now=NOW)
    assert (got.agent_id, got.score, got.eligible, got.rejected, got.considered) == (
        expected.agent_id, expected.score, expected.eligible, expected.rejected,
        expected.considered,
    )  # fmt: skip
    return got, reused


def test_kept_arguments_follow_inserts_removals_and_team_changes():
    fleet = Fleet.from_agents([agent("a", running_count=2), agent("b", running_count=3)])
    req = request()
    # load factor: a 1 - 2/4 = 0.5, b 0.25: a wins
    got, reused = _check(fleet, req)
    assert (got.agent_id, reused) == ("a", False)
    got, reused = _check(fleet, req)
    assert (got.agent_id, got.considered, reused) == ("a", 2, True)

    fleet.upsert(agent("c"))  # a new row in the team: load 1.0, it wins
    got, reused = _check(fleet, req)
    assert (got.agent_id, got.considered, reused) == ("c", 3, False)
    assert _check(fleet, req)[1]

    fleet.upsert(agent("c", team_id=OTHER))  # c leaves the team (same row, other index)
    got, _ = _check(fleet, req)
    assert (got.agent_id, got.considered, got.rejected["pool"]) == ("a", 2, 1)

    fleet.remove("a")  # the last row (c) moves into a's place
    got, _ = _check(fleet, req)
    assert (got.agent_id, got.considered) == ("b", 1)

    fleet.upsert(agent("c"))  # c joins the team again (same row, back in the team's index)
    got, _ = _check(fleet, req)
    assert (got.agent_id, got.considered) == ("c", 2)


def test_slots_and_heartbeats_need_no_new_arguments():
    fleet = Fleet.from_agents([agent("a"), agent("b", running_count=1)])
    req = request()
    assert _check(fleet, req)[0].agent_id == "a"
    version = fleet.version
    fleet.reserve("a")  # written in place: a is now as loaded as b (1 of 4)
    fleet.reserve("a")
    got, reused = _check(fleet, req)
    assert (got.agent_id, reused) == ("b", True)
    fleet.heartbeat("b", NOW - 3600)  # stale now
    got, reused = _check(fleet, req)
    assert (got.agent_id, got.rejected["stale"], reused) == ("a", 1, True)
    assert fleet.version == version


def test_kept_arguments_follow_new_names_and_wider_bitsets():
    fleet = Fleet.from_agents([agent("a"), agent("b", running_count=1)])
    req = request(required_models={"m-70"})
    assert _check(fleet, req)[0].agent_id == "a"  # no agent has m-70: warm 0 for both
    # 71 model names: the bitsets grow to two words, the column arrays are new ones
    fleet.heartbeat("b", NOW, cached_models={f"m-{i}" for i in range(71)})
    got, reused = _check(fleet, req)
    assert (got.agent_id, got.factors["warm"], reused) == ("b", 1.0, False)
    fleet.heartbeat("b", NOW, cached_models=set())  # and back to one word
    got, reused = _check(fleet, req)
    assert (got.agent_id, reused) == ("a", False)


def test_each_policy_object_keeps_its_own_arguments():
    fleet = Fleet.from_agents(
        [agent("a", running_count=2), agent("b", team_id=OTHER, community_opt_in=True)]
    )
    req = request(target_pool="community")
    # pool factor: a 1 (the team's), b 0; load: a 0.5, b 1. Only the pool weight: a wins;
    # only the load weight: b wins. Alternating, each pick rebuilds what the other replaced.
    pool_only = ScoringPolicy(weights={"pool": 1.0, "region": 0.0, "load": 0.0, "warm": 0.0,
                                       "gpu": 0.0, "reliability": 0.0})  # fmt: skip
    load_only = ScoringPolicy(weights={"pool": 0.0, "region": 0.0, "load": 1.0, "warm": 0.0,
                                       "gpu": 0.0, "reliability": 0.0})  # fmt: skip
    for _ in range(2):
        assert _check(fleet, req, pool_only)[0].agent_id == "a"
        assert _check(fleet, req, load_only)[0].agent_id == "b"


def test_a_new_version_forgets_every_template_and_its_arrays():
    fleet = Fleet.from_agents([agent("a"), agent("b", team_id=OTHER, community_opt_in=True)])
    team, community = request(), request(target_pool="community")
    _check(fleet, team)
    _check(fleet, community)
    assert {team.template_id, community.template_id} <= fleet.pick_cache.keys()
    fleet.upsert(agent("c", team_id=OTHER))  # a new version
    _check(fleet, team)
    # the community template's arguments (and the arrays they hold) are gone, not just stale
    assert set(fleet.pick_cache) == {team.template_id}
