"""uvicorn's HTTP/1.1 protocol (h11) with the three things it lacks for a server on the internet.

- A deadline for the request head: uvicorn times out only an idle connection between requests,
  so a client that opens a connection and sends nothing, or sends its header lines one slow byte
  at a time, holds it for ever. Here the head must be complete within ``header_timeout_s`` of its
  first byte (or of the connection), else 408 and the connection is closed. (The body's deadline
  is the application's: :class:`scoring.server.limits.Limits`.)
- JSON for its own refusals: a header block over the limit is 431 ``headers_too_large`` and a
  malformed request 400 ``bad_request``, in the server's error format instead of plain text.
- A lingering close after such a refusal: the rest of what the client is sending is read and
  discarded for up to :data:`LINGER_SECONDS` (and :data:`LINGER_BYTES`), so the client reads the
  answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from scoring.server.errors import ServerCode, error_body

LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


def protocol_class(header_timeout_s: float, max_header_bytes: int) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits."""

    class Protocol(ScoringProtocol):
        HEADER_TIMEOUT_S = header_timeout_s
        MAX_HEADER_BYTES = max_header_bytes

    return Protocol


class ScoringProtocol(H11Protocol):
    """See the module's docstring; configured through :func:`protocol_class`."""

    HEADER_TIMEOUT_S = 10.0
    MAX_HEADER_BYTES = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes discarded since a refusal; -1: no refusal

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        if self._lingering < 0 and self.conn.their_state is h11.IDLE:
            self._arm()  # a request head is on its way (or the next one is)
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the keep-alive timeout watches the idle connection now

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: 431 when its head outgrew the buffer, else 400."""
        buffered = len(self.conn.trailing_data[0])
        if buffered > self.MAX_HEADER_BYTES:
            limit = f"the header block is over {self.MAX_HEADER_BYTES} bytes"
            self._refuse(431, ServerCode.HEADERS_TOO_LARGE, limit)
        else:
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
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (pipelined): its own deadlines apply
        if self.conn.trailing_data[0]:
            late = "the request head was not received in time"
            self._refuse(408, ServerCode.REQUEST_TIMEOUT, late)
        else:
            self.transport.close()  # nothing sent at all: nothing to answer

    def _refuse(self, status: int, code: ServerCode, message: str) -> None:
        """Answer (written raw: h11 may be in its error state) and close, lingering."""
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
