"""How the run contract says no: stable error codes, one error per problem, and the 400 itself.

Every problem of a run body becomes a :class:`RunError` with an :class:`ErrorCode` (DESIGN
section 6 lists the codes); :func:`~scoring.contract.run.validate_run` collects all of them and
raises one :class:`RunValidationError`, which an API server turns into its 400 response.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal


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


#: Where a problem sits: a top-level body field, one parameter, or the workflow itself.
Where = Literal["body", "parameters", "workflow"]


@dataclass(frozen=True, slots=True)
class RunError:
    """One problem of a run body.

    ``key`` is the parameter key when ``where == "parameters"``, the top-level field name when
    ``where == "body"``, and ``None`` for the workflow itself or a body that is not an object.
    """

    code: ErrorCode
    key: str | None
    message: str
    where: Where = "body"


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


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` for error messages: bounded in length, whatever a client sent.

    Messages echo client values back; a megabyte string must not come back as a megabyte message,
    and Python refuses to ``repr`` an int of more than 4,300 digits at all.
    """
    try:
        text = repr(value)
    except ValueError:
        return "a very large integer"
    except RecursionError:  # a body nested thousands deep (JSON allows it)
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
