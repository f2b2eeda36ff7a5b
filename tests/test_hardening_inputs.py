"""Hardening of inputs (issue 9): strict records, and one checker for the calls' arguments.

DESIGN section 3: a bool is not a number, a string is valid Unicode, lengths are measured on the
string as sent, every number is finite and within its field's range, sets are bounded, and every
bad value is a ``ValidationError`` (records) or ``ValueError`` (call arguments) naming the field;
no other exception escapes. The regression tests are named after the defects of issue 9; the
fuzzers throw hostile values (bools, NaN, infinities, huge ints, lone surrogates, numpy scalars,
wrong shapes, nested containers) at every record and checker.
"""

from __future__ import annotations

import itertools
import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from scoring import Agent, AgentStatus, DispatchRequest, Fleet, ScoringPolicy, checks, pick_agent
from scoring.hashing import stable_hash64
from scoring.models import (
    FACTORS,
    MAX_EXCLUDED,
    MAX_LABELS,
    MAX_LOCALITY_WAIT_S,
    MAX_MODELS,
    MAX_NAME_LEN,
    MAX_SLOTS,
    MAX_TIMESTAMP,
    MAX_VRAM_GB,
    MAX_WEIGHT,
    Weights,
)
from tests.strategies import (
    LABELS,
    MODELS,
    REGIONS,
    hostile_numbers,
    hostile_scalars,
    hostile_texts,
    hostile_values,
)

TEAM = "11111111-1111-4111-8111-111111111111"
GOOD_AGENT = dict(agent_id="gpu-node-01", team_id=TEAM, status="idle", last_heartbeat=0.0,
                  gpu_capacity=4)  # fmt: skip
NOW = 1_000_000.0


def _error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def _build(model: type, fields: dict[str, Any]) -> Any:
    base = {Agent: GOOD_AGENT, DispatchRequest: {"team_id": TEAM}}.get(model, {})
    return model(**{**base, **fields})


def _rejects(model: type, field: str, value: Any) -> None:
    """Building ``model`` with ``field=value`` is a ValidationError located at that field."""
    with pytest.raises(ValidationError) as info:
        _build(model, {field: value})
    assert any(loc.split(".")[0] == field for loc in _error_fields(info.value)), info.value
    str(info.value)  # the message itself never fails (huge ints, surrogates)


def _value_error(call: Any, name: str) -> ValueError:
    """``call()`` raises exactly ValueError (no subclass such as UnicodeError) naming ``name``."""
    with pytest.raises(ValueError) as info:
        call()
    assert type(info.value) is ValueError, repr(info.value)
    assert name in str(info.value)
    return info.value


# --- issue 9 #5 ----------------------------------------------------------------------------------


def test_defect_5_weights_whose_sum_overflows_are_rejected():
    with pytest.raises(ValidationError) as info:
        ScoringPolicy(weights=dict.fromkeys(FACTORS, 1e308))
    assert _error_fields(info.value) == {f"weights.{f}" for f in FACTORS}
    _rejects(Weights, "load", float(np.nextafter(MAX_WEIGHT, math.inf)))
    _rejects(Weights, "load", 10**400)
    # The largest weights allowed keep the sum, the score's denominator, finite and exact.
    heaviest = ScoringPolicy(weights=dict.fromkeys(FACTORS, MAX_WEIGHT))
    assert heaviest.weights.array[-1] == len(FACTORS) * MAX_WEIGHT


# --- issue 9 #7 ----------------------------------------------------------------------------------

SURROGATE_FIELDS = [
    (Agent, "agent_id", "gpu-\ud800"),
    (Agent, "labels", {"gpu", "\udfff"}),
    (Agent, "region", "us-\ud800east"),
    (Agent, "gpu_model", "RTX \udc00 4090"),
    (Agent, "cached_models", {"models/\ud800.ckpt"}),
    (Agent, "team_id", "\ud800"),
    (Agent, "status", "idle\ud800"),
    (DispatchRequest, "tie_key", "\ud800"),
    (DispatchRequest, "submitter_region", "\udbff"),
    (DispatchRequest, "required_labels", {"\ud800"}),
    (DispatchRequest, "required_models", ["ok", "\ud800"]),
    (DispatchRequest, "exclude_agents", {"gpu-\udfff"}),
    (DispatchRequest, "preferred_gpu", "RTX\ud800"),
    (DispatchRequest, "target_pool", "team\ud800"),
    (ScoringPolicy, "region_affinity", {("us-east", "us-\ud800"): 0.5}),
]


@pytest.mark.parametrize(
    ("model", "field", "value"), SURROGATE_FIELDS, ids=[f for _, f, _ in SURROGATE_FIELDS]
)
def test_defect_7_a_lone_surrogate_in_any_string_field_is_a_validation_error(model, field, value):
    _rejects(model, field, value)


