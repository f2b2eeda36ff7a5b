"""Every error the API documents (DESIGN sections 2 and 10), each in the one error format."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from .conftest import ServerProcess, add_team, example_body, upload, wait_for


def errors_of(response: Any, status: int) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"errors"} and body["errors"]
    for error in body["errors"]:
        assert set(error) == {"code", "key", "message"}
    return list(body["errors"])


def codes(response: Any, status: int = 400) -> list[tuple[str, str | None]]:
    return [(e["code"], e["key"]) for e in errors_of(response, status)]


@pytest.fixture(scope="module")
def server(shared_server: ServerProcess) -> ServerProcess:
    """These tests only add state of their own (runs, uploads, a second team): one server."""
    return shared_server


@pytest.fixture(scope="module")
def env(server: ServerProcess) -> dict[str, Any]:
    """The demo plus a second team (with an upload of its own) and a disabled workflow."""
    other = add_team(server, disabled_workflow=True)
    with server.client() as client:
        own_png = upload(client)
        own_text = upload(client, b"hello", "notes.txt", "text/plain")
    with server.client(other["api_key"]) as client:
        foreign_png = upload(client)
    return {"other": other, "png": own_png, "text": own_text, "foreign_png": foreign_png}


def test_every_validation_code(server: ServerProcess, env: dict[str, Any]) -> None:
    wf = server.demo["workflow_id"]
    run = f"/r/workflows/{wf}/run"
    png = env["png"]
    cases: list[tuple[dict[str, Any], list[tuple[str, str | None]]]] = [
        ({"parameters": {"prompt": "x", "input_image": png, "seed": 1}}, [("unknown_key", "seed")]),
        ({"parameters": {"input_image": png}}, [("missing_required", "prompt")]),
        ({"parameters": {"prompt": "x", "input_image": png, "width": True}},
         [("type_mismatch", "width")]),
        ({"parameters": {"prompt": "x", "input_image": png, "width": 4096}},
         [("out_of_range", "width")]),
        ({"parameters": {"prompt": "x", "input_image": png, "sampler": "ddim"}},
         [("invalid_option", "sampler")]),
        ({"parameters": {"prompt": "x", "input_image": "inputs/nope.png"}},
         [("file_not_found", "input_image")]),
        ({"parameters": {"prompt": "x", "input_image": env["foreign_png"]}},
         [("file_wrong_team", "input_image")]),
        ({"parameters": {"prompt": "x", "input_image": env["text"]}},
         [("file_type_rejected", "input_image")]),
        ({"parameters": {f"k{i}": i for i in range(101)}},
         [("too_many_keys", "parameters"), ("missing_required", "prompt"),
          ("missing_required", "input_image")]),
        ({"parameters": {"prompt": "x", "input_image": png}, "target_pool": "everyone"},
         [("invalid_value", "target_pool")]),
        ({"parameters": {"prompt": "x", "input_image": png}, "submitter_region": "r" * 65},
         [("region_too_long", "submitter_region")]),
        ({"parameters": {"prompt": "x", "input_image": png}, "tool_type": "nerfstudio"},
         [("tool_type_mismatch", "tool_type")]),
    ]  # fmt: skip
    with server.client() as client:
        for body, expected in cases:
            assert codes(client.post(run, json=body)) == expected, body
        disabled = f"/r/workflows/{env['other']['disabled_workflow_id']}/run"
        body = {"parameters": {"prompt": "x", "input_image": png}}
        assert codes(client.post(disabled, json=body)) == [("workflow_disabled", None)]


def test_all_problems_of_one_body_are_reported_together(server: ServerProcess) -> None:
    body = {
        "parameters": {"width": "wide", "sampler": "ddim", "x": 1},
        "dispatch_target": "gpu",
        "submitter_region": "r" * 65,
    }
    with server.client() as client:
        got = codes(client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body))
    assert sorted(got, key=str) == sorted(
        [
            ("invalid_value", "dispatch_target"),
            ("region_too_long", "submitter_region"),
            ("type_mismatch", "width"),
            ("invalid_option", "sampler"),
            ("unknown_key", "x"),
            ("missing_required", "prompt"),
            ("missing_required", "input_image"),
        ],
        key=str,
    )


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[]", b'"text"', b"42", b"null", b'{"parameters": NaN}', b"\xff\xfe"],
    ids=["truncated", "array", "string", "number", "null", "nan", "not-utf8"],
)
def test_invalid_json(server: ServerProcess, raw: bytes) -> None:
    with server.client() as client:
        r = client.post(
            f"/r/workflows/{server.demo['workflow_id']}/run",
            content=raw,
            headers={"Content-Type": "application/json"},
        )
    assert codes(r) == [("invalid_json", None)]


def test_body_over_one_mebibyte_is_413(server: ServerProcess, env: dict[str, Any]) -> None:
    body = example_body(env["png"])
    body["parameters"]["prompt"] = "x" * (1024 * 1024)
    with server.client() as client:
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
    assert codes(r, 413) == [("payload_too_large", None)]


def test_missing_or_foreign_workflow_is_404(server: ServerProcess, env: dict[str, Any]) -> None:
    body = example_body(env["png"])
    with server.client() as client:
        for wf in [
            "0190a000-0000-7000-8000-000000000000",
            "not-a-uuid",
            env["other"]["workflow_id"],
        ]:
            assert codes(client.post(f"/r/workflows/{wf}/run", json=body), 404) == [
                ("not_found", None)
            ]
            assert codes(client.get(f"/r/workflows/{wf}"), 404) == [("not_found", None)]
        assert codes(client.get("/r/workflows/slug/nope"), 404) == [("not_found", None)]
        assert codes(client.get("/r/workflows/slug/text-to-image@2"), 404) == [("not_found", None)]


def test_unauthorized(server: ServerProcess) -> None:
    wf = server.demo["workflow_id"]
    from scoring.server import db

    database = db.Database(server.database)
    secret = database.get_meta("jwt_secret")
    database.dispose()
    assert secret is not None
    user = {"sub": server.demo["team_id"], "typ": "session"}
    expired = jwt.encode({**user, "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    forged = jwt.encode({**user, "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    upload_typ = jwt.encode({**user, "exp": int(time.time()) + 60, "typ": "upload"}, secret,
                            algorithm="HS256")  # fmt: skip
    for token in ["", "sk-unknown", "dk-unknown", "garbage", expired, forged, upload_typ]:
        with server.client(token) as client:
            r = client.post(f"/r/workflows/{wf}/run", json={})
            assert codes(r, 401) == [("unauthorized", None)], token
            assert r.headers["www-authenticate"] == "Bearer"
    with server.client("", Authorization="Basic dXNlcjpwYXNz") as client:
        assert codes(client.get(f"/r/workflows/{wf}"), 401) == [("unauthorized", None)]


def test_session_token_team_header_rules(server: ServerProcess, env: dict[str, Any]) -> None:
    demo = server.demo
    path = f"/r/workflows/{demo['workflow_id']}"
    with server.client(demo["user_token"]) as client:
        assert codes(client.get(path)) == [("missing_team_header", "X-Team-ID")]
        for team in [env["other"]["team_id"], "not-a-uuid"]:
            r = client.get(path, headers={"X-Team-ID": team})
            assert codes(r, 403) == [("forbidden", "X-Team-ID")]
        assert client.get(path, headers={"X-Team-ID": demo["team_id"]}).status_code == 200
    # Keys carry their team: an X-Team-ID sent with them is ignored.
    with server.client(**{"X-Team-ID": env["other"]["team_id"]}) as client:
        assert client.get(path).status_code == 200


def test_keys_only_on_their_own_routes(server: ServerProcess) -> None:
    demo = server.demo
    heartbeat = {"status": "idle", "gpu_capacity": 1}
    with server.client(demo["agent_keys"]["gpu-node-01"]) as agent:
        r = agent.post(f"/r/workflows/{demo['workflow_id']}/run", json={})
        assert codes(r, 403) == [("forbidden", None)]
        assert codes(agent.get(f"/r/workflows/{demo['workflow_id']}"), 403)[0][0] == "forbidden"
    for token, headers in [
        (demo["api_key"], {}),
        (demo["user_token"], {"X-Team-ID": demo["team_id"]}),
    ]:
        with server.client(token, **headers) as client:
            assert codes(client.post("/agents/heartbeat", json=heartbeat), 403) == [
                ("forbidden", None)
            ]


def test_another_teams_task_is_404(server: ServerProcess, env: dict[str, Any]) -> None:
    with server.client() as client:
        r = client.post(
            f"/r/workflows/{server.demo['workflow_id']}/run", json=example_body(env["png"])
        )
        task_id = r.json()["task_id"]
        assert client.get(f"/r/tasks/{task_id}").status_code == 200
        assert codes(client.get("/r/tasks/not-a-task"), 404) == [("not_found", None)]
    with server.client(env["other"]["api_key"]) as other:
        assert codes(other.get(f"/r/tasks/{task_id}"), 404) == [("not_found", None)]
        assert codes(other.get(f"/r/tasks/{task_id}/result"), 404) == [("not_found", None)]
    # Nor can an agent the task was not dispatched to start or complete it.
    with server.client(server.demo["agent_keys"]["gpu-node-02"]) as agent:
        assert codes(agent.post(f"/agents/tasks/{task_id}/start"), 404) == [("not_found", None)]
        done = agent.post(f"/agents/tasks/{task_id}/complete", json={"status": "completed"})
        assert codes(done, 404) == [("not_found", None)]


def test_heartbeat_body_is_validated(server: ServerProcess) -> None:
    with server.client(server.demo["agent_keys"]["gpu-node-01"]) as agent:
        r = agent.post(
            "/agents/heartbeat",
            json={"status": "sleeping", "gpu_capacity": 0, "agent_id": "someone-else",
                  "vram_gb": -1, "labels": ["ok", 3]},
        )  # fmt: skip
        got = codes(r)
        assert ("unknown_key", "agent_id") in got
        keys = {key for _, key in got}
        assert {"status", "gpu_capacity", "vram_gb"} <= keys
        assert codes(agent.post("/agents/heartbeat", json={"gpu_capacity": 1})) == [
            ("missing_required", "status")
        ]
        assert codes(agent.post("/agents/heartbeat", content=b"[1]"))[0][0] == "invalid_json"


def test_presign_and_upload_errors(server: ServerProcess) -> None:
    with server.client() as client:
        bad_name = client.post(
            "/r/files/presign",
            json={"file_name": "../etc/passwd", "file_size": 3, "content_type": "image/png"},
        )
        assert codes(bad_name) == [("invalid_file_name", "file_name")]
        missing = client.post("/r/files/presign", json={"file_name": "a.png"})
        assert {c for c, _ in codes(missing)} == {"missing_required"}
        too_big = client.post(
            "/r/files/presign",
            json={"file_name": "a.png", "file_size": 10**12, "content_type": "image/png"},
        )
        assert codes(too_big, 413) == [("payload_too_large", "file_size")]
        url = client.post(
            "/r/files/presign",
            json={"file_name": "a.bin", "file_size": 3, "content_type": "application/octet-stream"},
        ).json()["upload_url"]
    import httpx

    assert codes(httpx.put(url, content=b"ab"))[0][0] == "size_mismatch"
    assert codes(httpx.put(url, content=b"abcd"), 413)[0][0] == "payload_too_large"
    assert httpx.put(url, content=b"abc").status_code == 200
    assert codes(httpx.put(url, content=b"abc"), 409)[0][0] == "already_uploaded"
    assert codes(httpx.put(url + "x", content=b"abc"), 401)[0][0] == "unauthorized"


def test_unknown_route_and_method_use_the_error_format(server: ServerProcess) -> None:
    with server.client() as client:
        assert codes(client.get("/nowhere"), 404)[0][0] == "not_found"
        assert codes(client.delete(f"/r/tasks/{server.demo['workflow_id']}"), 405)[0][0] == (
            "method_not_allowed"
        )


def test_failed_attempts_retry_elsewhere_then_fail(tmp_path: Any) -> None:
    """Each failure excludes its agent; the third failure is final."""
    from scoring.server.agent import FakeAgent

    proc = ServerProcess(tmp_path, "--heartbeat-timeout", "5", demo_agents=3)
    proc.start()
    try:
        demo = proc.demo
        with proc.client() as client:
            r = client.post(f"/r/workflows/{demo['workflow_id']}/run",
                            json=example_body(upload(client)))  # fmt: skip
            task_id = r.json()["task_id"]
            agents = [FakeAgent(proc.url, key, agent_id, task_seconds=0.0, fail_every=1)
                      for agent_id, key in demo["agent_keys"].items()]  # fmt: skip

            def step_all() -> bool:
                for agent in agents:
                    agent.step()
                return client.get(f"/r/tasks/{task_id}").json()["task_status"] == "failed"

            try:
                wait_for(step_all, timeout=30, every=0.1)
            finally:
                for agent in agents:
                    agent.close()
            assert sorted(a.agent_id for a in agents if a.failed == [task_id]) == sorted(
                demo["agent_keys"]
            )
            r = client.get(f"/r/tasks/{task_id}/result")
            assert codes(r, 409) == [("task_failed", None)]
    finally:
        proc.stop()
