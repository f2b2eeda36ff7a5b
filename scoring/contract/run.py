"""The run-request contract: a ``POST /r/workflows/{id}/run`` body in, a routed task out.

:func:`validate_run` checks a raw JSON body against its
:class:`~scoring.contract.workflow.Workflow`, reports every problem at once as a
:class:`~scoring.contract.errors.RunValidationError` (an HTTP 400), and otherwise returns a
:class:`ValidatedRun` with defaults filled in and, for agent runs, the
:class:`~scoring.models.DispatchRequest` that :func:`~scoring.pick.pick_agent` takes.
:func:`dispatch_run` goes one step further and reserves an agent on a fleet.

Choices where DESIGN section 2 is silent (each has a test):

- a top-level field set to JSON ``null`` counts as omitted; a parameter set to ``null`` does not
  (it is a ``type_mismatch``): a form that clears a field should omit it;
- a top-level field the contract does not define is an ``unknown_key`` on that field's name;
- a body that is not an object, or ``parameters`` that is not an object, is a ``type_mismatch``
  (with key ``None`` and ``"parameters"`` respectively); so is a ``submitter_region`` that is
  not a string or not valid Unicode (a lone surrogate);
- a region is measured and normalised by :func:`scoring.models.normalize_region`, exactly as an
  agent's region is; valid text it refuses is ``region_too_long``;
- a body with more than 100 parameter keys gets ``too_many_keys`` and its keys are not checked
  one by one, so a hostile body cannot make the server do unbounded work;
- a ``comfy_cloud`` run of a ``nerfstudio`` workflow is an ``invalid_value`` on
  ``dispatch_target`` (ComfyUI Cloud runs ComfyUI only);
- ``target_pool`` and ``submitter_region`` are still validated for a ``comfy_cloud`` run (the body
  is wrong either way) but the run carries ``None`` for both;
- an optional parameter with neither a value nor a default is left out of ``parameters``.

The values ``dispatch_target``, ``target_pool`` and ``tool_type`` may take are read off the
``Literal`` types of the Workflow and DispatchRequest models, never restated here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from scoring.contract.errors import ErrorCode, RunError, RunValidationError, short_repr
from scoring.contract.files import FileStore, content_type_matches
from scoring.contract.workflow import (
    MAX_PARAMETER_KEYS,
    DispatchTarget,
    ParameterDef,
    ToolType,
    Workflow,
    request_field_type,
)
from scoring.models import DispatchRequest, ScoringPolicy, normalize_region, valid_text

if TYPE_CHECKING:  # the engine sits below the contract; validating a run never needs it
    from scoring.decision import Decision
    from scoring.fleet import Fleet

    TargetPool = Literal["team", "community"]
else:
    TargetPool = request_field_type("target_pool")  # DispatchRequest's own Literal


class RunRequest(BaseModel):
    """Typed form of a run body (DESIGN section 2); ``None`` means the field was omitted.

    Parameter values are checked by :func:`validate_run` against the workflow, not here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    parameters: dict[str, Any] | None = None
    dispatch_target: DispatchTarget | None = None
    target_pool: TargetPool | None = None
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
    target_pool: TargetPool | None
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
#: The values each enum field of the body may take, from the models' ``Literal`` types.
ENUM_VALUES: dict[str, tuple[str, ...]] = {
    "dispatch_target": get_args(DispatchTarget),
    "target_pool": get_args(TargetPool),
    "tool_type": get_args(ToolType),
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
    errors = _workflow_errors(workflow)
    fields = _top_level_fields(body, errors)
    if fields is None:  # not an object: nothing else can be checked
        raise RunValidationError(errors)
    target, tool_type = _route(workflow, fields, errors)
    region = _check_region(fields["submitter_region"], errors)
    parameters = _check_parameters(workflow, fields["parameters"], team, files, errors)
    if errors:
        raise RunValidationError(errors)

    tie_key = task_id if task_id is not None else str(uuid.uuid4())
    request = None
    if target == "agent":
        request = _dispatch_request(workflow, team, fields["target_pool"], region, tie_key)
    return ValidatedRun(
        workflow_id=workflow.id,
        team_id=team,
        task_id=tie_key,
        parameters=parameters,
        dispatch_target=target,
        target_pool=None if request is None else request.target_pool,
        submitter_region=None if request is None else request.submitter_region,
        tool_type=tool_type,
        dispatch_request=request,
    )


# --- the steps of validate_run: each appends its problems to ``errors`` -----------------------


def _workflow_errors(workflow: Workflow) -> list[RunError]:
    """Problems of the workflow itself, which no body can fix."""
    if workflow.status == "active":
        return []
    message = f"workflow {workflow.slug} is disabled"
    return [RunError(ErrorCode.WORKFLOW_DISABLED, None, message, "workflow")]


def _top_level_fields(
    body: Mapping[str, Any] | RunRequest | None, errors: list[RunError]
) -> dict[str, Any] | None:
    """Each top-level field of the body, ``None`` when omitted, null or an invalid enum value.

    Returns ``None`` (with the error recorded) when the body is not an object at all.
    """
    if isinstance(body, RunRequest):
        # Back to the raw form so both entry points share one set of checks; None is omitted.
        body = {k: v for k, v in body if v is not None}
    if body is None:
        body = {}  # an empty request body is the same as {}
    if not isinstance(body, Mapping):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, None, "the body must be a JSON object"))
        return None
    for name in body:
        if name not in _TOP_LEVEL:
            errors.append(RunError(ErrorCode.UNKNOWN_KEY, _key(name), "not a run request field"))
    fields = {name: body.get(name) for name in _TOP_LEVEL}
    for name, allowed in ENUM_VALUES.items():
        value = fields[name]
        if value is not None and (not isinstance(value, str) or value not in allowed):
            message = f"{short_repr(value)} is not one of {list(allowed)}"
            errors.append(RunError(ErrorCode.INVALID_VALUE, name, message))
            fields[name] = None  # reported; keep checking the rest against the defaults
    return fields


