"""Validation of the input records: every bad value is a ValidationError naming its field."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from scoring import Agent, AgentStatus, DispatchRequest, ScoringPolicy
from scoring.models import MAX_EXCLUDED
from tests.strategies import requests

TEAM = "11111111-1111-4111-8111-111111111111"
GOOD_AGENT = dict(agent_id="gpu-node-01", team_id=TEAM, status="idle", last_heartbeat=0.0,
                  gpu_capacity=4)  # fmt: skip


def _error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_capacity", 0),
        ("gpu_capacity", -1),
        ("gpu_capacity", 70_000),
        ("running_count", -1),
        ("last_heartbeat", math.nan),
        ("last_heartbeat", math.inf),
        ("vram_gb", math.nan),
        ("vram_gb", -1.0),
        ("failure_rate", 1.5),
        ("failure_rate", math.nan),
        ("region", "r" * 65),
        ("labels", {"x" * 65}),
        ("labels", {"   "}),
        ("status", "sleeping"),
        ("team_id", "not-a-uuid"),
        ("agent_id", ""),
        ("agent_id", " padded "),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_agent_field_is_named(field, value):
    with pytest.raises(ValidationError) as info:
        Agent(**{**GOOD_AGENT, field: value})
    assert any(loc.startswith(field) for loc in _error_fields(info.value))


def test_agent_normalises_and_converts():
    agent = Agent(**{**GOOD_AGENT, "region": "  US-East ", "labels": [" GPU", "ComfyUI"],
                     "last_heartbeat": datetime(2026, 1, 1, tzinfo=UTC)})  # fmt: skip
    assert agent.region == "us-east" and agent.labels == {"gpu", "comfyui"}
    assert agent.last_heartbeat == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert str(agent.team_id) == TEAM and agent.status is AgentStatus.IDLE
    assert Agent(**{**GOOD_AGENT, "region": "   "}).region is None  # empty means unknown


def test_naive_datetime_means_utc():
    naive = Agent(**{**GOOD_AGENT, "last_heartbeat": datetime(2026, 1, 1)})
    assert naive.last_heartbeat == datetime(2026, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"target_pool": "everyone"}, "target_pool"),
        ({"tool_type": "blender"}, "tool_type"),
        ({"submitter_region": "x" * 65}, "submitter_region"),
        ({"min_vram_gb": math.inf}, "min_vram_gb"),
        ({"preferred_gpu": "---"}, "preferred_gpu"),
        ({"required_labels": {"ok", ""}}, "required_labels"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"submitted_at": math.nan}, "submitted_at"),
        ({"submitted_at": -1.0}, "submitted_at"),
    ],
    ids=[
        "pool",
        "tool",
        "region",
        "vram",
        "gpu",
        "label",
        "extra",
        "submitted-nan",
        "submitted-negative",
    ],
)
def test_bad_request_field_is_named(fields, bad):
    with pytest.raises(ValidationError) as info:
        DispatchRequest(team_id=TEAM, **fields)
    assert bad in _error_fields(info.value)


def test_request_adds_the_tool_type_to_required_labels():
    request = DispatchRequest(team_id=TEAM, tool_type="nerfstudio", required_labels={"GPU"})
    assert request.labels_needed == {"gpu", "nerfstudio"}


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"weights": {"region": -1}}, "weights.region"),
        ({"weights": {"load": math.nan}}, "weights.load"),
        ({"weights": {"speed": 1}}, "weights.speed"),
        ({"weights": dict.fromkeys(["region", "load", "pool", "warm", "gpu", "reliability"], 0)},
         "weights"),
        ({"heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
        ({"tie_band": -0.1}, "tie_band"),
        ({"region_affinity": {("us-east", "us-east"): 0.5}}, "region_affinity"),
        ({"region_affinity": {("us-east", "us-west"): 1.5}}, "region_affinity"),
        ({"region_affinity": {("a", "b"): 0.2, ("B", "A"): 0.3}}, "region_affinity"),
        ({"locality_wait_s": -1.0}, "locality_wait_s"),
        ({"locality_wait_s": math.inf}, "locality_wait_s"),
    ],
    ids=["negative", "nan", "unknown-factor", "all-zero", "timeout", "band", "same-region",
         "affinity-range", "conflicting-pair", "wait-negative", "wait-inf"],
)  # fmt: skip
def test_bad_policy_field_is_named(fields, bad):
    with pytest.raises(ValidationError) as info:
        ScoringPolicy(**fields)
    assert bad in _error_fields(info.value)


def test_policy_merges_weights_and_is_immutable():
    policy = ScoringPolicy(weights={"region": 2.5}, region_affinity={("US-West", "us-east"): 0.6})
    assert policy.weights["region"] == 2.5
    assert policy.weights["load"] == ScoringPolicy().weights["load"]  # omitted keep defaults
    assert policy.affinity("us-east", "us-west") == policy.affinity("us-west", "us-east") == 0.6
    with pytest.raises(ValidationError):
        policy.tie_band = 1.0  # type: ignore[misc]
    assert policy == ScoringPolicy.model_validate(policy.model_dump())
    assert hash(policy) == hash(ScoringPolicy.model_validate(policy.model_dump()))


def test_default_policy_weights_are_all_positive():
    assert all(w > 0 for _, w in ScoringPolicy().weights.items())
    assert ScoringPolicy().heartbeat_timeout_s == 30.0 and ScoringPolicy().tie_band == 0.0
    assert (
        ScoringPolicy().locality_wait_s == 60.0
    )  # chosen by the trace replay (notebooks/WEIGHTS.md)


def test_copies_are_validated_and_recompute_cached_values():
    policy = ScoringPolicy()
    assert policy.affinity("us-east", "us-west") == 0.0  # fills the cached affinity map
    paired = policy.model_copy(update={"region_affinity": {("us-east", "us-west"): 0.6}})
    assert paired.affinity("us-east", "us-west") == 0.6
    with pytest.raises(ValidationError):
        policy.model_copy(update={"tie_band": -1})
    request = DispatchRequest(team_id=TEAM)
    assert request.labels_needed == {"comfyui"}
    assert request.model_copy(update={"tool_type": "nerfstudio"}).labels_needed == {"nerfstudio"}


# --- DispatchRequest.excluding: the copy scoring.holds.restrict makes of a held-back request ---


HELD = st.frozensets(st.sampled_from(["gpu-2", "gpu-4", "node 7", "x" * 256]), min_size=1)


@given(requests(agent_ids=["gpu-1", "gpu-2", "gpu-3"]), HELD)
def test_excluding_is_the_validated_copy_with_those_agents_excluded(req, agents):
    got = req.excluding(agents)
    expected = req.model_copy(update={"exclude_agents": req.exclude_agents | agents})
    assert got == expected and got.model_fields_set == expected.model_fields_set
    # derived values of the copy are its own, not the original's
    assert (got.template, got.template_id, got.queue_entry) == (
        expected.template, expected.template_id, expected.queue_entry)  # fmt: skip
    assert got.template_id != req.template_id or agents <= req.exclude_agents
    assert req.excluding(frozenset(agents)) is got  # kept for the same agents
    assert req.excluding(agents | {"gpu-9"}) is not got


@pytest.mark.parametrize(
    "agents",
    [frozenset({"   "}), frozenset({"x" * 257}), frozenset(f"a{i}" for i in range(MAX_EXCLUDED))],
)
def test_excluding_bad_or_too_many_agents_is_a_validation_error(agents):
    req = DispatchRequest(team_id=TEAM, exclude_agents={"gpu-1"})
    with pytest.raises(ValidationError) as info:
        req.excluding(agents)
    assert _error_fields(info.value) == {"exclude_agents"}


def test_running_count_is_committed_plus_in_flight_at_most_max_slots():
    """The server's one rule for the count it reports to its Fleet (scoring.models)."""
    from scoring.models import MAX_SLOTS, running_count

    assert running_count(3) == 3 and running_count(3, 2) == 5
    assert running_count(MAX_SLOTS - 1, 1) == MAX_SLOTS
    assert running_count(MAX_SLOTS, 7) == MAX_SLOTS
