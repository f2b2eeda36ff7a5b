"""The run-request contract (DESIGN section 2), rule by rule, as worked examples.

Each table row is one body and what the platform must answer: the accepted values, or the error
``code`` and the ``key`` it names. The base body is DESIGN's own example.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
from pydantic import ValidationError, field_validator

from scoring.contract import (
    DispatchedRun,
    ErrorCode,
    InMemoryFileStore,
    ParameterDef,
    RunRequest,
    RunValidationError,
    ValidatedRun,
    Workflow,
    dispatch_run,
    validate_run,
)
from scoring.contract import workflow as workflow_module
from scoring.contract.workflow import MAX_PARAMETER_KEYS
from scoring.models import DispatchRequest

TEAM = uuid.UUID("7f9c2a52-0d1e-4b7a-9a43-5a1f0c3b2d10")
OTHER_TEAM = uuid.UUID("0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f")
WORKFLOW_ID = uuid.UUID("019abc12-3456-7890-abcd-ef1234567890")
TASK_ID = "019abc12-9012-7890-abcd-ef1234567896"

IMAGE = f"inputs/{TEAM}/3b0a6c1e-5d2f-4e8a-9b7c-1a2b3c4d5e6f/photo.png"
FOREIGN_IMAGE = f"inputs/{OTHER_TEAM}/8d7c6b5a-4e3f-4a1b-9c8d-7e6f5a4b3c2d/photo.png"
PDF = f"inputs/{TEAM}/5e4d3c2b-1a0f-4e9d-8c7b-6a5f4e3d2c1b/scan.pdf"
UNTYPED = f"inputs/{TEAM}/9a8b7c6d-5e4f-4a3b-8c1d-0e9f8a7b6c5d/blob"

# DESIGN section 2's ParameterDefs: the prompt and input image its body names, and its width.
PROMPT = ParameterDef(key="prompt", type="string", label="Prompt", required=True, node_id="6",
                      field="text")  # fmt: skip
WIDTH = ParameterDef(key="width", type="number", label="Width", min=64, max=2048, default=512,
                     node_id="5", field="width")  # fmt: skip
INPUT_IMAGE = ParameterDef(key="input_image", type="file", label="Input image", accept=["image/*"],
                           node_id="10", field="image")  # fmt: skip
# One more of each kind, to reach every rule.
EXTRA = (
    ParameterDef(key="steps", type="number", min=1, max=150, default=20),
    ParameterDef(key="seed", type="number"),  # optional, no default, no bounds
    ParameterDef(key="sampler", type="select", options=["euler", "dpmpp_2m"], default="euler"),
    ParameterDef(key="hires", type="boolean", default=False),
)


def make_workflow(*parameters: ParameterDef, **changes: Any) -> Workflow:
    fields: dict[str, Any] = {
        "id": WORKFLOW_ID,
        "slug": "text-to-image",
        "team_id": TEAM,
        "tool_type": "comfyui",
        "required_labels": {"gpu", "comfyui"},
        "default_dispatch_target": "agent",
        "status": "active",
        "preferred_gpu": None,
        "min_vram_gb": None,
        "required_models": set(),
        "parameters": list(parameters),
    }
    return Workflow(**(fields | changes))


DESIGN_WORKFLOW = make_workflow(PROMPT, WIDTH, INPUT_IMAGE)
WORKFLOW = make_workflow(PROMPT, WIDTH, INPUT_IMAGE, *EXTRA)
DESIGN_PARAMETERS = {"prompt": "sunset over ocean", "width": 1024, "input_image": IMAGE}
DESIGN_BODY = {
    "parameters": DESIGN_PARAMETERS,
    "dispatch_target": "agent",
    "target_pool": "team",
    "submitter_region": "us-east",
    "tool_type": "comfyui",
}


@pytest.fixture
def store() -> InMemoryFileStore:
    files = InMemoryFileStore()
    files.put(IMAGE, team_id=TEAM, content_type="image/png", size=1048576)
    files.put(FOREIGN_IMAGE, team_id=OTHER_TEAM, content_type="image/png", size=1048576)
    files.put(PDF, team_id=TEAM, content_type="application/pdf", size=2048)
    files.put(UNTYPED, team_id=TEAM, content_type=None)
    return files


def body_with(**params: Any) -> dict[str, Any]:
    """DESIGN's body with some parameters changed; a value of ``...`` removes the key."""
    merged = {k: v for k, v in (DESIGN_PARAMETERS | params).items() if v is not ...}
    return DESIGN_BODY | {"parameters": merged}