def _route(
    workflow: Workflow, fields: Mapping[str, Any], errors: list[RunError]
) -> tuple[DispatchTarget, ToolType]:
    """Where the run goes and the runtime it asks for; both must suit the workflow."""
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
    return target, tool_type


def _check_region(value: Any, errors: list[RunError]) -> str | None:
    """The submitter's region as sent, if ``normalize_region`` accepts it; else ``None``.

    The DispatchRequest is given the region as sent and normalises it once, exactly as checked
    here: normalising twice is not safe in general (lower-casing can lengthen a string).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, "submitter_region", "must be a string"))
        return None
    try:
        valid_text(value, "submitter_region")
    except ValueError as exc:  # a lone surrogate: not text at all, whatever its length
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, "submitter_region", str(exc)))
        return None
    try:
        normalize_region(value)
    except ValueError as exc:  # for valid text, only its length fails; the words are the model's
        errors.append(RunError(ErrorCode.REGION_TOO_LONG, "submitter_region", str(exc)))
        return None
    return value


def _check_parameters(
    workflow: Workflow, given: Any, team: UUID, files: FileStore, errors: list[RunError]
) -> dict[str, Any]:
    """Check every supplied value, then fill defaults; returns the run's parameters."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        errors.append(RunError(ErrorCode.TYPE_MISMATCH, "parameters", "must be a JSON object"))
        return {}
    if len(given) > MAX_PARAMETER_KEYS:
        # The keys are then not checked one by one (bounded work for hostile bodies); required
        # keys are still looked up, which costs one probe per defined parameter.
        message = f"{len(given)} keys; at most {MAX_PARAMETER_KEYS} are allowed"
        errors.append(RunError(ErrorCode.TOO_MANY_KEYS, "parameters", message))
    else:
        defs = workflow.parameters_by_key
        for key, value in given.items():
            p = defs.get(key) if isinstance(key, str) else None
            problem = _value_problem(p, value, team, files)
            if problem is not None:
                errors.append(RunError(problem[0], _key(key), problem[1], "parameters"))
    return _with_defaults(workflow, given, errors)


def _value_problem(
    p: ParameterDef | None, value: Any, team: UUID, files: FileStore
) -> tuple[ErrorCode, str] | None:
    """The first problem of ``value`` for parameter ``p`` (``None``: no such parameter)."""
    if p is None:
        return ErrorCode.UNKNOWN_KEY, "not a parameter"
    problem = p.value_problem(value)
    if problem is None and p.type == "file":
        problem = _file_problem(value, p.accept, team, files)
    return problem


def _with_defaults(
    workflow: Workflow, given: Mapping[Any, Any], errors: list[RunError]
) -> dict[str, Any]:
    """The supplied values plus the defaults of omitted keys, in the workflow's order."""
    parameters: dict[str, Any] = {}
    for p in workflow.parameters:
        if p.key in given:
            parameters[p.key] = given[p.key]
        elif p.required:
            message = "is required"
            errors.append(RunError(ErrorCode.MISSING_REQUIRED, p.key, message, "parameters"))
        elif p.default is not None:
            parameters[p.key] = p.default
    return parameters


def _file_problem(
    key: str, accept: tuple[str, ...] | None, team: UUID, files: FileStore
) -> tuple[ErrorCode, str] | None:
    info = files.stat(key)
    if info is None:
        return ErrorCode.FILE_NOT_FOUND, "no uploaded file has this key"
    if info.team_id != team:
        return ErrorCode.FILE_WRONG_TEAM, "the file belongs to another team"
    if accept and not content_type_matches(info.content_type, accept):
        message = f"content type {short_repr(info.content_type)} is not in {list(accept)}"
        return ErrorCode.FILE_TYPE_REJECTED, message
    return None


def _dispatch_request(
    workflow: Workflow, team: UUID, pool: TargetPool | None, region: str | None, tie_key: str
) -> DispatchRequest:
    """The agent run's request; it validates, since the body passed and the workflow built."""
    return DispatchRequest(
        team_id=team,
        target_pool=pool or "team",
        submitter_region=region,  # as sent: the request normalises it (see _check_region)
        tie_key=tie_key,
        **workflow.request_fields(),  # checked against DispatchRequest when the workflow built
    )


def _key(key: Any) -> str:
    """The error's key: the key itself, or a bounded repr when a Python caller used a non-string."""
    return key if isinstance(key, str) else short_repr(key)


def dispatch_run(
    fleet: Fleet,
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


__all__ = ["DispatchedRun", "RunRequest", "ValidatedRun", "dispatch_run", "validate_run"]
