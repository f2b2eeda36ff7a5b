"""Regression tests for the engine defects of issue 27 (the third attack on the engine).

Each test failed on the code before its fix (checked by reverting the fix and running it).
"""

from __future__ import annotations

import json
import tracemalloc
import uuid

import pytest
from pydantic import ValidationError

from scoring import (
    Agent,
    DispatchRequest,
    Fleet,
    InMemoryFileStore,
    ParameterDef,
    ScoringPolicy,
    Workflow,
    assign,
    pick_agent,
    validate_run,
)
from scoring import reference as R
from scoring.contract.errors import RunValidationError
from scoring.holds import SlotHolds, restrict
from scoring.layout import VRAM_STEPS_PER_GB, VRAM_UNKNOWN
from scoring.models import MAX_TIMESTAMP, MAX_VRAM_GB
from tests.strategies import NOW

#: Defect 5 is about the kernels' entry with numba off: the no-JIT run (make test-nojit) runs these.
pytestmark = pytest.mark.kernels


TEAM = uuid.UUID("7f9c2a52-0d1e-4b7a-9a43-5a1f0c3b2d10")


def _agent(agent_id: str, **fields) -> Agent:
    base = dict(agent_id=agent_id, team_id=TEAM, status="idle", labels={"comfyui"},
                last_heartbeat=NOW, gpu_capacity=2)  # fmt: skip
    return Agent(**{**base, **fields})


# --- defect 5: Decision fields are Python numbers, with the JIT and without ---------------------


def _assert_plain(d) -> None:
    assert type(d.eligible) is int and type(d.row) is int and type(d.considered) is int
    assert d.score is None or type(d.score) is float
    assert all(type(v) is float for v in d.factors.values())
    assert all(type(v) is int for v in d.rejected.values())
    json.dumps({"eligible": d.eligible, "row": d.row, "score": d.score, "factors": d.factors,
                "rejected": d.rejected, "considered": d.considered})  # fmt: skip


def test_defect_5_decision_fields_are_python_numbers():
    fleet = Fleet.from_agents([_agent("a"), _agent("b", status="unhealthy")])
    request = DispatchRequest(team_id=TEAM, tie_key="t")
    _assert_plain(pick_agent(fleet, request, now=NOW))  # the bound (cached) path
    _assert_plain(pick_agent(fleet, request, now=NOW))
    _assert_plain(fleet.dispatch(request, now=NOW))
    none = DispatchRequest(team_id=TEAM, required_labels={"h100"})
    _assert_plain(pick_agent(fleet, none, now=NOW))
    for d in assign(fleet, [request, none], now=NOW):
        _assert_plain(d)


# --- defect 6: validate_run reports, never raises, on deep nesting and lone surrogates ---------


def _workflow(**fields) -> Workflow:
    return Workflow(id=uuid.uuid4(), slug="w", team_id=TEAM, **fields)


@pytest.mark.parametrize("field", ["dispatch_target", "target_pool", "tool_type"])
def test_defect_6_a_body_nested_5000_deep_is_a_validation_error(field):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RunValidationError) as caught:
        validate_run(_workflow(), {field: deep}, TEAM, InMemoryFileStore())
    assert caught.value.codes == ["invalid_value"]
    assert len(caught.value.errors[0].message) < 200


def test_a_deep_parameter_value_is_a_validation_error():
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}
    wf = _workflow(parameters=[ParameterDef(key="n", type="select", options=["x"])])
    with pytest.raises(RunValidationError) as caught:
        validate_run(wf, {"parameters": {"n": deep}}, TEAM, InMemoryFileStore())
    assert caught.value.codes == ["type_mismatch"]


def test_defect_6_a_lone_surrogate_region_is_not_text_rather_than_too_long():
    with pytest.raises(RunValidationError) as caught:
        validate_run(_workflow(), {"submitter_region": "us-\ud800"}, TEAM, InMemoryFileStore())
    assert caught.value.codes == ["type_mismatch"]
    assert "Unicode" in caught.value.errors[0].message
    with pytest.raises(RunValidationError) as caught:  # a long one stays too long
        validate_run(_workflow(), {"submitter_region": "x" * 65}, TEAM, InMemoryFileStore())
    assert caught.value.codes == ["region_too_long"]


# --- defect 7: strict booleans and UUIDs ---------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, "on", "true", 0, "off"])
def test_defect_7_required_is_a_strict_bool(value):
    with pytest.raises(ValidationError, match="required"):
        ParameterDef(key="a", type="string", required=value)


