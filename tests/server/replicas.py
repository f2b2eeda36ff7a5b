"""Replicas for the tests: several server processes on one PostgreSQL database.

Each replica is a :class:`~tests.server.conftest.ServerProcess` with its own port, file
directory and counters file (``--stats``); they share the database, so every demo key works on
every replica. :func:`dispatch_figures` sums their counters: placements, and lost races (a
reservation the database refused because another replica took the agent's last slot first).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .conftest import ServerProcess


@contextmanager
def replicas(
    tmp: Path, database: str, n: int, *extra: str, agents: int = 30
) -> Iterator[list[ServerProcess]]:
    """Start ``n`` replicas on ``database`` one after another (the first creates the schema and
    the demo), yield them, and stop every one still running."""
    started: list[ServerProcess] = []
    try:
        for i in range(n):
            home = tmp / f"replica{i}"
            home.mkdir()
            server = ServerProcess(home, "--heartbeat-timeout", "10", "--stats",
                                   str(home / "stats.json"), *extra, demo_agents=agents,
                                   database=database)  # fmt: skip
            started.append(server)
            server.start()
        yield started
    finally:
        for server in started:
            server.stop()


def dispatch_figures(servers: Sequence[ServerProcess]) -> dict[str, float]:
    """The replicas' dispatch counters summed, and lost races per placement."""
    total: dict[str, int] = {}
    for server in servers:
        path = server.tmp / "stats.json"
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                total[key] = total.get(key, 0) + int(value)
    placements = total.get("placements", 0)
    lost = total.get("lost_races", 0)
    return {
        "replicas": len(servers),
        "placements": placements,
        "lost_races": lost,
        "lost_races_own_agent": total.get("lost_races_own_agent", 0),
        "held_slots": total.get("held_slots", 0),
        "lost_tasks": total.get("lost_tasks", 0),
        "repicks": total.get("repicks", 0),
        "rounds": total.get("rounds", 0),
        "lost_races_per_placement": lost / placements if placements else 0.0,
    }


def write_rows(path: str | Path, rows: list[dict[str, object]]) -> None:
    """The rows of a measurement script, as indented JSON (parent directories made)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
