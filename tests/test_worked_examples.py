"""Worked examples: each case is arithmetic on paper, checked against the engine.

Unless a case says otherwise: one agent of the submitting team, idle, 0 of 4 slots running, labels
{comfyui}, region us-east, failure rate 0; request from us-east with no models, no GPU preference;
policy EQUAL (every weight 1, so the score is the plain mean of the six factors).
"""

from __future__ import annotations

import pytest

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, pick_agent
from scoring import reference as R
from scoring.decision import COUNT_BYTES, FACTOR_BYTES, Decision, decided
from scoring.models import REASONS

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

NOW = 1_000_000.0
TEAM = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
EQUAL = ScoringPolicy(weights=dict.fromkeys(["region", "load", "pool", "warm", "gpu",
                                             "reliability"], 1.0))  # fmt: skip


def agent(agent_id="a", **fields):
    base = dict(
        agent_id=agent_id,
        team_id=TEAM,
        status="idle",
        labels={"comfyui"},
        last_heartbeat=NOW,
        gpu_capacity=4,
        running_count=0,
        region="us-east",
    )
    return Agent(**{**base, **fields})


def request(**fields):
    return DispatchRequest(**{"team_id": TEAM, "submitter_region": "us-east", **fields})


def pick(agents, req, policy=EQUAL):
    return pick_agent(Fleet.from_agents(agents), req, policy, now=NOW)


def rejected_counts(**nonzero):
    """``Decision.rejected`` with every reason 0 but those given."""
    return {reason: nonzero.get(reason, 0) for reason in REASONS}


FACTOR_CASES = [
    # (agent fields, request fields, policy, expected factors, expected score)
    # region unknown on the submitter's side: neutral 0.5
    # (0.5 + 1 + 1 + 0.5 + 0.5 + 1) / 6 = 4.5 / 6 = 0.75
    ({}, {"submitter_region": None}, EQUAL,
     {"region": 0.5, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 0.75),
    # region unknown on the agent's side: neutral 0.5, same 4.5 / 6
    ({"region": None}, {}, EQUAL,
     {"region": 0.5, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 0.75),
    # same region: (1 + 1 + 1 + 0.5 + 0.5 + 1) / 6 = 5 / 6
    ({}, {}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 5 / 6),
    # region given in another case and spacing: " US-East " normalises to us-east, so 5 / 6
    ({"region": " US-East "}, {}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 5 / 6),
    # different regions, no pair configured: (0 + 1 + 1 + 0.5 + 0.5 + 1) / 6 = 4 / 6
    ({"region": "eu-west"}, {}, EQUAL,
     {"region": 0.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 4 / 6),
    # configured pair us-east/us-west at 0.6 (either order): (0.6 + 4) / 6 = 4.6 / 6
    ({"region": "us-west"}, {},
     EQUAL.model_copy(update={"region_affinity": ((("us-east", "us-west"), 0.6),)}),
     {"region": 0.6, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0},
     4.6 / 6),
    # load: 1 of 4 slots busy gives 1 - 1/4 = 0.75: (1 + 0.75 + 1 + 0.5 + 0.5 + 1) / 6 = 4.75 / 6
    ({"running_count": 1}, {}, EQUAL,
     {"region": 1.0, "load": 0.75, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0},
     4.75 / 6),
    # warm: 1 of 2 required models cached = 0.5: still 5 / 6
    ({"cached_models": {"m1"}}, {"required_models": {"m1", "m2"}}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 5 / 6),
    # warm: every required model cached = 1.0: (1 + 1 + 1 + 1 + 0.5 + 1) / 6 = 5.5 / 6
    ({"cached_models": {"m1", "m9"}}, {"required_models": {"m1"}}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 1.0, "gpu": 0.5, "reliability": 1.0},
     5.5 / 6),
    # gpu: RTX_4090 tokens {rtx, 4090} are in "NVIDIA GeForce RTX 4090": 1.0, so 5.5 / 6
    ({"gpu_model": "NVIDIA GeForce RTX 4090"}, {"preferred_gpu": "RTX_4090"}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 1.0, "reliability": 1.0},
     5.5 / 6),
    # gpu: preference not matched: 0.0, so (1 + 1 + 1 + 0.5 + 0 + 1) / 6 = 4.5 / 6
    ({"gpu_model": "NVIDIA A100-SXM4-80GB"}, {"preferred_gpu": "RTX_4090"}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.0, "reliability": 1.0}, 0.75),
    # gpu: agent's model unknown: neutral 0.5, so 5 / 6
    ({}, {"preferred_gpu": "RTX_4090"}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 5 / 6),
    # reliability: failure rate 0.25 gives 0.75: (1 + 1 + 1 + 0.5 + 0.5 + 0.75) / 6 = 4.75 / 6
    ({"failure_rate": 0.25}, {}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 0.75},
     4.75 / 6),
    # pool: a community agent (other team, opted in) scores 0: (1 + 1 + 0 + 0.5 + 0.5 + 1) / 6
    ({"team_id": OTHER, "community_opt_in": True}, {"target_pool": "community"}, EQUAL,
     {"region": 1.0, "load": 1.0, "pool": 0.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0}, 4 / 6),
    # weights region 3, load 1, others 0; 2 of 4 slots busy:
    # (3 * 1.0 + 1 * 0.5) / (3 + 1) = 3.5 / 4 = 0.875
    ({"running_count": 2}, {},
     ScoringPolicy(weights={"region": 3, "load": 1, "pool": 0, "warm": 0, "gpu": 0,
                            "reliability": 0}),
     {"region": 1.0, "load": 0.5, "pool": 1.0, "warm": 0.5, "gpu": 0.5, "reliability": 1.0},
     0.875),
]  # fmt: skip
FACTOR_IDS = [
    "submitter-region-unknown", "agent-region-unknown", "same-region", "region-normalised",
    "different-region", "configured-pair", "load-1-of-4", "warm-half", "warm-all",
    "gpu-match", "gpu-mismatch", "gpu-unknown", "reliability", "community-agent",
    "uneven-weights",
]  # fmt: skip


