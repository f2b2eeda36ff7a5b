"""Memory before authentication (issue 24, defect 4): bodies nobody vouched for are not read.

On every route of the served schema, 20 clients at once announce a 50 MiB body without
credentials and send it until they are answered; the server's resident memory (``VmRSS`` of
its process, sampled throughout) must grow by less than 64 MiB. Before the fix, the presign
and complete routes read and parsed whole bodies before checking credentials: three 200 MiB
bodies took the server from 203 to 1,594 MiB.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

CLIENTS = 20
BODY_BYTES = 50 * 1024 * 1024
MAX_GROWTH_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def server(shared_server: ServerProcess) -> ServerProcess:
    """A server of this module's own: its memory is measured."""
    return shared_server


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_until_answered(port: int, method: str, path: str, size: int, timeout: float = 120.0
                        ) -> int | None:  # fmt: skip
    """Announce ``size`` bytes, send them until the server answers; its status, or ``None`` when
    it closed the connection without one."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()  # fmt: skip
    chunk = b"x" * (256 * 1024)
    sent, answer = 0, b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(head)
        conn.setblocking(False)
        while time.monotonic() < deadline and b"\r\n" not in answer:
            readable, writable, _ = select.select([conn], [conn] if sent < size else [], [], 1.0)
            try:
                if readable:
                    got = conn.recv(65536)
                    if not got:
                        break
                    answer += got
                elif writable:
                    sent += conn.send(chunk[: size - sent])
            except (BlockingIOError, InterruptedError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def every_route(server: ServerProcess) -> list[tuple[str, str]]:
    """(method, path) of every operation in the served schema, its parameters filled in."""
    root = server.url.removesuffix("/api/v1")
    schema = httpx.get(f"{root}/openapi.json").json()
    values = {"workflowId": server.demo["workflow_id"], "slug": "text-to-image",
              "taskId": str(uuid.uuid4()), "token": "not-a-token"}  # fmt: skip
    routes = []
    for path, operations in schema["paths"].items():
        for name, value in values.items():
            path = path.replace("{" + name + "}", value)
        assert "{" not in path, path
        routes.extend((method.upper(), path) for method in operations)
    return routes


def test_unauthenticated_bodies_do_not_grow_memory(server: ServerProcess) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    routes = every_route(server)
    assert len(routes) >= 11
    for method, path in routes:  # each route's refusal path once, before the baseline
        send_until_answered(server.port, method, path, 1024 * 1024 + 1)
    baseline = rss_bytes(pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: dict[tuple[str, str], list[int | None]] = {}
    try:
        for method, path in routes:
            got: list[int | None] = []

            def one(method: str = method, path: str = path, got: list[int | None] = got) -> None:
                got.append(send_until_answered(server.port, method, path, BODY_BYTES))

            clients = [threading.Thread(target=one) for _ in range(CLIENTS)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            statuses[(method, path)] = got
    finally:
        stop.set()
        sampler.join()
    assert peak - baseline < MAX_GROWTH_BYTES, (
        f"RSS grew {(peak - baseline) / 2**20:.0f} MiB (from {baseline / 2**20:.0f} MiB)"
    )
    for route, got in statuses.items():
        assert len(got) == CLIENTS and all(s is not None and 400 <= s < 500 for s in got), (
            route,
            got,
        )
