"""Slot shares: replicas on one database stop racing for the same freed slot.

When the queue is longer than the free slots, every replica's round sees the same few free slots
and fills all of them from its own claimed tasks: with ``R`` replicas, ``R - 1`` of every ``R``
reservations of a freed slot lose the race (measured: 0.42 lost races per placement with 2
replicas, 0.62 with 4; ``tests/server/herding.py``). Randomising among near-best agents does not
help there: the contention is for the slots, not for the best one among many.

So each agent has one owner among the live replicas (rendezvous hashing of the agent id with the
replica ids: when a replica goes, only its agents change owner). While the queue is longer than
the free slots, a replica leaves a slot of another replica's agent to its owner for
:data:`GRACE_S` after it last saw the agent's count change while free. After that anyone may
take it (the owner had no use for it, or is gone), and a run whose required models are all
cached there may take it at once, so holding a slot never turns a warm placement into a cold
load. With one replica, or a
queue shorter than the free slots, nothing is held.

The live replicas are rows of the ``replicas`` table that each replica refreshes at every sync
(:mod:`scoring.server.replicas`); one not seen for :data:`TTL_S` is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import Connection, delete, func, insert, select, update

from scoring import DispatchRequest, Fleet
from scoring.hashing import stable_hash64
from scoring.models import MAX_EXCLUDED
from scoring.server import db

#: Seconds a non-owner leaves a freed slot to its owner (four syncs of 0.25 s: the owner has
#: learnt of it by then, and its next round takes it when it has a run for it).
GRACE_S = 1.0
#: A replica not seen for this long is gone (its agents go to the others).
TTL_S = 3.0


def owner(agent_id: str, replicas: Sequence[str]) -> str:
    """The replica that owns ``agent_id``: the highest hash of (replica, agent) wins."""
    return max(replicas, key=lambda r: stable_hash64(f"{r}\x00{agent_id}"))


def heartbeat(conn: Connection, replica_id: str, now: float) -> tuple[str, ...]:
    """Record that ``replica_id`` is alive; returns the live replicas' ids, sorted.

    Rows not seen for ten times :data:`TTL_S` are deleted, so the table stays small.
    """
    t = db.replicas
    done = conn.execute(update(t).where(t.c.id == replica_id).values(seen_at=now))
    if done.rowcount == 0:
        conn.execute(insert(t).values(id=replica_id, seen_at=now))
    conn.execute(delete(t).where(t.c.seen_at < now - 10 * TTL_S))
    rows = conn.execute(select(t.c.id).where(t.c.seen_at >= now - TTL_S).order_by(t.c.id))
    return tuple(rows.scalars())


def queued_count(conn: Connection) -> int:
    """Tasks waiting for an agent."""
    t = db.tasks
    query = select(func.count()).where(t.c.status == "queued", t.c.dispatch_target == "agent")
    return int(conn.execute(query).scalar_one())


class SlotShares:
    """One replica's view of who owns which agent, and of the slots it leaves to their owners.

    :meth:`update` is called by the sync thread with the live replicas and whether the queue is
    longer than the free slots; :meth:`held` by the dispatch loop, under the server's ``sync``
    lock, with the Fleet it is about to place on.
    """

    def __init__(self, replica_id: str, grace_s: float = GRACE_S) -> None:
        self.replica_id = replica_id
        self.grace_s = grace_s
        self._replicas: tuple[str, ...] = (replica_id,)
        self._saturated = False
        self._owners: dict[str, bool] = {}  # agent id -> owned by another replica
        self._free_since: dict[str, tuple[int, float]] = {}  # agent -> (count, seen since)
        self._lock = threading.Lock()

    def update(self, replicas: Iterable[str], saturated: bool) -> None:
        """The live replicas (this one is always among them) and the queue's state."""
        live = tuple(sorted({*replicas, self.replica_id}))
        with self._lock:
            if live != self._replicas:
                self._replicas, self._owners = live, {}
            self._saturated = saturated

    @property
    def replicas(self) -> tuple[str, ...]:
        return self._replicas

    def held(self, fleet: Fleet, now: float) -> set[str]:
        """Agents with a free slot that this replica leaves to their owner now (call under the
        Fleet's lock, or the lock that orders its changes)."""
        with self._lock:
            replicas, saturated = self._replicas, self._saturated
        since = self._free_since
        if len(replicas) < 2 or not saturated:
            since.clear()  # nothing held: at the next saturation every free slot starts fresh
            return set()
        columns = fleet.columns
        free_rows = np.flatnonzero(columns.running_count < columns.gpu_capacity)
        counts = columns.running_count[free_rows].tolist()
        free = {
            fleet.agent_id_at(row): n for row, n in zip(free_rows.tolist(), counts, strict=True)
        }
        for agent in list(since):
            if agent not in free:
                del since[agent]
        for agent, n in free.items():
            # The grace runs from the last change of the agent's count seen free: an owner that
            # keeps the agent busy changes it between syncs, an owner with no use for it not.
            if since.get(agent, (None, 0.0))[0] != n:
                since[agent] = (n, now)
        return {
            agent for agent in free
            if now - since[agent][1] < self.grace_s and self._foreign(agent, replicas)
        }  # fmt: skip

    def owns(self, agent: str) -> bool:
        """Whether this replica owns ``agent`` among the live replicas it knows."""
        with self._lock:
            replicas = self._replicas
        return not self._foreign(agent, replicas)

    def _foreign(self, agent: str, replicas: tuple[str, ...]) -> bool:
        foreign = self._owners.get(agent)
        if foreign is None:
            foreign = self._owners[agent] = owner(agent, replicas) != self.replica_id
        return foreign


def restrict(
    fleet: Fleet, requests: Sequence[DispatchRequest], held: set[str]
) -> list[DispatchRequest]:
    """The requests with the held agents excluded, except those that have all of a request's
    required models cached (a warm placement is never given up). Requests that share a template
    share their copy's exclusions, so they still share one scan in ``assign``. A request keeps
    at most ``MAX_EXCLUDED`` exclusions: past that, held agents stay open to it."""
    if not held:
        return list(requests)
    models = {agent: fleet.get(agent).cached_models for agent in held}
    by_template: dict[tuple[object, ...], frozenset[str]] = {}
    out = []
    for r in requests:
        extra = by_template.get(r.template)
        if extra is None:
            needed = r.required_models
            already = r.exclude_agents
            cold = sorted(a for a in held - already if not (needed and needed <= models[a]))
            extra = by_template[r.template] = frozenset(
                cold[: MAX_EXCLUDED - len(r.exclude_agents)]
            )
        out.append(r.model_copy(update={"exclude_agents": r.exclude_agents | extra})
                   if extra else r)  # fmt: skip
    return out
