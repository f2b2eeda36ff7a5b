"""Issue 24: every request answered cleanly, through a real server process.

One regression test per defect the attack on the server found (numbered as in the issue; the
stepped-back clock, defect 7, belongs to the task lifecycle and is tested there). Each failed on
the code before the fix. The tests share one server started with short timeouts (2 s for a
request's head and body, 1 s for a busy database); each works with a team of its own where it
dispatches tasks, so they do not see each other's runs.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import PNG, ROOT, ServerProcess, add_team, example_body, upload, wait_for

HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("hardening"), "--heartbeat-timeout", "30",
        "--header-timeout", str(HEAD_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
        "--upload-timeout", str(BODY_TIMEOUT_S),
        "--db-busy-timeout", "1", demo_agents=3,
    )  # fmt: skip
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def error_codes(response: Any, status: int) -> list[str]:
    assert response.status_code == status, response.text
    return [e["code"] for e in response.json()["errors"]]


def heartbeat(server: ServerProcess, key: str, **fields: Any) -> httpx.Response:
    body = {"status": "idle", "gpu_capacity": 2, "labels": ["gpu", "comfyui"],
            "region": "us-east", **fields}  # fmt: skip
    with server.client(key) as agent:
        return agent.post("/agents/heartbeat", json=body)


def dispatched_task(server: ServerProcess, team: dict[str, Any], **heartbeat_fields: Any) -> str:
    """Submit the example run as ``team`` and wait until its (only) agent is handed it."""
    (agent_key,) = team["agent_keys"].values()
    heartbeat(server, agent_key, **heartbeat_fields)
    with server.client(team["api_key"]) as client:
        body = example_body(upload(client))
        if heartbeat_fields.get("community_opt_in"):
            body["target_pool"] = "community"
        r = client.post(f"/r/workflows/{team['workflow_id']}/run", json=body)
        assert r.status_code == 202, r.text
        task_id = str(r.json()["task_id"])

    def handed_out() -> bool:
        tasks = heartbeat(server, agent_key, **heartbeat_fields).json()["tasks"]
        return any(t["task_id"] == task_id for t in tasks)

    wait_for(handed_out)
    return task_id


def raw_request(port: int, data: bytes, *, wait: float, until_answered: bool = False) -> bytes:
    """Send ``data`` on a new connection; everything answered until the server closes it or
    ``wait`` seconds pass (or, with ``until_answered``, until one whole response with a
    Content-Length has arrived: the server may keep the connection open for seconds after)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)
        conn.settimeout(wait)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
                if until_answered and _whole_response(answer):
                    break
        except TimeoutError:
            pass
        except ConnectionResetError:
            answer += b"<reset>"
    return answer


def _whole_response(answer: bytes) -> bool:
    head, blank, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if blank else []:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


# --- 1. a version in other digits than ASCII ----------------------------------------------------


@pytest.mark.parametrize("version", ["²", "¹", "³", "①", "④", "١", "1²"])
def test_1_non_ascii_digit_version_is_not_found(server: ServerProcess, version: str) -> None:
    with server.client() as client:
        r = client.get(f"/r/workflows/slug/text-to-image@{version}")
        assert error_codes(r, 404) == ["not_found"]
        assert client.get("/r/workflows/slug/text-to-image@1").status_code == 200


# --- 2. long file names -------------------------------------------------------------------------


def test_2_file_names_over_200_bytes_are_refused_and_200_bytes_upload(
    server: ServerProcess,
) -> None:
    with server.client() as client:
        for name in ("a" * 201, "a" * 230 + ".png", "é" * 101):  # 201, 234 and 202 bytes
            r = client.post(
                "/r/files/presign",
                json={"file_name": name, "file_size": len(PNG), "content_type": "image/png"},
            )
            assert error_codes(r, 400) == ["invalid_file_name"]
        longest = "b" * 196 + ".png"  # 200 bytes: presigned, and the PUT stores it
        key = upload(client, name=longest)
    assert key.endswith("/" + longest)
    assert (server.tmp / "files" / key).read_bytes() == PNG


# --- 3. outputs of a completed task --------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}  # the object itself is the first level


