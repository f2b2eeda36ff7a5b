"""The dispatch loop: the queue of runs in the database, placed on the Fleet's free slots.

:func:`place` is the one place where queued requests meet the library's placement. The loop
(:class:`Dispatcher`) runs it whenever capacity may have changed (a run arrived, a task ended,
an agent reported) and at least once a second, commits the placements, and queues again the
unstarted tasks of agents whose heartbeats stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy import select

from scoring import Decision, DispatchRequest, Fleet, ScoringPolicy, assign
from scoring.server import db, tasks
from scoring.server.heartbeats import PERSIST_EVERY_S
from scoring.server.state import ServerState

log = logging.getLogger("scoring.server.dispatch")

#: Most queued tasks considered in one round (oldest first).
BATCH = 5000
#: A queued task's explanation is rewritten at most this often (it changes with every heartbeat).
EXPLAIN_EVERY_S = 2.0


def place(
    fleet: Fleet, requests: Sequence[DispatchRequest], policy: ScoringPolicy, now: float
) -> list[Decision]:
    """Place queued requests: one Decision per request, in the order given (the library's
    :func:`scoring.assign`, DESIGN section 9).

    A Decision whose ``agent_id`` is ``None`` leaves its task queued (deferred for a warm agent,
    or no free eligible agent); a placed one has already reserved its slot on the Fleet.
    """
    return assign(fleet, requests, policy, now)


class Dispatcher:
    """The background thread that runs :meth:`run_once` on wake-ups and every ``interval``."""

    def __init__(self, state: ServerState, interval: float = 1.0, min_gap: float = 0.02) -> None:
        self.state = state
        self.interval = interval
        self.min_gap = min_gap  # wake-ups closer than this share one round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._requests: dict[str, tuple[int, DispatchRequest]] = {}
        self._explained: dict[str, tuple[str, float]] = {}

    def start(self) -> None:
        """Start the loop thread."""
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for its current round."""
        self._stop.set()
        self.state.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.state.wake.wait(self.interval)
            self.state.wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_once()
            except Exception:  # the loop must outlive a failed round (e.g. a busy database)
                log.exception("dispatch round failed")
            self._stop.wait(self.min_gap)

    def run_once(self, now: float | None = None) -> int:
        """One round: requeue tasks of silent agents, then place the queue. Returns placements."""
        now = time.time() if now is None else now
        self._requeue_silent(now)
        ids = self._queued()
        if not ids:
            return 0
        requests = self._load_requests(ids)
        state = self.state
        with state.sync:
            decisions = place(state.fleet, requests, state.policy, now)
            placed = [d.agent_id for d in decisions if d.agent_id is not None]
            state.pending.update(placed)
        explains = {}
        for task_id, d in zip(ids, decisions, strict=True):
            if d.agent_id is not None:
                continue
            last = self._explained.get(task_id)
            if last is not None and now - last[1] < EXPLAIN_EVERY_S:
                continue
            text = d.explain()
            self._explained[task_id] = (text, now)
            if last is None or last[0] != text:
                explains[task_id] = text
        lost: list[str] = []
        try:
            lost = tasks.commit_placements(state, ids, decisions, explains)
        except Exception:
            lost = placed  # nothing was committed: give every slot back
            for task_id in explains:
                self._explained.pop(task_id, None)
            raise
        finally:
            with state.sync:
                state.pending.subtract(placed)
                state.pending += type(state.pending)()  # drop zero counts
                for agent in set(lost):
                    self._resync(agent)
        for task_id, d in zip(ids, decisions, strict=True):
            if d.agent_id is not None:
                self._requests.pop(task_id, None)
                self._explained.pop(task_id, None)
        if lost:
            log.info("lost %d reservations to other dispatchers", len(lost))
            state.wake.set()  # their tasks are still queued: try again with the fresh counts
        return len(placed) - len(lost)

    def _resync(self, agent_id: str) -> None:
        """Set the Fleet's running count of an agent to its reservations (call under ``sync``).

        After a lost reservation the Fleet counted a slot the database refused; a release that
        raced with a heartbeat can also leave it one low. Either way the database is right.
        """
        state = self.state
        if agent_id not in state.fleet:
            return
        count = state.reserved_in_db(agent_id) + state.pending.get(agent_id, 0)
        at = state.fleet.get(agent_id).last_heartbeat
        state.fleet.heartbeat(agent_id, at, running_count=min(count, 65535))

    def _queued(self) -> list[str]:
        t = db.tasks
        with self.state.database.read() as conn:
            rows = conn.execute(
                select(t.c.id, t.c.attempts)
                .where(t.c.status == "queued", t.c.dispatch_target == "agent")
                .order_by(t.c.id)
                .limit(BATCH)
            ).all()
        ids = [r.id for r in rows]
        stale = [r.id for r in rows if self._requests.get(r.id, (r.attempts,))[0] != r.attempts]
        for task_id in stale:  # failed once more: exclusions changed
            del self._requests[task_id]
        if len(self._requests) > 2 * BATCH:
            keep = set(ids)
            self._requests = {k: v for k, v in self._requests.items() if k in keep}
            self._explained = {k: v for k, v in self._explained.items() if k in keep}
        return ids

    def _load_requests(self, ids: list[str]) -> list[DispatchRequest]:
        missing = [task_id for task_id in ids if task_id not in self._requests]
        t = db.tasks
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            with self.state.database.read() as conn:
                rows = conn.execute(
                    select(t.c.id, t.c.request, t.c.excluded, t.c.attempts, t.c.created_at).where(
                        t.c.id.in_(chunk)
                    )
                ).all()
            for r in rows:
                # submitted_at orders the queue and bounds a wait for a warm agent
                request = DispatchRequest.model_validate(
                    {**r.request, "exclude_agents": r.excluded, "submitted_at": r.created_at}
                )
                self._requests[r.id] = (r.attempts, request)
        return [self._requests[task_id][1] for task_id in ids]

    def _requeue_silent(self, now: float) -> None:
        # The database's heartbeat time lags the Fleet's by up to PERSIST_EVERY_S: waiting that
        # much longer means the Fleet already holds the agent stale, so the task cannot go
        # straight back to the agent that was silent.
        timeout = self.state.policy.heartbeat_timeout_s
        cutoff = now - timeout - PERSIST_EVERY_S
        if self.state.started_at > now - timeout:
            return  # just started: agents have not had a heartbeat's time to report yet
        a, t = db.agents, db.tasks
        with self.state.database.read() as conn:
            silent = (
                conn.execute(
                    select(a.c.id)
                    .where(a.c.last_heartbeat < cutoff)
                    .where(
                        select(t.c.id)
                        .where(t.c.agent_id == a.c.id, t.c.status == "dispatched")
                        .exists()
                    )
                )
                .scalars()
                .all()
            )
        for agent_id in silent:
            moved = tasks.requeue_unstarted(self.state, agent_id, cutoff)
            if moved:
                log.info("queued %d tasks of silent agent %s again", moved, agent_id)