def test_defect_7_a_lone_surrogate_tie_key_never_reaches_the_hash():
    with pytest.raises(ValidationError):
        DispatchRequest(team_id=TEAM, tie_key="\ud800")
    request = DispatchRequest(team_id=TEAM, tie_key="task-1")
    with pytest.raises(ValidationError):  # copies are validated too
        request.model_copy(update={"tie_key": "\ud800"})
    # The hash itself refuses such a string with a plain ValueError, not the codec's error.
    _value_error(lambda: stable_hash64("\ud800"), "Unicode")
    assert stable_hash64("task-1") == stable_hash64(request.tie_key)  # valid text still hashes


# --- issue 9 #8 ----------------------------------------------------------------------------------

NUMBER_FIELDS = [
    (Agent, "gpu_capacity"),
    (Agent, "running_count"),
    (Agent, "vram_gb"),
    (Agent, "failure_rate"),
    (Agent, "last_heartbeat"),
    (DispatchRequest, "min_vram_gb"),
    (DispatchRequest, "submitted_at"),
    (ScoringPolicy, "heartbeat_timeout_s"),
    (ScoringPolicy, "tie_band"),
    (ScoringPolicy, "locality_wait_s"),
    (ScoringPolicy, "deferrals_per_slot"),
    *[(Weights, f) for f in FACTORS],
]
_number_ids = [f"{m.__name__}.{f}" for m, f in NUMBER_FIELDS]


@pytest.mark.parametrize(("model", "field"), NUMBER_FIELDS, ids=_number_ids)
@pytest.mark.parametrize("value", [True, False, np.True_, np.False_], ids=str)
def test_defect_8_a_bool_is_not_a_number(model, field, value):
    _rejects(model, field, value)


@pytest.mark.parametrize(("model", "field"), NUMBER_FIELDS, ids=_number_ids)
@pytest.mark.parametrize(
    "value", [10**400, -(10**400), 10**5000, "1", math.nan, math.inf], ids=checks.show
)
def test_defect_8_huge_ints_nan_inf_and_strings_are_validation_errors(model, field, value):
    _rejects(model, field, value)


def test_defect_8_an_affinity_of_true_is_not_a_number():
    _rejects(ScoringPolicy, "region_affinity", {("us-east", "us-west"): True})
    _rejects(ScoringPolicy, "region_affinity", {("us-east", "us-west"): np.True_})


def _id(show):
    """Test ids by ``show``, but one fixed id for a bare ``object()``, whose repr holds its
    address: pytest-xdist's workers must collect the same ids."""
    return lambda value: "object()" if type(value) is object else show(value)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0, None, [True]], ids=repr)
def test_defect_8_community_opt_in_is_a_strict_bool(value):
    _rejects(Agent, "community_opt_in", value)


def test_defect_8_community_opt_in_takes_python_and_numpy_bools():
    assert Agent(**GOOD_AGENT, community_opt_in=True).community_opt_in is True
    assert Agent(**GOOD_AGENT, community_opt_in=np.True_).community_opt_in is True
    assert Agent(**GOOD_AGENT, community_opt_in=np.False_).community_opt_in is False


@pytest.mark.parametrize("value", [5, 5.0, "ab", b"ab", object(), [5], [("a", "b")]], ids=_id(repr))
def test_defect_8_region_affinity_of_the_wrong_shape_is_a_validation_error(value):
    _rejects(ScoringPolicy, "region_affinity", value)


@pytest.mark.parametrize(
    "value",
    [{"ab": 0.5}, [("ab", 0.5)], {("a",): 0.5}, {("a", "b", "c"): 0.5}, [(("a", 1), 0.5)]],
    ids=repr,
)
def test_defect_8_an_affinity_key_must_be_two_region_strings(value):
    _rejects(ScoringPolicy, "region_affinity", value)


def test_defect_8_affinity_pairs_as_tuples_or_lists_still_work():
    expected = ((("us-east", "us-west"), 0.6),)
    assert ScoringPolicy(region_affinity={("US-West", "us-east"): 0.6}).region_affinity == expected
    assert (
        ScoringPolicy(region_affinity=[(["us-east", "us-west"], 0.6)]).region_affinity == expected
    )
    assert (
        ScoringPolicy(region_affinity={("us-east", "us-west"): np.float32(0.5)}).affinity(
            "us-west", "us-east"
        )
        == 0.5
    )


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**5000, 2**1024], ids=checks.show)
def test_defect_8_a_huge_int_now_is_a_value_error(value):
    _value_error(lambda: checks.timestamp(value, "now"), "now")