@pytest.mark.parametrize(("agent_fields", "request_fields", "policy", "factors", "score"),
                         FACTOR_CASES, ids=FACTOR_IDS)  # fmt: skip
def test_factors_and_score(agent_fields, request_fields, policy, factors, score):
    a, req = agent(**agent_fields), request(**request_fields)
    decision = pick([a], req, policy)
    assert decision.agent_id == "a"
    assert decision.factors == factors
    assert decision.score == pytest.approx(score, abs=1e-15)
    assert R.factors(a, req, policy) == factors  # the oracle agrees on paper too


@pytest.mark.parametrize(
    ("status", "eligible"),
    [("idle", True), ("busy", True), ("syncing", False), ("tunnel", False),
     ("unhealthy", False)],
    ids=["idle", "busy", "syncing", "tunnel", "unhealthy"],
)  # fmt: skip
def test_each_status(status, eligible):
    decision = pick([agent(status=status)], request())
    assert (decision.agent_id == "a") is eligible
    assert decision.rejected["status"] == (0 if eligible else 1)


FILTER_CASES = [
    # heartbeat 30.001 s old, timeout 30 s: stale
    ("stale", {"last_heartbeat": NOW - 30.001}, {}),
    ("status", {"status": "unhealthy"}, {}),
    # team pool, agent of another team (opted in or not): pool
    ("pool", {"team_id": OTHER, "community_opt_in": True}, {}),
    # community pool, agent of another team that did not opt in: pool
    ("pool", {"team_id": OTHER}, {"target_pool": "community"}),
    # tool type nerfstudio is itself a required label
    ("labels", {}, {"tool_type": "nerfstudio"}),
    ("labels", {"labels": {"comfyui"}}, {"required_labels": {"gpu-h100"}}),
    # 4 of 4 slots running: capacity
    ("capacity", {"running_count": 4}, {}),
    ("vram", {"vram_gb": 16}, {"min_vram_gb": 24}),
    ("vram", {"vram_gb": None}, {"min_vram_gb": 8}),  # unknown VRAM fails a minimum
    ("excluded", {}, {"exclude_agents": {"a"}}),
    # failure_rate 0.25 (code 8192 of 32768) above max_failure_rate 0.125 (code 4096): failures
    ("failures", {"failure_rate": 0.25}, {"max_failure_rate": 0.125}),
    # one step (1/32768) above the maximum is above it
    ("failures", {"failure_rate": 0.125 + 1 / 32768}, {"max_failure_rate": 0.125}),
]
FILTER_IDS = [
    "stale", "status", "pool-team", "pool-community-no-opt-in", "labels-tool-type",
    "labels-missing", "capacity", "vram-too-small", "vram-unknown", "excluded",
    "failures", "failures-one-step-above",
]  # fmt: skip


