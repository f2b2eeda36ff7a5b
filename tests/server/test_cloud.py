"""``comfy_cloud`` runs (DESIGN section 10.3) through a real server process and a local stand-in
of ComfyUI's HTTP API (:mod:`tests.server.comfy_standin`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from scoring.server import cloud, db
from tests.server.comfy_standin import ComfyStandIn
from tests.server.conftest import (
    ServerProcess,
    add_team,
    example_body,
    free_port,
    task_status,
    upload,
    wait_for,
)

CLOUD_KEY = "comfy-test-key-1"


@contextmanager
def cloud_server(tmp: Path, cloud_url: str, *extra: str) -> Iterator[ServerProcess]:
    """A server whose Cloud is ``cloud_url``, polled every 0.1 s."""
    server = ServerProcess(tmp, "--cloud-url", cloud_url, "--cloud-poll", "0.1", *extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def standin() -> Iterator[ComfyStandIn]:
    s = ComfyStandIn(api_key=CLOUD_KEY, delay=1.0).start()
    try:
        yield s
    finally:
        s.stop()


def set_key(server: ServerProcess, team_id: str, key: str = CLOUD_KEY) -> None:
    database = db.Database(server.database)
    try:
        cloud.set_key(database, team_id, key)
    finally:
        database.dispose()


def task_events(server: ServerProcess, task_id: str) -> list[tuple[str, str]]:
    """The task's status history: (status, detail), in order."""
    database = db.Database(server.database)
    e = db.task_events
    try:
        with database.read() as conn:
            rows = conn.execute(
                select(e.c.status, e.c.detail).where(e.c.task_id == task_id).order_by(e.c.id)
            ).all()
    finally:
        database.dispose()
    return [(r.status, r.detail) for r in rows]


def cloud_body(file_key: str, prompt: str = "sunset over ocean") -> dict[str, Any]:
    body = example_body(file_key)
    body["dispatch_target"] = "comfy_cloud"
    body["parameters"]["prompt"] = prompt
    return body


def submit(client: httpx.Client, workflow_id: str, body: dict[str, Any]) -> str:
    r = client.post(f"/r/workflows/{workflow_id}/run", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["task_id"])


task = task_status