def test_defect_8_region_length_is_measured_before_lower_casing():
    dotted = "İ" * 40  # 40 characters; lower-cased, 80
    assert len(dotted.lower()) > MAX_NAME_LEN
    agent = Agent(**GOOD_AGENT, region=dotted, labels={"İ" * MAX_NAME_LEN})
    assert agent.region == dotted.lower() and agent.labels == {("İ" * MAX_NAME_LEN).lower()}
    assert DispatchRequest(team_id=TEAM, submitter_region=dotted).submitter_region == dotted.lower()
    # Trimmed first: padding does not count, but 65 characters as sent do.
    assert Agent(**GOOD_AGENT, region="  " + "x" * MAX_NAME_LEN + " ").region == "x" * MAX_NAME_LEN
    _rejects(Agent, "region", "İ" * (MAX_NAME_LEN + 1))
    _rejects(Agent, "region", "i\u0307" * (MAX_NAME_LEN + 1))
    _rejects(Agent, "labels", {"İ" * (MAX_NAME_LEN + 1)})
    _rejects(ScoringPolicy, "region_affinity", {("x" * (MAX_NAME_LEN + 1), "y"): 0.5})


def test_defect_8_a_stored_lower_cased_name_validates_again():
    # "İ" * 40 is stored as "i̇" * 40, 80 characters: copies re-validate it and the fleet
    # rebuilds the record from it, so it must be as valid as the name sent.
    agent = Agent(**GOOD_AGENT, region="İ" * 40, labels={"İ" * MAX_NAME_LEN, "gpu"})
    assert len(agent.region) == 80
    assert agent.model_copy(update={"running_count": 1}).region == agent.region
    assert Agent.model_validate(agent.model_dump()) == agent
    assert Fleet.from_agents([agent]).get(agent.agent_id) == agent


@pytest.mark.parametrize(
    "value",
    [1e300, float(np.nextafter(MAX_TIMESTAMP, math.inf)), -1.0, -1e-9,
     datetime(1969, 12, 31, 23, 59, 59),
     datetime(9999, 12, 31, 23, 0, tzinfo=timezone(-timedelta(hours=2)))],
    ids=["1e300", "after-9999", "-1", "just-negative", "before-1970", "9999-behind-utc"],
)  # fmt: skip
def test_defect_8_last_heartbeat_outside_year_0_to_9999_is_rejected(value):
    _rejects(Agent, "last_heartbeat", value)
    _rejects(DispatchRequest, "submitted_at", value)
    _value_error(lambda: checks.timestamp(value, "at"), "at")


def test_defect_8_timestamps_at_the_edges_of_the_range_are_accepted():
    for value, expected in [(MAX_TIMESTAMP, MAX_TIMESTAMP), (datetime.max, MAX_TIMESTAMP),
                            (datetime(1970, 1, 1), 0.0), (0, 0.0)]:  # fmt: skip
        assert Agent(**{**GOOD_AGENT, "last_heartbeat": value}).last_heartbeat == expected
    assert checks.timestamp(datetime.max.replace(tzinfo=UTC), "at") == MAX_TIMESTAMP


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "field", "limit", "make"),
    [
        (Agent, "labels", MAX_LABELS, lambda i: f"label-{i}"),
        (Agent, "cached_models", MAX_MODELS, lambda i: f"models/m{i}.safetensors"),
        (DispatchRequest, "required_labels", MAX_LABELS, lambda i: f"label-{i}"),
        (DispatchRequest, "required_models", MAX_MODELS, lambda i: f"models/m{i}"),
        (DispatchRequest, "exclude_agents", MAX_EXCLUDED, lambda i: f"gpu-node-{i}"),
    ],
    ids=["labels", "cached_models", "required_labels", "required_models", "exclude_agents"],
)
def test_sets_are_bounded(model, field, limit, make):
    assert len(getattr(_build(model, {field: {make(i) for i in range(limit)}}), field)) == limit
    _rejects(model, field, {make(i) for i in range(limit + 1)})
    _rejects(model, field, [make(0)] * (limit + 1))  # counted as sent: duplicates too
    # An endless iterable is refused after reading one entry past the limit, not hung on.
    _rejects(model, field, (make(i) for i in itertools.count()))


def test_agent_limits_match_the_design():
    assert (MAX_LABELS, MAX_MODELS) == (64, 256)


@pytest.mark.parametrize(
    ("field", "value"),
    [("agent_id", "x" * 257), ("tie_key", "x" * 257), ("gpu_model", "x" * 257),
     ("preferred_gpu", "x" * 257), ("cached_models", {"m" * 1025})],
    ids=["agent_id", "tie_key", "gpu_model", "preferred_gpu", "model-path"],
)  # fmt: skip
def test_strings_are_bounded(field, value):
    model = DispatchRequest if field in ("tie_key", "preferred_gpu") else Agent
    _rejects(model, field, value)


# --- new fields (DESIGN section 6) ----------------------------------------------------------------


def test_submitted_at_takes_seconds_datetimes_or_none():
    assert DispatchRequest(team_id=TEAM).submitted_at is None  # submitted now
    assert DispatchRequest(team_id=TEAM, submitted_at=5).submitted_at == 5.0
    moment = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert DispatchRequest(team_id=TEAM, submitted_at=moment).submitted_at == moment.timestamp()
    naive = DispatchRequest(team_id=TEAM, submitted_at=moment.replace(tzinfo=None))
    assert naive.submitted_at == moment.timestamp()


