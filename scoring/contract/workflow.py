"""Workflows and their parameter definitions, validated when they are built.

A :class:`ParameterDef` describes one input a run may set; a :class:`Workflow` bundles them with
what its runs need from an agent. Both are frozen pydantic models that refuse to contradict
themselves, so the run validator (:mod:`scoring.contract.run`) can trust every definition it
reads.

Every Workflow field that a run copies into its :class:`~scoring.models.DispatchRequest`
(``tool_type``, ``required_labels``, ``min_vram_gb``, ``preferred_gpu``, ``required_models``)
is validated with that request field's own annotated type, taken from the request model rather
than restated, and a workflow is built only if a request carrying its values validates. So an
accepted workflow never makes a run fail with anything but a
:class:`~scoring.contract.errors.RunValidationError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from scoring.contract.errors import ErrorCode, short_repr
from scoring.contract.files import normalize_accept_pattern
from scoring.models import DispatchRequest, Uuid

#: Most keys one run's ``parameters`` may carry (and so most parameters one workflow may define).
MAX_PARAMETER_KEYS = 100

ParameterType = Literal["string", "number", "boolean", "select", "file"]
DispatchTarget = Literal["agent", "comfy_cloud"]

#: The Workflow fields a run copies into its DispatchRequest, under the request's field names.
REQUEST_FIELDS = ("tool_type", "required_labels", "min_vram_gb", "preferred_gpu", "required_models")


def request_field_type(name: str) -> Any:
    """The annotated type of ``DispatchRequest.<name>``, with its constraints and validators.

    The field's default is not part of it; each model keeps its own.
    """
    return DispatchRequest.model_fields[name].rebuild_annotation()


if TYPE_CHECKING:
    # Static checkers need the types spelled out; at run time they are DispatchRequest's own
    # annotated types (below), so the contract cannot drift from what a request accepts.
    ToolType = Literal["comfyui", "nerfstudio"]
    RequestLabels = frozenset[str]
    RequestVram = float | None
    RequestGpu = str | None
    RequestModels = frozenset[str]
else:
    ToolType = request_field_type("tool_type")
    RequestLabels = request_field_type("required_labels")
    RequestVram = request_field_type("min_vram_gb")
    RequestGpu = request_field_type("preferred_gpu")
    RequestModels = request_field_type("required_models")

# ``strict`` keeps booleans and numeric strings out of bounds, as the run contract does for values.
_Bound = Annotated[float | None, Field(strict=True, allow_inf_nan=False)]


class _Validated(BaseModel):
    """Frozen model whose copies are validated too (as ``scoring.models`` records are).

    Pydantic's ``model_copy(update=...)`` skips validation and copies ``cached_property`` values,
    so a copied workflow could hold contradictory parameters or a stale ``parameters_by_key``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **(update or {})})


def _strings(value: Any) -> Any:
    """Options and accept lists arrive as any sequence of strings; store them as a tuple."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _accept(value: Any) -> Any:
    value = _strings(value)
    return None if value is None else tuple(normalize_accept_pattern(v) for v in value)


def is_number(value: Any) -> bool:
    """A JSON number the contract accepts: int or finite float, never a bool or numeric string."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True  # arbitrary-size ints compare exactly with the bounds; no float() overflow
    return isinstance(value, float) and math.isfinite(value)


