"""One error format for every answer: ``{"errors": [{"code", "key", "message"}, ...]}``.

Handlers turn the server's own :class:`ApiError`, Starlette's HTTP errors (unknown route, wrong
method), FastAPI's request validation errors and a busy or unreachable database into that body,
and :func:`responses` declares it in the OpenAPI schema for each status a route can answer with.
Every code is a :class:`ServerCode` or, for a run body's problems, the contract's
:class:`~scoring.contract.errors.ErrorCode`: nothing else can be raised.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoring.contract.errors import ErrorCode
from scoring.server.db import DatabaseBusy

log = logging.getLogger("scoring.server")

#: Seconds a client is asked to wait (``Retry-After``) when the database is busy.
RETRY_AFTER_S = 1


class ServerCode(StrEnum):
    """The server's error codes (each compares equal to its string), beside the run contract's
    :class:`~scoring.contract.errors.ErrorCode`, whose codes a run's 400 carries."""

    BAD_REQUEST = "bad_request"
    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    MISSING_REQUIRED = "missing_required"
    UNKNOWN_KEY = "unknown_key"
    INVALID_FILE_NAME = "invalid_file_name"
    INVALID_OUTPUTS = "invalid_outputs"
    SIZE_MISMATCH = "size_mismatch"
    CONTENT_MISMATCH = "content_mismatch"
    MISSING_TEAM_HEADER = "missing_team_header"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    CONFLICT = "conflict"
    ALREADY_UPLOADED = "already_uploaded"
    NOT_READY = "not_ready"
    TASK_FAILED = "task_failed"
    STALE_ATTEMPT = "stale_attempt"
    NOT_CANCELLABLE = "not_cancellable"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    TASK_CANCELLED = "task_cancelled"
    COMFY_CLOUD_NOT_CONFIGURED = "comfy_cloud_not_configured"
    HEADERS_TOO_LARGE = "headers_too_large"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"


#: Every code an answer may carry.
KNOWN_CODES = frozenset(ServerCode) | frozenset(ErrorCode)


class JSONAnswer(JSONResponse):
    """JSON with every non-ASCII character escaped.

    Answers echo client strings (keys, parameter values), and JSON may carry lone surrogates
    (``"\\ud800"``) that cannot be encoded as UTF-8; escaped, they come back as they were sent
    instead of failing the answer.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


class ErrorItem(BaseModel):
    """One problem: a stable ``code``, the field or parameter it concerns, and a message."""

    code: str
    key: str | None
    message: str


class ErrorBody(BaseModel):
    """Every error answer's body."""

    errors: list[ErrorItem]


class ApiError(Exception):
    """An error answer: HTTP ``status`` with one or more ``errors``."""

    def __init__(
        self,
        status: int,
        code: ServerCode | str,
        message: str,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        code = ServerCode(code)  # a code outside the vocabulary fails here, in every test
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.errors = [{"code": str(code), "key": key, "message": message}]
        self.headers = headers

    @classmethod
    def many(cls, status: int, errors: list[dict[str, Any]]) -> ApiError:
        """An answer listing several problems (each a dict with code, key, message)."""
        unknown = {str(e["code"]) for e in errors} - KNOWN_CODES
        if unknown:
            raise ValueError(f"error codes outside the vocabulary: {sorted(unknown)}")
        error = cls(status, ServerCode.BAD_REQUEST, errors[0]["message"], errors[0]["key"])
        error.errors = [{**e, "code": str(e["code"])} for e in errors]
        return error


def unavailable(message: str = "the database is busy; try again") -> ApiError:
    """503 ``unavailable`` with ``Retry-After``: a busy or unreachable database."""
    return ApiError(503, ServerCode.UNAVAILABLE, message,
                    headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


def not_found(what: str) -> ApiError:
    """404 ``not_found``: missing and foreign resources look the same (nothing leaks)."""
    return ApiError(404, ServerCode.NOT_FOUND, f"{what} not found")


def validation_errors(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors in the server's format; the key is the field's dotted path."""
    out = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "path", "query")]
        kind = err.get("type", "")
        if kind == "json_invalid":
            code = ServerCode.INVALID_JSON
        elif kind == "missing":
            code = ServerCode.MISSING_REQUIRED
        elif kind == "extra_forbidden":
            code = ServerCode.UNKNOWN_KEY
        else:
            code = ServerCode.INVALID_VALUE
        out.append({"code": str(code), "key": ".".join(loc) or None,
                    "message": str(err.get("msg"))})  # fmt: skip
    fallback = {"code": str(ServerCode.INVALID_VALUE), "key": None, "message": "invalid request"}
    return out or [fallback]


_STATUS_CODES = {
    400: ServerCode.BAD_REQUEST,
    401: ServerCode.UNAUTHORIZED,
    403: ServerCode.FORBIDDEN,
    404: ServerCode.NOT_FOUND,
    405: ServerCode.METHOD_NOT_ALLOWED,
    408: ServerCode.REQUEST_TIMEOUT,
    409: ServerCode.CONFLICT,
    413: ServerCode.PAYLOAD_TOO_LARGE,
    415: ServerCode.UNSUPPORTED_MEDIA_TYPE,
    431: ServerCode.HEADERS_TOO_LARGE,
    503: ServerCode.UNAVAILABLE,
}


def error_body(code: ServerCode, message: str) -> bytes:
    """The encoded body of a one-error answer, for code below the application (the limits
    middleware and the HTTP protocol)."""
    return bytes(JSONAnswer(_body([{"code": str(code), "key": None, "message": message}])).body)


def _body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"errors": errors}


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the server's format."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONAnswer(_body(exc.errors), status_code=exc.status, headers=headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, ServerCode.BAD_REQUEST)
        item = {"code": str(code), "key": None, "message": str(exc.detail)}
        return JSONAnswer(_body([item]), status_code=exc.status_code, headers=exc.headers)

    # SQLite's "database is locked" after its busy timeout, a lost PostgreSQL connection, a
    # full pool, this process's writers queued too long: the client may simply try again, so
    # 503 and not 500 (integrity errors stay 500s: they are bugs).
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(DatabaseBusy)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        return await _api_error(request, unavailable())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONAnswer(_body(validation_errors(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        item = {"code": str(ServerCode.INTERNAL), "key": None, "message": "internal server error"}
        return JSONAnswer(_body([item]), status_code=500)


_DESCRIPTIONS = {
    400: "Invalid request: every problem is listed",
    401: "Missing or invalid credentials (`unauthorized`)",
    403: "Credentials not allowed here (`forbidden`)",
    404: "No such resource, or another team's (`not_found`)",
    408: "The request was not received in time (`request_timeout`)",
    409: "Conflict with the resource's state",
    413: "Body too large (`payload_too_large`)",
    422: "The Idempotency-Key named another run (`idempotency_key_reused`)",
    415: "The body is not of the required media type (`unsupported_media_type`)",
    431: "Header block over its limit (`headers_too_large`)",
    503: "The database is busy or unreachable (`unavailable`, with `Retry-After`)",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the error body, for a route's ``responses=``."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}
