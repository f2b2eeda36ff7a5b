"""The dispatcher loop: place each task now, or keep it waiting until capacity frees.

Nothing is ever dropped. A task that finds no eligible agent waits; waiting tasks are retried in
arrival order whenever an agent may have gained room (a task ended, an agent became ready).

Waiting tasks are grouped by *eligibility class*: team, pool, VRAM minimum and excluded agents
are everything that decides which agents are eligible in this simulation, so if the oldest task
of a class finds no agent, no younger task of that class can either. A retry therefore costs one
pick per class, not one per waiting task, and an agent that frees a slot only wakes the classes
it could serve (its own team's, plus every community-pool class when it has opted in).

A task whose attempt failed, or whose agent disconnected, is retried with that agent in
``exclude_agents``. If the exclusions leave no eligible agent, the dispatcher tries once more
without them: running on an agent that once failed beats waiting for ever (a one-agent team).
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from scoring import DispatchRequest, Fleet
from scoring.sim.agents import team_uuid
from scoring.sim.workload import Task


class Policy(Protocol):
    name: str

    def choose(self, fleet: Fleet, request: DispatchRequest, now: float) -> str | None: ...


@dataclass(eq=False, slots=True)
class TaskState:
    """A submitted task and what the dispatcher knows about it."""

    task: Task
    exclude: frozenset[str] = frozenset()
    attempts: int = 0
    _request: DispatchRequest | None = None
    _plain: DispatchRequest | None = None

    @property
    def request(self) -> DispatchRequest:
        if self._request is None:
            self._request = make_request(self.task, self.exclude)
        return self._request

    @property
    def plain_request(self) -> DispatchRequest:
        """The request without exclusions."""
        if self._plain is None:
            self._plain = self.request if not self.exclude else make_request(self.task)
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


def make_request(task: Task, exclude: frozenset[str] = frozenset()) -> DispatchRequest:
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
        exclude_agents=exclude,
        tie_key=f"task-{task.task_id}",
    )


class Dispatcher:
    """Places tasks with ``policy``; ``start(state, agent_id)`` runs a placed task.

    ``clock()`` gives the current time in seconds since the epoch (simulated).
    """

    def __init__(
        self,
        fleet: Fleet,
        policy: Policy,
        clock: Callable[[], float],
        start: Callable[[TaskState, str], None],
    ) -> None:
        self.fleet, self.policy, self.clock, self.start = fleet, policy, clock, start
        self.classes: dict[tuple[Any, ...], list[TaskState]] = {}
        self.by_team: defaultdict[int, set[tuple[Any, ...]]] = defaultdict(set)
        self.community: set[tuple[Any, ...]] = set()
        self.picks = 0

    @property
    def waiting(self) -> list[TaskState]:
        """Every waiting task, in arrival order."""
        return sorted((s for q in self.classes.values() for s in q), key=lambda s: s.seq)

    def submit(self, state: TaskState) -> None:
        """A new (or retried) task: place it now, or queue it in arrival order."""
        key = state.key
        queue = self.classes.get(key)
        if queue:  # older tasks of its class are waiting, so no agent is eligible for it either
            insort(queue, state, key=lambda s: s.seq)
        elif not self._try(state):
            self.classes[key] = [state]
            self.by_team[state.task.team].add(key)
            if state.task.pool == "community":
                self.community.add(key)

    def requeue(self, state: TaskState, failed_on: str) -> None:
        """Retry a task elsewhere after its attempt on ``failed_on`` failed or was lost."""
        state.exclude_agent(failed_on)
        self.submit(state)

    def kick(self, team: int, community_opt_in: bool) -> None:
        """An agent of ``team`` may have room: retry the classes it could serve, oldest first."""
        if not self.classes:
            return
        keys = set(self.by_team.get(team, ()))
        if community_opt_in:
            keys |= self.community
        heap = [(self.classes[k][0].seq, k) for k in keys]
        heapq.heapify(heap)
        while heap:
            _, key = heapq.heappop(heap)
            queue = self.classes[key]
            if not self._try(queue[0]):
                continue  # this class stays blocked; others may still fit
            queue.pop(0)
            if queue:
                heapq.heappush(heap, (queue[0].seq, key))
            else:
                self._drop(key)

    def _drop(self, key: tuple[Any, ...]) -> None:
        del self.classes[key]
        self.by_team[key[0]].discard(key)
        self.community.discard(key)

    def _try(self, state: TaskState) -> bool:
        now = self.clock()
        self.picks += 1
        agent_id = self.policy.choose(self.fleet, state.request, now)
        if agent_id is None and state.exclude:
            self.picks += 1
            agent_id = self.policy.choose(self.fleet, state.plain_request, now)
        if agent_id is None:
            return False
        self.start(state, agent_id)
        return True