def test_locality_wait_defaults_to_zero_and_is_bounded():
    assert ScoringPolicy().locality_wait_s == 60.0  # the default chosen by the trace replay
    assert ScoringPolicy(locality_wait_s=MAX_LOCALITY_WAIT_S).locality_wait_s == 86_400.0
    assert ScoringPolicy(locality_wait_s=30).locality_wait_s == 30.0
    for bad in (-1.0, MAX_LOCALITY_WAIT_S + 1, math.inf, math.nan, True, "30"):
        _rejects(ScoringPolicy, "locality_wait_s", bad)


def test_deferrals_per_slot_defaults_to_one_and_is_bounded():
    assert ScoringPolicy().deferrals_per_slot == 1  # the default chosen by the trace replay
    assert ScoringPolicy(deferrals_per_slot=MAX_SLOTS).deferrals_per_slot == MAX_SLOTS
    for bad in (0, -1, MAX_SLOTS + 1, 1.5, True, "2", None):
        _rejects(ScoringPolicy, "deferrals_per_slot", bad)


def test_numpy_scalars_are_numbers():
    agent = Agent(**{**GOOD_AGENT, "gpu_capacity": np.int64(3), "running_count": np.uint16(1),
                     "vram_gb": np.float32(24), "failure_rate": np.float64(0.25),
                     "last_heartbeat": np.int32(7)})  # fmt: skip
    assert (agent.gpu_capacity, agent.running_count, agent.vram_gb) == (3, 1, 24.0)
    assert (agent.failure_rate, agent.last_heartbeat) == (0.25, 7.0)
    assert type(agent.gpu_capacity) is int and type(agent.vram_gb) is float


@pytest.mark.parametrize(
    ("field", "value"), [("gpu_capacity", 4.0), ("running_count", 1.5), ("gpu_capacity", "4")]
)
def test_slot_fields_are_strict_integers(field, value):
    _rejects(Agent, field, value)


# --- scoring.checks: unit tests ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (1.5, 1.5), (np.float32(2.5), 2.5), (np.int64(7), 7.0), (np.uint64(9), 9.0),
     (datetime(1970, 1, 1, 0, 1), 60.0),
     (datetime(1970, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), 0.0),
     (MAX_TIMESTAMP, MAX_TIMESTAMP)],
    ids=["zero", "float", "f32", "i64", "u64", "naive", "aware", "max"],
)  # fmt: skip
def test_timestamp_accepts(value, expected):
    got = checks.timestamp(value, "at")
    assert got == expected and type(got) is float


@pytest.mark.parametrize(
    "value",
    [True, np.False_, math.nan, -math.inf, np.float32("nan"), 10**400, -1, "5", None, [1.0],
     np.array([1.0]), b"1", 1 + 0j, np.datetime64("2020-01-01"), object()],
    ids=_id(checks.show),
)  # fmt: skip
def test_timestamp_rejects(value):
    _value_error(lambda: checks.timestamp(value, "at"), "at")


def test_timestamps_broadcast_one_value_and_take_exactly_n():
    assert checks.timestamps(5, 3, "at").tolist() == [5.0, 5.0, 5.0]
    assert checks.timestamps(np.array(5.0), 2, "at").tolist() == [5.0, 5.0]
    assert checks.timestamps(datetime(1970, 1, 1, 0, 0, 2), 2, "at").tolist() == [2.0, 2.0]
    assert checks.timestamps([1, 2.5, datetime(1970, 1, 2)], 3, "at").tolist() == [1, 2.5, 86400]
    assert checks.timestamps(np.arange(3, dtype=np.int32), 3, "at").dtype == np.float64
    assert checks.timestamps([], 0, "at").shape == (0,)
    for bad in ([1.0, 2.0], [1.0] * 4, np.zeros((3, 1)), np.zeros(4), [[1.0], [2.0], [3.0]]):
        _value_error(lambda bad=bad: checks.timestamps(bad, 3, "at"), "at")
    # A bad element is named by its index.
    assert "at[1]" in str(_value_error(lambda: checks.timestamps([1, True, 3], 3, "at"), "at"))
    assert "at[2]" in str(_value_error(lambda: checks.timestamps([1, 2, 1e300], 3, "at"), "at"))
    for bad in (np.array([True, False, True]), np.array(["1", "2", "3"]), np.zeros(3, complex)):
        _value_error(lambda bad=bad: checks.timestamps(bad, 3, "at"), "at")


def test_status_checks():
    assert checks.status_code("busy", "status") == 1
    assert checks.status_code(AgentStatus.UNHEALTHY, "status") == 4
    assert checks.status_codes("idle", 2, "status").tolist() == [0, 0]
    assert checks.status_codes(["tunnel", AgentStatus.BUSY], 2, "status").tolist() == [3, 1]
    assert checks.status_codes(np.array(["syncing", "idle"]), 2, "status").tolist() == [2, 0]
    assert checks.status_codes(("idle",) * 3, 3, "status").dtype == np.uint8
    for bad in ("IDLE", "sleeping", 0, None, True, b"idle", ["idle"]):
        _value_error(lambda bad=bad: checks.status_code(bad, "status"), "status")
    # issue 9 #9: a status list longer than the ids used to be cut silently.
    for bad in (["idle", "busy", "idle"], ["idle"], [["idle"], "busy"], ["idle", None]):
        _value_error(lambda bad=bad: checks.status_codes(bad, 2, "status"), "status")


