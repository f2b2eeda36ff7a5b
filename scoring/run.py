"""The run-request contract: a ``POST /r/workflows/{id}/run`` body in, a routed task out.

:func:`validate_run` checks a raw JSON body against its :class:`~scoring.workflow.Workflow`,
reports every problem at once as a :class:`RunValidationError` (an HTTP 400), and otherwise
returns a :class:`ValidatedRun` with defaults filled in and, for agent runs, the
:class:`~scoring.models.DispatchRequest` that :func:`~scoring.pick.pick_agent` takes.
:func:`dispatch_run` goes one step further and reserves an agent on a fleet.

Choices where DESIGN section 2 is silent (each has a test):

- a top-level field set to JSON ``null`` counts as omitted; a parameter set to ``null`` does not
  (it is a ``type_mismatch``): a form that clears a field should omit it;
- a top-level field the contract does not define is an ``unknown_key`` on that field's name;
- a body that is not an object, or ``parameters`` that is not an object, is a ``type_mismatch``
  (with key ``None`` and ``"parameters"`` respectively); so is a non-string ``submitter_region``;
- the 64-character region limit applies after trimming and lower-casing, as for agents;
- a body with more than 100 parameter keys gets ``too_many_keys`` and its keys are not checked
  one by one, so a hostile body cannot make the server do unbounded work;
- a ``comfy_cloud`` run of a ``nerfstudio`` workflow is an ``invalid_value`` on
  ``dispatch_target`` (ComfyUI Cloud runs ComfyUI only);
- ``target_pool`` and ``submitter_region`` are still validated for a ``comfy_cloud`` run (the body
  is wrong either way) but the run carries ``None`` for both;
- an optional parameter with neither a value nor a default is left out of ``parameters``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from scoring.files import FileStore, content_type_matches
from scoring.models import MAX_NAME_LEN, DispatchRequest, ScoringPolicy, normalize_region
from scoring.workflow import MAX_PARAMETER_KEYS, DispatchTarget, ToolType, Workflow, short_repr

if TYPE_CHECKING:  # the engine modules are not needed to validate a run
    from scoring.decision import Decision


class ErrorCode(StrEnum):
    """Stable error codes of the run contract (each compares equal to its string)."""

    UNKNOWN_KEY = "unknown_key"
    MISSING_REQUIRED = "missing_required"
    TYPE_MISMATCH = "type_mismatch"
    OUT_OF_RANGE = "out_of_range"
    INVALID_OPTION = "invalid_option"
    FILE_NOT_FOUND = "file_not_found"
    FILE_WRONG_TEAM = "file_wrong_team"
    FILE_TYPE_REJECTED = "file_type_rejected"
    TOO_MANY_KEYS = "too_many_keys"
    INVALID_VALUE = "invalid_value"
    REGION_TOO_LONG = "region_too_long"
    WORKFLOW_DISABLED = "workflow_disabled"
    TOOL_TYPE_MISMATCH = "tool_type_mismatch"


@dataclass(frozen=True, slots=True)
class RunError:
    """One problem of a run body.

    ``key`` is the parameter key when ``where == "parameters"``, the top-level field name when
    ``where == "body"``, and ``None`` for the workflow itself or a body that is not an object.
    """

    code: ErrorCode
    key: str | None
    message: str
    where: Literal["body", "parameters", "workflow"] = "body"


class RunValidationError(ValueError):
    """A run body broke the contract; ``errors`` lists every problem, ``http_status`` is 400."""

    http_status = 400

    def __init__(self, errors: list[RunError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{e.code} {e.key}: {e.message}" for e in self.errors))

    @property
    def codes(self) -> list[str]:
        """The error codes, in report order."""
        return [str(e.code) for e in self.errors]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready response body: ``{"errors": [{"code", "key", "message", "where"}, ...]}``."""
        return {"errors": [{**asdict(e), "code": str(e.code)} for e in self.errors]}


