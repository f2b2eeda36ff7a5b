"""What one server process holds: the database, the live Fleet, the policy, the file store.

The Fleet mirrors the database for fast picks. Its slot counts are kept conservative (never
below the reservations committed to the database), and the database's conditional updates are
the last word on every reservation (see :mod:`scoring.server.tasks`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from sqlalchemy import select

from scoring import Agent, Fleet, ScoringPolicy
from scoring.holds import SlotHolds
from scoring.models import running_count
from scoring.server import db
from scoring.server.auth import Authenticator
from scoring.server.commits import GroupCommit
from scoring.server.metrics import Metrics
from scoring.server.storage import KnownFiles, UploadStore
from scoring.server.waiting import Waiters
from scoring.server.workflows import WorkflowRepository

log = logging.getLogger("scoring.server.state")


@dataclass
class ServerState:
    """Everything the routes and the dispatch loop share.

    ``sync`` orders the Fleet's slot bookkeeping: a placement counts as ``pending`` from the
    moment the Fleet reserved it until its database commit ends, so a heartbeat that rewrites
    the agent's record never sets its running count below what is reserved.
    """

    database: db.Database
    auth: Authenticator
    files: UploadStore
    policy: ScoringPolicy
    max_attempts: int = 3
    #: Attempts lost with their agent (``agent_lost``, ``not_listed``) before the task fails.
    max_lost_attempts: int = 10
    #: A dispatched task not started within this many seconds is queued again.
    start_timeout_s: float = 60.0
    #: The server's time: the wall clock read once at start, advanced by the monotonic clock, so
    #: that a step of the machine's clock never makes a silent agent look fresh (liveness is
    #: judged by this process's own receive times, DESIGN section 10.1). Tests replace it.
    clock: Callable[[], float] = field(default_factory=lambda: _steady_clock())
    fleet: Fleet = field(default_factory=Fleet)
    workflows: WorkflowRepository = field(init=False)
    sync: threading.RLock = field(default_factory=threading.RLock)
    pending: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default=0.0)
    wake: threading.Event = field(default_factory=threading.Event)
    #: Set when a ``comfy_cloud`` run is queued (:mod:`scoring.server.cloud`).
    cloud_wake: threading.Event = field(default_factory=threading.Event)
    #: When this process last heard of each agent, by :attr:`clock` (a heartbeat received, or
    #: a newer one another replica wrote): liveness is judged by these.
    heard: dict[str, float] = field(default_factory=dict)
    #: Counts changes that may let a waiting run be placed (a slot freed, an agent's report
    #: changed): the dispatcher skips a group it could not place until this moves.
    capacity_epoch: int = 0
    #: Free slots of live agents in the database at the last sync (replicas only; None: unknown).
    free_slots: int | None = None
    #: The freshly freed slots kept for warm runs and for their owner replica (scoring.holds).
    holds: SlotHolds | None = None
    #: Last heartbeat record written to the database per agent, and when (see heartbeats.py).
    persisted: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)
    #: The Prometheus metrics of this process (GET /metrics).
    metrics: Metrics = field(default_factory=Metrics)
    #: The writer that commits submissions and agents' calls in groups (started by the app).
    commits: GroupCommit = field(init=False)
    #: Heartbeats waiting for work (``?wait=S``), woken by the dispatcher.
    waiters: Waiters = field(default_factory=Waiters)
    #: The upload store's answers for files that exist (validating a run reads no database).
    known_files: KnownFiles = field(init=False)
    _cloud_teams: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.workflows = WorkflowRepository(self.database)
        self.commits = GroupCommit(self.database, lock=self.sync)
        self.known_files = KnownFiles(self.files)
        self.started_at = self.started_at or self.clock()

    def cloud_configured(self, team_id: str) -> bool:
        """Whether the team has a ComfyUI Cloud API key (``admin set-cloud-key``). A key once
        found is remembered (keys are replaced, never removed); a team without one is looked
        up each time, so a key just set is seen at once."""
        if team_id in self._cloud_teams:
            return True
        with self.database.read() as conn:
            found = conn.execute(
                select(db.cloud_keys.c.team_id).where(db.cloud_keys.c.team_id == team_id)
            ).first()
        if found is not None:
            self._cloud_teams.add(team_id)
        return found is not None

    def restore_fleet(self) -> int:
        """Load every agent that ever sent a heartbeat into the Fleet; returns how many.

        Their last heartbeats are old, so they stay ``stale`` (ineligible) until they report
        again; their running counts are the reservations in the database.
        """
        with self.database.read() as conn:
            rows = conn.execute(select(db.agents).where(db.agents.c.record.is_not(None))).all()
        for row in rows:
            record = dict(row.record)
            record["running_count"] = max(int(record.get("running_count", 0)), row.running_count)
            agent = Agent(
                agent_id=row.id,
                team_id=UUID(row.team_id),
                last_heartbeat=row.last_heartbeat or 0.0,
                **record,
            )
            try:
                self.fleet.upsert(agent)
            except ValueError as exc:  # stored by an older server with other limits
                log.warning("agent %s not restored: %s", row.id, exc)
        return len(rows)

    def released(self, agent_id: str, n: int = 1) -> None:
        """Slots of ``agent_id`` given back in the database (committed): give them back in the
        Fleet.

        With replicas the Fleet's count may already be the database's, from a sync that read
        the rows after the commit: releasing as well would leave it low, and this replica would
        then lose races for slots that are not free. So then the count is set from the
        database (plus the placements in flight) instead.
        """
        with self.sync:
            self.capacity_epoch += 1
            if agent_id not in self.fleet:
                return
            if self.free_slots is None:  # one process: the Fleet has seen every reservation
                for _ in range(n):
                    self.fleet.release(agent_id)
                return
            count = self.reserved(agent_id)
            at = self.fleet.get(agent_id).last_heartbeat
            self.fleet.heartbeat(agent_id, at, running_count=count)

    def reserved(self, agent_id: str) -> int:
        """The agent's slots this process counts as taken (call under ``sync``): its committed
        reservations plus this process's placements in flight."""
        return self.slots(agent_id)[0]

    def slots(self, agent_id: str) -> tuple[int, int]:
        """:meth:`reserved`, and the agent's capacity as committed (the one its reservations
        are checked against; 0 before its first heartbeat is stored). Call under ``sync``."""
        with self.database.read() as conn:
            row = conn.execute(
                select(db.agents.c.running_count, db.agents.c.gpu_capacity).where(
                    db.agents.c.id == agent_id
                )
            ).first()
        committed, capacity = (0, 0) if row is None else (int(row[0]), int(row[1]))
        return running_count(committed, self.pending.get(agent_id, 0)), capacity


def _steady_clock() -> Callable[[], float]:
    """Wall time at the first call, then advanced by ``time.monotonic`` only."""
    origin = time.time() - time.monotonic()
    return lambda: origin + time.monotonic()