def errors_of(workflow: Workflow, body: Any, store: InMemoryFileStore) -> list[tuple[str, Any]]:
    with pytest.raises(RunValidationError) as info:
        validate_run(workflow, body, TEAM, store)
    assert info.value.http_status == 400
    return [(str(e.code), e.key) for e in info.value.errors]


# --- the DESIGN example ------------------------------------------------------------------------


def test_design_example_validates(store: InMemoryFileStore) -> None:
    run = validate_run(DESIGN_WORKFLOW, DESIGN_BODY, team_id=TEAM, files=store, task_id=TASK_ID)
    assert isinstance(run, ValidatedRun)
    assert run.parameters == DESIGN_PARAMETERS
    assert run.dispatch_target == "agent"
    assert run.dispatch_request == DispatchRequest(
        team_id=TEAM,
        target_pool="team",
        submitter_region="us-east",
        tool_type="comfyui",
        required_labels={"gpu", "comfyui"},
        min_vram_gb=None,
        preferred_gpu=None,
        required_models=set(),
        exclude_agents=set(),
        tie_key=TASK_ID,
    )


def test_design_parameter_def_fields() -> None:
    assert (WIDTH.key, WIDTH.type, WIDTH.label) == ("width", "number", "Width")
    assert (WIDTH.min, WIDTH.max, WIDTH.default) == (64, 2048, 512)
    assert (WIDTH.node_id, WIDTH.field, WIDTH.required) == ("5", "width", False)


def test_run_request_form_is_the_same_contract(store: InMemoryFileStore) -> None:
    typed = RunRequest(**DESIGN_BODY)
    got = validate_run(DESIGN_WORKFLOW, typed, TEAM, store, task_id=TASK_ID)
    assert got == validate_run(DESIGN_WORKFLOW, DESIGN_BODY, str(TEAM), store, task_id=TASK_ID)


def test_workflow_carries_its_needs_into_the_dispatch_request(store: InMemoryFileStore) -> None:
    workflow = make_workflow(
        PROMPT,
        required_labels={"GPU", "comfyui", "sdxl"},
        min_vram_gb=16,
        preferred_gpu="RTX_4090",
        required_models={"checkpoints/sdxl_base.safetensors"},
    )
    run = validate_run(workflow, {"parameters": {"prompt": "x"}}, TEAM, store, task_id="t-1")
    request = run.dispatch_request
    assert request is not None
    assert request.required_labels == {"gpu", "comfyui", "sdxl"}  # normalised like agents' labels
    assert request.min_vram_gb == 16
    assert request.preferred_gpu == "RTX_4090"
    assert request.required_models == {"checkpoints/sdxl_base.safetensors"}
    assert request.tie_key == run.task_id == "t-1"
    assert request.exclude_agents == frozenset()


def test_tie_key_defaults_to_a_fresh_uuid4(store: InMemoryFileStore) -> None:
    first = validate_run(DESIGN_WORKFLOW, DESIGN_BODY, TEAM, store)
    second = validate_run(DESIGN_WORKFLOW, DESIGN_BODY, TEAM, store)
    assert uuid.UUID(first.task_id).version == 4
    assert first.task_id != second.task_id
    assert first.dispatch_request is not None
    assert first.dispatch_request.tie_key == first.task_id


# --- accepted bodies: defaults and normalisation -----------------------------------------------

OPTIONAL_ONLY = make_workflow(WIDTH, *EXTRA)
NO_PARAMETERS = make_workflow()
CLOUD_DEFAULT = make_workflow(WIDTH, default_dispatch_target="comfy_cloud")
NO_DEFAULT_TARGET = make_workflow(WIDTH, default_dispatch_target=None)
NERF = make_workflow(tool_type="nerfstudio", required_labels={"gpu"})
DEFAULTS = {"width": 512, "steps": 20, "sampler": "euler", "hires": False}  # seed: no default