class RunRequest(BaseModel):
    """Typed form of a run body (DESIGN section 2); ``None`` means the field was omitted.

    Parameter values are checked by :func:`validate_run` against the workflow, not here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    parameters: dict[str, Any] | None = None
    dispatch_target: DispatchTarget | None = None
    target_pool: Literal["team", "community"] | None = None
    submitter_region: str | None = None
    tool_type: ToolType | None = None


@dataclass(frozen=True)
class ValidatedRun:
    """A run that passed the contract.

    ``parameters`` holds every supplied value plus the defaults of omitted keys, in the workflow's
    parameter order. ``dispatch_request`` is ``None`` exactly when ``dispatch_target`` is
    ``comfy_cloud``; then ``target_pool`` and ``submitter_region`` are ``None`` too.
    """

    workflow_id: UUID
    team_id: UUID
    task_id: str
    parameters: dict[str, Any]
    dispatch_target: DispatchTarget
    target_pool: Literal["team", "community"] | None
    submitter_region: str | None
    tool_type: ToolType
    dispatch_request: DispatchRequest | None = field(repr=False)


class DispatchedRun(NamedTuple):
    """What :func:`dispatch_run` returns; ``decision`` is ``None`` for a ``comfy_cloud`` run."""

    run: ValidatedRun
    decision: Decision | None

    @property
    def routed_to(self) -> DispatchTarget:
        """``"agent"`` or ``"comfy_cloud"``."""
        return self.run.dispatch_target


_TOP_LEVEL = frozenset(RunRequest.model_fields)
_ENUMS: dict[str, tuple[str, ...]] = {
    "dispatch_target": ("agent", "comfy_cloud"),
    "target_pool": ("team", "community"),
    "tool_type": ("comfyui", "nerfstudio"),
}


def validate_run(
    workflow: Workflow,
    body: Mapping[str, Any] | RunRequest | None,
    team_id: UUID | str,
    files: FileStore,
    *,
    task_id: str | None = None,
) -> ValidatedRun:
    """Validate a run body against ``workflow`` for the submitting team.

    Parameters
    ----------
    workflow : Workflow
        The workflow being run.
    body : dict or RunRequest
        The decoded JSON body (anything JSON can hold is handled) or its typed form.
    team_id : UUID or str
        The submitting team (from the caller's credentials, never from the body).
    files : FileStore
        Where uploaded file keys are looked up.
    task_id : str, optional
        The task's id; becomes the dispatch request's ``tie_key``, so retries of one task break
        ties the same way while different tasks spread across equal agents. Defaults to a fresh
        ``uuid4`` string.

    Returns
    -------
    ValidatedRun

    Raises
    ------
    RunValidationError
        With every problem of the body, when there is at least one.
    ValueError
        If ``team_id`` is not a UUID (a server bug, not a client error).
    """
    team = team_id if isinstance(team_id, UUID) else UUID(str(team_id))
    if isinstance(body, RunRequest):
        # Back to the raw form so both entry points share one set of checks; None is omitted.
        body = {k: v for k, v in body if v is not None}
    errors: list[RunError] = []
    if workflow.status != "active":
        message = f"workflow {workflow.slug} is disabled"
        errors.append(RunError(ErrorCode.WORKFLOW_DISABLED, None, message, "workflow"))
    if body is None:
        body = {}  # an empty request body is the same as {}
    if not isinstance(body, Mapping):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, None, "the body must be a JSON object"))
        raise RunValidationError(errors)

    for name in body:
        if name not in _TOP_LEVEL:
            errors.append(RunError(ErrorCode.UNKNOWN_KEY, _key(name), "not a run request field"))
    fields = {name: body.get(name) for name in _TOP_LEVEL}  # None: omitted or null
    for name, allowed in _ENUMS.items():
        value = fields[name]
        if value is not None and (not isinstance(value, str) or value not in allowed):
            message = f"{short_repr(value)} is not one of {list(allowed)}"
            errors.append(RunError(ErrorCode.INVALID_VALUE, name, message))
            fields[name] = None  # reported; keep checking the rest against the defaults

    target: DispatchTarget = (
        fields["dispatch_target"] or workflow.default_dispatch_target or "agent"
    )
    tool_type: ToolType = fields["tool_type"] or workflow.tool_type
    if tool_type != workflow.tool_type:
        message = f"workflow {workflow.slug} runs {workflow.tool_type}, not {tool_type}"
        errors.append(RunError(ErrorCode.TOOL_TYPE_MISMATCH, "tool_type", message))
    if target == "comfy_cloud" and workflow.tool_type != "comfyui":
        message = f"comfy_cloud runs comfyui workflows only, not {workflow.tool_type}"
        errors.append(RunError(ErrorCode.INVALID_VALUE, "dispatch_target", message))
    region = _check_region(fields["submitter_region"], errors)
    parameters = _check_parameters(workflow, fields["parameters"], team, files, errors)

    if errors:
        raise RunValidationError(errors)
    tie_key = task_id if task_id is not None else str(uuid.uuid4())
    pool: Literal["team", "community"] = fields["target_pool"] or "team"
    request = None
    if target == "agent":
        request = DispatchRequest(
            team_id=team,
            target_pool=pool,
            submitter_region=region,
            tool_type=tool_type,
            required_labels=workflow.required_labels,
            min_vram_gb=workflow.min_vram_gb,
            preferred_gpu=workflow.preferred_gpu,
            required_models=workflow.required_models,
            tie_key=tie_key,
        )
    agent_run = request is not None
    return ValidatedRun(
        workflow_id=workflow.id,
        team_id=team,
        task_id=tie_key,
        parameters=parameters,
        dispatch_target=target,
        target_pool=pool if agent_run else None,
        submitter_region=region if agent_run else None,
        tool_type=tool_type,
        dispatch_request=request,
    )


def _check_region(value: Any, errors: list[RunError]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, "submitter_region", "must be a string"))
        return None
    try:
        return normalize_region(value)
    except ValueError:  # the only failure left for a string is its length
        message = f"longer than {MAX_NAME_LEN} characters after trimming"
        errors.append(RunError(ErrorCode.REGION_TOO_LONG, "submitter_region", message))
        return None


def _param_error(code: ErrorCode, key: Any, message: str) -> RunError:
    return RunError(code, _key(key), message, "parameters")


def _key(key: Any) -> str:
    """The error's key: the key itself, or a bounded repr when a Python caller used a non-string."""
    return key if isinstance(key, str) else short_repr(key)


def _check_parameters(
    workflow: Workflow, given: Any, team: UUID, files: FileStore, errors: list[RunError]
) -> dict[str, Any]:
    """Check every supplied value, then fill defaults; returns the run's parameters."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, "parameters", "must be a JSON object"))
        return {}
    defs = workflow.parameters_by_key
    too_many = len(given) > MAX_PARAMETER_KEYS
    if too_many:
        message = f"{len(given)} keys; at most {MAX_PARAMETER_KEYS} are allowed"
        errors.append(RunError(ErrorCode.TOO_MANY_KEYS, "parameters", message))
    # Past the limit the keys are not checked one by one (bounded work for hostile bodies);
    # required keys are still looked up, which costs one probe per defined parameter.
    for key, value in () if too_many else given.items():
        p = defs.get(key) if isinstance(key, str) else None
        if p is None:
            errors.append(_param_error(ErrorCode.UNKNOWN_KEY, key, "not a parameter"))
            continue
        problem = p.value_problem(value)
        if problem is None and p.type == "file":
            problem = _file_problem(value, p.accept, team, files)
        if problem is not None:
            errors.append(_param_error(ErrorCode(problem[0]), key, problem[1]))

    parameters: dict[str, Any] = {}
    for p in workflow.parameters:
        if p.key in given:
            parameters[p.key] = given[p.key]
        elif p.required:
            errors.append(_param_error(ErrorCode.MISSING_REQUIRED, p.key, "is required"))
        elif p.default is not None:
            parameters[p.key] = p.default
    return parameters


def _file_problem(
    key: str, accept: tuple[str, ...] | None, team: UUID, files: FileStore
) -> tuple[str, str] | None:
    info = files.stat(key)
    if info is None:
        return "file_not_found", "no uploaded file has this key"
    if info.team_id != team:
        return "file_wrong_team", "the file belongs to another team"
    if accept and not content_type_matches(info.content_type, accept):
        return (
            "file_type_rejected",
            f"content type {short_repr(info.content_type)} is not in {list(accept)}",
        )
    return None


def dispatch_run(
    fleet: Any,
    workflow: Workflow,
    body: Mapping[str, Any] | RunRequest | None,
    team_id: UUID | str,
    files: FileStore,
    policy: ScoringPolicy | None = None,
    now: float | None = None,
    *,
    task_id: str | None = None,
) -> DispatchedRun:
    """Validate a run and route it: reserve an agent, or hand it to ComfyUI Cloud.

    Parameters
    ----------
    fleet : Fleet
        The live fleet; an agent run calls ``fleet.dispatch``, which picks and reserves a slot
        atomically.
    workflow, body, team_id, files, task_id
        As for :func:`validate_run`.
    policy : ScoringPolicy, optional
        Passed to ``fleet.dispatch`` (``None``: the default policy).
    now : float, optional
        Seconds since the epoch, passed to ``fleet.dispatch`` (``None``: the current time).

    Returns
    -------
    DispatchedRun
        ``(run, decision)``. ``decision`` is ``None`` for a ``comfy_cloud`` run, whose fleet is
        left untouched. A decision without an agent means no agent fits now: the task waits.

    Raises
    ------
    RunValidationError
        As :func:`validate_run`; nothing is reserved then.
    """
    run = validate_run(workflow, body, team_id, files, task_id=task_id)
    if run.dispatch_request is None:
        return DispatchedRun(run, None)
    return DispatchedRun(run, fleet.dispatch(run.dispatch_request, policy=policy, now=now))


__all__ = [
    "DispatchedRun",
    "ErrorCode",
    "RunError",
    "RunRequest",
    "RunValidationError",
    "ValidatedRun",
    "dispatch_run",
    "validate_run",
]
