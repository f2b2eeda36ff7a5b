"""The dispatcher loop: hand the waiting queue to the policy whenever capacity may have changed.

Nothing is ever dropped. A submitted task is offered to the policy at once; one that finds no
free eligible agent waits, and one the policy defers (held back for a warm agent) waits too, and
the dispatcher wakes itself when the earliest deferral expires. Whenever an agent may have gained
room (a task ended, an agent became ready, a model finished loading), the waiting tasks it could
serve are handed to the policy's ``assign`` as one batch, oldest submission first.

Waiting tasks are grouped by *eligibility class*: team, pool, VRAM minimum and excluded agents
are everything that decides which agents are eligible in this simulation. A class whose task
found no free eligible agent is *blocked*: no task of it can be placed until an agent it could
use gains room, so a blocked class is skipped until then, and an agent that frees a slot only
wakes the classes it could serve (its own team's, plus every community-pool class when it has
opted in). A batch holds, per class and model, at most as many tasks as there are free slots:
tasks of one class and one model are alike to every policy except by age, and the older ones
come first, so the younger ones could not be placed in that batch anyway.

A policy that holds free slots back (the scorer's slot holds, :mod:`scoring.holds`) says when
the first of them opens to every run (``Policy.release_at``); the dispatcher wakes then and offers
every waiting class again, as the API server's dispatch loop runs at least once a second.

A task whose attempt failed, or whose agent disconnected, is retried with that agent in
``exclude_agents``. If the exclusions leave no eligible agent, the dispatcher tries once more
without them: running on an agent that once failed beats waiting for ever (a one-agent team).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from scoring import DispatchRequest, Fleet
from scoring.sim.agents import team_uuid
from scoring.sim.policies import Outcome, Policy
from scoring.sim.workload import Task

#: A deferral expires this long after its bound, so that the policy, reading the clock as
#: seconds since the epoch, sees the bound passed despite rounding.
_EXPIRY_SLACK_S = 1e-6


@dataclass(eq=False, slots=True)
class TaskState:
    """A submitted task and what the dispatcher knows about it.

    ``submitted`` is when it was first submitted (seconds since the epoch); retries keep it.
    """

    task: Task
    submitted: float = 0.0
    exclude: frozenset[str] = frozenset()
    attempts: int = 0
    queued: bool = False
    expiry: float = math.nan  # when its current deferral ends (NaN: not deferred)
    _request: DispatchRequest | None = None
    _plain: DispatchRequest | None = None

    @property
    def request(self) -> DispatchRequest:
        if self._request is None:
            self._request = make_request(self.task, self.exclude, self.submitted)
        return self._request

    @property
    def plain_request(self) -> DispatchRequest:
        """The request without exclusions."""
        if self._plain is None:
            self._plain = (
                self.request if not self.exclude else make_request(self.task, (), self.submitted)
            )
        return self._plain

    def exclude_agent(self, agent_id: str) -> None:
        self.exclude = self.exclude | {agent_id}
        self._request = None

    @property
    def key(self) -> tuple[Any, ...]:
        """The eligibility class (see the module docstring)."""
        t = self.task
        return (t.team, t.pool, t.min_vram_gb, self.exclude)

    @property
    def seq(self) -> int:
        return self.task.task_id


def make_request(
    task: Task, exclude: Iterable[str] = (), submitted: float | None = None
) -> DispatchRequest:
    """The DispatchRequest a ComfyUI run of ``task`` sends."""
    return DispatchRequest(
        team_id=team_uuid(task.team),
        target_pool=task.pool,
        submitter_region=task.region,
        tool_type="comfyui",
        required_labels={"gpu"},
        min_vram_gb=task.min_vram_gb,
        preferred_gpu=task.preferred_gpu,
        required_models={task.model} if task.model else set(),
        exclude_agents=frozenset(exclude),
        tie_key=f"task-{task.task_id}",
        submitted_at=submitted,
    )


def _seq(state: TaskState) -> int:
    return state.task.task_id


class Dispatcher:
    """Places tasks with ``policy``; ``start(state, agent_id)`` runs a placed task.

    ``clock()`` gives the current time in seconds since the epoch (simulated);
    ``wake(at)`` asks to have :meth:`expire` called at time ``at``; ``free_slots()`` bounds from
    above how many tasks could be placed right now.
    """

    def __init__(
        self,
        fleet: Fleet,
        policy: Policy,
        clock: Callable[[], float],
        start: Callable[[TaskState, str], None],
        wake: Callable[[float], None] | None = None,
        free_slots: Callable[[], int] | None = None,
    ) -> None:
        self.fleet, self.policy, self.clock, self.start = fleet, policy, clock, start
        self.wake = wake or (lambda at: None)
        self.free_slots = free_slots or (lambda: 1 << 30)
        self.classes: dict[tuple[Any, ...], list[TaskState]] = {}
        self.by_team: defaultdict[int, set[tuple[Any, ...]]] = defaultdict(set)
        self.community: set[tuple[Any, ...]] = set()
        self.blocked: set[tuple[Any, ...]] = set()
        self.expiries: list[tuple[float, int, TaskState]] = []  # deferrals, earliest first
        self.rechecks: list[float] = []  # when slots the policy held open to every run
        self.next_wake = math.inf
        # Times with a wake asked for and not yet come: asking twice for one time only made
        # the second wake find nothing due and ask again, a chain that grew with every
        # deferral (36,573 empty wakes for 3,000 tasks).
        self.wakes: set[float] = set()
        self.picks = 0  # requests handed to the policy
        self.batches = 0  # assign calls
        self.deferrals = 0

    @property
    def waiting(self) -> list[TaskState]:
        """Every waiting task, in arrival order."""
        return sorted((s for q in self.classes.values() for s in q), key=_seq)

    def submit(self, state: TaskState) -> None:
        """A new (or retried) task: place it now, or queue it in submission order."""
        key = state.key
        queue = self.classes.get(key)
        state.queued = True
        if queue is None:
            self.classes[key] = [state]
            self.by_team[state.task.team].add(key)
            if state.task.pool == "community":
                self.community.add(key)
        else:
            insort(queue, state, key=_seq)
        if key in self.blocked:
            return  # no free agent for its class: no task of it can start before one frees
        # Older tasks of its class are deferred (nothing changed for them since): offer it alone.
        self._offer([state])

    def requeue(self, state: TaskState, failed_on: str) -> None:
        """Retry a task elsewhere after its attempt on ``failed_on`` failed or was lost."""
        state.exclude_agent(failed_on)
        self.submit(state)

    def kick(self, team: int, community_opt_in: bool) -> None:
        """An agent of ``team`` may have room: offer the classes it could serve again."""
        if not self.classes:
            return
        keys = set(self.by_team.get(team, ()))
        if community_opt_in:
            keys |= self.community
        self.blocked -= keys
        self._offer_classes(keys)

    def expire(self, at: float | None = None) -> None:
        """Deferrals due by now: offer their classes again (past the bound, they are placed).

        ``at``: the time of the wake that calls it (``None``: every wake due by now)."""
        now = self.clock()
        self.next_wake = math.inf
        if at is not None:
            self.wakes.discard(at)
        else:
            self.wakes = {t for t in self.wakes if t > now}
        keys = set()
        while self.expiries and self.expiries[0][0] <= now:
            _, _, state = heapq.heappop(self.expiries)
            if state.queued:
                keys.add(state.key)
        recheck = False
        while self.rechecks and self.rechecks[0] <= now:
            heapq.heappop(self.rechecks)
            recheck = True
        if recheck:  # a held slot opened: every waiting class may use it now
            self.blocked.clear()
            keys.update(self.classes)
        self._offer_classes(keys - self.blocked)
        self._schedule()

    # --- internals ----------------------------------------------------------------------------

    def _offer_classes(self, keys: Iterable[tuple[Any, ...]]) -> None:
        keys = [k for k in keys if k in self.classes]
        if not keys:
            return
        free = self.free_slots()
        if free <= 0:
            self.blocked.update(keys)
            return
        batch: list[TaskState] = []
        for key in keys:
            queue = self.classes[key]
            if self.policy.wait_s <= 0:
                # First come, first served: past the first `free` tasks none can start.
                batch.extend(queue[:free])
                continue
            taken: defaultdict[str | None, int] = defaultdict(int)
            for state in queue:
                model = state.task.model
                if taken[model] < free:
                    taken[model] += 1
                    batch.append(state)
        batch.sort(key=_seq)
        self._offer(batch)

    def _offer(self, batch: list[TaskState]) -> None:
        """Hand ``batch`` (queued tasks, oldest first) to the policy and act on its answers."""
        now = self.clock()
        outcomes = self._assign(batch, [s.request for s in batch], now)
        retry = []
        for state, (agent_id, until) in zip(batch, outcomes, strict=True):
            if agent_id is not None:
                self._dequeue(state)
                self.start(state, agent_id)
            elif until is not None:
                self._defer(state, until)
            elif state.exclude:
                retry.append(state)
            else:
                self.blocked.add(state.key)
        release = getattr(self.policy, "release_at", None)  # a Policy has it; a stand-in may not
        if self.classes and release is not None and (at := release()) is not None:
            self._recheck(at)
        if retry:
            outcomes = self._assign(retry, [s.plain_request for s in retry], now)
            for state, (agent_id, _) in zip(retry, outcomes, strict=True):
                if agent_id is not None:
                    self._dequeue(state)
                    self.start(state, agent_id)
                else:
                    self.blocked.add(state.key)

    def _assign(
        self, batch: list[TaskState], requests: list[DispatchRequest], now: float
    ) -> list[Outcome]:
        self.batches += 1
        self.picks += len(batch)
        keys: list[Hashable] = [s.key for s in batch]
        submitted = [s.submitted for s in batch]
        return self.policy.assign(self.fleet, requests, keys, submitted, now)

    def _defer(self, state: TaskState, until: float) -> None:
        """``state`` is held back until ``until`` (the policy's word): offer it again then."""
        self.deferrals += 1
        at = until + _EXPIRY_SLACK_S
        if state.expiry != at:  # deferred again within the same bound: already on the heap
            state.expiry = at
            heapq.heappush(self.expiries, (at, state.seq, state))
            self._schedule()

    def _recheck(self, at: float) -> None:
        """Offer the waiting classes again at ``at``, when a slot the policy held opens."""
        at += _EXPIRY_SLACK_S
        if not self.rechecks or at < self.rechecks[0]:
            heapq.heappush(self.rechecks, at)
            self._schedule()

    def _schedule(self) -> None:
        first = min(self.expiries[0][0] if self.expiries else math.inf,
                    self.rechecks[0] if self.rechecks else math.inf)  # fmt: skip
        if first < self.next_wake:
            self.next_wake = first
            if first not in self.wakes:
                self.wakes.add(first)
                self.wake(first)

    def _dequeue(self, state: TaskState) -> None:
        key = state.key
        queue = self.classes[key]
        i = bisect_left(queue, state.seq, key=_seq)
        assert queue[i] is state
        del queue[i]
        state.queued = False
        if not queue:
            del self.classes[key]
            self.by_team[key[0]].discard(key)
            self.community.discard(key)
            self.blocked.discard(key)