ACCEPTED = [
    # (workflow, body, parameters, dispatch_target, target_pool, submitter_region, tool_type)
    (OPTIONAL_ONLY, {}, DEFAULTS, "agent", "team", None, "comfyui"),
    (OPTIONAL_ONLY, {"parameters": {}}, DEFAULTS, "agent", "team", None, "comfyui"),
    (OPTIONAL_ONLY, {"parameters": {"seed": 7, "hires": True}},
     DEFAULTS | {"seed": 7, "hires": True}, "agent", "team", None, "comfyui"),
    (OPTIONAL_ONLY, {"parameters": {"width": 64, "steps": 150}},
     DEFAULTS | {"width": 64, "steps": 150}, "agent", "team", None, "comfyui"),  # bounds inclusive
    (OPTIONAL_ONLY, {"parameters": {"width": 100.5, "seed": -(10**30)}},
     DEFAULTS | {"width": 100.5, "seed": -(10**30)}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"parameters": {}}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"parameters": None}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, None, {}, "agent", "team", None, "comfyui"),
    (NO_DEFAULT_TARGET, {}, {"width": 512}, "agent", "team", None, "comfyui"),
    (CLOUD_DEFAULT, {}, {"width": 512}, "comfy_cloud", None, None, "comfyui"),
    (CLOUD_DEFAULT, {"dispatch_target": "agent"}, {"width": 512}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"dispatch_target": "comfy_cloud", "submitter_region": "us-east",
                     "target_pool": "community"}, {}, "comfy_cloud", None, None, "comfyui"),
    (NO_PARAMETERS, {"target_pool": "community"}, {}, "agent", "community", None, "comfyui"),
    (NO_PARAMETERS, {"submitter_region": "  US-East \t"}, {}, "agent", "team", "us-east",
     "comfyui"),
    (NO_PARAMETERS, {"submitter_region": ""}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"submitter_region": "   "}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"submitter_region": None}, {}, "agent", "team", None, "comfyui"),
    (NO_PARAMETERS, {"submitter_region": "  " + "r" * 64 + "  "}, {}, "agent", "team", "r" * 64,
     "comfyui"),
    (NO_PARAMETERS, {"dispatch_target": None, "tool_type": None}, {}, "agent", "team", None,
     "comfyui"),
    (NERF, {}, {}, "agent", "team", None, "nerfstudio"),
    (NERF, {"tool_type": "nerfstudio"}, {}, "agent", "team", None, "nerfstudio"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("workflow", "body", "parameters", "target", "pool", "region", "tool_type"),
    ACCEPTED,
    ids=[
        "empty-body-takes-defaults",
        "empty-parameters-takes-defaults",
        "given-values-kept-rest-default",
        "bounds-are-inclusive",
        "floats-and-huge-ints-are-numbers",
        "no-parameters-empty-body",
        "no-parameters-empty-object",
        "no-parameters-null",
        "no-body-at-all",
        "target-omitted-no-workflow-default-is-agent",
        "target-omitted-takes-workflow-default",
        "explicit-target-beats-workflow-default",
        "comfy-cloud-ignores-pool-and-region",
        "community-pool",
        "region-trimmed-and-lower-cased",
        "empty-region-is-unknown",
        "blank-region-is-unknown",
        "null-region-is-unknown",
        "region-limit-counts-after-trimming",
        "null-top-level-fields-are-omitted",
        "tool-type-defaults-to-workflow-runtime",
        "tool-type-equal-to-workflow-runtime",
    ],
)
def test_accepted(
    store: InMemoryFileStore,
    workflow: Workflow,
    body: Any,
    parameters: dict[str, Any],
    target: str,
    pool: str | None,
    region: str | None,
    tool_type: str,
) -> None:
    run = validate_run(workflow, body, TEAM, store)
    assert run.parameters == parameters
    assert list(run.parameters) == [p.key for p in workflow.parameters if p.key in parameters]
    assert (run.dispatch_target, run.target_pool, run.submitter_region) == (target, pool, region)
    assert run.tool_type == tool_type
    if target == "comfy_cloud":
        assert run.dispatch_request is None
    else:
        assert run.dispatch_request is not None
        assert run.dispatch_request.target_pool == pool
        assert run.dispatch_request.submitter_region == region
        assert run.dispatch_request.tool_type == tool_type
        assert run.dispatch_request.team_id == TEAM


# --- rejected bodies: one rule each ------------------------------------------------------------

