"""The load harness shared by the load and crash tests.

16 client threads submit runs (each with its own HTTP client) while simulated agents (the
server's :class:`~scoring.server.agent.FakeAgent`, one thread each) heartbeat, start and
complete what they are handed. Afterwards :func:`check` reads the server's database: every
accepted task completed exactly once, and no agent ever held more reservations than slots.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select

from scoring.server import db
from scoring.server.agent import FakeAgent

from .conftest import ServerProcess, example_body, upload


@dataclass
class LoadResult:
    accepted: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)  # seconds, accepted runs only
    refused: int = 0  # transport errors and 5xx while the server was down
    elapsed: float = 0.0
    agents: list[FakeAgent] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        return {
            "runs": len(self.accepted),
            "runs_per_s": len(self.accepted) / self.elapsed,
            "p50_ms": pick(0.50),
            "p99_ms": pick(0.99),
            "refused": self.refused,
        }


#: Longest wait for the last tasks after the submissions, however steady their progress.
DRAIN_CAP_S = 180.0


def run_load(
    servers: ServerProcess | Sequence[ServerProcess],
    runs: int = 2000,
    clients: int = 16,
    capacity: int = 2,
    task_seconds: float = 0.05,
    kill_after: int | None = None,
    deadline_s: float = 60.0,
    drain_s: float = 30.0,
    on_kill: Callable[[], None] | None = None,
    retry_start: bool = True,
) -> LoadResult:
    """Submit ``runs`` runs from ``clients`` threads with every demo agent working; with
    ``kill_after``, SIGKILL the server once that many runs were accepted and start it again
    (or call ``on_kill`` instead). Submitting stops after ``deadline_s``; then the last tasks
    are waited for while they make progress: until none completed for ``drain_s`` (a stall),
    or :data:`DRAIN_CAP_S` passed (a machine busy with other tests is slow, not wrong).

    With several ``servers`` (replicas on one database) clients and agents are spread over them
    round-robin, and one that finds its replica unreachable moves on to the next, as behind a
    load balancer. ``retry_start=False``: agents drop a task whose start answer was lost
    (:class:`~scoring.server.agent.FakeAgent`), and the server must recover it.
    """
    replicas = [servers] if isinstance(servers, ServerProcess) else list(servers)
    server = replicas[0]
    demo = server.demo
    with server.client() as client:
        body = example_body(upload(client))
    path = f"/r/workflows/{demo['workflow_id']}/run"
    result = LoadResult()
    lock = threading.Lock()
    stop_agents = threading.Event()
    urls = [r.url for r in replicas]
    result.agents = [
        FakeAgent(urls[i % len(urls)], key, agent_id, capacity=capacity,
                  task_seconds=task_seconds, retry_start=retry_start,
                  fallback_urls=tuple(urls[(i + j) % len(urls)] for j in range(1, len(urls))))
        for i, (agent_id, key) in enumerate(demo["agent_keys"].items())
    ]  # fmt: skip
    agent_threads = [threading.Thread(target=a.run, args=(stop_agents, 0.2), daemon=True)
                     for a in result.agents]  # fmt: skip
    for t in agent_threads:
        t.start()
    remaining = [runs]
    killed = threading.Event()
    end_by = time.monotonic() + deadline_s
    kill = on_kill or (lambda: _restart(server))

    def client_loop(index: int) -> None:
        https = [r.client(demo["api_key"]) for r in replicas]
        at = index % len(https)
        try:
            while time.monotonic() < end_by:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = https[at].post(path, json=body)
                except httpx.TransportError:
                    r = None
                    at = (at + 1) % len(https)  # the next replica, as a load balancer would
                dt = time.perf_counter() - t0
                with lock:
                    if r is not None and r.status_code == 202:
                        result.accepted.add(r.json()["task_id"])
                        result.latencies.append(dt)
                    else:
                        assert r is None or r.status_code >= 500, r.text
                        result.refused += 1
                        remaining[0] += 1  # not accepted: submit another
                        time.sleep(0.05)
                    if (
                        kill_after is not None
                        and not killed.is_set()
                        and (len(result.accepted) >= kill_after)
                    ):
                        killed.set()
                        threading.Thread(target=kill).start()
        finally:
            for http in https:
                http.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.elapsed = time.perf_counter() - start
    try:
        # The last runs still need an agent's turn: a bounded wait after the submissions.
        _wait_all_done(server, result.accepted, drain_s)
    finally:
        stop_agents.set()
        for t in agent_threads:
            t.join(timeout=10)
        for a in result.agents:
            a.close()
    return result


def _restart(server: ServerProcess) -> None:
    server.kill()
    server.start()


def _wait_all_done(server: ServerProcess, accepted: set[str], stall_s: float) -> None:
    database = db.Database(server.database)
    start = last = time.monotonic()
    done: set[str] = set()
    try:
        while time.monotonic() - last < stall_s and time.monotonic() - start < DRAIN_CAP_S:
            # Every accepted task by id: a crash can also leave runs the server committed but
            # never answered, so a count of completed tasks can reach len(accepted) early.
            with database.read() as conn:
                now_done = set(
                    conn.execute(
                        select(db.tasks.c.id).where(db.tasks.c.status == "completed")
                    ).scalars()
                )
            if accepted <= now_done:
                return
            if len(now_done) > len(done):
                last = time.monotonic()
            done = now_done
            time.sleep(0.25)
    finally:
        database.dispose()


def check(server: ServerProcess, result: LoadResult, capacity: int) -> dict[str, Any]:
    """Assert exactly-once completion of every accepted task and per-agent capacity."""
    database = db.Database(server.database)
    with database.read() as conn:
        statuses = dict(conn.execute(select(db.tasks.c.id, db.tasks.c.status)).all())
        events = conn.execute(
            select(
                db.task_events.c.task_id, db.task_events.c.status, db.task_events.c.agent_id
            ).order_by(db.task_events.c.id)
        ).all()
        reserved = dict(conn.execute(select(db.agents.c.id, db.agents.c.running_count)).all())
    database.dispose()
    missing = result.accepted - statuses.keys()
    assert not missing, f"{len(missing)} accepted tasks lost"
    not_done = [t for t in result.accepted if statuses[t] != "completed"]
    stuck = Counter(statuses[t] for t in not_done)
    assert not not_done, (
        f"{len(not_done)} accepted tasks not completed: {dict(stuck)}; "
        f"by the agents: {_agents_view(result, not_done[:5])}; their events: "
        f"{[[tuple(e[1:]) for e in events if e.task_id == t] for t in not_done[:3]]}"
    )
    completions = Counter(e.task_id for e in events if e.status == "completed")
    assert all(completions[t] == 1 for t in statuses), "a task completed twice"
    by_agents = Counter(t for a in result.agents for t in a.completed)
    assert set(by_agents) == set(statuses) and max(by_agents.values()) == 1
    # Reservations per agent over time, from the status history: never above the capacity.
    held: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    holder: dict[str, str] = {}
    for e in events:
        if e.status == "dispatched":
            held[e.agent_id] += 1
            holder[e.task_id] = e.agent_id
            peak[e.agent_id] = max(peak[e.agent_id], held[e.agent_id])
        elif e.status in ("completed", "failed", "queued", "cancelled") and e.task_id in holder:
            held[holder.pop(e.task_id)] -= 1
    assert max(peak.values()) <= capacity, peak
    assert all(a.max_running <= capacity and a.over_capacity == 0 for a in result.agents)
    assert all(v == 0 for v in reserved.values()), reserved  # every slot given back
    return {"max_reserved_per_agent": max(peak.values()), "tasks": len(statuses)}


def _agents_view(result: LoadResult, task_ids: list[str]) -> dict[str, list[str]]:
    """Where the agents hold these tasks, and what those agents were doing (for a failure's
    message: a stalled agent, or one waiting on a call, is told from a slow server)."""
    view: dict[str, list[str]] = {t: [] for t in task_ids}
    now = time.time()
    for a in result.agents:
        for t in task_ids:
            for name in ("running", "to_report", "to_start", "attempt"):
                if t in getattr(a, name):
                    view[t].append(f"{a.agent_id}.{name}")
            if t in a.running:
                view[t].append(f"(attempt {a.attempt.get(t)}, due in {a.running[t] - now:.1f}s)")
                calling = None if a.calling is None else (a.calling[0], now - a.calling[1])
                view[t].append(f"(last step {now - a.stepped_at:.1f}s ago, errors {a.errors}, "
                               f"calling {calling}, {a.client.base_url})")  # fmt: skip
            if t in a.completed:
                view[t].append(f"{a.agent_id}.completed")
            if t in a.cancelled:
                view[t].append(f"{a.agent_id}.cancelled")
    return view
