"""``python -m scoring.server.admin``: every command against SQLite and PostgreSQL, and keys it
issues (and revokes) honoured by a running server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from scoring.server import admin, cloud, db, tasks
from scoring.server.app import build_state
from scoring.server.auth import Authenticator, Principal, load_secret
from scoring.server.config import Settings
from scoring.server.errors import ApiError
from scoring.server.workflows import WorkflowRepository

from .conftest import ROOT, ServerProcess, new_database, wait_for

WORKFLOW = {
    "slug": "upscale",
    "tool_type": "comfyui",
    "required_labels": ["gpu"],
    "parameters": [{"key": "prompt", "type": "string", "label": "Prompt", "required": True,
                    "node_id": "6", "field": "text"}],
}  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'admin.db'}"
    return new_database(request.getfixturevalue("postgres"))


class Admin:
    """The CLI run in this process: ``admin("create-team", "acme")`` is its JSON answer."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url, self.capsys = url, capsys

    def __call__(self, *args: str) -> Any:
        code = admin.main(["--database", self.url, *args])
        out, err = self.capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    def fails(self, *args: str) -> str:
        code = admin.main(["--database", self.url, *args])
        out, err = self.capsys.readouterr()
        assert (code, out) == (1, "")
        return str(json.loads(err)["error"])


def resolve(url: str, key: str) -> Principal:
    """The caller behind ``key``, by a fresh authenticator (no cache)."""
    database = db.Database(url)
    try:
        return Authenticator(database, "unused").resolve(f"Bearer {key}", None)
    finally:
        database.dispose()


def test_every_command(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Admin(url, capsys)
    team = run("create-team", "acme")
    assert team["name"] == "acme"
    team_id = team["team_id"]
    other = run("create-team", "other")["team_id"]

    user = run("create-user", "--team", team_id, "--email", "ops@acme.test")
    assert (user["team_id"], user["email"]) == (team_id, "ops@acme.test")
    token = run("session", "--user", user["user_id"])["token"]
    database = db.Database(url)
    auth = Authenticator(database, load_secret(database, None))  # the server's secret
    assert auth.resolve(f"Bearer {token}", team_id) == Principal(
        "user", uuid.UUID(team_id), user_id=user["user_id"]
    )
    with pytest.raises(ApiError, match="not a member"):
        auth.resolve(f"Bearer {token}", other)

    sk = run("issue-key", "--team", team_id, "--kind", "sk")
    dk = run("issue-key", "--team", team_id, "--kind", "dk", "--agent", "gpu-a")
    assert sk["key"].startswith("sk-") and dk["key"].startswith("dk-")
    assert sk["prefix"] == sk["key"][:12]
    assert resolve(url, sk["key"]) == Principal("team_key", uuid.UUID(team_id))
    assert resolve(url, dk["key"]) == Principal("agent", uuid.UUID(team_id), agent_id="gpu-a")
    second = run("issue-key", "--team", team_id, "--kind", "dk", "--agent", "gpu-a")["key"]
    assert resolve(url, second).agent_id == "gpu-a"  # a second key for the same agent

    workflow_file = tmp_path / "workflow.json"
    workflow_file.write_text(json.dumps(WORKFLOW))
    added = run("add-workflow", "--team", team_id, "--file", str(workflow_file))
    assert (added["slug"], added["version"], added["team_id"]) == ("upscale", 1, team_id)
    again = run("add-workflow", "--team", team_id, "--file", str(workflow_file))
    assert (again["workflow_id"], again["version"]) == (added["workflow_id"], 2)
    found = WorkflowRepository(database).by_slug(uuid.UUID(team_id), "upscale")
    assert found is not None and (str(found[0].id), found[1]) == (added["workflow_id"], 2)
    assert WorkflowRepository(database).by_slug(uuid.UUID(other), "upscale") is None

    agents = run("list-agents")
    assert [(a["agent_id"], a["team_id"]) for a in agents] == [("gpu-a", team_id)]
    assert run("list-agents", "--team", other) == []

    state = build_state(Settings(database=url, files_dir=str(tmp_path / "files")))
    caller = Principal("team_key", uuid.UUID(team_id))
    submitted = [tasks.submit(state, caller, added["workflow_id"], {"parameters": {"prompt": p}})
                 for p in ("a", "b")]  # fmt: skip
    listed = run("list-tasks", "--team", team_id, "--status", "queued")
    assert [t["task_id"] for t in listed] == submitted[::-1]  # newest first
    assert {t["status"] for t in listed} == {"queued"}
    assert run("list-tasks", "--status", "completed") == []
    assert run("list-tasks", "--team", other) == []

    # A Cloud key, then comfy_cloud runs are accepted for the team (and only for it).
    cloud_run = {"parameters": {"prompt": "a"}, "dispatch_target": "comfy_cloud"}
    with pytest.raises(ApiError, match="no ComfyUI Cloud API key"):
        tasks.submit(state, caller, added["workflow_id"], cloud_run)
    assert run("set-cloud-key", "--team", team_id, "--key", "ck-1") == {
        "team_id": team_id, "cloud_key": "set"}  # fmt: skip
    assert cloud.get_key(database, team_id) == "ck-1"
    assert tasks.submit(state, caller, added["workflow_id"], cloud_run)
    assert "visible ASCII" in run.fails("set-cloud-key", "--team", team_id, "--key", "a b")
    assert "no team" in run.fails("set-cloud-key", "--team", str(uuid.uuid4()), "--key", "k")
    state.database.dispose()

    revoked = run("revoke-key", sk["prefix"])["revoked"]
    assert revoked == {"prefix": sk["prefix"], "kind": "sk", "team_id": team_id,
                       "agent_id": None}  # fmt: skip
    with pytest.raises(ApiError, match="unknown key"):
        resolve(url, sk["key"])
    assert resolve(url, dk["key"]).agent_id == "gpu-a"  # the others still work
    run("revoke-key", dk["key"])  # the whole key names it too
    with pytest.raises(ApiError, match="unknown key"):
        resolve(url, dk["key"])
    database.dispose()


def test_refusals(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Admin(url, capsys)
    team = run("create-team", "acme")["team_id"]
    other = run("create-team", "other")["team_id"]
    missing = str(uuid.uuid4())
    assert "no team" in run.fails("create-user", "--team", missing)
    assert "no team" in run.fails("issue-key", "--team", missing, "--kind", "sk")
    assert "needs --agent" in run.fails("issue-key", "--team", team, "--kind", "dk")
    assert "takes none" in run.fails("issue-key", "--team", team, "--kind", "sk", "--agent", "x")
    run("issue-key", "--team", team, "--kind", "dk", "--agent", "gpu-a")
    assert "another team" in run.fails(
        "issue-key", "--team", other, "--kind", "dk", "--agent", "gpu-a"
    )
    assert "no user" in run.fails("session", "--user", missing)
    assert "0 keys" in run.fails("revoke-key", "sk-nosuchkey")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**WORKFLOW, "tool_type": "blender"}))
    assert "tool_type" in run.fails("add-workflow", "--team", team, "--file", str(bad))
    assert run("list-agents") == [
        {"agent_id": "gpu-a", "team_id": team, "status": None, "gpu_capacity": 0,
         "running_count": 0, "last_heartbeat": None}
    ]  # fmt: skip