TOO_MANY = {f"k{i}": i for i in range(MAX_PARAMETER_KEYS + 1)}

REJECTED = [
    # (body, code, key) against WORKFLOW, DESIGN's body with one thing wrong
    (body_with(height=768), "unknown_key", "height"),
    (DESIGN_BODY | {"priority": "high"}, "unknown_key", "priority"),
    (body_with(prompt=...), "missing_required", "prompt"),
    (body_with(width=True), "type_mismatch", "width"),
    (body_with(width=False), "type_mismatch", "width"),
    (body_with(width="1024"), "type_mismatch", "width"),
    (body_with(width=math.nan), "type_mismatch", "width"),
    (body_with(width=math.inf), "type_mismatch", "width"),
    (body_with(width=-math.inf), "type_mismatch", "width"),
    (body_with(width=None), "type_mismatch", "width"),
    (body_with(width=[1024]), "type_mismatch", "width"),
    (body_with(prompt=5), "type_mismatch", "prompt"),
    (body_with(prompt={"text": "x"}), "type_mismatch", "prompt"),
    (body_with(hires="true"), "type_mismatch", "hires"),
    (body_with(hires=1), "type_mismatch", "hires"),
    (body_with(sampler=0), "type_mismatch", "sampler"),
    (body_with(input_image=7), "type_mismatch", "input_image"),
    (body_with(width=63), "out_of_range", "width"),
    (body_with(width=2048.5), "out_of_range", "width"),
    (body_with(width=10**400), "out_of_range", "width"),
    (body_with(steps=0), "out_of_range", "steps"),
    (body_with(sampler="Euler"), "invalid_option", "sampler"),
    (body_with(sampler=""), "invalid_option", "sampler"),
    (body_with(input_image=f"inputs/{TEAM}/nope/photo.png"), "file_not_found", "input_image"),
    (body_with(input_image=""), "file_not_found", "input_image"),
    (body_with(input_image=FOREIGN_IMAGE), "file_wrong_team", "input_image"),
    (body_with(input_image=PDF), "file_type_rejected", "input_image"),
    (body_with(input_image=UNTYPED), "file_type_rejected", "input_image"),
    (DESIGN_BODY | {"parameters": DESIGN_PARAMETERS | TOO_MANY}, "too_many_keys", "parameters"),
    (DESIGN_BODY | {"parameters": [DESIGN_PARAMETERS]}, "type_mismatch", "parameters"),
    (DESIGN_BODY | {"parameters": "prompt=x"}, "type_mismatch", "parameters"),
    (DESIGN_BODY | {"dispatch_target": "gpu"}, "invalid_value", "dispatch_target"),
    (DESIGN_BODY | {"dispatch_target": "AGENT"}, "invalid_value", "dispatch_target"),
    (DESIGN_BODY | {"dispatch_target": 1}, "invalid_value", "dispatch_target"),
    (DESIGN_BODY | {"target_pool": "public"}, "invalid_value", "target_pool"),
    (DESIGN_BODY | {"target_pool": ["team"]}, "invalid_value", "target_pool"),
    (DESIGN_BODY | {"tool_type": "a1111"}, "invalid_value", "tool_type"),
    (DESIGN_BODY | {"tool_type": "nerfstudio"}, "tool_type_mismatch", "tool_type"),
    (DESIGN_BODY | {"submitter_region": "r" * 65}, "region_too_long", "submitter_region"),
    (DESIGN_BODY | {"submitter_region": 5}, "type_mismatch", "submitter_region"),
    ([DESIGN_BODY], "type_mismatch", None),
    ("parameters", "type_mismatch", None),
]

REJECTED_IDS = [
    "unknown-parameter",
    "unknown-body-field",
    "missing-required",
    "true-is-not-a-number",
    "false-is-not-a-number",
    "numeric-string-is-not-a-number",
    "nan-is-not-a-number",
    "inf-is-not-a-number",
    "minus-inf-is-not-a-number",
    "null-is-not-a-number",
    "array-is-not-a-number",
    "number-is-not-a-string",
    "object-is-not-a-string",
    "string-is-not-a-boolean",
    "one-is-not-a-boolean",
    "select-value-must-be-a-string",
    "file-key-must-be-a-string",
    "below-min",
    "above-max",
    "huge-int-above-max",
    "below-min-of-other-param",
    "select-is-case-sensitive",
    "select-empty-string",
    "file-not-uploaded",
    "file-empty-key",
    "file-of-another-team",
    "file-mime-not-accepted",
    "file-without-content-type",
    "more-than-100-keys",
    "parameters-is-an-array",
    "parameters-is-a-string",
    "unknown-dispatch-target",
    "dispatch-target-is-case-sensitive",
    "dispatch-target-not-a-string",
    "unknown-target-pool",
    "target-pool-not-a-string",
    "unknown-tool-type",
    "tool-type-differs-from-workflow",
    "region-over-64-chars",
    "region-not-a-string",
    "body-is-an-array",
    "body-is-a-string",
]


