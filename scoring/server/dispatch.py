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
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, tuple_

from scoring import (
    Agent,
    Decision,
    DispatchRequest,
    Fleet,
    ScoringPolicy,
    assign,
    holds,
    pick_agent,
)
from scoring.pick import only_excluded_fit
from scoring.server import db, tasks
from scoring.server.heartbeats import PERSIST_EVERY_S
from scoring.server.replicas import sync_fleet
from scoring.server.state import ServerState

log = logging.getLogger("scoring.server.dispatch")

#: Most queued tasks considered in one round (oldest first within each group).
BATCH = 5000
#: Most groups (team, workflow) with queued runs considered in one round.
MAX_GROUPS = 1000
#: A group whose oldest run could not be placed is skipped this long, unless capacity or the
#: fleet changes first.
SKIP_S = 1.0
#: Lost agents and start timeouts are looked for at most this often.
SWEEP_EVERY_S = 0.5
#: Most queued tasks one round claims on PostgreSQL: other replicas' rounds meanwhile skip them,
#: so a replica should hold no more than it can place (about the free slots of a large fleet).
CLAIM = 256
#: Fewest queued tasks one round claims on PostgreSQL, however few slots look free.
MIN_CLAIM = 8
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


def lift_exclusions(
    fleet: Fleet,
    own: Sequence[DispatchRequest],
    requests: Sequence[DispatchRequest],
    decisions: list[Decision],
    policy: ScoringPolicy,
    now: float,
) -> list[Decision]:
    """Place again, without their own exclusions, the runs that only excluded agents could take.

    A failed attempt excludes its agent from the run's next attempts (DESIGN section 10.1) so
    that the run goes elsewhere; when there is nowhere else (every agent of the pool that could
    take it, free or busy, failed it before: :func:`scoring.pick.only_excluded_fit`), the run is
    tried again on one of those, within ``max_attempts``, rather than left queued for ever.
    ``own`` are the runs' requests, ``requests`` the same as placed (slots held for others added
    to their exclusions, :func:`scoring.holds.restrict`): only the run's own exclusions go.
    """
    out = list(decisions)
    fits: dict[int, bool] = {}  # by template: a backlog of retried runs costs a scan each kind
    for n, (mine, request, d) in enumerate(zip(own, requests, decisions, strict=True)):
        if d.agent_id is not None or d.deferred or d.eligible or not mine.exclude_agents:
            continue
        fit = fits.get(mine.template_id)
        if fit is None:  # (placements in between change only capacity, which it ignores)
            fit = fits[mine.template_id] = only_excluded_fit(fleet, mine, policy, now)
        if fit:
            held = request.exclude_agents - mine.exclude_agents
            lifted = request.model_copy(update={"exclude_agents": held})
            out[n] = fleet.dispatch(lifted, policy, now)
    return out


def warm_up(policy: ScoringPolicy) -> None:
    """Compile the engine's kernels on a throwaway fleet before the server takes requests.

    Compiling (seconds, without numba's on-disk cache) inside the first dispatch round would
    hold the Fleet's lock that long, and every heartbeat would wait behind it.
    """
    team = uuid.UUID(int=1)
    agent = Agent(agent_id="warm-up", team_id=team, status="idle", labels={"comfyui"},
                  last_heartbeat=0.0, gpu_capacity=1, cached_models={"m"})  # fmt: skip
    request = DispatchRequest(team_id=team, required_models={"m"}, submitted_at=0.0)
    for wait in (0.0, 60.0):
        fleet = Fleet.from_agents([agent])
        assign(fleet, [request, request], policy.model_copy(update={"locality_wait_s": wait}), 1.0)
    pick_agent(Fleet.from_agents([agent]), request, policy, now=1.0).explain()