def ended(client: httpx.Client, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The task once completed, failed or cancelled."""
    done = ("completed", "failed", "cancelled")
    found: dict[str, Any] = wait_for(
        lambda: (t := task(client, task_id))["task_status"] in done and t, timeout=timeout
    )
    return found


def test_refused_without_a_cloud_key_then_accepted_with_one(
    tmp_path: Path, standin: ComfyStandIn
) -> None:
    with cloud_server(tmp_path, standin.url) as server, server.client() as client:
        body = cloud_body(upload(client))
        r = client.post(f"/r/workflows/{server.demo['workflow_id']}/run", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["errors"] == [
            {"code": "comfy_cloud_not_configured", "key": "dispatch_target",
             "message": "this team has no ComfyUI Cloud API key configured"}
        ]  # fmt: skip
        assert standin.posts == []
        set_key(server, server.demo["team_id"])
        task_id = submit(client, server.demo["workflow_id"], body)
        assert task(client, task_id)["dispatch_target"] == "comfy_cloud"


def test_set_key_replaces_and_checks() -> None:
    database = db.Database("sqlite://")
    database.create()
    try:
        with database.begin() as conn:
            conn.execute(db.teams.insert().values(id="t1", name="t", created_at=0.0))
        cloud.set_key(database, "t1", "first")
        cloud.set_key(database, "t1", "second")
        assert cloud.get_key(database, "t1") == "second"
        assert cloud.get_key(database, "t2") is None
        with pytest.raises(ValueError, match="no team"):
            cloud.set_key(database, "t2", "k")
        for bad in ("", "has space", "new\nline"):
            with pytest.raises(ValueError, match="visible ASCII"):
                cloud.set_key(database, "t1", bad)
        assert cloud.get_key(database, "t1") == "second"
    finally:
        database.dispose()


def test_cloud_run_goes_queued_running_completed(tmp_path: Path, standin: ComfyStandIn) -> None:
    with cloud_server(tmp_path, standin.url) as server, server.client() as client:
        team, workflow = server.demo["team_id"], server.demo["workflow_id"]
        set_key(server, team)
        file_key = upload(client)
        task_id = submit(client, workflow, cloud_body(file_key))
        running = wait_for(lambda: (t := task(client, task_id))["task_status"] == "running" and t)
        assert running["dispatch_target"] == "comfy_cloud" and running["agent_id"] is None
        done = ended(client, task_id)
        assert done["task_status"] == "completed", done
        assert done["explain"] == "completed on ComfyUI Cloud"

        # What the Cloud received: the key, and each parameter at its node and field.
        [post] = standin.posts
        assert post["headers"]["x-api-key"] == CLOUD_KEY
        assert post["body"]["prompt"] == {
            "6": {"inputs": {"text": "sunset over ocean"}},
            "5": {"inputs": {"width": 1024}},
            "3": {"inputs": {"sampler_name": "euler"}},  # the default
            "10": {"inputs": {"image": file_key}},
        }
        assert post["body"]["client_id"]
        [prompt_id] = standin.prompts
        # Polled until the history had the outputs (empty for the first second).
        polls = [p for m, p in standin.requests if p == f"/history/{prompt_id}"]
        assert len(polls) >= 3

        r = client.get(f"/r/tasks/{task_id}/result")
        assert r.status_code == 200, r.text
        outputs = r.json()["outputs"]
        image_key = f"outputs/{team}/{task_id}/ComfyUI_00000_.png"
        assert outputs == {"images": [image_key], "cloud_prompt_id": prompt_id}
        assert (tmp_path / "files" / image_key).read_bytes() == standin.image(prompt_id)
        database = db.Database(server.database)
        try:
            with database.read() as conn:
                row = conn.execute(select(db.files).where(db.files.c.key == image_key)).one()
        finally:
            database.dispose()
        assert (row.team_id, row.content_type) == (team, "image/png")
        assert row.size == len(standin.image(prompt_id))

        statuses = [s for s, _ in task_events(server, task_id)]
        assert statuses[0] == "queued" and statuses[-1] == "completed"
        assert set(statuses[1:-1]) == {"running"}

        # A running Cloud run cancelled: ended at the runner's next look, never completed.
        other = submit(client, workflow, cloud_body(file_key, "cancelled soon"))
        wait_for(lambda: task(client, other)["explain"].startswith("accepted by"))
        r = client.post(f"/r/tasks/{other}/cancel")
        assert r.status_code == 200 and r.json()["task_status"] == "running", r.text
        assert ended(client, other)["task_status"] == "cancelled"
        r = client.get(f"/r/tasks/{other}/result")
        assert r.status_code == 409 and r.json()["errors"][0]["code"] == "task_cancelled"
        assert [s for s, _ in task_events(server, other)][-1] == "cancelled"


def test_cloud_refusals_and_errors_fail_the_task_with_the_reason(
    tmp_path: Path, standin: ComfyStandIn
) -> None:
    standin.delay = 0.2
    with cloud_server(tmp_path, standin.url) as server, server.client() as client:
        set_key(server, server.demo["team_id"])
        other = add_team(server)
        set_key(server, other["team_id"], "not-the-stand-in-key")
        file_key = upload(client)
        workflow = server.demo["workflow_id"]
        refused = submit(client, workflow, cloud_body(file_key, "REFUSE-ME at validation"))
        crashed = submit(client, workflow, cloud_body(file_key, "CRASH-ME while running"))
        with server.client(other["api_key"]) as theirs:
            wrong_key = submit(theirs, other["workflow_id"], cloud_body(upload(theirs)))
            wrong = ended(theirs, wrong_key)

        done = ended(client, refused)
        assert done["task_status"] == "failed"
        assert done["explain"] == (
            "failed: ComfyUI Cloud: POST /prompt: HTTP 400: Prompt outputs failed validation; "
            "node 6: Value not allowed: text: 'REFUSE-ME at validation' is refused"
        )
        r = client.get(f"/r/tasks/{refused}/result")
        assert r.status_code == 409 and r.json()["errors"][0]["code"] == "task_failed"
        assert "Prompt outputs failed validation" in r.json()["errors"][0]["message"]

        done = ended(client, crashed)
        assert done["task_status"] == "failed"
        assert done["explain"] == (
            "failed: ComfyUI Cloud: node 6 (CLIPTextEncode): stand-in out of memory"
        )

        assert wrong["task_status"] == "failed"
        assert wrong["explain"] == "failed: ComfyUI Cloud: POST /prompt: HTTP 401: bad API key"
        # A refusal is not retried: three prompts, three requests (the 401 before reading).
        assert standin.requests.count(("POST", "/prompt")) == 3
        assert [s for s, _ in task_events(server, refused)][-1] == "failed"


def test_cloud_unreachable_for_a_while(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there until the stand-in starts
    standin = ComfyStandIn(api_key=CLOUD_KEY, delay=0.3, port=port)
    with cloud_server(tmp_path, f"http://127.0.0.1:{port}") as server, server.client() as client:
        set_key(server, server.demo["team_id"])
        task_id = submit(client, server.demo["workflow_id"], cloud_body(upload(client)))
        waiting = wait_for(lambda: "unavailable" in (t := task(client, task_id))["explain"] and t)
        assert waiting["task_status"] == "running"
        assert "ConnectError" in waiting["explain"]
        standin.fail_next(2, 503)  # back, but failing for two requests first
        standin.start()
        try:
            done = ended(client, task_id)
            assert done["task_status"] == "completed", done
            assert standin.requests[:3] == [("POST", "/prompt")] * 3
            assert len(standin.posts) == 1 and len(standin.prompts) == 1
            [prompt_id] = standin.prompts
            r = client.get(f"/r/tasks/{task_id}/result")
            assert r.json()["outputs"]["cloud_prompt_id"] == prompt_id
        finally:
            standin.stop()


def test_server_restart_while_a_cloud_run_runs(tmp_path: Path) -> None:
    standin = ComfyStandIn(api_key=CLOUD_KEY, delay=4.0).start()
    try:
        with cloud_server(tmp_path, standin.url) as server:
            with server.client() as client:
                set_key(server, server.demo["team_id"])
                task_id = submit(client, server.demo["workflow_id"], cloud_body(upload(client)))
                wait_for(lambda: task(client, task_id)["explain"].startswith("accepted by"))
            server.kill()
            assert standin.prompts and not any(p.startswith("/view") for _, p in standin.requests)
            server.start()
            with server.client() as client:
                done = ended(client, task_id)
            assert done["task_status"] == "completed", done
            assert len(standin.posts) == 1
            statuses = [s for s, _ in task_events(server, task_id)]
            assert statuses.count("completed") == 1
    finally:
        standin.stop()


def test_a_cloud_run_outlives_the_heartbeat_timeout(tmp_path: Path) -> None:
    """A Cloud run holds no agent: the sweep for lost agents must leave it running."""
    standin = ComfyStandIn(api_key=CLOUD_KEY, delay=3.0).start()
    try:
        with cloud_server(tmp_path, standin.url, "--heartbeat-timeout", "0.5") as server:
            with server.client() as client:
                set_key(server, server.demo["team_id"])
                task_id = submit(client, server.demo["workflow_id"], cloud_body(upload(client)))
                done = ended(client, task_id)
            assert done["task_status"] == "completed", done
            assert len(standin.posts) == 1, [s for s in task_events(server, task_id)]
    finally:
        standin.stop()