@pytest.mark.parametrize(("body", "code", "key"), REJECTED, ids=REJECTED_IDS)
def test_rejected(store: InMemoryFileStore, body: Any, code: str, key: str | None) -> None:
    assert errors_of(WORKFLOW, body, store) == [(code, key)]


def test_disabled_workflow(store: InMemoryFileStore) -> None:
    disabled = make_workflow(PROMPT, WIDTH, INPUT_IMAGE, status="disabled")
    assert errors_of(disabled, DESIGN_BODY, store) == [("workflow_disabled", None)]


def test_comfy_cloud_runs_comfyui_only(store: InMemoryFileStore) -> None:
    assert errors_of(NERF, {"dispatch_target": "comfy_cloud"}, store) == [
        ("invalid_value", "dispatch_target")
    ]


def test_too_many_keys_is_not_checked_key_by_key(store: InMemoryFileStore) -> None:
    """Past 100 keys only the count is reported: bounded work whatever the body holds."""
    params = {f"junk{i}": math.nan for i in range(10_000)}
    assert errors_of(WORKFLOW, {"parameters": params}, store) == [
        ("too_many_keys", "parameters"),
        ("missing_required", "prompt"),
    ]


def test_exactly_100_keys_are_allowed(store: InMemoryFileStore) -> None:
    many = make_workflow(*(ParameterDef(key=f"p{i}", type="number") for i in range(100)))
    run = validate_run(many, {"parameters": {f"p{i}": i for i in range(100)}}, TEAM, store)
    assert len(run.parameters) == 100


def test_every_problem_is_reported_together(store: InMemoryFileStore) -> None:
    body = {
        "parameters": {
            "width": True,
            "steps": 500,
            "sampler": "lms",
            "input_image": FOREIGN_IMAGE,
            "height": 768,
        },
        "dispatch_target": "gpu",
        "target_pool": "public",
        "submitter_region": "x" * 65,
        "tool_type": "nerfstudio",
        "priority": 1,
    }
    disabled = make_workflow(PROMPT, WIDTH, INPUT_IMAGE, *EXTRA, status="disabled")
    assert sorted(errors_of(disabled, body, store), key=str) == sorted(
        [
            ("workflow_disabled", None),
            ("unknown_key", "priority"),
            ("invalid_value", "dispatch_target"),
            ("invalid_value", "target_pool"),
            ("tool_type_mismatch", "tool_type"),
            ("region_too_long", "submitter_region"),
            ("type_mismatch", "width"),
            ("out_of_range", "steps"),
            ("invalid_option", "sampler"),
            ("file_wrong_team", "input_image"),
            ("unknown_key", "height"),
            ("missing_required", "prompt"),
        ],
        key=str,
    )


def test_error_object_and_response_body(store: InMemoryFileStore) -> None:
    with pytest.raises(RunValidationError) as info:
        validate_run(WORKFLOW, body_with(width="wide", extra=1), TEAM, store)
    error = info.value
    assert error.http_status == 400
    assert isinstance(error, ValueError)
    assert error.codes == ["type_mismatch", "unknown_key"]
    first = error.errors[0]
    assert (first.code, first.key, first.where) == ("type_mismatch", "width", "parameters")
    assert first.code is ErrorCode.TYPE_MISMATCH and "numeric strings" in first.message
    payload = json.loads(json.dumps(error.to_dict()))
    assert payload["errors"][1] == {
        "code": "unknown_key",
        "key": "extra",
        "message": "not a parameter",
        "where": "parameters",
    }
    assert "type_mismatch width" in str(error)