@pytest.mark.parametrize(("reason", "agent_fields", "request_fields"), FILTER_CASES,
                         ids=FILTER_IDS)  # fmt: skip
def test_each_filter_rejects(reason, agent_fields, request_fields):
    decision = pick([agent(**agent_fields)], request(**request_fields))
    assert decision.agent_id is None and decision.eligible == 0
    assert decision.rejected == {r: int(r == reason) for r in decision.rejected}


@pytest.mark.parametrize(
    ("failure_rate", "max_failure_rate"),
    [(0.125, 0.125), (0.0, 0.0), (1.0, 1.0), (0.125, 0.125 + 1 / 65536), (0.5, None)],
    ids=["at-the-maximum", "zero-at-zero", "one-at-one", "between-steps", "no-maximum"],
)
def test_a_failure_rate_not_above_the_maximum_passes(failure_rate, max_failure_rate):
    # failures rejects only failure_rate > max_failure_rate: 0.125 (code 4096) at a maximum of
    # 0.125 passes; a maximum between two steps passes the step below it (its code is floor(m *
    # 32768) = 4096); the reference agrees
    agents, req = [agent(failure_rate=failure_rate)], request(max_failure_rate=max_failure_rate)
    decision = pick(agents, req)
    assert decision.agent_id == "a" and decision.rejected["failures"] == 0
    assert R.pick_agent(agents, req, EQUAL, NOW).agent_id == "a"


def test_heartbeat_exactly_at_the_timeout_is_not_stale():
    # now - last_heartbeat = 30 s is not more than the 30 s timeout
    assert pick([agent(last_heartbeat=NOW - 30.0)], request()).agent_id == "a"


def test_every_failed_filter_is_counted():
    # one agent failing three filters counts once under each; the explanation names the label
    failing = agent(last_heartbeat=NOW - 60, status="tunnel", labels={"gpu"})
    decision = pick([failing, agent("b", team_id=OTHER)], request(required_labels={"gpu-h100"}))
    # "b" is another team's: outside the pool, counted once under pool and nowhere else
    assert decision.rejected == rejected_counts(stale=1, status=1, pool=1, labels=1)
    assert decision.considered == 1
    assert decision.explain() == (
        "0/1 agents eligible: 1 stale, 1 status, 1 labels (missing comfyui, gpu-h100)"
    )


def test_region_never_rejects():
    # an agent on another continent is still eligible: region only scores (0.0 here)
    decision = pick([agent(region="ap-south")], request(submitter_region="us-east"))
    assert decision.agent_id == "a" and decision.factors["region"] == 0.0


def test_exact_tie_is_broken_by_tie_key_independent_of_fleet_order():
    twins = [agent("twin-a"), agent("twin-b"), agent("twin-c")]
    winners = set()
    for key in ["task-1", "task-2", "task-3", "task-4", "task-5", "task-6"]:
        req = request(tie_key=key)
        # every twin scores 5 / 6; the lowest tie hash of (key, agent_id) wins
        expected = min(twins, key=lambda a: R.tie_hash(key, a.agent_id)).agent_id
        assert pick(twins, req).agent_id == expected
        assert pick(twins[::-1], req).agent_id == expected
        winners.add(expected)
    assert len(winners) > 1  # different tasks spread over the twins


def test_tie_band_widens_the_tie():
    # a: 5/6 = 0.8333 (same region); b: 4.6/6 = 0.7667 (us-west paired at 0.6); gap 0.0667
    paired = EQUAL.model_copy(update={"region_affinity": ((("us-east", "us-west"), 0.6),)})
    agents = [agent("a"), agent("b", region="us-west")]
    banded = paired.model_copy(update={"tie_band": 0.1})
    for key in [f"task-{i}" for i in range(8)]:
        req = request(tie_key=key)
        assert pick(agents, req, paired).agent_id == "a"  # no band: the higher score
        lower = min(["a", "b"], key=lambda aid: R.tie_hash(key, aid))
        assert pick(agents, req, banded).agent_id == lower  # both within 0.1 of the best