@pytest.mark.parametrize(
    "outputs",
    [nested(400), nested(33), {"x": float("nan")}, {"x": float("inf")}, {"x": -float("inf")},
     {"blob": "x" * (1024 * 1024)}],
    ids=["depth-400", "depth-33", "nan", "infinity", "minus-infinity", "over-1-mib"],
)  # fmt: skip
def test_3_outputs_are_checked_on_complete(server: ServerProcess, outputs: Any) -> None:
    team = add_team(server, agents=1)
    task_id = dispatched_task(server, team)
    (agent_key,) = team["agent_keys"].values()
    # Python's json writes NaN and Infinity as the bare words, as a careless agent would.
    raw = json.dumps({"status": "completed", "outputs": outputs}).encode()
    with server.client(agent_key) as agent:
        assert agent.post(f"/agents/tasks/{task_id}/start").status_code == 200
        r = agent.post(f"/agents/tasks/{task_id}/complete", content=raw,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        if len(raw) > 1024 * 1024:  # the whole body is over the request limit first
            assert error_codes(r, 413) == ["payload_too_large"]
        else:
            assert error_codes(r, 400) == ["invalid_outputs"]
        # refused, the task is still the agent's to complete properly
        good = {"status": "completed", "outputs": nested(32)}
        assert agent.post(f"/agents/tasks/{task_id}/complete", json=good).status_code == 200
    with server.client(team["api_key"]) as client:
        result = client.get(f"/r/tasks/{task_id}/result")
    assert result.status_code == 200, result.text
    assert result.json()["outputs"] == nested(32)


# --- 4. bodies before credentials: see test_memory.py; here, the answer comes first -----------


@pytest.mark.parametrize(
    "path",
    ["/r/files/presign", f"/agents/tasks/{uuid.uuid4()}/complete", "/agents/heartbeat"],
    ids=["presign", "complete", "heartbeat"],  # the same in every pytest-xdist worker
)
def test_4_large_unauthenticated_bodies_are_refused_before_they_are_read(
    server: ServerProcess, path: str
) -> None:
    size = 200 * 1024 * 1024
    head = (f"POST /api/v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {size}\r\n\r\n").encode()  # fmt: skip
    # Only the head and 64 KiB are sent: the answer must not wait for the other 200 MiB.
    answer = raw_request(server.port, head + b"{" * 65536, wait=10.0, until_answered=True)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"payload_too_large"' in answer


# --- 5. a locked or unusable database ---------------------------------------------------------


def impatient(server: ServerProcess, token: str) -> httpx.Client:
    """A client that gives up after 8 s (the old server answered a locked database after 30)."""
    auth = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=server.url, headers=auth, timeout=8.0)


