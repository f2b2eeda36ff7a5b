"""Properties of the run contract, checked against an independent oracle written from DESIGN §2.

The oracle below shares no code with :mod:`scoring.contract`: it restates
each rule directly (types, bounds, options, file ownership and MIME patterns, top-level enums,
region length) and predicts which fields of a body must be flagged.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from scoring.contract import (
    ErrorCode,
    InMemoryFileStore,
    ParameterDef,
    RunRequest,
    RunValidationError,
    ValidatedRun,
    Workflow,
    validate_run,
)
from scoring.models import DispatchRequest, normalize_region
from tests.strategies_run import (
    HOSTILE_NEEDS,
    OTHER_TEAM,
    TEAM,
    TOP_LEVEL,
    Scenario,
    json_bodies,
    mostly,
    near_valid_bodies,
    scenarios,
    valid_bodies,
)

ENUMS = {
    "dispatch_target": ("agent", "comfy_cloud"),
    "target_pool": ("team", "community"),
    "tool_type": ("comfyui", "nerfstudio"),
}

# --- the oracle ----------------------------------------------------------------------------------


def mime_ok(content_type: str | None, accept: tuple[str, ...] | None) -> bool:
    if not accept:
        return True
    media = (content_type or "").split(";")[0].strip().lower()
    # fnmatch's "*" also crosses "/", harmless here: stored types have exactly one slash.
    return any(p == "*/*" or (media and fnmatch.fnmatchcase(media, p)) for p in accept)


def satisfies(p: ParameterDef, value: Any, store: InMemoryFileStore) -> bool:
    """Whether ``value`` is a valid value of ``p`` for the submitting team ``TEAM``."""
    if p.type == "string":
        return type(value) is str
    if p.type == "boolean":
        return type(value) is bool
    if p.type == "number":
        if type(value) is float and (math.isnan(value) or math.isinf(value)):
            return False
        if type(value) not in (int, float):
            return False
        return (p.min is None or value >= p.min) and (p.max is None or value <= p.max)
    if p.type == "select":
        return type(value) is str and value in (p.options or ())
    if type(value) is not str:
        return False
    info = store.stat(value)
    return info is not None and info.team_id == TEAM and mime_ok(info.content_type, p.accept)


def expected_flags(s: Scenario, body: Any) -> set[tuple[str, str | None]]:
    """``(where, key)`` of every field the contract must flag; empty means the body is valid."""
    wf = s.workflow
    flags: set[tuple[str, str | None]] = set()
    if wf.status != "active":
        flags.add(("workflow", None))
    body = {} if body is None else body
    if not isinstance(body, dict):
        return flags | {("body", None)}
    flags |= {("body", k) for k in body if k not in TOP_LEVEL}
    chosen = {}
    for name, allowed in ENUMS.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and value in allowed):
            flags.add(("body", name))
            value = None
        chosen[name] = value
    if (chosen["tool_type"] or wf.tool_type) != wf.tool_type:
        flags.add(("body", "tool_type"))
    target = chosen["dispatch_target"] or wf.default_dispatch_target or "agent"
    if target == "comfy_cloud" and wf.tool_type != "comfyui":
        flags.add(("body", "dispatch_target"))
    region = body.get("submitter_region")
    # DESIGN section 3: lengths are measured after trimming, before lower-casing.
    if region is not None and (not isinstance(region, str) or len(region.strip()) > 64):
        flags.add(("body", "submitter_region"))
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        return flags | {("body", "parameters")}
    defs = {p.key: p for p in wf.parameters}
    if len(params) > 100:
        flags.add(("body", "parameters"))
    else:
        for key, value in params.items():
            if key not in defs or not satisfies(defs[key], value, s.store):
                flags.add(("parameters", key))
    flags |= {("parameters", p.key) for p in wf.parameters if p.required and p.key not in params}
    return flags


def check_run(run: ValidatedRun, s: Scenario, body: Any) -> None:
    """Everything an accepted run must be, restated from the contract."""
    wf = s.workflow
    body = {} if body is None else body
    given_params = body.get("parameters") or {}
    assert run.workflow_id == wf.id and run.team_id == TEAM
    for p in wf.parameters:
        if p.key in given_params:
            assert run.parameters[p.key] is given_params[p.key]
        elif p.default is not None:
            assert run.parameters[p.key] == p.default
        else:
            assert p.key not in run.parameters
        if p.key in run.parameters:
            assert satisfies(p, run.parameters[p.key], s.store)
    assert set(run.parameters) <= {p.key for p in wf.parameters}
    target = body.get("dispatch_target") or wf.default_dispatch_target or "agent"
    assert run.dispatch_target == target
    assert run.tool_type == wf.tool_type
    request = run.dispatch_request
    if target == "comfy_cloud":
        assert request is None and run.target_pool is None and run.submitter_region is None
        return
    assert request is not None
    region = body.get("submitter_region")
    assert request.team_id == TEAM
    assert request.target_pool == run.target_pool == (body.get("target_pool") or "team")
    assert (
        request.submitter_region == run.submitter_region == ((region or "").strip().lower() or None)
    )
    assert request.tool_type == wf.tool_type
    assert request.required_labels == wf.required_labels
    assert request.min_vram_gb == wf.min_vram_gb
    assert request.preferred_gpu == wf.preferred_gpu
    assert request.required_models == wf.required_models
    assert request.tie_key == run.task_id == "task-1"


def outcome(s: Scenario, body: Any) -> ValidatedRun | RunValidationError:
    """Run the contract; any exception other than RunValidationError fails the test."""
    try:
        return validate_run(s.workflow, body, TEAM, s.store, task_id="task-1")
    except RunValidationError as error:
        return error


def check_against_oracle(s: Scenario, body: Any) -> None:
    got = outcome(s, body)
    flags = expected_flags(s, body)
    if isinstance(got, ValidatedRun):
        assert not flags, f"accepted a body the oracle rejects: {flags}"
        check_run(got, s, body)
        return
    assert got.http_status == 400
    assert got.errors, "a RunValidationError must list at least one error"
    for e in got.errors:
        assert e.code in set(ErrorCode)
        assert e.key is None or isinstance(e.key, str)
        assert isinstance(e.message, str) and e.message
    assert {(e.where, e.key) for e in got.errors} == flags


# --- properties ----------------------------------------------------------------------------------


@given(s=scenarios(), body=json_bodies())
def test_any_json_body_is_a_run_or_a_400(s: Scenario, body: Any) -> None:
    check_against_oracle(s, body)


@given(data=st.data(), s=scenarios())
def test_near_valid_bodies_match_the_oracle(data: st.DataObject, s: Scenario) -> None:
    check_against_oracle(s, data.draw(near_valid_bodies(s)))


@given(data=st.data(), s=scenarios(hostile=True))
def test_any_workflow_that_builds_gives_a_run_or_a_400(data: st.DataObject, s: Scenario) -> None:
    """Issue 9: whatever a workflow that builds asks of agents, a run of it is accepted or is a
    RunValidationError (``outcome`` lets any other exception, e.g. pydantic's, fail the test)."""
    # Mostly valid bodies: only an accepted agent run builds a DispatchRequest.
    body = data.draw(mostly(valid_bodies(s), json_bodies() | near_valid_bodies(s)))
    check_against_oracle(s, body)


@pytest.mark.parametrize("name", sorted(HOSTILE_NEEDS))
@given(data=st.data())
def test_workflow_fields_obey_the_dispatch_request_rules(name: str, data: st.DataObject) -> None:
    """A Workflow field that flows into the DispatchRequest accepts what the request accepts,
    stores it as the request does, and refuses what the request refuses, naming the field."""
    value = data.draw(HOSTILE_NEEDS[name], label=name)
    build = lambda: Workflow(id=TEAM, slug="wf", team_id=TEAM, **{name: value})  # noqa: E731
    try:
        expected = DispatchRequest(team_id=TEAM, **{name: value})
    except ValidationError as refused:
        with pytest.raises(ValidationError) as info:
            build()
        got = [(e["loc"], e["msg"]) for e in info.value.errors()]
        assert got == [(e["loc"], e["msg"]) for e in refused.errors()]
        return
    try:
        workflow = build()
    except ValidationError as info:
        # The request takes the raw value; the workflow also refuses a value whose *stored*
        # form the request would refuse (a normaliser that is not idempotent).
        assert "would carry an invalid request" in str(info), info
        with pytest.raises(ValidationError):
            DispatchRequest(team_id=TEAM, **{name: getattr(expected, name)})
        return
    assert getattr(workflow, name) == getattr(expected, name)


BARE = Workflow(id=TEAM, slug="bare", team_id=TEAM)  # no parameters, needs nothing


# Near the limit, "İ" counts once before lower-casing and twice after it.
near_limit = st.builds(
    lambda k, n, pad: pad + "İ" * k + "x" * n + pad,
    st.integers(0, 70),
    st.integers(0, 70),
    st.sampled_from(["", " ", "\t"]),
)


@given(
    region=near_limit
    | st.text(st.sampled_from("İiXx -\t\u00a0"), max_size=80)
    | st.text(max_size=80)
)
def test_region_is_measured_and_normalised_as_the_models_do(region: str) -> None:
    """The contract takes ``normalize_region``'s word on a region, whatever its letters (``İ``
    grows when lower-cased), and the request carries it normalised exactly once."""
    try:
        expected = normalize_region(region)
    except ValueError:
        with pytest.raises(RunValidationError) as info:
            validate_run(BARE, {"submitter_region": region}, TEAM, InMemoryFileStore())
        assert info.value.codes == ["region_too_long"]
        return
    run = validate_run(BARE, {"submitter_region": region}, TEAM, InMemoryFileStore())
    assert run.dispatch_request is not None
    assert run.submitter_region == run.dispatch_request.submitter_region == expected


@given(data=st.data(), s=scenarios(active=True))
def test_valid_bodies_are_accepted(data: st.DataObject, s: Scenario) -> None:
    body = data.draw(valid_bodies(s))
    run = validate_run(s.workflow, body, TEAM, s.store, task_id="task-1")
    check_run(run, s, body)


@given(data=st.data(), s=scenarios(active=True))
def test_typed_request_gives_the_same_run(data: st.DataObject, s: Scenario) -> None:
    body = data.draw(valid_bodies(s))
    typed = RunRequest(**body)
    assert validate_run(s.workflow, typed, TEAM, s.store, task_id="task-1") == validate_run(
        s.workflow, body, TEAM, s.store, task_id="task-1"
    )


@given(data=st.data(), s=scenarios())
def test_key_order_does_not_change_the_answer(data: st.DataObject, s: Scenario) -> None:
    body = data.draw(near_valid_bodies(s))
    flipped = dict(reversed(body.items()))
    if isinstance(flipped.get("parameters"), dict):
        flipped["parameters"] = dict(reversed(flipped["parameters"].items()))
    first, second = outcome(s, body), outcome(s, flipped)
    if isinstance(first, ValidatedRun):
        assert first == second
    else:
        assert isinstance(second, RunValidationError)
        key = lambda e: (e.code, e.key or "", e.where)  # noqa: E731
        assert sorted(first.errors, key=key) == sorted(second.errors, key=key)


FAULTS = [
    "unknown_key",
    "missing_required",
    "type_mismatch",
    "out_of_range",
    "invalid_option",
    "file_not_found",
    "file_wrong_team",
    "file_type_rejected",
    "too_many_keys",
    "invalid_value",
    "region_too_long",
    "workflow_disabled",
    "tool_type_mismatch",
]


# A definition for each fault that needs one, added when the drawn workflow has none that fits
# (its key is longer than any generated key, so it never collides).
FAULT_DEFS = {
    "missing_required": ParameterDef(key="fault-required", type="string", required=True),
    "type_mismatch": ParameterDef(key="fault-number", type="number"),
    "out_of_range": ParameterDef(key="fault-bounded", type="number", min=0, max=1),
    "invalid_option": ParameterDef(key="fault-select", type="select", options=["a"]),
    "file_not_found": ParameterDef(key="fault-file", type="file"),
    "file_wrong_team": ParameterDef(key="fault-file", type="file"),
    "file_type_rejected": ParameterDef(key="fault-file", type="file", accept=["video/*"]),
}


# Values of the wrong JSON type for each parameter type: the contract's named traps first.
WRONG_TYPES: dict[str, list[Any]] = {
    "number": [True, False, "12", "1e3", math.nan, math.inf, -math.inf, None, [1], {"v": 1}],
    "boolean": ["true", "false", 1, 0, 1.0, None, [True]],
    "string": [12.5, 3, True, None, ["x"], {"k": "v"}],
    "select": [0, 1.5, False, None, ["a"]],
    "file": [7, True, None, ["inputs/x.png"], {"key": "inputs/x.png"}],
}
BAD_ENUM_VALUES = ["bogus", "public", "AGENT", "Team", " team", "comfy-cloud", "", 1, True, []]


def fits(fault: str, p: ParameterDef, s: Scenario) -> bool:
    """Whether ``p`` can carry ``fault`` on its own."""
    if fault == "missing_required":
        return p.required
    if fault == "out_of_range":
        return p.type == "number" and (p.min is not None or p.max is not None)
    if fault == "invalid_option":
        return p.type == "select"
    if fault == "file_type_rejected":
        return p.type == "file" and any(rejected_files(p, s))
    return fault == "type_mismatch" or (fault.startswith("file_") and p.type == "file")


def rejected_files(p: ParameterDef, s: Scenario) -> list[str]:
    return [k for k in s.own_files if not mime_ok(s.store.content_type(k), p.accept)]


def bad_value(fault: str, p: ParameterDef, s: Scenario) -> st.SearchStrategy[Any]:
    """A value of ``p`` that breaks exactly the rule of ``fault``."""
    if fault == "type_mismatch":
        return st.sampled_from(WRONG_TYPES[p.type])
    if fault == "out_of_range":
        return st.just(p.max + 1 if p.max is not None else p.min - 1)  # type: ignore[operator]
    if fault == "invalid_option":
        return st.just("".join(p.options or ()) + "?")
    if fault == "file_not_found":
        return st.sampled_from([k for k in s.bad_files if s.store.stat(k) is None])
    if fault == "file_wrong_team":
        return st.sampled_from([k for k in s.bad_files if s.store.team_of(k) == OTHER_TEAM])
    return st.sampled_from(rejected_files(p, s))


@pytest.mark.parametrize("fault", FAULTS)
@given(data=st.data(), s=scenarios(active=True))
def test_one_fault_gives_exactly_its_error(fault: str, data: st.DataObject, s: Scenario) -> None:
    """A valid body broken in one place is rejected with exactly that place's code and key."""
    body = data.draw(valid_bodies(s))
    params = dict(body.get("parameters") or {})
    workflow = s.workflow
    if fault in FAULT_DEFS:
        candidates = [p for p in workflow.parameters if fits(fault, p, s)]
        if not candidates or data.draw(st.booleans()):
            added = FAULT_DEFS[fault]
            if fault == "type_mismatch":  # every type has its own traps
                kind = data.draw(st.sampled_from(sorted(WRONG_TYPES)))
                options = ["a"] if kind == "select" else None
                added = ParameterDef(key=f"fault-{kind}", type=kind, options=options)
            candidates = [added]
            workflow = Workflow.model_validate(
                dict(workflow) | {"parameters": (*workflow.parameters, added)}
            )
        p = data.draw(st.sampled_from(candidates))
        if fault == "missing_required":
            params.pop(p.key, None)
        else:
            params[p.key] = data.draw(bad_value(fault, p, s))
        where: tuple[str, str | None] = ("parameters", p.key)
    elif fault == "unknown_key":
        known = {p.key for p in workflow.parameters}
        key = data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in known))
        params[key], where = 1, ("parameters", key)
    elif fault == "too_many_keys":
        params |= {f"extra-{i}": i for i in range(101 - len(params))}
        where = ("body", "parameters")
    elif fault == "invalid_value":
        name = data.draw(st.sampled_from(sorted(ENUMS)))
        body[name] = data.draw(st.sampled_from(BAD_ENUM_VALUES))
        where = ("body", name)
    elif fault == "region_too_long":
        body["submitter_region"] = " " + "r" * 65
        where = ("body", "submitter_region")
    elif fault == "workflow_disabled":
        workflow = Workflow.model_validate(dict(workflow) | {"status": "disabled"})
        where = ("workflow", None)
    else:
        body["tool_type"] = "nerfstudio" if workflow.tool_type == "comfyui" else "comfyui"
        where = ("body", "tool_type")
    body["parameters"] = params
    with pytest.raises(RunValidationError) as info:
        validate_run(workflow, body, TEAM, s.store)
    assert [(e.code, (e.where, e.key)) for e in info.value.errors] == [(fault, where)]
