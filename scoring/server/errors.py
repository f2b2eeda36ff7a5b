"""One error format for every answer: ``{"errors": [{"code", "key", "message"}, ...]}``.

Handlers turn the server's own :class:`ApiError`, Starlette's HTTP errors (unknown route, wrong
method) and FastAPI's request validation errors into that body, and :data:`RESPONSES` declares it
in the OpenAPI schema for each status a route can answer with.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("scoring.server")


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

    def __init__(self, status: int, code: str, message: str, key: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.errors = [{"code": code, "key": key, "message": message}]

    @classmethod
    def many(cls, status: int, errors: list[dict[str, Any]]) -> ApiError:
        """An answer listing several problems (each a dict with code, key, message)."""
        error = cls(status, errors[0]["code"], errors[0]["message"], errors[0]["key"])
        error.errors = errors
        return error


def not_found(what: str) -> ApiError:
    """404 ``not_found``: missing and foreign resources look the same (nothing leaks)."""
    return ApiError(404, "not_found", f"{what} not found")


def validation_errors(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors in the server's format; the key is the field's dotted path."""
    out = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "path", "query")]
        kind = err.get("type", "")
        if kind == "json_invalid":
            code = "invalid_json"
        elif kind == "missing":
            code = "missing_required"
        elif kind == "extra_forbidden":
            code = "unknown_key"
        else:
            code = "invalid_value"
        out.append({"code": code, "key": ".".join(loc) or None, "message": str(err.get("msg"))})
    return out or [{"code": "invalid_value", "key": None, "message": "invalid request"}]


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
}


def _body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"errors": errors}


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the server's format."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONAnswer(_body(exc.errors), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        item = {"code": code, "key": None, "message": str(exc.detail)}
        return JSONAnswer(_body([item]), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONAnswer(_body(validation_errors(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        item = {"code": "internal", "key": None, "message": "internal server error"}
        return JSONAnswer(_body([item]), status_code=500)


_DESCRIPTIONS = {
    400: "Invalid request: every problem is listed",
    401: "Missing or invalid credentials (`unauthorized`)",
    403: "Credentials not allowed here (`forbidden`)",
    404: "No such resource, or another team's (`not_found`)",
    409: "Conflict with the resource's state",
    413: "Body too large (`payload_too_large`)",
    422: "The Idempotency-Key named another run (`idempotency_key_reused`)",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the error body, for a route's ``responses=``."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}