class Dispatcher:
    """The background thread that runs :meth:`run_once` on wake-ups and every ``interval``."""

    def __init__(
        self,
        state: ServerState,
        interval: float = 1.0,
        min_gap: float = 0.002,
        claim: int = CLAIM,
        stats_path: str | None = None,
        refresh: bool = False,
    ) -> None:
        self.state = state
        self.claim = claim
        self.stats_path = None if stats_path is None else Path(stats_path)
        self.stats: Counter[str] = Counter()
        self._stats_at = 0.0
        self.refresh = refresh
        self._seen: dict[str, tuple[Any, float]] = {}
        self.interval = interval
        self.min_gap = min_gap  # wake-ups closer than this share one round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._requests: dict[str, tuple[int, DispatchRequest]] = {}
        self._explained: dict[str, tuple[str, float]] = {}
        #: This round's group heads (task id -> group) and what became of them.
        self._heads: dict[str, tuple[str, str]] = {}
        self._outcomes: dict[str, str] = {}
        #: Groups whose head could not be placed: (capacity epoch, when).
        self._unplaceable: dict[tuple[str, str], tuple[int, float]] = {}
        self._swept_at = -float("inf")

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
        self._write_stats(self.state.clock(), force=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            woken = self.state.wake.wait(self.interval)
            self.state.wake.clear()
            if self._stop.is_set():
                break
            try:
                if woken and self._full():
                    # Nothing can be placed: a submission only joins the queue. The timed
                    # round (every ``interval``) still reads it, for deferrals and explanations.
                    self._sweep(self.state.clock())
                    continue
                with self.state.metrics.round_seconds.time():
                    self.run_once()
            except Exception:  # the loop must outlive a failed round (e.g. a busy database)
                log.exception("dispatch round failed")
            self._stop.wait(self.min_gap)

    def _full(self) -> bool:
        """Whether no agent of the Fleet has a free slot."""
        with self.state.sync:
            return holds.free_slots(self.state.fleet) == 0

    def run_once(self, now: float | None = None) -> int:
        """One round: end the attempts of lost agents and of tasks never started, then place
        the queue (by group, :meth:`_queued`). Returns placements.

        On PostgreSQL each attempt of the round is one transaction that claims the queued tasks
        it considers (``FOR UPDATE SKIP LOCKED``), so replicas place different tasks; they still
        pick agents from similar Fleets, and a placement whose agent's last slot another replica
        took is picked again without that agent, up to :data:`REPICKS` times in the round.
        """
        now = self.state.clock() if now is None else now
        self._sweep(now)
        state = self.state
        if self.refresh:
            # Counts as of now, not as of the last poll: fewer picks of slots already taken.
            sync_fleet(state, self._seen)
        requests: dict[str, DispatchRequest] = {}
        todo: list[str] | None = None  # None: claim from the queue
        total = 0
        for attempt in range(REPICKS + 1):
            accepted: list[str] = []
            try:
                with self._transaction() as conn:
                    ids = self._queued(conn, now) if todo is None else self._reclaim(conn, todo)
                    if not ids:
                        break
                    if todo is None:
                        self.stats["rounds"] += 1
                        requests.update(zip(ids, self._load_requests(ids), strict=True))
                    accepted, retry = self._attempt(conn, ids, requests, now, attempt == 0)
            except Exception:
                self._give_back(accepted)  # rolled back
                raise
            self._give_back(accepted, resync=False)  # committed
            state.waiters.wake(accepted)  # their long-polling heartbeats answer now
            self.stats["placements"] += len(accepted)
            total += len(accepted)
            if not retry:
                break
            # Re-pick without the agent whose last slot another replica took: its count was
            # resynced, and excluding it spares a second race on a count that may lag again.
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
        self._write_stats(now)
        self._note_unplaceable(requests, now)
        log.debug("round: %d placed, %d re-picks", total, attempt)
        return total

    @contextmanager
    def _transaction(self) -> Iterator[Connection | None]:
        """PostgreSQL: one transaction for an attempt (claims and reservations commit together).
        SQLite: none; :func:`tasks.commit_placements` commits on its own under the write lock,
        so reads and the placement never hold SQLite's single writer."""
        if self.state.database.is_sqlite:
            yield None
            return
        with self.state.database.begin() as conn:
            yield conn

    def _attempt(
        self,
        conn: Connection | None,
        ids: list[str],
        requests: dict[str, DispatchRequest],
        now: float,
        explain: bool,
    ) -> tuple[list[str], list[tasks.Lost]]:
        """Place ``ids`` and write the placements; returns the agents of those the database took
        (still ``pending`` until the transaction commits) and the lost races to pick again."""
        state = self.state
        t0 = time.perf_counter()
        batch = [requests[i] for i in ids]
        with state.sync:
            t1 = time.perf_counter()
            held = self._held(len(ids), now)
            restricted = holds.restrict(state.fleet, batch, held)
            decisions = lift_exclusions(
                state.fleet, batch, restricted,
                place(state.fleet, restricted, state.policy, now), state.policy, now,
            )  # fmt: skip
            placed = [d.agent_id for d in decisions if d.agent_id is not None]
            state.pending.update(placed)
        self.stats["held_slots"] += len(held.fresh | held.foreign)
        t2 = time.perf_counter()
        # a waiting run is explained by its own request, whatever was held from it
        own = {i: r for i, r, c in zip(ids, batch, restricted, strict=True) if c is not r}
        explains = self._explanations(ids, decisions, now, own) if explain else {}
        try:
            lost = tasks.commit_placements(state, ids, decisions, explains, conn)
        except Exception:
            self._give_back(placed)
            for task_id in explains:
                self._explained.pop(task_id, None)
            raise
        t3 = time.perf_counter()
        log.debug("attempt: %d tasks, lock %.3f, place %.3f, explain+commit %.3f", len(ids),
                  t1 - t0, t2 - t1, t3 - t2)  # fmt: skip
        refused = Counter(x.agent_id for x in lost)
        self.stats["lost_races"] += sum(x.agent_full for x in lost)
        if state.holds is not None:  # whose agent the lost slot was (see scoring.holds)
            mine = sum(x.agent_full and state.holds.owns(x.agent_id) for x in lost)
            self.stats["lost_races_own_agent"] += mine
        self.stats["lost_tasks"] += sum(not x.agent_full for x in lost)
        self._give_back(list(refused.elements()))  # and their agents' counts resynced
        taken = {x.task_id for x in lost}
        state.metrics.decided(batch, decisions, [n for n, i in enumerate(ids) if i in taken])
        for task_id, d in zip(ids, decisions, strict=True):
            if task_id in self._heads:
                placed_now = d.agent_id is not None and task_id not in taken
                # A head kept from held slots (scoring.holds) is not unplaceable: a hold ends.
                waiting = d.deferred or task_id in own
                self._outcomes[task_id] = (
                    "placed" if placed_now else "waiting" if waiting else "unplaced"
                )
            if d.agent_id is not None and task_id not in taken:
                self._requests.pop(task_id, None)
                self._explained.pop(task_id, None)
        accepted = list((Counter(placed) - refused).elements())
        return accepted, [x for x in lost if x.agent_full]

    def _held(self, queued: int, now: float) -> holds.Held:
        """The slots held from this round's runs (call under ``sync``). A lone process (no
        sync thread) judges the queue by the tasks this round took against the Fleet's free
        slots; replicas by the database's counts, at every sync."""
        state = self.state
        if state.holds is None:
            return holds.Held()
        if state.free_slots is None:
            state.holds.update((), saturated=queued > holds.free_slots(state.fleet))
        return state.holds.held(state.fleet, now)

    def _unrestricted(self, request: DispatchRequest, d: Decision, now: float) -> Decision:
        """A waiting run's decision with the counts of its own request (the agents held for
        other replicas are not its exclusions), for its explanation."""
        p = pick_agent(self.state.fleet, request, self.state.policy, now)
        rejected = list(p.rejected.values())
        return Decision(None, None, (), p.eligible, rejected, p.considered, p.missing_labels,
                        deferred=d.deferred, waiting_for=d.waiting_for)  # fmt: skip

    def _claim_size(self) -> int:
        """How many queued tasks an attempt claims: about what the free slots can take (the
        rest stays for other replicas' rounds), at least :data:`MIN_CLAIM`, at most ``claim``.

        Tasks deferred for a warm agent count against it, so a queue headed by many deferred
        tasks is placed more slowly than by one process that considers :data:`BATCH` at once.
        """
        free = self.state.free_slots
        if free is None:
            return self.claim
        return max(MIN_CLAIM, min(self.claim, 2 * free))

    def _reclaim(self, claim: Connection | None, ids: list[str]) -> list[str]:
        """Those of ``ids`` still queued (and, on PostgreSQL, not claimed by another replica)."""
        t = db.tasks
        query = select(t.c.id).where(t.c.id.in_(ids), t.c.status == "queued")
        if claim is None:
            with self.state.database.read() as conn:
                found = set(conn.execute(query).scalars())
        else:
            found = set(claim.execute(query.with_for_update(skip_locked=True)).scalars())
        return [i for i in ids if i in found]

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
        self,
        ids: list[str],
        decisions: list[Decision],
        now: float,
        own: dict[str, DispatchRequest],
    ) -> dict[str, str]:
        """The changed explanations of tasks left queued (each rewritten at most every
        :data:`EXPLAIN_EVERY_S`); ``own`` holds the requests of those placed with slots held
        from them, explained by a pick of their own request (only when due)."""
        explains = {}
        for task_id, d in zip(ids, decisions, strict=True):
            if d.agent_id is not None:
                continue
            last = self._explained.get(task_id)
            if last is not None and now - last[1] < EXPLAIN_EVERY_S:
                continue
            request = own.get(task_id)
            text = (d if request is None else self._unrestricted(request, d, now)).explain()
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
        count = state.reserved(agent_id)
        at = state.fleet.get(agent_id).last_heartbeat
        state.fleet.heartbeat(agent_id, at, running_count=count)

    def _queued(self, claim: Connection | None, now: float) -> list[str]:
        """The queued tasks this round considers, read by group (DESIGN section 10.2).

        A group is a team's runs of one workflow. Every group with queued runs is found by a
        walk of the queue index (one seek a group), and each contributes its oldest runs: about
        its share of the free slots, at most :data:`BATCH` in all (on PostgreSQL, the claim
        size, claimed ``FOR UPDATE SKIP LOCKED``). A group whose oldest run could not be placed
        (no eligible agent, or every eligible one busy) is skipped until capacity or the fleet
        changes (or :data:`SKIP_S` passed). So a round costs a few index seeks per group plus
        the runs it considers, whatever the backlog: one team's 50,000 runs that no agent can
        take do not delay another team's runs.
        """
        t = db.tasks
        state = self.state
        with self.state.database.read() if claim is None else nullcontext(claim) as conn:
            groups = [g for g in _groups(conn) if not self._skipped(g, now)]
            if not groups:
                return []
            budget = BATCH if claim is None else self._claim_size()
            free = max(1, holds.free_slots(state.fleet))
            share = min(max(1, budget // len(groups)), 2 * -(-free // len(groups)) + MIN_CLAIM)
            rows: list[Any] = []
            for team, workflow in groups:
                query = (
                    select(t.c.id, t.c.attempt)
                    .where(t.c.status == "queued", t.c.dispatch_target == "agent",
                           t.c.team_id == team, t.c.workflow_id == workflow)
                    .order_by(t.c.id)
                    .limit(share)
                )  # fmt: skip
                if claim is not None:  # rows another replica's round holds are skipped
                    query = query.with_for_update(skip_locked=True)
                found = conn.execute(query).all()
                if found:
                    self._heads[found[0].id] = (team, workflow)
                rows.extend(found)
        rows.sort(key=lambda r: r.id)
        ids = [r.id for r in rows]
        stale = [r.id for r in rows if self._requests.get(r.id, (r.attempt,))[0] != r.attempt]
        for task_id in stale:  # queued again after an attempt: exclusions may have changed
            del self._requests[task_id]
        if len(self._requests) > 2 * BATCH:
            keep = set(ids)
            self._requests = {k: v for k, v in self._requests.items() if k in keep}
            self._explained = {k: v for k, v in self._explained.items() if k in keep}
        return ids

    def _skipped(self, group: tuple[str, str], now: float) -> bool:
        """Whether ``group``'s head was unplaceable at this capacity epoch, lately."""
        mark = self._unplaceable.get(group)
        if mark is None:
            return False
        epoch, at = mark
        if epoch == self.state.capacity_epoch and now - at < SKIP_S:
            return True
        del self._unplaceable[group]
        return False

    def _note_unplaceable(self, requests: dict[str, DispatchRequest], now: float) -> None:
        """Mark the groups whose head this round neither placed nor deferred."""
        heads, self._heads = self._heads, {}
        for task_id, group in heads.items():
            outcome = self._outcomes.get(task_id)
            if outcome == "unplaced":
                self._unplaceable[group] = (self.state.capacity_epoch, now)
        self._outcomes = {}

    def _load_requests(self, ids: list[str]) -> list[DispatchRequest]:
        missing = [task_id for task_id in ids if task_id not in self._requests]
        t = db.tasks
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            with self.state.database.read() as conn:
                rows = conn.execute(
                    select(t.c.id, t.c.request, t.c.excluded, t.c.attempt, t.c.created_at).where(
                        t.c.id.in_(chunk)
                    )
                ).all()
            for r in rows:
                # submitted_at orders the queue and bounds a wait for a warm agent
                request = DispatchRequest.model_validate(
                    {**r.request, "exclude_agents": r.excluded, "submitted_at": r.created_at}
                )
                self._requests[r.id] = (r.attempt, request)
        return [self._requests[task_id][1] for task_id in ids]

    def _sweep(self, now: float) -> None:
        """End the attempts of agents lost and of tasks never started (DESIGN section 10.1),
        at most every :data:`SWEEP_EVERY_S`.

        An agent is lost when this process has not heard of it (:attr:`ServerState.heard`, by
        the server's own clock) for the heartbeat timeout: the Fleet holds it stale from the
        same moment, so its tasks cannot go straight back to it. Its
        dispatched and running tasks are queued again as new attempts and its slots freed. A
        process that just started waits a heartbeat timeout before judging (agents have not had
        the time to report), and a start timeout before timing out starts.
        """
        state = self.state
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        timeout = state.policy.heartbeat_timeout_s
        up = now - state.started_at
        a, t = db.agents, db.tasks
        if up >= timeout:
            cutoff = now - timeout
            with state.database.read() as conn:
                holders = conn.execute(
                    select(t.c.agent_id)
                    .where(t.c.status.in_(tasks.ACTIVE), t.c.agent_id.is_not(None))
                    .distinct()
                ).scalars().all()  # fmt: skip
            for agent in holders:
                if state.heard.get(agent, state.started_at) >= cutoff:
                    continue
                where = t.c.agent_id == agent
                if state.free_slots is not None:
                    # Replicas: another one may have heard it meanwhile; its heartbeats reach
                    # the database up to PERSIST_EVERY_S late.
                    lag = cutoff - PERSIST_EVERY_S
                    where &= (
                        select(a.c.id).where(a.c.id == agent, a.c.last_heartbeat < lag).exists()
                    )
                moved = tasks.end_attempts(state, agent, tasks.Outcome.AGENT_LOST, where)
                if moved:
                    log.info("agent %s lost: %d tasks queued again", agent, moved)
        if up >= state.start_timeout_s:
            late = (t.c.status == "dispatched") & (t.c.dispatched_at < now - state.start_timeout_s)
            moved = tasks.end_attempts(state, None, tasks.Outcome.START_TIMEOUT, late)
            if moved:
                log.info("%d dispatched tasks not started in time: queued again", moved)


def _groups(conn: Connection) -> list[tuple[str, str]]:
    """The (team, workflow) groups with queued agent runs, by a walk of the queue index (one
    seek each), at most :data:`MAX_GROUPS`."""
    t = db.tasks
    key = tuple_(t.c.team_id, t.c.workflow_id)
    base = select(t.c.team_id, t.c.workflow_id).where(
        t.c.status == "queued", t.c.dispatch_target == "agent"
    )
    found: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    while len(found) < MAX_GROUPS:
        query = base if after is None else base.where(key > tuple_(*after))
        row = conn.execute(query.order_by(t.c.team_id, t.c.workflow_id).limit(1)).first()
        if row is None:
            break
        after = (row.team_id, row.workflow_id)
        found.append(after)
    return found
