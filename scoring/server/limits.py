"""The limits of DESIGN section 10.3, each declared once and checked before anything is parsed.

:class:`Limits` is the outermost application layer: it refuses an oversized header block (431),
a body over :attr:`Settings.max_body_bytes` (413), a run body that is not JSON (415) and a body
not received within :attr:`Settings.body_timeout_s` (408), before authentication or any database
read, and it reads every body except an upload's into memory itself, so no route holds more than
the limit. Uploads (:data:`UPLOADS`) are streamed to their route, whose limit is the size signed
into the upload URL, under a deadline of their own (:attr:`Settings.upload_timeout_s`).

A refused request's body is read and discarded first (up to :data:`DRAIN_MAX_BYTES`): a client
that sends its whole body before reading the answer (most do) would otherwise find the connection
closed under it and never see the 413.

:func:`decode` is the one JSON decoder of request bodies (strict: no NaN, no duplicate keys, no
lone surrogates) and :func:`check_outputs` the rule of a task's outputs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from scoring.contract.errors import short_repr
from scoring.server.errors import ApiError, ServerCode, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Request line plus header fields, in bytes (the HTTP protocol refuses larger blocks itself).
MAX_HEADER_BYTES = 16 * 1024
#: A file name, in bytes of UTF-8: with a UUID directory and the team's, a key stays well under
#: the file systems' 255-byte names and the 1,024-byte key column.
MAX_FILE_NAME_BYTES = 200
#: A task's outputs, as compact JSON.
MAX_OUTPUT_BYTES = 1024 * 1024
#: Nesting of a task's outputs (an object or list inside another counts one level).
MAX_OUTPUT_DEPTH = 32
#: A refused body is read (and discarded) up to this size before the answer; a larger one is
#: answered at once.
DRAIN_MAX_BYTES = 8 * 1024 * 1024
#: Seconds spent reading a refused body before answering anyway.
DRAIN_SECONDS = 5.0
#: Routes whose body is streamed to the route (its size is signed into the URL).
UPLOADS = "/api/v1/uploads/"
#: Routes whose body must be ``application/json``.
JSON_ONLY = (("POST", re.compile(r"/api/v1/r/workflows/[^/]+/run")),)
_JSON_TYPE = re.compile(r"application/(?:[A-Za-z0-9.+-]+\+)?json\s*(?:;.*)?", re.IGNORECASE)


def header_bytes(scope: Scope) -> int:
    """The size of a request's head as sent: request line and ``name: value`` lines."""
    line = len(scope["method"]) + len(scope.get("raw_path", b"")) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class Limits:
    """ASGI middleware enforcing the request limits of DESIGN section 10.3."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, body_timeout_s: float, upload_timeout_s: float
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.upload_timeout_s = upload_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"].startswith(UPLOADS)
        timeout = self.upload_timeout_s if upload else self.body_timeout_s
        body = _Body(receive, time.monotonic() + timeout)
        refusal = self._refusal(scope, body)
        if refusal is None and not upload:
            refusal = await body.read_all(self.max_body_bytes)
        if refusal is not None:
            await _answer(send, body, *refusal)
            return

        async def send_after_drain(message: Message) -> None:
            if message["type"] == "http.response.start" and not body.done:
                await body.drain()  # an answer before the whole body (a 401 to an upload)
            await send(message)

        await self.app(scope, body.receive, send_after_drain)

    def _refusal(self, scope: Scope, body: _Body) -> tuple[int, ServerCode, str] | None:
        if header_bytes(scope) > MAX_HEADER_BYTES:
            limit = f"the header block is over {MAX_HEADER_BYTES} bytes"
            return 431, ServerCode.HEADERS_TOO_LARGE, limit
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        body.declared = int(declared) if declared.isdigit() else None
        if not scope["path"].startswith(UPLOADS) and (body.declared or 0) > self.max_body_bytes:
            limit = f"the body is over {self.max_body_bytes} bytes"
            return 413, ServerCode.PAYLOAD_TOO_LARGE, limit
        chunked = body.declared is None and b"transfer-encoding" in headers
        has_body = chunked or bool(body.declared)
        method, path = scope["method"], scope["path"]
        if has_body and any(m == method and p.fullmatch(path) for m, p in JSON_ONLY):
            kind = headers.get(b"content-type", b"").decode("latin-1")
            if not _JSON_TYPE.fullmatch(kind.strip()):
                return 415, ServerCode.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json"
        return None


class _Body:
    """A request's body as the application reads it: under one deadline, replayed once read."""

    def __init__(self, receive: Receive, deadline: float) -> None:
        self._receive = receive
        self.deadline = deadline
        self.declared: int | None = None
        self.done = False
        self._buffered: bytes | None = None

    async def receive(self) -> Message:
        """The next message: the buffered body first, then what the client sends."""
        if self._buffered is not None:
            chunk, self._buffered = self._buffered, None
            return {"type": "http.request", "body": chunk, "more_body": False}
        if self.done:
            return await self._receive()  # after the body: only a disconnect comes
        with anyio.move_on_after(self.deadline - time.monotonic()):
            message = await self._receive()
            self.done = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        raise _timeout()

    async def read_all(self, limit: int) -> tuple[int, ServerCode, str] | None:
        """Buffer the whole body (replayed by :meth:`receive`); a refusal if it is too large,
        too slow or cut off."""
        chunks, size = [], 0
        try:
            while not self.done:
                message = await self.receive()
                if message["type"] != "http.request":
                    return 400, ServerCode.BAD_REQUEST, "the client went away"
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return 413, ServerCode.PAYLOAD_TOO_LARGE, f"the body is over {limit} bytes"
                chunks.append(chunk)
        except ApiError as exc:
            return exc.status, ServerCode(str(exc.errors[0]["code"])), str(exc.errors[0]["message"])
        self._buffered = b"".join(chunks)
        return None

    async def drain(self) -> None:
        """Read and discard the rest of the body, within bounds, so the client reads the answer."""
        if self.done or (self.declared or 0) > DRAIN_MAX_BYTES:
            return
        seen = 0
        with anyio.move_on_after(min(DRAIN_SECONDS, max(0.0, self.deadline - time.monotonic()))):
            while not self.done and seen <= DRAIN_MAX_BYTES:
                message = await self._receive()
                seen += len(message.get("body", b""))
                self.done = message["type"] != "http.request" or not message.get("more_body")


