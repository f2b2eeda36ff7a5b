"""``make bench-server``: the API server under load, beside its stack's ceiling (DESIGN section 12).

``python -m benchmarks.server [--seconds 5] [--connections 4,8,16,32] [--skip-postgres]
[--out benchmarks]`` measures, in one run on this machine:

- **submissions**: ``POST /r/workflows/{id}/run`` with wrk (Debian's ``wrk``) against a fresh
  server with the demo data (no agent: runs only queue), at each connection count, on SQLite
  and on PostgreSQL with one and two replicas (two wrk processes, one per replica), each beside
  the *baseline*: a plain FastAPI endpoint on the same uvicorn that only inserts the row
  (:mod:`benchmarks.server.baseline`, the ceiling of this stack on this machine);
- **end to end**: 200 simulated agents in one asyncio process (:mod:`benchmarks.server.agents`)
  long-poll their heartbeats, start and complete 0.05 s tasks while runs are submitted as fast as
  they are accepted; completed runs per second;
- **dispatch latency**: runs submitted at 500 per second to the same agents; from the submit
  to the heartbeat answer that hands the task to its agent, p50 and p99.

It writes ``benchmarks/SERVER.md`` (the tables, the goals met or missed) and
``benchmarks/server.png`` (accepted runs per second and p99 against connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + bytes(40)
BODY = {
    "parameters": {"prompt": "sunset over ocean", "width": 1024},
    "dispatch_target": "agent",
    "target_pool": "team",
    "submitter_region": "us-east",
    "tool_type": "comfyui",
}
GOALS = {"sqlite": 2000, "postgres-1": 1500, "postgres-2": 2500}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """A server process on a loopback port (the scoring server, or the baseline)."""

    args: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, health: str, timeout: float = 300.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{health}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no answer within {timeout} s: {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def scoring_servers(
    tmp: Path, database: str, replicas: int = 1, agents: int = 2
) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """Replicas of the scoring server on ``database`` with the demo; yields their API URLs and
    the demo (keys, workflow) with an uploaded image as the example body's file."""
    procs = []
    demo_path = tmp / "demo.json"
    try:
        for n in range(replicas):
            port = _port()
            args = [
                sys.executable,
                "-m",
                "scoring.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                database,
                "--files",
                str(tmp / "files"),
                "--demo",
                str(demo_path),
                "--demo-agents",
                str(agents),
                "--heartbeat-timeout",
                "60",
                "--log-level",
                "warning",
            ]
            p = Process(args, port, tmp / f"server-{n}.log")
            p.start("/api/v1/health")
            procs.append(p)
        urls = [f"http://127.0.0.1:{p.port}/api/v1" for p in procs]
        demo = json.loads(demo_path.read_text())
        demo["body"] = {
            **BODY,
            "parameters": {**BODY["parameters"], "input_image": _upload(urls[0], demo["api_key"])},
        }
        yield urls, demo
    finally:
        for p in procs:
            p.stop()


def _upload(url: str, key: str) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        f"{url}/r/files/presign",
        headers=auth,
        json={"file_name": "in.png", "file_size": len(PNG), "content_type": "image/png"},
    )
    r.raise_for_status()
    httpx.put(r.json()["upload_url"], content=PNG).raise_for_status()
    return str(r.json()["file_key"])


