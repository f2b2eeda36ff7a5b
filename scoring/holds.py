"""Slot holds: a dispatcher's rule for freshly freed slots, on top of :func:`scoring.assign`.

While the queue is longer than the free slots, a slot that has just freed goes to whichever
queued run the dispatcher looks at first, and a run that must load its model there evicts a model
the next runs may have wanted. Two holds keep such a slot for a moment:

- **for warm runs** (every dispatcher): for :data:`HOLD_S` after an agent's count last changed
  while it had a free slot, a run with required models may take that slot only if all of them are
  cached there. ``assign`` defers a young run for a warm agent that is busy; this is the same idea
  from the slot's side, for runs past their wait and runs with no warm agent anywhere. Runs with
  no required models load nothing and are never held back by it.
- **for the agent's owner** (several dispatcher replicas on one database): each agent has one
  owner among the live replicas (rendezvous hashing of the agent and replica ids, so a replica
  that goes moves only its own agents). For :data:`GRACE_S` after the same moment, another
  replica leaves the slot to the owner's runs, warm runs excepted. Otherwise every replica fills
  the same few free slots at once and all but one lose the race (``scoring.server.shares``).

After its hold a slot is anyone's: a hold delays a placement by at most a second, never forever.
The hold for warm runs starts again at a change of the agent's count only after it has been open
for as long as it was held (so an agent whose count keeps changing while it has free slots is
open to every run at least half the time, in windows of at least :data:`HOLD_S`), and a clock
stepped back ends every hold instead of stretching it until the clock catches up.
The owner's grace applies only while the queue is longer than the free slots (the races it
prevents need that); the hold for warm runs always (a cold run then takes a slot that has been
free a while, when there is one, rather than the one a warm run may be about to want). Holds
are exclusions added to the requests (:func:`restrict`), so ``assign`` itself is unchanged and
still groups requests of one template.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from scoring.fleet import Fleet
from scoring.hashing import stable_hash64
from scoring.models import MAX_EXCLUDED, DispatchRequest

#: Seconds a freshly freed slot is open only to runs with their models cached there (measured on
#: the trace: README, "Slot holds"; not tuned, one sync period of replicas times four).
HOLD_S = 1.0
#: Seconds another replica leaves a freshly freed slot to its owner (four syncs of 0.25 s: the
#: owner has learnt of the slot by then, and its next round takes it when it has a run for it).
GRACE_S = 1.0


def free_slots(fleet: Fleet) -> int:
    """Free slots in the fleet (a queue longer than this is one that holds apply to)."""
    c = fleet.columns
    return int((c.gpu_capacity.astype(np.int64) - c.running_count).clip(min=0).sum())


def owner(agent_id: str, replicas: Sequence[str]) -> str:
    """The replica that owns ``agent_id``: the highest hash of (replica, agent) wins."""
    return max(replicas, key=lambda r: stable_hash64(f"{r}\x00{agent_id}"))


class Held(NamedTuple):
    """Agents with a free slot held now: ``fresh`` from runs that would load a model there,
    ``foreign`` (another replica's) from every run without all its models cached there."""

    fresh: frozenset[str] = frozenset()
    foreign: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.fresh or self.foreign)