def _timeout() -> ApiError:
    return ApiError(408, ServerCode.REQUEST_TIMEOUT, "the body was not received in time",
                    headers={"Connection": "close"})  # fmt: skip


async def _answer(send: Send, body: _Body, status: int, code: ServerCode, message: str) -> None:
    """A refusal sent by the middleware itself, in the server's error format."""
    headers = [(b"content-type", b"application/json")]
    if status == 408:  # a client this slow keeps no connection
        headers.append((b"connection", b"close"))
    else:
        await body.drain()
    content = error_body(code, message)
    headers.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})


# --- bodies ----------------------------------------------------------------------------------


def decode(raw: bytes, *, empty_ok: bool = False, constants: bool = False) -> Any:
    """A request body as one JSON object; ``None`` for an empty body when ``empty_ok``.

    Strict where Python's ``json`` is lenient: duplicate keys, numbers out of the float range
    and strings that are not valid Unicode (lone surrogates) are refused; so are ``NaN`` and
    ``Infinity`` unless ``constants`` (they are then checked by the caller, see
    :func:`check_outputs`).

    Raises
    ------
    ApiError
        400 ``invalid_json``.
    """
    if not raw.strip() and empty_ok:
        return None
    try:
        value = json.loads(
            raw,
            object_pairs_hook=_unique_keys,
            parse_constant=float if constants else _reject_constant,
            parse_float=float if constants else _finite_float,
        )
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError):
        raise ApiError(400, ServerCode.INVALID_JSON, "the body is not valid JSON") from None
    except ValueError as exc:  # from the hooks below: a duplicate key, NaN, a huge number
        raise ApiError(400, ServerCode.INVALID_JSON, str(exc)) from None
    if not isinstance(value, dict):
        raise ApiError(400, ServerCode.INVALID_JSON, "the body must be a JSON object")
    try:  # one pass over every string, in C: a lone surrogate cannot be encoded
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, ServerCode.INVALID_JSON, "a string is not valid Unicode") from None
    except ValueError:  # circular: impossible from json.loads; kept for the type checker
        raise ApiError(400, ServerCode.INVALID_JSON, "the body is not valid JSON") from None
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # Python's json keeps the last silently
            raise ValueError(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"{text} is out of range")
    return value


def check_outputs(outputs: Any) -> None:
    """A task's outputs as the result route can return them: at most :data:`MAX_OUTPUT_DEPTH`
    deep, :data:`MAX_OUTPUT_BYTES` as JSON, finite numbers only.

    Raises
    ------
    ApiError
        400 ``invalid_outputs`` naming the first rule broken.
    """
    if outputs is None:
        return
    stack: list[tuple[Any, int]] = [(outputs, 1)]
    while stack:  # iterative: a deep value must not exhaust the interpreter's stack here
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_OUTPUT_DEPTH:
                raise _bad_outputs(f"nested more than {MAX_OUTPUT_DEPTH} deep")
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _bad_outputs("numbers must be finite (no NaN or Infinity)")
    size = len(json.dumps(outputs, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_OUTPUT_BYTES:
        raise _bad_outputs(f"{size} bytes as JSON; at most {MAX_OUTPUT_BYTES}")


def _bad_outputs(message: str) -> ApiError:
    return ApiError(400, ServerCode.INVALID_OUTPUTS, message, "outputs")