def test_slot_count_checks():
    assert checks.slot_count(0, "running_count") == 0
    assert checks.slot_count(np.uint16(MAX_SLOTS), "running_count") == MAX_SLOTS
    assert checks.slot_counts(2, 3, "running_count").tolist() == [2, 2, 2]
    assert checks.slot_counts([0, np.int8(5)], 2, "running_count").tolist() == [0, 5]
    assert checks.slot_counts(np.array([1, 2], np.int64), 2, "c").dtype == np.uint16
    for bad in (True, np.True_, -1, MAX_SLOTS + 1, 1.0, "1", None, 10**400):
        _value_error(lambda bad=bad: checks.slot_count(bad, "running_count"), "running_count")
    for bad in ([1, True], [1], [1, 2, 3], np.array([1.0, 2.0]), np.array([True, True]),
                np.array([1, 70_000]), [2**64, 1], [np.uint64(2**64 - 1), 0]):  # fmt: skip
        _value_error(lambda bad=bad: checks.slot_counts(bad, 2, "running_count"), "running_count")


def test_agent_id_checks():
    assert checks.agent_id("gpu-node-01", "agent_id") == "gpu-node-01"
    assert checks.agent_ids(["a", "b", "a"], "agent_ids") == ["a", "b", "a"]
    assert checks.agent_ids(np.array(["a", "b"]), "agent_ids") == ["a", "b"]
    assert checks.agent_ids((), "agent_ids") == []
    for bad in ("", "\ud800", 5, None, b"a"):
        _value_error(lambda bad=bad: checks.agent_id(bad, "agent_id"), "agent_id")
    for bad in ("ab", ["a", ""], ["a", "\ud800"], ["a", 3], {"a"}, None, np.array([["a"]])):
        _value_error(lambda bad=bad: checks.agent_ids(bad, "agent_ids"), "agent_ids")


def test_names_checks():
    assert checks.names(None, "cached_models") == frozenset()
    assert checks.names([" a ", "B", "a"], "cached_models") == {"a", "B"}  # trimmed, case kept
    assert len(checks.names([f"m{i}" for i in range(MAX_MODELS)], "cached_models")) == MAX_MODELS
    assert checks.names(["x", "y"], "labels", limit=2) == {"x", "y"}
    assert checks.names({" a ": 1, "b": 2}, "cached_models") == {"a", "b"}  # a mapping's keys
    for bad in ("model", b"model", 5, ["a", ""], ["  "], ["\ud800"], [None], ["x" * 1025],
                [f"m{i}" for i in range(MAX_MODELS + 1)]):  # fmt: skip
        _value_error(lambda bad=bad: checks.names(bad, "cached_models"), "cached_models")
    _value_error(lambda: checks.names(["x", "y", "z"], "labels", limit=2), "labels")


@pytest.mark.parametrize("n", [-1, True, 1.5, None])
def test_batch_size_must_be_a_count(n):
    with pytest.raises(ValueError):
        checks.timestamps(1.0, n, "at")


# --- scoring.checks: fuzzing against a plain reference -----------------------------------------
# The references decide acceptance their own way (exact integer comparisons, no numpy), and give
# None for a value that must be rejected.