def cli(database: str, *args: str) -> Any:
    """The CLI as a separate process, as an administrator runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "scoring.server.admin", "--database", database, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    return json.loads(out)


def test_a_running_server_honours_issued_and_revoked_keys(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    server.start()
    try:
        team = cli(server.database, "create-team", "acme")["team_id"]
        workflow_file = tmp_path / "workflow.json"
        workflow_file.write_text(json.dumps(WORKFLOW))
        workflow = cli(server.database, "add-workflow", "--team", team, "--file",
                       str(workflow_file))  # fmt: skip
        sk = cli(server.database, "issue-key", "--team", team, "--kind", "sk")
        dk = cli(server.database, "issue-key", "--team", team, "--kind", "dk", "--agent", "gpu-a")
        beat = {
            "status": "idle",
            "gpu_capacity": 1,
            "running_count": 0,
            "labels": ["gpu", "comfyui"],
        }
        with server.client(sk["key"]) as client, server.client(dk["key"]) as agent:
            r = client.get("/r/workflows/slug/upscale")
            assert (r.status_code, r.json()["id"]) == (200, workflow["workflow_id"])
            r = client.post(f"/r/workflows/{workflow['workflow_id']}/run",
                            json={"parameters": {"prompt": "a"}})  # fmt: skip
            assert r.status_code == 202, r.text
            assert agent.post("/agents/heartbeat", json=beat).status_code == 200
            wait_for(lambda: agent.post("/agents/heartbeat", json=beat).json()["tasks"])
            # the key is in the server's cache now; revoked, it must stop working anyway
            assert client.get("/r/workflows/slug/upscale").status_code == 200
            assert admin.main(["--database", server.database, "revoke-key", sk["prefix"]]) == 0
            revoked_at = time.monotonic()
            wait_for(lambda: client.get("/r/workflows/slug/upscale").status_code == 401,
                     timeout=3.0, every=0.02)  # fmt: skip
            took = time.monotonic() - revoked_at
            assert agent.post("/agents/heartbeat", json=beat).status_code == 200
    finally:
        server.stop()
    print(f"revoked key refused {took:.2f} s after the revocation")