def test_5_locked_database_answers_503_with_retry_after(server: ServerProcess) -> None:
    run = f"/r/workflows/{server.demo['workflow_id']}/run"
    with server.client() as client:
        body = example_body(upload(client))
    locker = sqlite3.connect(server.db_path, timeout=10, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
        with impatient(server, server.demo["api_key"]) as client:
            r = client.post(run, json=body)
            assert error_codes(r, 503) == ["unavailable"]
            assert 1 <= int(r.headers["Retry-After"]) <= 2
        with impatient(server, server.demo["agent_keys"]["gpu-node-03"]) as agent:
            r = agent.post("/agents/heartbeat", json={"status": "idle", "gpu_capacity": 1})
            assert error_codes(r, 503) == ["unavailable"]
    finally:
        locker.rollback()
        locker.close()
    with server.client() as client:
        r = client.post(run, json=body)
        assert r.status_code == 202, r.text


def _start_on(database: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "scoring.server", "--port", "0", "--files", str(tmp / "files"),
            "--database", f"sqlite:///{database}", "--db-busy-timeout", "1"]  # fmt: skip
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database " * 400)


def _truncated(path: Path) -> None:
    from scoring.server import db

    database = db.Database(f"sqlite:///{path}")
    database.create()
    database.dispose()
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")


@pytest.mark.parametrize("make", [_garbage, _truncated, _foreign], ids=lambda f: f.__name__[1:])
def test_5_unusable_database_file_is_one_line_and_exit_2(tmp_path: Path, make: Any) -> None:
    database = tmp_path / "scoring.db"
    make(database)
    done = _start_on(database, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scoring.server: cannot use database"), lines
    if make is _foreign:  # another application's file gets none of the server's tables
        with sqlite3.connect(database) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        assert names == ["invoices"]


def test_5_start_on_a_locked_database_fails_at_once(tmp_path: Path) -> None:
    from scoring.server import db

    path = tmp_path / "scoring.db"
    database = db.Database(f"sqlite:///{path}")
    database.create()
    database.dispose()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        done = _start_on(path, tmp_path)  # the old server tried for 33 s, then a traceback
    finally:
        locker.rollback()
        locker.close()
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "locked" in lines[0], lines


# --- 6. concurrent PUTs to one upload URL -------------------------------------------------------


def test_6_of_concurrent_puts_the_winner_s_bytes_are_stored(server: ServerProcess) -> None:
    for _trial in range(3):
        size = 256 * 1024
        with server.client() as client:
            answer = client.post(
                "/r/files/presign",
                json={"file_name": "race.bin", "file_size": size,
                      "content_type": "application/octet-stream"},
            ).json()  # fmt: skip
        bodies = [bytes([i]) * size for i in range(12)]
        statuses: dict[int, int] = {}
        barrier = threading.Barrier(len(bodies))
        threads = [
            threading.Thread(target=_put, args=(barrier, answer["upload_url"], body, statuses, i))
            for i, body in enumerate(bodies)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [i for i, status in statuses.items() if status == 200]
        assert len(winners) == 1 and sorted(statuses.values()) == [200] + [409] * 11, statuses
        stored = (server.tmp / "files" / answer["file_key"]).read_bytes()
        assert stored == bodies[winners[0]]


def _put(barrier: threading.Barrier, url: str, body: bytes, statuses: dict[int, int],
         i: int) -> None:  # fmt: skip
    barrier.wait()
    statuses[i] = httpx.put(url, content=body, timeout=30.0).status_code


# --- 8. request timeouts -------------------------------------------------------------------------


def test_8_half_sent_request_head_is_answered_408_and_closed(server: ServerProcess) -> None:
    answer = raw_request(server.port, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n",
                         wait=HEAD_TIMEOUT_S + 8)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"request_timeout"' in answer


def test_8_silent_connection_is_closed(server: ServerProcess) -> None:
    # closed by the server: a recv that returns, not one that waits out its timeout
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.settimeout(HEAD_TIMEOUT_S + 8)
        assert conn.recv(1) == b""


def test_8_half_sent_body_is_answered_408_and_closed(server: ServerProcess) -> None:
    head = (f"POST /api/v1/r/workflows/{server.demo['workflow_id']}/run HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {server.demo['api_key']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()  # fmt: skip
    answer = raw_request(server.port, head + b'{"parameters": ', wait=BODY_TIMEOUT_S + 8)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"request_timeout"' in answer and b"connection: close" in answer.lower()


def test_8_half_sent_upload_is_answered_408_and_its_url_kept(server: ServerProcess) -> None:
    url = _presigned(server, len(PNG))
    path = url.split(str(server.port), 1)[1]
    head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(PNG)}\r\n\r\n").encode()
    answer = raw_request(server.port, head + PNG[:100], wait=BODY_TIMEOUT_S + 8)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert httpx.put(url, content=PNG).status_code == 200  # the claim was given back


# --- 9. lenient inputs ----------------------------------------------------------------------------


def test_9_lone_surrogate_in_a_run_is_refused(server: ServerProcess) -> None:
    with server.client() as client:
        body = example_body(upload(client))
        raw = json.dumps(body).replace("sunset over ocean", "sunset \\ud800 ocean").encode()
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", content=raw,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert error_codes(r, 400) == ["invalid_json"]


@pytest.mark.parametrize("size", [True, False, 3.0, "3"])
def test_9_presign_file_size_must_be_an_integer(server: ServerProcess, size: Any) -> None:
    with server.client() as client:
        body = {"file_name": "a.png", "file_size": size, "content_type": "image/png"}
        r = client.post("/r/files/presign", json=body)
    assert error_codes(r, 400) == ["invalid_value"]


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_9_run_body_must_be_json(server: ServerProcess, kind: str | None) -> None:
    with server.client() as client:
        raw = json.dumps(example_body(upload(client))).encode()
        headers = {} if kind is None else {"Content-Type": kind}
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", content=raw,
                        headers=headers)  # fmt: skip
        assert error_codes(r, 415) == ["unsupported_media_type"]
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", content=raw,
                        headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
        assert r.status_code == 202, r.text


def test_9_duplicate_keys_are_invalid_json(server: ServerProcess) -> None:
    with server.client() as client:
        key = upload(client)
        raw = f'{{"parameters": {{"prompt": "a", "prompt": "b", "input_image": "{key}"}}}}'.encode()
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", content=raw,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert error_codes(r, 400) == ["invalid_json"]
    assert "prompt" in r.json()["errors"][0]["message"]


def test_9_host_header_is_never_copied_into_urls(server: ServerProcess) -> None:
    with server.client(Host="evil.example") as client:
        body = {"file_name": "a.png", "file_size": 3, "content_type": "image/png"}
        r = client.post("/r/files/presign", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["upload_url"].startswith(server.url + "/uploads/")
        slash = client.get("/health/")  # no redirect built from the Host header
    assert slash.status_code == 404 and "location" not in slash.headers


def test_9_huge_authorization_header_is_answered_431(server: ServerProcess) -> None:
    huge = {"Authorization": "Bearer " + "a" * 200_000}
    request = urllib.request.Request(f"{server.url}/r/files/presign", method="GET", headers=huge)
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=15)
    assert answer.value.code == 431
    assert json.loads(answer.value.read())["errors"][0]["code"] == "headers_too_large"
    # a header block over 16 KiB that arrives whole is refused by the application the same way
    with server.client() as client:
        r = client.get("/health", headers={"X-Padding": "p" * 17_000})
    assert error_codes(r, 431) == ["headers_too_large"]


# --- 10. the 413 reaches a client that sends its body first ------------------------------------


@pytest.mark.parametrize("size_mib", [2, 6])
def test_10_urllib_reads_the_413_of_a_large_run_body(server: ServerProcess, size_mib: int) -> None:
    body = b'{"parameters": {"prompt": "' + b"x" * (size_mib << 20) + b'"}}'
    url = f"{server.url}/r/workflows/{server.demo['workflow_id']}/run"
    for _ in range(3):
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Authorization": f"Bearer {server.demo['api_key']}",
            "Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=15)
        assert answer.value.code == 413
        assert json.loads(answer.value.read())["errors"][0]["code"] == "payload_too_large"


# --- 11. community agents are shown to other teams by an alias -------------------------------


def test_11_another_team_s_agent_is_shown_by_a_stable_alias(server: ServerProcess) -> None:
    submitter = add_team(server)
    owner = add_team(server, agents=1)
    (agent_id,) = owner["agent_keys"]
    # the owner's agent, opted in to the community pool, serves the submitter's community run
    submitter["agent_keys"] = owner["agent_keys"]
    task_id = dispatched_task(server, submitter, community_opt_in=True)
    with server.client(submitter["api_key"]) as client:
        first = client.get(f"/r/tasks/{task_id}").json()
        second = client.get(f"/r/tasks/{task_id}").json()
    assert first["task_status"] == "dispatched"
    shown = first["agent_id"]
    assert shown.startswith("community-") and shown == second["agent_id"]
    assert agent_id not in json.dumps(first)
    assert first["explain"].startswith(f"{shown} (score ")
    # the owner's own runs on it still name it
    own = dispatched_task(server, owner)
    with server.client(owner["api_key"]) as client:
        assert client.get(f"/r/tasks/{own}").json()["agent_id"] == agent_id


# --- 12. uploaded bytes against the presign ---------------------------------------------------


def _presigned(server: ServerProcess, size: int, content_type: str = "image/png") -> str:
    with server.client() as client:
        body = {"file_name": "x.png", "file_size": size, "content_type": content_type}
        r = client.post("/r/files/presign", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["upload_url"])


def test_12_image_bytes_must_be_of_the_declared_type(server: ServerProcess) -> None:
    not_png = b"GIF89a" + b"\0" * 100
    url = _presigned(server, len(not_png))
    assert error_codes(httpx.put(url, content=not_png), 400) == ["content_mismatch"]
    text = b"just some text, no image at all"
    assert error_codes(httpx.put(_presigned(server, len(text)), content=text), 400) == [
        "content_mismatch"
    ]
    # a refused PUT leaves the URL usable for the right bytes
    png = PNG[: len(not_png)]
    assert httpx.put(url, content=png).status_code == 200


def test_12_put_content_type_must_match_the_presign(server: ServerProcess) -> None:
    url = _presigned(server, len(PNG))
    r = httpx.put(url, content=PNG, headers={"Content-Type": "text/html"})
    assert error_codes(r, 415) == ["unsupported_media_type"]
    r = httpx.put(url, content=PNG, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text


# --- the error vocabulary -------------------------------------------------------------------------


def test_every_error_code_is_in_the_vocabulary() -> None:
    from scoring.contract.errors import ErrorCode
    from scoring.server.errors import ApiError, ServerCode

    with pytest.raises(ValueError, match="made_up"):
        ApiError(400, "made_up", "a code outside the enum")
    with pytest.raises(ValueError, match="made_up"):
        ApiError.many(400, [{"code": "made_up", "key": None, "message": "x"}])
    contract = ApiError.many(400, [{"code": ErrorCode.OUT_OF_RANGE, "key": "width", "message": ""}])
    assert contract.errors[0]["code"] == "out_of_range"
    assert ApiError(409, ServerCode.NOT_READY, "later").errors[0]["code"] == "not_ready"
