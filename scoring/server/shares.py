"""Replicas on one database, and the slots each leaves to the others (DESIGN section 11).

When the queue is longer than the free slots, every replica's round sees the same few free slots
and fills all of them from its own claimed tasks: with ``R`` replicas, ``R - 1`` of every ``R``
reservations of a freed slot lose the race (measured: 0.42 lost races per placement with 2
replicas, 0.85 with 4; ``tests/server/herding.py``). Randomising among near-best agents does not
help there: the contention is for the slots, not for the best one among many. So each agent has
an owner among the live replicas, and the others leave its freshly freed slots to it for a moment
(:mod:`scoring.holds`, which also holds fresh slots for warm runs in a lone dispatcher).

This module keeps the registry of live replicas: rows of the ``replicas`` table that each replica
refreshes at every sync (:mod:`scoring.server.replicas`); one not seen for :data:`TTL_S` is gone.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, func, insert, select, update

from scoring.server import db

#: A replica not seen for this long is gone (its agents go to the others).
TTL_S = 3.0


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


def queued_count(conn: Connection, at_most: int | None = None) -> int:
    """Tasks waiting for an agent, counted up to ``at_most`` (so that the cost of asking
    whether the queue is longer than the free slots does not grow with a backlog)."""
    t = db.tasks
    waiting = select(t.c.id).where(t.c.status == "queued", t.c.dispatch_target == "agent")
    if at_most is not None:
        waiting = waiting.limit(at_most)
    return int(conn.execute(select(func.count()).select_from(waiting.subquery())).scalar_one())
