"""Several server replicas on one database: each one's Fleet follows the others' changes.

A replica's Fleet hears the heartbeats of the agents connected to it, its own reservations and
the completions it records. What the other replicas heard reaches it through the database:
:class:`FleetSync` polls the ``agents`` table (a few rows per agent, read in one query) every
``interval`` seconds and writes newer heartbeats and the committed reservation counts into the
Fleet (DESIGN section 11). Polling rather than LISTEN/NOTIFY keeps the server portable (the same
code runs on SQLite files) and bounds the lag at the interval plus the heartbeat persistence
interval of :mod:`scoring.server.heartbeats`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

from sqlalchemy import select

from scoring import Agent
from scoring.holds import SlotHolds
from scoring.models import running_count
from scoring.server import db, shares
from scoring.server.state import ServerState

log = logging.getLogger("scoring.server.replicas")


def sync_fleet(state: ServerState, seen: dict[str, tuple[Any, float]]) -> int:
    """Bring the Fleet up to the database's agents; returns how many agents changed.

    An agent's record and heartbeat time are taken when the database's heartbeat is newer than
    the Fleet's (another replica heard it); its running count becomes the committed reservations
    plus this replica's placements in flight (``pending``), the same rule as a heartbeat's.
    ``seen`` holds the last (record, heartbeat time) taken per agent, to skip unchanged ones.
    ``state.free_slots`` becomes the free slots of agents with a recent heartbeat.

    The rows are read under ``sync``, so a placement is either still counted in ``pending`` or
    already in the rows read, never neither: the count may briefly be one high, never low.
    """
    a = db.agents
    changed = 0
    handed: list[str] = []
    with state.sync:
        with state.database.read() as conn:
            rows = conn.execute(
                select(a.c.id, a.c.team_id, a.c.record, a.c.running_count, a.c.last_heartbeat,
                       a.c.gpu_capacity)
                .where(a.c.record.is_not(None))
            ).all()  # fmt: skip
        fleet = state.fleet
        now = state.clock()
        fresh = now - state.policy.heartbeat_timeout_s
        state.free_slots = sum(
            max(0, row.gpu_capacity - row.running_count)
            for row in rows
            if (row.last_heartbeat or 0.0) >= fresh
        )
        for row in rows:
            count = running_count(int(row.running_count), state.pending.get(row.id, 0))
            at = row.last_heartbeat or 0.0
            before = seen.get(row.id)
            if before is not None and at > before[1]:
                state.heard[row.id] = now  # another replica heard it since the last poll
            if row.id not in fleet:
                record = {**row.record, "running_count": count}
                fleet.upsert(Agent(agent_id=row.id, team_id=UUID(row.team_id),
                                   last_heartbeat=at, **record))  # fmt: skip
                seen[row.id] = (row.record, at)
                changed += 1
                continue
            current = fleet.get(row.id)
            last = seen.get(row.id)
            if at > current.last_heartbeat and (last is None or last[0] != row.record):
                record = {**row.record, "running_count": count}
                fleet.upsert(Agent(agent_id=row.id, team_id=UUID(row.team_id),
                                   last_heartbeat=at, **record))  # fmt: skip
                seen[row.id] = (row.record, at)
                changed += 1
            elif at > current.last_heartbeat or count != current.running_count:
                if count > current.running_count:  # another replica handed it a task
                    handed.append(row.id)
                fleet.heartbeat(row.id, max(at, current.last_heartbeat), running_count=count)
                seen[row.id] = (row.record, at)
                changed += 1
        if changed:
            state.capacity_epoch += 1
    # Its heartbeat may be waiting here (long poll): it hears of the task within a poll.
    state.waiters.wake(handed)
    return changed


class FleetSync:
    """The background thread that runs :func:`sync_fleet` every ``interval`` seconds and wakes
    the dispatch loop when something changed (a slot freed elsewhere may fit a queued run)."""

    def __init__(self, state: ServerState, interval: float = 0.25) -> None:
        self.state = state
        self.interval = interval
        self._seen: dict[str, tuple[Any, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the polling thread."""
        self._thread = threading.Thread(target=self._loop, name="fleet-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the current poll."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if sync_fleet(self.state, self._seen):
                    self.state.wake.set()
                if self.state.holds is not None:
                    sync_holds(self.state, self.state.holds)
            except Exception:  # keep polling through a busy or restarting database
                log.exception("fleet sync failed")


def sync_holds(state: ServerState, holds: SlotHolds) -> None:
    """Say this replica is alive, and tell ``holds`` the live replicas and whether the queue is
    longer than the free slots (call after :func:`sync_fleet`)."""
    free = state.free_slots
    with state.database.begin() as conn:
        live = shares.heartbeat(conn, holds.replica_id, time.time())
        queued = shares.queued_count(conn, None if free is None else free + 1)
    holds.update(live, saturated=free is not None and queued > free)
