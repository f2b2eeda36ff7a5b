"""A real server for the tests: ``python -m scoring.server`` on 127.0.0.1 in a subprocess.

Each test gets its own database, file directory and demo file (so tests never share state),
and the process is always terminated in teardown. ``ServerProcess.kill()`` sends SIGKILL and
``start()`` starts it again on the same database and port, for the crash test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = bytes.fromhex("89504e470d0a1a0a") + b"\0" * 1024  # a PNG signature and some bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server subprocess and what it wrote: ``demo`` (the --demo JSON), ``url``."""

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        demo_agents: int = 2,
        database: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.env = env or {}
        self.port = free_port()
        self.db_path = tmp / "db.sqlite"
        self.database = database or f"sqlite:///{self.db_path}"
        self.demo_path = tmp / "demo.json"
        self.args = [
            sys.executable, "-m", "scoring.server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", self.database, "--files", str(tmp / "files"),
            "--demo", str(self.demo_path), "--demo-agents", str(demo_agents), *extra,
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "server.log"
        self.demo: dict[str, Any] = {}

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait for its health answer (a first start compiles the
        kernels: about a minute on a busy 2-core machine without numba's cache)."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    self.demo = json.loads(self.demo_path.read_text())
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        """An HTTP client for the API, authenticated with ``token`` (default: the team key)."""
        token = self.demo["api_key"] if token is None else token
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers={**auth, **headers}, timeout=30.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running server with the demo (two agent keys) and a 2 s heartbeat timeout."""
    proc = ServerProcess(tmp_path, "--heartbeat-timeout", "2")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a whole module, for tests that only read or add state of their own."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), "--heartbeat-timeout", "2")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def upload(client: httpx.Client, data: bytes = PNG, name: str = "photo.png",
           content_type: str = "image/png") -> str:  # fmt: skip
    """Presign and PUT a file the way a platform client does; returns its file key."""
    r = client.post(
        "/r/files/presign",
        json={"file_name": name, "file_size": len(data), "content_type": content_type},
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    put = httpx.put(answer["upload_url"], content=data, timeout=30.0)
    assert put.status_code == 200, put.text
    return str(answer["file_key"])


def example_body(file_key: str) -> dict[str, Any]:
    """The platform's example request (DESIGN sections 1 and 10), with an uploaded image."""
    return {
        "parameters": {"prompt": "sunset over ocean", "width": 1024, "input_image": file_key},
        "dispatch_target": "agent",
        "target_pool": "team",
        "submitter_region": "us-east",
        "tool_type": "comfyui",
    }


def task_status(client: httpx.Client, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{task_id}``'s answer (which must be 200)."""
    r = client.get(f"/r/tasks/{task_id}")
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def wait_for(predicate: Any, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"condition not met within {timeout} s")


def add_team(
    server: ServerProcess, *, disabled_workflow: bool = False, agents: int = 0
) -> dict[str, Any]:
    """Another team with a user, a key and a workflow, written straight into the server's
    database (as ``python -m scoring.server.admin`` does); returns their ids and the key."""
    import uuid as _uuid

    from scoring import Workflow
    from scoring.server import accounts, db, workflows
    from scoring.server.demo import demo_workflow

    database = db.Database(server.database)
    workflow = _uuid.uuid4()
    with database.begin() as conn:
        team = accounts.create_team(conn, "other")
        user = accounts.create_user(conn, team)["user_id"]
        workflows.save(conn, demo_workflow(_uuid.UUID(team), workflow))
        key = accounts.issue_key(conn, team, "sk")
        agent_keys = {}
        for i in range(agents):
            agent_id = f"other-{team[:6]}-{i}"
            agent_keys[agent_id] = accounts.issue_key(conn, team, "dk", agent_id)
        disabled = ""
        if disabled_workflow:
            wf: Workflow = demo_workflow(_uuid.UUID(server.demo["team_id"]), _uuid.uuid4())
            wf = wf.model_copy(update={"slug": "disabled-one", "status": "disabled"})
            workflows.save(conn, wf)
            disabled = str(wf.id)
    database.dispose()
    return {"team_id": team, "user_id": user, "workflow_id": str(workflow),
            "api_key": key, "disabled_workflow_id": disabled, "agent_keys": agent_keys}  # fmt: skip


def postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: ``pg_config --bindir`` first (Debian keeps them off
    PATH, in /usr/lib/postgresql/VERSION/bin), then PATH; ``None`` when neither has them."""
    import shutil

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(found.stdout.strip())
        tools = (bindir / "initdb", bindir / "pg_ctl")
        if found.returncode == 0 and all(tool.is_file() for tool in tools):
            return bindir
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is not None and pg_ctl is not None and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 for the session (:func:`postgres_cluster`); yields a
    URL template with ``{db}``.

    Without PostgreSQL's server binaries the tests are skipped, except under CI (``CI=true``),
    where ``.ci/run`` installs them: there a missing PostgreSQL fails.
    """
    if postgres_bindir() is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    with postgres_cluster() as url:
        yield url


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster: ``initdb`` in a temporary directory, a loopback port,
    stopped and deleted on exit (run as the ``postgres`` user when running as root, which
    PostgreSQL refuses); yields a URL template with ``{db}``."""
    import shutil
    import tempfile

    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's temporary root: that is private to root, and the server runs as
    # ``postgres``.
    data = Path(tempfile.mkdtemp(prefix="scoring-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True,
                       timeout=120)  # fmt: skip

    try:
        pg("initdb", "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
        # Several replicas' pools plus the tests' own connections: more than the default 100.
        options = (f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200")  # fmt: skip
        pg("pg_ctl", "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w",
           "start")  # fmt: skip
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{{db}}"
        finally:
            pg("pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def new_database(url_template: str) -> str:
    """A fresh, empty database on the test PostgreSQL server; returns its URL."""
    import uuid as _uuid

    import psycopg

    name = f"t{_uuid.uuid4().hex[:12]}"
    admin = url_template.format(db="postgres").replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url_template.format(db=name)