def test_defect_7_required_takes_a_bool():
    assert ParameterDef(key="a", type="string", required=True).required is True
    assert ParameterDef(key="a", type="string").required is False


RAW = b"0123456789abcdef"  # 16 bytes: pydantic's lax UUID took them as an id


@pytest.mark.parametrize("value", [RAW, bytearray(RAW), TEAM.bytes, TEAM.int, 12345])
@pytest.mark.parametrize(
    "make",
    [
        lambda t: DispatchRequest(team_id=t),
        lambda t: Agent(agent_id="a", team_id=t, status="idle", last_heartbeat=NOW, gpu_capacity=1),
        lambda t: Workflow(id=uuid.uuid4(), slug="w", team_id=t),
    ],
    ids=["request", "agent", "workflow"],
)
def test_defect_7_team_id_is_a_uuid_or_its_string_never_raw_bytes(make, value):
    with pytest.raises(ValidationError, match="team_id"):
        make(value)


@pytest.mark.parametrize("value", [TEAM, str(TEAM), str(TEAM).upper(), TEAM.hex])
def test_defect_7_team_id_takes_a_uuid_or_its_string_form(value):
    assert DispatchRequest(team_id=value).team_id == TEAM
    assert Workflow(id=uuid.uuid4(), slug="w", team_id=value).team_id == TEAM


def test_defect_7_a_lone_surrogate_team_id_is_a_validation_error():
    with pytest.raises(ValidationError, match="team_id"):
        DispatchRequest(team_id=str(TEAM)[:-1] + "\ud800")


# --- defect 3: slot holds are bounded -----------------------------------------------------------


def test_defect_3_a_clock_stepped_back_ends_a_hold_instead_of_stretching_it():
    fleet = Fleet.from_agents([_agent("a", gpu_capacity=4)])
    holds = SlotHolds("me", hold_s=1.0, grace_s=1.0)
    holds.update(["me", "other"], saturated=True)
    assert "a" in holds.held(fleet, now=NOW).fresh
    back = NOW - 3600.0  # the clock stepped back an hour
    assert not holds.held(fleet, now=back)  # neither for warm runs nor for an owner
    fleet.heartbeat("a", NOW, running_count=1)  # a change after the step starts a new hold
    assert "a" in holds.held(fleet, now=back + 1.0).fresh
    assert "a" not in holds.held(fleet, now=back + 2.0).fresh