def test_bad_team_id_is_a_programming_error(store: InMemoryFileStore) -> None:
    with pytest.raises(ValueError, match="badly formed") as info:
        validate_run(WORKFLOW, DESIGN_BODY, "team-a", store)
    assert not isinstance(info.value, RunValidationError)


def test_run_request_rejects_unknown_fields_and_values() -> None:
    with pytest.raises(ValidationError):
        RunRequest(priority=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RunRequest(dispatch_target="gpu")  # type: ignore[arg-type]


# --- workflows that contradict themselves are rejected when built ------------------------------

BAD_DEFS = [
    ({"key": "w", "type": "number", "min": 10, "max": 5}, "min 10.0 is above max 5.0"),
    ({"key": "w", "type": "number", "min": 64, "default": 32}, "default 32 is invalid"),
    ({"key": "w", "type": "number", "max": 64, "default": 65.5}, "default 65.5 is invalid"),
    ({"key": "w", "type": "number", "default": True}, "default True is invalid"),
    ({"key": "w", "type": "number", "default": "512"}, "default '512' is invalid"),
    ({"key": "w", "type": "number", "default": math.nan}, "default nan is invalid"),
    ({"key": "w", "type": "number", "min": math.inf}, "finite number"),
    ({"key": "w", "type": "number", "min": True}, "valid number"),
    ({"key": "w", "type": "number", "options": ["1"]}, "options apply to select"),
    ({"key": "w", "type": "string", "min": 1}, "min/max apply to number"),
    ({"key": "w", "type": "string", "default": 3}, "default 3 is invalid"),
    ({"key": "w", "type": "boolean", "default": "yes"}, "default 'yes' is invalid"),
    ({"key": "s", "type": "select"}, "at least one option"),
    ({"key": "s", "type": "select", "options": []}, "at least one option"),
    ({"key": "s", "type": "select", "options": ["a", "a"]}, "distinct"),
    ({"key": "s", "type": "select", "options": "ab"}, "list of strings"),
    ({"key": "s", "type": "select", "options": ["a", 1]}, "valid string"),
    ({"key": "s", "type": "select", "options": ["a"], "default": "b"}, "default 'b' is invalid"),
    ({"key": "f", "type": "string", "accept": ["image/*"]}, "accept applies to file"),
    ({"key": "f", "type": "file", "accept": ["images"]}, "not a MIME pattern"),
    ({"key": "f", "type": "file", "default": "inputs/x.png"}, "file parameter cannot have"),
    ({"key": "r", "type": "string", "required": True, "default": "x"}, "required parameter"),
    ({"key": "r", "type": "string", "node_id": "5"}, "both node_id and field"),
    ({"key": "", "type": "string"}, "at least 1 character"),
    ({"key": " w", "type": "string"}, "pattern"),
    ({"key": "w", "type": "text"}, "'string', 'number'"),
    ({"key": "w", "type": "string", "colour": "red"}, "Extra inputs"),
]


@pytest.mark.parametrize(
    ("fields", "message"),
    BAD_DEFS,
    ids=[
        "min-above-max",
        "default-below-min",
        "default-above-max",
        "bool-default-for-number",
        "string-default-for-number",
        "nan-default",
        "infinite-bound",
        "bool-bound",
        "options-on-number",
        "min-on-string",
        "number-default-for-string",
        "string-default-for-boolean",
        "select-without-options",
        "select-with-empty-options",
        "duplicate-options",
        "options-as-a-string",
        "non-string-option",
        "default-not-an-option",
        "accept-on-string",
        "bad-mime-pattern",
        "file-default",
        "required-with-default",
        "node-id-without-field",
        "empty-key",
        "key-with-surrounding-space",
        "unknown-type",
        "unknown-field",
    ],
)
def test_contradictory_parameter_def(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ParameterDef(**fields)


def test_duplicate_parameter_keys() -> None:
    with pytest.raises(ValidationError, match="'width' is defined twice"):
        make_workflow(WIDTH, WIDTH.model_copy(update={"label": "Again"}))


def test_workflow_limits() -> None:
    with pytest.raises(ValidationError, match="at most 100"):
        make_workflow(*(ParameterDef(key=f"p{i}", type="string") for i in range(101)))
    with pytest.raises(ValidationError):
        make_workflow(status="paused")
    with pytest.raises(ValidationError):
        make_workflow(default_dispatch_target="gpu")
    with pytest.raises(ValidationError):
        make_workflow(min_vram_gb=-1)
    with pytest.raises(ValidationError, match="nerfstudio workflow cannot default to comfy_cloud"):
        make_workflow(tool_type="nerfstudio", default_dispatch_target="comfy_cloud")


def test_punctuation_only_preferred_gpu_is_refused_when_the_workflow_is_built() -> None:
    """Issue 9 defect 4: ``preferred_gpu="---"`` used to build, then every run of the workflow
    raised DispatchRequest's pydantic error (a 500 for the API server). It has no letter or digit
    to match a GPU name by, so the workflow itself is refused, naming the field."""
    with pytest.raises(ValidationError, match="letter or a digit") as info:
        make_workflow(PROMPT, preferred_gpu="---")
    assert [e["loc"] for e in info.value.errors()] == [("preferred_gpu",)]


# What a workflow asks of agents, refused when built with the DispatchRequest's own words.
BAD_NEEDS = [
    ("preferred_gpu", "---"),
    ("preferred_gpu", "_"),
    ("preferred_gpu", 4090),
    ("required_labels", {"gpu", ""}),
    ("required_labels", {"x" * 65}),
    ("required_labels", "gpu"),  # a string is not a set of labels
    ("min_vram_gb", -1),
    ("min_vram_gb", math.nan),
    ("min_vram_gb", math.inf),
    ("required_models", {" "}),
    ("tool_type", "a1111"),
    ("tool_type", None),
]


@pytest.mark.parametrize(
    ("name", "value"),
    BAD_NEEDS,
    ids=[
        "gpu-punctuation-only",
        "gpu-underscore-only",
        "gpu-not-a-string",
        "empty-label",
        "label-over-64-chars",
        "labels-as-a-string",
        "negative-vram",
        "nan-vram",
        "infinite-vram",
        "blank-model",
        "unknown-tool-type",
        "null-tool-type",
    ],
)
def test_workflow_needs_follow_the_dispatch_request_rules(name: str, value: Any) -> None:
    with pytest.raises(ValidationError) as request_error:
        DispatchRequest(team_id=TEAM, **{name: value})
    with pytest.raises(ValidationError) as workflow_error:
        make_workflow(PROMPT, **{name: value})
    got = [(e["loc"], e["msg"]) for e in workflow_error.value.errors()]
    assert got == [(e["loc"], e["msg"]) for e in request_error.value.errors()]
    assert got[0][0] == (name,)


def test_workflow_is_refused_when_its_stored_values_make_a_bad_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rule of DispatchRequest that its fields' annotated types do not carry (here a
    validator declared on the model, standing in for a cross-field rule or a normaliser that is
    not idempotent) still refuses the workflow when it is built, not its runs later."""

    class AtMostTwoLabels(DispatchRequest):
        @field_validator("required_labels")
        @classmethod
        def _few(cls, labels: frozenset[str]) -> frozenset[str]:
            if len(labels) > 2:
                raise ValueError("at most 2 labels")
            return labels

    monkeypatch.setattr(workflow_module, "DispatchRequest", AtMostTwoLabels)
    message = "would carry an invalid request: required_labels: Value error, at most 2 labels"
    with pytest.raises(ValidationError, match=message):
        make_workflow(PROMPT, required_labels={"gpu", "comfyui", "sdxl"})
    assert make_workflow(PROMPT, required_labels={"gpu", "sdxl"}).required_labels == {"gpu", "sdxl"}


def test_accept_patterns_are_normalised() -> None:
    p = ParameterDef(key="f", type="file", accept=("Image/*", "video/MP4; codecs=avc1"))
    assert p.accept == ("image/*", "video/mp4")


# --- dispatch_run: the server's one call ---------------------------------------------------------


class RecordingFleet:
    """Stands in for a Fleet: records what dispatch_run asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def dispatch(self, request: DispatchRequest, policy: Any = None, now: Any = None) -> str:
        self.calls.append((request, policy, now))
        return "decision"


def test_dispatch_run_passes_request_policy_and_now(store: InMemoryFileStore) -> None:
    fleet = RecordingFleet()
    got = dispatch_run(fleet, DESIGN_WORKFLOW, DESIGN_BODY, TEAM, store, "policy", 123.0)
    assert isinstance(got, DispatchedRun)
    run, decision = got
    assert decision == "decision" and got.routed_to == "agent"
    assert fleet.calls == [(run.dispatch_request, "policy", 123.0)]


def test_dispatch_run_comfy_cloud_leaves_fleet_alone(store: InMemoryFileStore) -> None:
    fleet = RecordingFleet()
    got = dispatch_run(fleet, DESIGN_WORKFLOW, DESIGN_BODY | {"dispatch_target": "comfy_cloud"},
                       TEAM, store)  # fmt: skip
    assert got.decision is None and got.routed_to == "comfy_cloud"
    assert got.run.dispatch_request is None
    assert fleet.calls == []


def test_dispatch_run_invalid_body_reserves_nothing(store: InMemoryFileStore) -> None:
    fleet = RecordingFleet()
    with pytest.raises(RunValidationError):
        dispatch_run(fleet, DESIGN_WORKFLOW, body_with(width=1), TEAM, store)
    assert fleet.calls == []


def test_dispatch_run_on_a_real_fleet(store: InMemoryFileStore) -> None:
    """End to end: the run lands on the team's agent and reserves its only slot."""
    from scoring.fleet import Fleet
    from scoring.models import Agent

    now = 1_750_000_000.0
    agents = [
        Agent(agent_id="gpu-node-01", team_id=TEAM, status="idle", labels={"gpu", "comfyui"},
              last_heartbeat=now, gpu_capacity=1, region="us-east"),
        Agent(agent_id="foreign-01", team_id=OTHER_TEAM, status="idle", community_opt_in=True,
              labels={"gpu", "comfyui"}, last_heartbeat=now, gpu_capacity=8, region="us-east"),
    ]  # fmt: skip
    fleet = Fleet.from_agents(agents)
    _, decision = dispatch_run(fleet, DESIGN_WORKFLOW, DESIGN_BODY, TEAM, store, now=now)
    assert decision is not None and decision.agent_id == "gpu-node-01"
    assert fleet.get("gpu-node-01").running_count == 1
    # Its only slot is taken and a team-pool run never lands on another team's agent: it waits.
    _, second = dispatch_run(fleet, DESIGN_WORKFLOW, DESIGN_BODY, TEAM, store, now=now)
    assert second is not None and second.agent_id is None
    assert second.rejected["capacity"] == 1 and second.rejected["pool"] == 1
    # A community-pool run may use the opted-in foreign agent.
    community = DESIGN_BODY | {"target_pool": "community"}
    _, third = dispatch_run(fleet, DESIGN_WORKFLOW, community, TEAM, store, now=now)
    assert third is not None and third.agent_id == "foreign-01"


def test_design_public_names() -> None:
    """DESIGN section 6's import line works: code outside this repository relies on it."""
    import scoring
    from scoring import (  # noqa: F401
        FileStore,
        InMemoryFileStore,
        ParameterDef,
        RunRequest,
        RunValidationError,
        Workflow,
        validate_run,
    )

    assert scoring.validate_run is validate_run
    assert {"dispatch_run", "S3FileStore", "ValidatedRun", "ErrorCode"} <= set(scoring.__all__)
    # The contract package exports the same objects, and every one of them is also in scoring.
    import scoring.contract

    assert set(scoring.contract.__all__) <= set(scoring.__all__)
    for name in scoring.contract.__all__:
        assert getattr(scoring.contract, name) is getattr(scoring, name)


def test_old_module_paths_are_gone() -> None:
    """The contract moved into scoring.contract without shims: one place to import from."""
    import importlib

    for old in ("scoring.run", "scoring.workflow", "scoring.files"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def test_copies_are_validated_and_fresh() -> None:
    """``model_copy`` re-validates: no stale parameter index, no contradiction slips through."""
    wider = WORKFLOW.model_copy(update={"parameters": [WIDTH.model_copy(update={"max": 4096})]})
    assert wider.parameters_by_key["width"].max == 4096
    assert list(wider.parameters_by_key) == ["width"]
    with pytest.raises(ValidationError, match="is above max"):
        WIDTH.model_copy(update={"max": 32, "default": None})
    with pytest.raises(ValidationError, match="defined twice"):
        WORKFLOW.model_copy(update={"parameters": [WIDTH, WIDTH]})