class SlotHolds:
    """One dispatcher's holds: when each free slot last changed, and who owns which agent.

    :meth:`update` gives it the live replicas (just itself for a lone dispatcher) and whether the
    queue is longer than the free slots (the owner's grace needs both); :meth:`held` is called
    before each placement, with the Fleet about to be placed on, under the lock that orders the
    Fleet's changes.
    """

    def __init__(
        self, replica_id: str = "dispatcher", hold_s: float = HOLD_S, grace_s: float = GRACE_S
    ) -> None:
        self.replica_id = replica_id
        self.hold_s = hold_s
        self.grace_s = grace_s
        self._replicas: tuple[str, ...] = (replica_id,)
        self._saturated = False
        self._owners: dict[str, bool] = {}  # agent id -> owned by another replica
        self._free_since: dict[str, tuple[int, float]] = {}  # agent -> (count, seen since)
        self._fresh_from: dict[str, float] = {}  # agent -> start of its hold for warm runs
        self._release: float | None = None
        self._lock = threading.Lock()

    def update(self, replicas: Iterable[str], saturated: bool) -> None:
        """The live replicas (this one is always among them) and the queue's state."""
        live = tuple(sorted({*replicas, self.replica_id}))
        with self._lock:
            if live != self._replicas:
                self._replicas, self._owners = live, {}
            self._saturated = saturated

    def held(self, fleet: Fleet, now: float) -> Held:
        """The agents held now (see :class:`Held`)."""
        with self._lock:
            replicas, saturated = self._replicas, self._saturated
        since = self._free_since
        columns = fleet.columns
        free_rows = np.flatnonzero(columns.running_count < columns.gpu_capacity)
        counts = columns.running_count[free_rows].tolist()
        free = {
            fleet.agent_id_at(row): n for row, n in zip(free_rows.tolist(), counts, strict=True)
        }
        fresh_from, hold_s = self._fresh_from, self.hold_s
        for agent in list(since):
            if agent not in free:
                del since[agent]
                fresh_from.pop(agent, None)
        for agent, n in free.items():
            # The owner's grace runs from the last change of the agent's count seen free: an
            # owner that keeps the agent busy changes it between syncs, one with no use for it
            # not. The hold for warm runs starts there too, but not again until it has been
            # open for as long as it was held: a count that keeps changing on an agent with
            # free slots would otherwise hold them from cold runs for good.
            if since.get(agent, (None, 0.0))[0] != n:
                since[agent] = (n, now)
                start = fresh_from.get(agent)
                if start is None or not 0.0 <= now - start < 2 * hold_s:
                    fresh_from[agent] = now
        # A time before a hold's start (a clock stepped back) ends the hold: held only while
        # 0 <= now - start < its length, so no hold outlasts its length whatever the clock does.
        fresh = frozenset(a for a in free if 0.0 <= now - fresh_from[a] < hold_s)
        ends = [fresh_from[a] + hold_s for a in fresh]
        foreign: frozenset[str] = frozenset()
        if len(replicas) > 1 and saturated:
            foreign = frozenset(
                a for a in free
                if 0.0 <= now - since[a][1] < self.grace_s and self._foreign(a, replicas)
            )  # fmt: skip
            ends += [since[a][1] + self.grace_s for a in foreign]
        self._release = min(ends, default=None)
        return Held(fresh, foreign)

    def release_at(self) -> float | None:
        """When the first slot held at the last :meth:`held` opens to every run (``None``: none
        was held)."""
        return self._release

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
    fleet: Fleet, requests: Sequence[DispatchRequest], held: Held
) -> list[DispatchRequest]:
    """The requests with the agents held from them excluded (see :class:`Held`); an agent with all
    of a request's required models cached is never held from it. Requests that share a template
    share their copy's exclusions, so they still share one scan in ``assign``. A request keeps at
    most ``MAX_EXCLUDED`` exclusions: past that, held agents stay open to it."""
    if not held:
        return list(requests)
    agents = held.fresh | held.foreign
    models = {agent: fleet.cached_models(agent) for agent in agents}
    by_template: dict[tuple[object, ...], frozenset[str]] = {}
    out = []
    for r in requests:
        extra = by_template.get(r.template)
        if extra is None:
            needed = r.required_models
            candidates = agents if needed else held.foreign
            already = r.exclude_agents
            cold = sorted(a for a in candidates - already if not (needed and needed <= models[a]))
            extra = by_template[r.template] = frozenset(
                cold[: MAX_EXCLUDED - len(r.exclude_agents)]
            )
        out.append(r.excluding(extra) if extra else r)
    return out