class ParameterDef(_Validated):
    """One input of a workflow.

    ``min``/``max`` apply to ``number`` only, ``options`` to ``select`` only (required there, as a
    non-empty list of distinct strings), ``accept`` to ``file`` only (MIME patterns such as
    ``image/*``; omitted means any type). ``node_id`` and ``field`` say where the value goes in
    the graph; give both or neither.

    ``default`` is used when a run omits the key; it must itself be a valid value. A required
    parameter has no default (it would never be used), and neither does a ``file`` parameter: a
    file must be uploaded by the team that runs the workflow.

    Examples
    --------
    >>> ParameterDef(key="width", type="number", label="Width", min=64, max=2048, default=512,
    ...              node_id="5", field="width").default
    512
    """

    key: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$")]
    type: ParameterType
    label: str = ""
    description: str = ""
    required: Annotated[bool, Strict()] = False  # "yes", 1 or "on" is no answer
    default: Any = None
    min: _Bound = None
    max: _Bound = None
    options: Annotated[tuple[str, ...] | None, BeforeValidator(_strings)] = None
    accept: Annotated[tuple[str, ...] | None, BeforeValidator(_accept)] = None
    node_id: str | None = None
    field: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParameterDef:
        if self.type != "number" and (self.min is not None or self.max is not None):
            raise ValueError(f"{self.key}: min/max apply to number parameters only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.key}: min {self.min} is above max {self.max}")
        if self.type != "select" and self.options is not None:
            raise ValueError(f"{self.key}: options apply to select parameters only")
        if self.type == "select":
            if not self.options:
                raise ValueError(f"{self.key}: a select parameter needs at least one option")
            if len(set(self.options)) != len(self.options):
                raise ValueError(f"{self.key}: options must be distinct")
        if self.type != "file" and self.accept is not None:
            raise ValueError(f"{self.key}: accept applies to file parameters only")
        if (self.node_id is None) != (self.field is None):
            raise ValueError(f"{self.key}: give both node_id and field, or neither")
        if self.default is not None:
            self._check_default()
        return self

    def _check_default(self) -> None:
        if self.required:
            raise ValueError(f"{self.key}: a required parameter cannot have a default")
        if self.type == "file":
            raise ValueError(f"{self.key}: a file parameter cannot have a default")
        problem = self.value_problem(self.default)
        if problem is not None:
            raise ValueError(
                f"{self.key}: default {short_repr(self.default)} is invalid: {problem[1]}"
            )

    def value_problem(self, value: Any) -> tuple[ErrorCode, str] | None:
        """Check ``value`` against this definition, apart from file-store lookups.

        Returns
        -------
        tuple of (ErrorCode, str) or None
            ``(error code, message)`` for the first problem, or ``None`` if the value is valid.
            File parameters only check that the value is a string (a file key).
        """
        kind = self.type
        if kind in ("string", "file", "select") and not isinstance(value, str):
            wanted = "a file key (string)" if kind == "file" else "a string"
            return ErrorCode.TYPE_MISMATCH, f"expected {wanted}, got {_json_type(value)}"
        if kind == "boolean" and not isinstance(value, bool):
            return ErrorCode.TYPE_MISMATCH, f"expected a boolean, got {_json_type(value)}"
        if kind == "number":
            if not is_number(value):
                return ErrorCode.TYPE_MISMATCH, f"expected a finite number, got {_describe(value)}"
            if (self.min is not None and value < self.min) or (
                self.max is not None and value > self.max
            ):
                message = f"{short_repr(value)} is outside [{self.min}, {self.max}]"
                return ErrorCode.OUT_OF_RANGE, message
        if kind == "select" and value not in (self.options or ()):
            message = f"{short_repr(value)} is not one of {list(self.options or ())}"
            return ErrorCode.INVALID_OPTION, message
        return None


class Workflow(_Validated):
    """A runnable graph: its owner, what its runs need from an agent, and its parameters.

    ``default_dispatch_target`` ``None`` means runs go to an ``agent`` unless they say otherwise.
    At most :data:`MAX_PARAMETER_KEYS` parameters, with distinct keys. The fields named in
    :data:`REQUEST_FIELDS` obey the rules of the same fields of
    :class:`~scoring.models.DispatchRequest` (labels trimmed and lower-cased, ``preferred_gpu``
    with a letter or a digit, ``min_vram_gb`` finite and not negative, ...).
    """

    id: UUID
    slug: Annotated[str, Field(min_length=1, max_length=128)]
    team_id: Uuid
    tool_type: ToolType = "comfyui"
    required_labels: RequestLabels = frozenset()
    default_dispatch_target: DispatchTarget | None = None
    status: Literal["active", "disabled"] = "active"
    preferred_gpu: RequestGpu = None
    min_vram_gb: RequestVram = None
    required_models: RequestModels = frozenset()
    parameters: Annotated[tuple[ParameterDef, ...], Field(max_length=MAX_PARAMETER_KEYS)] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Workflow:
        if self.default_dispatch_target == "comfy_cloud" and self.tool_type != "comfyui":
            # ComfyUI Cloud runs ComfyUI graphs only; every run taking the default would fail.
            raise ValueError(f"a {self.tool_type} workflow cannot default to comfy_cloud")
        seen: set[str] = set()
        for p in self.parameters:
            if p.key in seen:
                raise ValueError(f"parameter key {p.key!r} is defined twice")
            seen.add(p.key)
        self._check_request_fields()
        return self

    def _check_request_fields(self) -> None:
        """Refuse a workflow whose runs' DispatchRequest would not validate.

        The fields above already passed the request's own validators, but a run passes on the
        *stored* (normalised) values, which the request validates once more: a normaliser that
        is not idempotent, or a rule of DispatchRequest that spans several fields, would
        otherwise surface only when a run is dispatched (a server error, not a 400).
        """
        try:
            DispatchRequest(team_id=self.team_id, **self.request_fields())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()
            )
            message = f"runs of this workflow would carry an invalid request: {problems}"
            raise ValueError(message) from None

    def request_fields(self) -> dict[str, Any]:
        """What every run of this workflow copies into its DispatchRequest, by field name."""
        return {name: getattr(self, name) for name in REQUEST_FIELDS}

    @cached_property
    def parameters_by_key(self) -> Mapping[str, ParameterDef]:
        """Each ParameterDef by its ``key``, in definition order."""
        return {p.key: p for p in self.parameters}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, float):
        return f"non-finite {value!r}"  # only NaN/inf floats reach here
    if isinstance(value, str):
        return "a string (numeric strings are not numbers)"
    return _json_type(value)