def _ref_time(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, datetime):
        aware = v if v.tzinfo else v.replace(tzinfo=UTC)
        try:
            seconds = (aware - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(seconds=1)
        except (OverflowError, ValueError):
            return None
    elif isinstance(v, (int, np.integer)):
        return float(v) if 0 <= int(v) <= MAX_TIMESTAMP else None  # exact, no float overflow
    elif isinstance(v, (float, np.floating)):
        seconds = float(v)
    else:
        return None
    return seconds if 0 <= seconds <= MAX_TIMESTAMP else None  # NaN fails


def _ref_slot(v: Any) -> int | None:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        return None
    return int(v) if 0 <= int(v) <= MAX_SLOTS else None


_REF_STATUS = {"idle": 0, "busy": 1, "syncing": 2, "tunnel": 3, "unhealthy": 4}


def _ref_status(v: Any) -> int | None:
    return _REF_STATUS.get(str(v)) if isinstance(v, str) else None


def _ref_batch(values: Any, n: int, ref: Any) -> list[Any] | None:
    """The reference for a batch argument: one value for all, or exactly ``n``."""
    if isinstance(values, np.ndarray) and values.ndim == 0:
        values = values[()]
    elif isinstance(values, np.ndarray) or isinstance(values, (list, tuple)):
        if len(values) != n or (isinstance(values, np.ndarray) and values.ndim != 1):
            return None
        items = [ref(v) for v in values]
        return None if None in items else items
    one = ref(values)  # one value for all (a string too: one status, not characters)
    return None if one is None else [one] * n


def _valid_text(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ref_names(value: Any, limit: int, max_len: int) -> frozenset[str] | None:
    if value is None:
        return frozenset()
    if not isinstance(value, (list, tuple, set, frozenset, dict)) or len(value) > limit:
        return None
    if not all(_valid_text(v) and 0 < len(v.strip()) <= max_len for v in value):
        return None
    return frozenset(v.strip() for v in value)


def _ref_agent_ids(values: Any) -> list[str] | None:
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            return None
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return None
    return list(values) if all(_valid_text(v) and v for v in values) else None


def _same(call: Any, expected: Any, name: str) -> Any:
    """Differential check: ``call()`` fails with ValueError naming ``name`` exactly when the
    reference rejected (``expected is None``); otherwise it returns ``expected``."""
    try:
        got = call()
    except ValueError as e:
        assert type(e) is ValueError and name in str(e), repr(e)
        assert expected is None, f"rejected a valid input: {e}"
        event("rejected")
        return None
    assert expected is not None, f"accepted an invalid input, giving {got!r}"
    event("accepted")
    return got


good_times = st.one_of(
    st.floats(0, MAX_TIMESTAMP), st.integers(0, 2**40), st.datetimes(min_value=datetime(1970, 1, 2))
)
time_elements = st.one_of(good_times, hostile_scalars)
slot_elements = st.one_of(st.integers(0, MAX_SLOTS), hostile_numbers, hostile_scalars)
status_elements = st.one_of(
    st.sampled_from([*AgentStatus, *(s.value for s in AgentStatus)]), hostile_texts, hostile_scalars
)
numeric_dtypes = st.sampled_from(
    [np.float64, np.float32, np.float16, np.int64, np.int8, np.uint16, np.uint64, np.bool_]
)


@st.composite
def batches(draw, elements: st.SearchStrategy) -> tuple[int, Any]:
    """``(n, values)``: one value, a list or tuple or 1-d array of about ``n``, or worse."""
    n = draw(st.integers(0, 4))
    size = draw(st.sampled_from([n, n, n, n + 1, max(n - 1, 0)]))
    kind = draw(st.sampled_from(["one", "list", "tuple", "array", "objects", "2d", "nested"]))
    if kind == "one":
        return n, draw(elements)
    if kind == "array":
        return n, draw(arrays(draw(numeric_dtypes), size))
    if kind == "2d":
        return n, draw(arrays(draw(numeric_dtypes), (size, draw(st.integers(0, 2)))))
    items = draw(st.lists(elements, min_size=size, max_size=size))
    if kind == "objects":
        values = np.empty(size, dtype=object)
        for i, item in enumerate(items):  # one by one: a list item stays one object
            values[i] = item
        return n, values
    if kind == "nested":
        return n, [items]
    return n, items if kind == "list" else tuple(items)


@given(hostile_scalars)
def test_fuzz_timestamp_only_value_errors_and_matches_the_reference(value):
    _same(lambda: checks.timestamp(value, "now"), _ref_time(value), "now")


@given(batches(time_elements))
def test_fuzz_timestamps_only_value_errors_and_match_the_reference(batch):
    n, values = batch
    expected = _ref_batch(values, n, _ref_time)
    got = _same(lambda: checks.timestamps(values, n, "at"), expected, "at")
    if got is not None:
        assert got.dtype == np.float64 and got.shape == (n,) and got.tolist() == expected


@given(batches(slot_elements))
def test_fuzz_slot_counts_only_value_errors_and_match_the_reference(batch):
    n, values = batch
    expected = _ref_batch(values, n, _ref_slot)
    got = _same(lambda: checks.slot_counts(values, n, "running_count"), expected, "running_count")
    if got is not None:
        assert got.dtype == np.uint16 and got.shape == (n,) and got.tolist() == expected
    if not isinstance(values, (list, tuple, np.ndarray)):
        _same(lambda: checks.slot_count(values, "c"), _ref_slot(values), "c")


@given(batches(status_elements))
def test_fuzz_status_codes_only_value_errors_and_match_the_reference(batch):
    n, values = batch
    expected = _ref_batch(values, n, _ref_status)
    got = _same(lambda: checks.status_codes(values, n, "status"), expected, "status")
    if got is not None:
        assert got.dtype == np.uint8 and got.shape == (n,) and got.tolist() == expected


name_collections = st.one_of(
    st.lists(st.one_of(st.sampled_from(MODELS), hostile_texts), max_size=6),
    st.sets(st.one_of(st.sampled_from(MODELS), hostile_texts), max_size=6).map(frozenset),
    st.lists(hostile_scalars, max_size=3).map(tuple),
    hostile_values,
)


@given(name_collections, st.integers(1, 5))
def test_fuzz_names_only_value_errors_and_match_the_reference(value, limit):
    got = _same(
        lambda: checks.names(value, "cached_models", limit, max_len=64),
        _ref_names(value, limit, 64),
        "cached_models",
    )
    if got is not None:
        assert got == _ref_names(value, limit, 64)


@given(st.one_of(st.lists(hostile_texts, max_size=4), hostile_values))
def test_fuzz_agent_ids_only_value_errors_and_match_the_reference(values):
    got = _same(lambda: checks.agent_ids(values, "agent_ids"), _ref_agent_ids(values), "agent_ids")
    if got is not None:
        assert got == _ref_agent_ids(values)


# --- model constructors: fuzzing with hostile values ---------------------------------------------


def _drawn_fields(draw: Any, fields: dict[str, st.SearchStrategy]) -> dict[str, Any]:
    """Valid values but for up to two hostile fields; rarely a field left out or an unknown one
    added. (Were every field hostile a third of the time, almost no record would be accepted, and
    the accepted records' ranges would go untested.)"""
    hostile = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2))
    chosen = {k: draw(hostile_values if k in hostile else s) for k, s in fields.items()}
    if draw(st.integers(0, 19)) == 0:
        del chosen[draw(st.sampled_from(sorted(chosen)))]
    if draw(st.integers(0, 19)) == 0:
        chosen["speed"] = draw(hostile_values)
    return chosen