@dataclass
class WrkResult:
    connections: int
    accepted_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(
    urls: list[str],
    body: dict[str, Any],
    key: str | None,
    connections: int,
    seconds: float,
    tmp: Path,
) -> WrkResult:
    """POST ``body`` to each of ``urls`` at once (one wrk each, the connections split)."""
    lua = tmp / "post.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
    lua.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
        f'wrk.headers["Content-Type"] = "application/json"\n{auth}'
    )
    each = max(1, connections // len(urls))
    procs = [
        subprocess.Popen(
            [
                "wrk",
                "-t",
                str(min(2, each)),
                "-c",
                str(each),
                "-d",
                f"{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(lua),
                url,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    outs = [p.communicate()[0] for p in procs]
    total = ok = errors = 0.0
    p50 = p99 = 0.0
    for out in outs:
        requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        secs = _seconds(re.search(r"requests in ([\d.]+\w+),", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        failed = float(bad.group(1)) if bad else 0.0
        errors += failed + (sum(map(float, sock.groups())) if sock else 0.0)
        ok += (requests - failed) / secs
        total += requests
        p50 = max(p50, _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)))  # type: ignore[union-attr]
        p99 = max(p99, _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)))  # type: ignore[union-attr]
    return WrkResult(connections, ok, p50, p99, int(errors))


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _seconds(text: str) -> float:
    return _ms(text) / 1000.0


def submissions(
    name: str, database: str, replicas: int, conns: list[int], seconds: float, tmp: Path
) -> list[WrkResult]:
    print(f"submissions: {name}", flush=True)
    results = []
    for c in conns:
        here, db = _fresh(database, tmp)
        with scoring_servers(here, db, replicas) as (urls, demo):
            route = [f"{u}/r/workflows/{demo['workflow_id']}/run" for u in urls]
            wrk(route, demo["body"], demo["api_key"], c, 1.0, here)  # warm-up
            r = wrk(route, demo["body"], demo["api_key"], c, seconds, here)
        print(
            f"  {c:>3} connections: {r.accepted_per_s:7.0f} accepted/s, p50 {r.p50_ms:.1f} ms, "
            f"p99 {r.p99_ms:.1f} ms, errors {r.errors}",
            flush=True,
        )
        results.append(r)
    return results


def baseline(database: str, conns: list[int], seconds: float, tmp: Path) -> list[WrkResult]:
    print("submissions: baseline (plain FastAPI, one insert)", flush=True)
    results = []
    for c in conns:
        here, db = _fresh(database, tmp)
        port = _port()
        p = Process(
            [
                sys.executable,
                "-m",
                "benchmarks.server.baseline",
                "--port",
                str(port),
                "--database",
                db,
                "--loop",
                "uvloop",
            ],
            port,
            here / "baseline.log",
        )
        p.start("/health")
        try:
            url = [f"http://127.0.0.1:{port}/run"]
            wrk(url, BODY, None, c, 1.0, here)
            r = wrk(url, BODY, None, c, seconds, here)
        finally:
            p.stop()
        print(
            f"  {c:>3} connections: {r.accepted_per_s:7.0f} accepted/s, p99 {r.p99_ms:.1f} ms",
            flush=True,
        )
        results.append(r)
    return results


def _fresh(database: str, tmp: Path) -> tuple[Path, str]:
    """A new directory and an empty database for one measurement (the queue of one
    measurement does not slow the next): a file in it, or a new PostgreSQL database."""
    here = Path(tempfile.mkdtemp(dir=tmp))
    url = database.format(path=here / "db.sqlite", db=f"b{os.urandom(4).hex()}")
    if url.startswith("postgresql"):
        _create_pg(url)
    return here, url


def _create_pg(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0].replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")


@contextmanager
def postgres(tmp: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (fsync on: commits are as durable as in production);
    yields a URL template with ``{db}``."""
    bindir = Path(
        subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    data = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200"
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data / "db"),
        "-o",
        options,
        "-l",
        str(data / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{{db}}"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def end_to_end(seconds: float, tmp: Path) -> dict[str, Any]:
    """Completed runs per second with 200 agents, and dispatch latency at 500 runs/s."""
    from benchmarks.server.agents import simulate

    out: dict[str, Any] = {}
    for label, rate in (("throughput", None), ("latency", 500.0)):
        here = Path(tempfile.mkdtemp(dir=tmp))
        with scoring_servers(here, f"sqlite:///{here / 'db.sqlite'}", agents=200) as (urls, demo):
            print(
                f"end to end: {label} (200 agents, 0.05 s tasks"
                f"{'' if rate is None else f', {rate:.0f} runs/s'})",
                flush=True,
            )
            out[label] = asyncio.run(simulate(urls[0], demo, seconds, rate))
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in out[label].items()), flush=True)
    return out


def _commit() -> str:
    """The measured commit (``+`` when the tree had changes)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()  # fmt: skip
    return head + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    p.add_argument("--connections", default="4,8,16,32")
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    a = p.parse_args(argv)
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (Debian: apt-get install wrk; `make bench-server` does)")
    conns = [int(c) for c in a.connections.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    started = time.time()
    load = os.getloadavg()
    results: dict[str, Any] = {"connections": conns, "seconds": a.seconds}
    try:
        results["baseline-sqlite"] = baseline("sqlite:///{path}", conns, a.seconds, tmp)
        results["sqlite"] = submissions("SQLite", "sqlite:///{path}", 1, conns, a.seconds, tmp)
        if not a.skip_postgres:
            with postgres(tmp) as url:
                results["baseline-postgres"] = baseline(url, conns, a.seconds, tmp)
                results["postgres-1"] = submissions(
                    "PostgreSQL, one replica", url, 1, conns, a.seconds, tmp
                )
                results["postgres-2"] = submissions(
                    "PostgreSQL, two replicas", url, 2, conns, a.seconds, tmp
                )
        results["end_to_end"] = end_to_end(max(a.seconds, 5.0), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load"] = [load, os.getloadavg()]
    results["commit"] = _commit()
    results["minutes"] = (time.time() - started) / 60
    from benchmarks.server.report import write

    write(results, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