def test_defect_3_a_count_that_keeps_changing_does_not_hold_free_slots_for_good():
    """An agent with 2-3 free slots whose count changes every half second: a cold run (one
    the hold excludes) must find it open within two hold lengths, again and again."""
    fleet = Fleet.from_agents([_agent("a", gpu_capacity=4)])
    holds = SlotHolds("me", hold_s=1.0)
    holds.update(["me"], saturated=True)
    cold = DispatchRequest(team_id=TEAM, required_models={"m"}, tie_key="cold")  # not on "a"
    open_at, held_since = [], None
    for step in range(240):  # 60 s, a dispatch round every 0.25 s
        now = NOW + step * 0.25
        if step % 2 == 0:
            fleet.heartbeat("a", NOW, running_count=1 + step // 2 % 2)
        held = holds.held(fleet, now)
        restricted = restrict(fleet, [cold], held)[0]
        if "a" in restricted.exclude_agents:
            held_since = now if held_since is None else held_since
            assert now - held_since < holds.hold_s  # held at most one hold length at a time
        else:
            held_since = None
            open_at.append(now)
    gaps = [b - a for a, b in zip([NOW, *open_at], [*open_at, NOW + 60.0], strict=True)]
    assert max(gaps) <= 2 * holds.hold_s
    later = restrict(fleet, [cold], holds.held(fleet, NOW + 61.0))
    d = assign(fleet, later, ScoringPolicy(locality_wait_s=0.0), now=NOW)
    assert d[0].agent_id == "a"


# --- defect 4: a request stamped after now ------------------------------------------------------


def _future_case(wait: float, stamp: float):
    team_agents = [
        _agent("warm", gpu_capacity=1, running_count=1, cached_models={"m"}),
        _agent("cold", gpu_capacity=1),
    ]
    request = DispatchRequest(team_id=TEAM, required_models={"m"}, tie_key="t", submitted_at=stamp)
    policy = ScoringPolicy(locality_wait_s=wait)
    return team_agents, request, policy


@pytest.mark.parametrize("wait", [0.0, 30.0])
@pytest.mark.parametrize("ahead", [1.0, MAX_TIMESTAMP - NOW])  # a second ahead; year 9999
def test_defect_4_a_request_stamped_after_now_is_never_deferred(wait, ahead):
    agents, request, policy = _future_case(wait, NOW + ahead)
    expected, _ = R.assign(agents, [request], policy, now=NOW)
    got = assign(Fleet.from_agents(agents), [request], policy, now=NOW)
    assert (expected[0].agent_id, expected[0].deferred) == ("cold", False)
    assert (got[0].agent_id, got[0].deferred) == ("cold", False)


def test_defect_4_a_young_request_is_still_deferred():
    agents, request, policy = _future_case(30.0, NOW - 1.0)
    expected, _ = R.assign(agents, [request], policy, now=NOW)
    got = assign(Fleet.from_agents(agents), [request], policy, now=NOW)
    assert expected[0].deferred and got[0].deferred


# --- defect 1: exclusions do not split assign's heap --------------------------------------------


def test_defect_1_retried_requests_share_one_heap():
    """1,000 requests of one kind, each excluding a different agent (retried tasks), onto 1,000
    agents: grouped by template, each built a heap of the whole pool (1,000 heaps of 1,000
    rows, 32 MB); of one kind, they share one. Measured as the call's peak of allocations."""
    agents = [_agent(f"gpu-{i}", gpu_capacity=1) for i in range(1000)]
    fleet = Fleet.from_agents(agents)
    queue = [DispatchRequest(team_id=TEAM, exclude_agents={f"gpu-{i}"}, tie_key=f"task-{i}",
                             submitted_at=NOW) for i in range(1000)]  # fmt: skip
    assign(Fleet.from_agents(agents[:2]), queue[:2], now=NOW)  # compiled before measuring
    tracemalloc.start()
    try:
        decisions = assign(fleet, queue, now=NOW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"{peak:,} bytes"
    assert all(d.agent_id is not None for d in decisions)
    for r, d in zip(queue, decisions, strict=True):
        assert d.agent_id not in r.exclude_agents
        assert d.rejected["excluded"] == 1


# --- defect 2: one team cannot widen or fill the name tables for the others ---------------------

TEAM_B = uuid.UUID("0b0b0b0b-0d1e-4b7a-9a43-5a1f0c3b2d10")


def _hostile(k: int, team: uuid.UUID = TEAM_B) -> Agent:
    """An agent within its own limits: 64 fresh labels, 256 fresh cached models."""
    return _agent(f"b-{k}", team_id=team, labels={f"b{k}-label-{i}" for i in range(64)},
                  cached_models={f"b{k}/model-{i}" for i in range(256)})  # fmt: skip


def test_defect_2_one_team_widens_the_bitsets_by_its_share_at_most():
    fleet = Fleet.from_agents([_agent(f"a-{i}", cached_models={f"m{i % 5}"}) for i in range(500)])
    refused = 0
    for k in range(100):  # the attack: 100 such agents of team B
        try:
            fleet.upsert(_hostile(k))
        except ValueError as e:
            assert "distinct" in str(e)
            refused += 1
    assert refused == 96  # four agents' names fit the team's share (256 labels, 1,024 models)
    # every row of team A's fleet: at most 4 + 16 words more (100 and 400 more before)
    assert fleet.columns.labels.shape[1] <= 1 + 4 and fleet.columns.cached_models.shape[1] <= 1 + 16
    # the refusals changed nothing: each refused agent is absent, the team's share as it was
    assert len(fleet) == 504 and "b-50" not in fleet
    fleet.remove("b-0")
    fleet.upsert(_hostile(50))  # room again once an agent's names are gone
    other = uuid.UUID(int=77)
    fleet.upsert(_hostile(99, team=other))  # another team has its own share


def test_defect_2_one_team_cannot_fill_the_gpu_name_table():
    fleet = Fleet()
    for k in range(64):
        fleet.upsert(_agent(f"b-{k}", team_id=TEAM_B, gpu_model=f"GPU model {k}"))
    with pytest.raises(ValueError, match="GPU models"):
        fleet.upsert(_agent("b-64", team_id=TEAM_B, gpu_model="GPU model 64"))
    fleet.upsert(_agent("b-64", team_id=TEAM_B, gpu_model="GPU model 0"))  # a name it holds
    fleet.upsert(_agent("a-0", gpu_model="NVIDIA GeForce RTX 4090"))  # team A's new name fits
    # a heartbeat's models count against the agent's team too, net of the names it replaces,
    # and a refused one changes nothing
    team_c = uuid.UUID(int=78)
    for k in range(4):
        fleet.remove(f"b-{k}")
        fleet.upsert(_hostile(k, team=team_c))
    fleet.upsert(_agent("c-extra", team_id=team_c, labels={"b0-label-0"}))  # at its share
    with pytest.raises(ValueError, match="cached models"):
        fleet.heartbeat("c-extra", NOW, running_count=1, cached_models={"x0"})
    assert fleet.get("c-extra").running_count == 0 and fleet.get("c-extra").cached_models == set()
    fleet.heartbeat("b-1", NOW, cached_models={f"x{i}" for i in range(256)})  # replaces its 256
    fleet.heartbeat("b-1", NOW, cached_models={"b0/model-0"})  # frees b-1's 256 names
    fleet.heartbeat("c-extra", NOW, cached_models={f"x{i}" for i in range(255)})


# --- the largest VRAM: derived from the layout, never stored as unknown -------------------------


@pytest.mark.parametrize(
    ("vram_gb", "min_vram_gb", "eligible"),
    [
        # the largest accepted value: code 65534 = 16383.5 * 4, one below VRAM_UNKNOWN (65535)
        (16_383.5, 16_383.5, True),
        (16_383.5, 16_383.25, True),  # floor code 65533 <= 65534
        (16_383.25, 16_383.5, False),  # code 65533 < floor 65534
        (None, 0.0, False),  # unknown fails any minimum, even 0
    ],
    ids=["largest-meets-largest", "largest-meets-less", "less-misses-largest", "unknown"],
)
def test_vram_at_the_largest_code_is_known_and_compared(vram_gb, min_vram_gb, eligible):
    agents = [_agent("big", vram_gb=vram_gb)]
    fleet = Fleet.from_agents(agents)
    assert fleet.get("big").vram_gb == vram_gb  # not read back as unknown
    request = DispatchRequest(team_id=TEAM, min_vram_gb=min_vram_gb, tie_key="t")
    got = pick_agent(fleet, request, now=NOW)
    expected = R.pick_agent(agents, request, now=NOW)
    assert (got.agent_id is not None) is eligible
    assert got.agent_id == expected.agent_id and got.rejected == expected.rejected


def test_vram_above_the_largest_code_is_refused():
    """16383.75 (code 65535) was accepted and stored as unknown: a min_vram_gb rejected the
    agent while the reference picked it."""
    assert MAX_VRAM_GB == (VRAM_UNKNOWN - 1) / VRAM_STEPS_PER_GB == 16_383.5
    with pytest.raises(ValidationError, match="vram_gb"):
        _agent("big", vram_gb=16_383.75)
    with pytest.raises(ValidationError, match="min_vram_gb"):
        DispatchRequest(team_id=TEAM, min_vram_gb=16_383.75)


def test_an_agent_at_its_teams_share_may_replace_its_names():
    """The share counts what the team uses once a record is replaced (the replaced names are
    given back): an agent of a team at its limit may report other models instead of its own,
    by upsert or by heartbeat; a net increase is still refused."""
    from scoring.fleet import TEAM_SHARES

    per = 256
    n = TEAM_SHARES["cached_models"] // per
    team = uuid.UUID(int=7)

    def agent(i: int, models: list[str]) -> Agent:
        return Agent(agent_id=f"a{i}", team_id=team, status="idle", labels={"comfyui"},
                     last_heartbeat=0.0, gpu_capacity=1, cached_models=set(models))  # fmt: skip

    fleet = Fleet.from_agents([agent(i, [f"m{i}-{j}" for j in range(per)]) for i in range(n)])
    fleet.upsert(agent(0, [f"new-{j}" for j in range(per)]))
    assert fleet.get("a0").cached_models == {f"new-{j}" for j in range(per)}
    fleet.heartbeat("a1", 1.0, cached_models=[f"other-{j}" for j in range(per)])
    assert fleet.get("a1").cached_models == {f"other-{j}" for j in range(per)}
    with pytest.raises(ValueError, match="at most"):
        fleet.upsert(agent(n, ["one-more"]))
    assert len(fleet) == n