times = st.one_of(
    st.floats(0, 2e9),
    st.integers(0, 2**33),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
)
AGENT_FIELDS = {
    "agent_id": st.sampled_from(["gpu-node-01", "a", "x" * 256]),
    "team_id": st.one_of(st.uuids(), st.uuids().map(str)),
    "status": st.sampled_from([*AgentStatus, *(s.value for s in AgentStatus)]),
    "labels": st.sets(st.sampled_from(LABELS)),
    "last_heartbeat": times,
    "gpu_capacity": st.integers(1, MAX_SLOTS),
    "running_count": st.integers(0, MAX_SLOTS),
    "region": st.one_of(st.none(), st.sampled_from([*REGIONS, "  US-East ", "İ" * 40])),
    "community_opt_in": st.booleans(),
    "vram_gb": st.one_of(st.none(), st.floats(0, 200)),
    "gpu_model": st.one_of(st.none(), st.just("NVIDIA GeForce RTX 4090")),
    "cached_models": st.sets(st.sampled_from(MODELS)),
    "failure_rate": st.floats(0, 1),
}
REQUEST_FIELDS = {
    "team_id": AGENT_FIELDS["team_id"],
    "target_pool": st.sampled_from(["team", "community"]),
    "submitter_region": AGENT_FIELDS["region"],
    "tool_type": st.sampled_from(["comfyui", "nerfstudio"]),
    "required_labels": AGENT_FIELDS["labels"],
    "min_vram_gb": AGENT_FIELDS["vram_gb"],
    "preferred_gpu": st.one_of(st.none(), st.sampled_from(["RTX_4090", "a100"])),
    "required_models": AGENT_FIELDS["cached_models"],
    "exclude_agents": st.sets(st.sampled_from(["gpu-node-01", "a"])),
    "tie_key": st.text(max_size=12),
    "submitted_at": st.one_of(st.none(), times),
}
WEIGHT_FIELDS = dict.fromkeys(FACTORS, st.floats(0, MAX_WEIGHT))
POLICY_FIELDS = {
    "weights": st.fixed_dictionaries({}, optional=WEIGHT_FIELDS),
    "heartbeat_timeout_s": st.floats(1e-3, 1e6),
    "region_affinity": st.dictionaries(
        st.tuples(st.sampled_from(REGIONS), st.sampled_from(REGIONS)).filter(lambda p: p[0] < p[1]),
        st.floats(0, 1),
        max_size=3,
    ),
    "tie_band": st.floats(0, 1),
    "locality_wait_s": st.floats(0, MAX_LOCALITY_WAIT_S),
    "deferrals_per_slot": st.integers(1, MAX_SLOTS),
}


def _is_text(s: Any) -> bool:
    return type(s) is str and _valid_text(s)


def _in(value: Any, low: float, high: float) -> bool:
    return type(value) is float and math.isfinite(value) and low <= value <= high


def _check_agent(a: Agent) -> None:
    assert _is_text(a.agent_id) and 0 < len(a.agent_id) <= 256 and a.agent_id == a.agent_id.strip()
    assert isinstance(a.team_id, uuid.UUID) and isinstance(a.status, AgentStatus)
    assert type(a.gpu_capacity) is int and 1 <= a.gpu_capacity <= MAX_SLOTS
    assert type(a.running_count) is int and 0 <= a.running_count <= MAX_SLOTS
    assert _in(a.last_heartbeat, 0.0, MAX_TIMESTAMP) and _in(a.failure_rate, 0.0, 1.0)
    assert a.vram_gb is None or _in(a.vram_gb, 0.0, MAX_VRAM_GB)
    assert type(a.community_opt_in) is bool
    assert a.region is None or (_is_text(a.region) and a.region == a.region.strip().lower() != "")
    assert a.gpu_model is None or (_is_text(a.gpu_model) and a.gpu_model.strip() == a.gpu_model)
    assert len(a.labels) <= MAX_LABELS and len(a.cached_models) <= MAX_MODELS
    assert all(_is_text(x) and x.strip() == x != "" for x in a.labels | a.cached_models)
    stable_hash64(a.agent_id)


