"""uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C) with the three things it lacks for a
server on the internet.

- A deadline for the request head: uvicorn times out only an idle connection between requests,
  so a client that opens a connection and sends nothing, or sends its header lines one slow byte
  at a time, holds it for ever. Here the head must be complete within ``header_timeout_s`` of its
  first byte (or of the connection), else 408 and the connection is closed. (The body's deadline
  is the application's: :class:`scoring.server.limits.Limits`.)
- A bound on the head's size while it arrives (llhttp has none): a head still incomplete after
  more than ``MAX_HEADER_BYTES`` is 431 ``headers_too_large`` (one that arrives whole is refused
  the same way by the application); a malformed request is 400 ``bad_request``, both in the
  server's error format instead of plain text.
- A lingering close after such a refusal: the rest of what the client is sending is read and
  discarded for up to :data:`LINGER_SECONDS` (and :data:`LINGER_BYTES`), so the client reads the
  answer instead of a connection reset.

httptools rather than h11: parsing in C leaves the event loop's one core to the application
(``benchmarks/SERVER.md``).
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from scoring.server.errors import ServerCode, error_body

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


def protocol_class(header_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits."""

    class Protocol(ScoringProtocol):
        HEADER_TIMEOUT_S = header_timeout_s
        MAX_HEADER_BYTES = max_header_bytes

    return Protocol


class ScoringProtocol(HttpToolsProtocol):
    """See the module's docstring; configured through :func:`protocol_class`."""

    HEADER_TIMEOUT_S = 10.0
    MAX_HEADER_BYTES = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes discarded since a refusal; -1: no refusal
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0  # bytes received since the head began

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        was_in_head = self._in_head
        if was_in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and not was_in_head:  # the next request's head began in this chunk
            self._head_bytes = len(data)
        if self._lingering < 0 and self._in_head and self._head_bytes > self.MAX_HEADER_BYTES:
            limit = f"the header block is over {self.MAX_HEADER_BYTES} bytes"
            self._refuse(431, ServerCode.HEADERS_TOO_LARGE, limit)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the keep-alive timeout watches the idle connection now

    def send_400_response(self, msg: str) -> None:
        """llhttp refused the request."""
        self._refuse(400, ServerCode.BAD_REQUEST, "not a valid HTTP/1.1 request")

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.HEADER_TIMEOUT_S, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (pipelined): its own deadlines apply
        if self._head_bytes:
            late = "the request head was not received in time"
            self._refuse(408, ServerCode.REQUEST_TIMEOUT, late)
        else:
            self.transport.close()  # nothing sent at all: nothing to answer

    def _refuse(self, status: int, code: ServerCode, message: str) -> None:
        """Answer (written raw: the parser may be in its error state) and close, lingering."""
        self._disarm()
        body = error_body(code, message)
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self._lingering = 0
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
