"""The dispatch loop: the queue of runs in the database, placed on the Fleet's free slots.

:func:`place` is the one place where queued requests meet the library's placement. The loop
(:class:`Dispatcher`) runs it whenever capacity may have changed (a run arrived, a task ended,
an agent reported) and at least once a second, commits the placements, and queues again the
unstarted tasks of agents whose heartbeats stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Connection, select

from scoring import Decision, DispatchRequest, Fleet, ScoringPolicy, assign
from scoring.server import db, tasks
from scoring.server.heartbeats import PERSIST_EVERY_S
from scoring.server.state import ServerState

log = logging.getLogger("scoring.server.dispatch")

#: Most queued tasks considered in one round (oldest first).
BATCH = 5000
#: Most queued tasks one round claims on PostgreSQL: other replicas' rounds meanwhile skip them,
#: so a replica should hold no more than it can place (about the free slots of a large fleet).
CLAIM = 256
#: Re-picks in one round of the placements that lost their agent's last slot to another replica.
REPICKS = 3
#: The dispatch counters (placements, lost races, ...) are written at most this often.
STATS_EVERY_S = 1.0
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

    def __init__(
        self,
        state: ServerState,
        interval: float = 1.0,
        min_gap: float = 0.02,
        claim: int = CLAIM,
        stats_path: str | None = None,
    ) -> None:
        self.state = state
        self.claim = claim
        self.stats_path = None if stats_path is None else Path(stats_path)
        self.stats: Counter[str] = Counter()
        self._stats_at = 0.0
        self._after_commit: list[str] = []
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
        self._write_stats(time.time(), force=True)

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
        """One round: requeue tasks of silent agents, then place the queue. Returns placements.

        On PostgreSQL the round claims the queued tasks it considers (``FOR UPDATE SKIP
        LOCKED``, held until its transaction commits), so replicas place different tasks; they
        still pick agents from similar Fleets, and a lost reservation is picked again without
        that agent, up to :data:`REPICKS` times in the round.
        """
        now = time.time() if now is None else now
        self._requeue_silent(now)
        database = self.state.database
        if database.is_sqlite:
            return self._round(None, now)
        self._after_commit = []
        try:
            with database.begin() as conn:
                placed = self._round(conn, now)
        except Exception:
            self._give_back(self._after_commit)  # rolled back
            raise
        finally:
            committed, self._after_commit = self._after_commit, []
        self._give_back(committed, resync=False)
        return placed

    def _round(self, conn: Connection | None, now: float) -> int:
        ids = self._queued(conn)
        if not ids:
            return 0
        state = self.state
        requests = dict(zip(ids, self._load_requests(ids), strict=True))
        todo = ids
        accepted: list[str] = []  # agents of placements the database took (maybe uncommitted)
        self.stats["rounds"] += 1
        try:
            for attempt in range(REPICKS + 1):
                with state.sync:
                    decisions = place(state.fleet, [requests[i] for i in todo], state.policy, now)
                    placed = [d.agent_id for d in decisions if d.agent_id is not None]
                    state.pending.update(placed)
                explains = self._explanations(todo, decisions, now) if attempt == 0 else {}
                try:
                    lost = tasks.commit_placements(state, todo, decisions, explains, conn)
                except Exception:
                    with state.sync:
                        state.pending.subtract(placed)
                        for agent in set(placed):
                            self._resync(agent)
                    for task_id in explains:
                        self._explained.pop(task_id, None)
                    raise
                refused = Counter(x.agent_id for x in lost)
                accepted.extend((Counter(placed) - refused).elements())
                self.stats["placements"] += len(placed) - len(lost)
                self.stats["lost_races"] += sum(x.agent_full for x in lost)
                self.stats["lost_tasks"] += sum(not x.agent_full for x in lost)
                with state.sync:
                    state.pending.subtract(refused)
                    state.pending += Counter()  # drop zero counts
                    for agent in refused:
                        self._resync(agent)
                taken = {x.task_id for x in lost}
                for task_id, d in zip(todo, decisions, strict=True):
                    if d.agent_id is not None and task_id not in taken:
                        self._requests.pop(task_id, None)
                        self._explained.pop(task_id, None)
                retry = [x for x in lost if x.agent_full]
                if not retry:
                    break
                # Re-pick without the agent whose last slot another replica took: its count
                # was resynced above, and excluding it spares a second race on a stale count.
                for x in retry:
                    r = requests[x.task_id]
                    requests[x.task_id] = r.model_copy(
                        update={"exclude_agents": r.exclude_agents | {x.agent_id}}
                    )
                todo = [x.task_id for x in retry]
                self.stats["repicks"] += len(todo)
            else:
                log.info("lost reservations after %d re-picks", REPICKS)
                state.wake.set()  # still queued: try again next round with fresh counts
        except Exception:
            self._give_back(accepted)
            raise
        if conn is not None:
            # Committed when the caller's block ends; until then they stay ``pending``.
            self._after_commit.extend(accepted)
        else:
            self._give_back(accepted, resync=False)
        self._write_stats(now)
        return len(accepted)

    def _give_back(self, agents: list[str], resync: bool = True) -> None:
        """Placements no longer in flight: committed (``resync=False``) or rolled back."""
        state = self.state
        with state.sync:
            state.pending.subtract(agents)
            state.pending += Counter()
            if resync:
                for agent in set(agents):
                    self._resync(agent)

    def _explanations(
        self, ids: list[str], decisions: list[Decision], now: float
    ) -> dict[str, str]:
        """The changed explanations of tasks left queued (each rewritten at most every
        :data:`EXPLAIN_EVERY_S`)."""
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
        return explains

    def _write_stats(self, now: float, force: bool = False) -> None:
        if self.stats_path is None or (not force and now - self._stats_at < STATS_EVERY_S):
            return
        self._stats_at = now
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(self.stats)) + "\n")
        tmp.replace(self.stats_path)

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

    def _queued(self, claim: Connection | None) -> list[str]:
        t = db.tasks
        query = (
            select(t.c.id, t.c.attempts)
            .where(t.c.status == "queued", t.c.dispatch_target == "agent")
            .order_by(t.c.id)
        )
        if claim is None:
            with self.state.database.read() as conn:
                rows = conn.execute(query.limit(BATCH)).all()
        else:
            # Rows another replica's round holds are skipped, not waited for.
            query = query.limit(self.claim).with_for_update(skip_locked=True)
            rows = claim.execute(query).all()
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