def test_community_pool_mixes_own_and_opted_in_agents():
    own = agent("own", running_count=3)  # own team, no opt-in needed: pool 1.0, load 0.25
    opted = agent("opted", team_id=OTHER, community_opt_in=True)  # pool 0.0, load 1.0
    closed = agent("closed", team_id=OTHER)  # another team, not opted in: rejected
    decision = pick([own, opted, closed], request(target_pool="community"))
    # own: (1 + 0.25 + 1 + 0.5 + 0.5 + 1) / 6 = 4.25 / 6; opted: (1 + 1 + 0 + 2) / 6 = 4 / 6
    assert decision.agent_id == "own" and decision.score == pytest.approx(4.25 / 6)
    assert decision.eligible == 2 and decision.rejected["pool"] == 1
    # in the team pool only the own agent is eligible
    assert pick([opted, closed], request(target_pool="team")).agent_id is None


def test_empty_fleet_is_an_answer_not_an_error():
    decision = pick([], request())
    assert decision.agent_id is None and decision.eligible == 0 and decision.considered == 0
    assert decision.explain() == "0/0 agents eligible (no agent in the pool)"


# --- pool-scoped counting (DESIGN section 4) ----------------------------------------------------


def test_a_foreign_stale_agent_counts_once_under_pool_and_nowhere_else():
    # another team's agent, stale (60 s), tunnel, without comfyui and full: outside the pool, so
    # one count under pool; the team's own agent is eligible
    foreign = agent("foreign", team_id=OTHER, last_heartbeat=NOW - 60, status="tunnel",
                    labels=set(), running_count=4)  # fmt: skip
    decision = pick([agent("own"), foreign], request())
    assert decision.rejected == rejected_counts(pool=1)
    assert decision.considered == 1 and decision.eligible == 1


def test_explain_of_a_team_request_never_mentions_agents_outside_its_pool():
    # 1 own agent (full) and 5 of another team, opted in or not, in every state
    own = agent("own", running_count=4)
    states = ["idle", "busy", "tunnel", "unhealthy", "syncing"]
    others = [agent(f"x{i}", team_id=OTHER, community_opt_in=i % 2 == 0, status=status)
              for i, status in enumerate(states)]  # fmt: skip
    for fleet in ([own], [own, *others]):
        decision = pick(fleet, request(exclude_agents={"x0", "x1"}))
        assert decision.explain() == "0/1 agents eligible: 1 capacity"
    # the community pool takes in the opted-in ones (x0, x2, x4): 4 agents considered;
    # x0 is excluded, x2 is in a tunnel, x4 syncing: none eligible
    decision = pick([own, *others], request(target_pool="community", exclude_agents={"x0"}))
    assert decision.considered == 4 and decision.rejected["pool"] == 2
    assert decision.explain() == "0/4 agents eligible: 2 status, 1 capacity, 1 excluded"


def test_a_picks_decision_is_the_decision_its_constructor_makes():
    # the pick builds its Decision without __init__ (scoring.decision.decided): every attribute,
    # equality, the factors and counts by name and the explanation are those of Decision(...)
    factors = (1.0, 0.5, 1.0, 0.5, 0.5, 1.0)
    rejected = tuple(rejected_counts(status=1, pool=2, labels=3, excluded=1).values())
    for args in (("a", 0.75, factors, 4, rejected, 11, ("gpu-h100",), 7),
                 (None, None, (), 0, rejected, 11, (), -1)):  # fmt: skip
        fast, made = decided(*args), Decision(*args)
        assert fast == made
        for name in ("agent_id", "score", "factors", "eligible", "rejected", "considered",
                     "missing_labels", "row", "deferred", "waiting_for"):  # fmt: skip
            assert getattr(fast, name) == getattr(made, name), name
        assert fast.explain() == made.explain()
    assert decided(*args).rejected == rejected_counts(status=1, pool=2, labels=3, excluded=1)
    # assign's Decisions keep the factors and counts packed as bytes: the same Decision
    packed = ("a", 0.75, FACTOR_BYTES.pack(*factors), 4, COUNT_BYTES.pack(*rejected), 11,
              ("gpu-h100",), 7)  # fmt: skip
    fast, made = decided(*packed), Decision("a", 0.75, factors, 4, rejected, 11, ("gpu-h100",), 7)
    assert fast == made and fast.factors == made.factors and fast.rejected == made.rejected
    assert fast.factors["load"] == 0.5 and fast.rejected["labels"] == 3
    assert fast.explain() == made.explain()
    assert fast.explain() == ("a (score 0.750); 4/11 agents eligible: 1 status, 3 labels"
                              " (missing gpu-h100), 1 excluded")  # fmt: skip