def _check_request(r: DispatchRequest) -> None:
    assert r.submitter_region is None or _is_text(r.submitter_region)
    assert r.min_vram_gb is None or _in(r.min_vram_gb, 0.0, MAX_VRAM_GB)
    assert r.submitted_at is None or _in(r.submitted_at, 0.0, MAX_TIMESTAMP)
    assert len(r.required_labels) <= MAX_LABELS and len(r.required_models) <= MAX_MODELS
    assert len(r.exclude_agents) <= MAX_EXCLUDED
    names = r.required_labels | r.required_models | r.exclude_agents
    assert all(_is_text(x) and x.strip() == x != "" for x in names)
    assert r.preferred_gpu is None or _is_text(r.preferred_gpu)
    assert _is_text(r.tie_key) and len(r.tie_key) <= 256
    r.tie_key_hash  # noqa: B018 (hashing an accepted tie key never fails)


def _check_weights(w: Weights) -> None:
    assert all(_in(w[f], 0.0, MAX_WEIGHT) for f in FACTORS) and any(w[f] > 0 for f in FACTORS)
    assert np.isfinite(w.array).all() and w.array[-1] > 0


def _check_policy(p: ScoringPolicy) -> None:
    _check_weights(p.weights)
    assert _in(p.heartbeat_timeout_s, 0.0, MAX_TIMESTAMP) and p.heartbeat_timeout_s > 0
    assert _in(p.tie_band, 0.0, 1.0) and _in(p.locality_wait_s, 0.0, MAX_LOCALITY_WAIT_S)
    assert type(p.deferrals_per_slot) is int and 1 <= p.deferrals_per_slot <= MAX_SLOTS
    for (a, b), affinity in p.region_affinity:
        assert _is_text(a) and _is_text(b) and a < b and _in(affinity, 0.0, 1.0)


MODELS_UNDER_FUZZ = {
    Agent: (AGENT_FIELDS, _check_agent),
    DispatchRequest: (REQUEST_FIELDS, _check_request),
    Weights: (WEIGHT_FIELDS, _check_weights),
    ScoringPolicy: (POLICY_FIELDS, _check_policy),
}


@pytest.mark.parametrize("model", list(MODELS_UNDER_FUZZ), ids=lambda m: m.__name__)
@given(data=st.data())
def test_fuzz_constructors_raise_only_validation_errors_and_hold_only_valid_values(model, data):
    fields, check = MODELS_UNDER_FUZZ[model]
    kwargs = _drawn_fields(data.draw, fields)
    try:
        record = model(**kwargs)
    except ValidationError as e:
        str(e)  # formatting the error never fails either
        assert e.errors()
        event("rejected")
        return
    event("accepted")
    check(record)
    assert model.model_validate(record.model_dump()) == record  # and it round-trips


@pytest.mark.parametrize("model", list(MODELS_UNDER_FUZZ), ids=lambda m: m.__name__)
@given(value=hostile_values)
def test_fuzz_validating_any_value_as_a_record_raises_only_validation_errors(model, value):
    try:
        model.model_validate(value)
    except ValidationError:
        pass


# --- end to end: the fleet and the pick check their arguments with scoring.checks ---------------


def _fleet() -> Fleet:
    return Fleet.from_agents(
        [Agent(**{**GOOD_AGENT, "agent_id": f"a{i}", "last_heartbeat": NOW}) for i in range(2)]
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.heartbeat("a0", True),
        lambda f: f.heartbeat("a0", 1e300),
        lambda f: f.heartbeat("a0", 10**400),
        lambda f: f.heartbeat("a0", NOW, running_count=True),
        lambda f: f.heartbeat_many(["a0", "a1"], [NOW, True]),
        lambda f: f.heartbeat_many(["a0", "a1"], NOW, status=["idle", "busy", "idle"]),
        lambda f: f.heartbeat_many(["a0", "a1"], [NOW, 1e300]),
        lambda f: pick_agent(f, DispatchRequest(team_id=TEAM), now=10**400),
    ],
    ids=["bool-at", "far-future", "huge-int", "bool-count", "bool-in-batch", "long-status",
         "far-future-batch", "huge-now"],
)  # fmt: skip
def test_defect_9_heartbeat_and_pick_arguments_are_checked_alike(call):
    fleet = _fleet()
    before = fleet.agents()
    with pytest.raises(ValueError) as info:
        call(fleet)
    assert type(info.value) is ValueError
    assert fleet.agents() == before  # all or nothing
