"""Dispatch policies compared by the simulation: the engine, four classic baselines and four
anchors that know about model caches (DESIGN section 9).

Every policy answers one question for a batch of waiting requests, oldest first: "which agent
runs each of these now, which ones wait for a warm agent, and which find no room?" (see
:meth:`Policy.assign`). All of them use the engine's own eligibility: the scorer through
``scoring.assign``, the others
through :func:`scoring.pick.eligible_agents`, which returns exactly the agents that pass every
hard filter (same heartbeat timeout). Only the choice among the eligible differs, so a difference
in the metrics is a difference in choosing (and, for ``delay`` and the scorer, in waiting), never
in filtering. What the anchors read about an agent besides eligibility (tasks running, models
cached or being loaded, cache size, region) comes from the dispatcher's view
(:mod:`scoring.sim.view`), as a router of their kind reads it from its replicas.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from scoring import DispatchRequest, Fleet, ScoringPolicy, assign
from scoring.assign import deferral_ends
from scoring.holds import HOLD_S, SlotHolds, restrict
from scoring.pick import eligible_agents, evaluate
from scoring.sim.view import LOAD_ESTIMATE_S, AgentView, FleetView

#: Names accepted by :func:`make_policy` (and the CLI's ``--policies``).
POLICY_NAMES = (
    "scorer", "random", "round_robin", "least_loaded", "p2c", "multiplex", "gie", "startup",
    "delay",
)  # fmt: skip
#: The anchors: what a platform team would otherwise adopt (DESIGN section 9).
ANCHORS = ("multiplex", "gie", "startup", "delay")

#: One request's outcome: (agent id or None, when its deferral ends or None). A placed request
#: has an agent; a deferred one the time (seconds since the epoch) from which it is no longer
#: held back, as the library states it (``Decision.deferred_until``, ``scoring.deferral_ends``);
#: one with neither found no free eligible agent.
Outcome = tuple[str | None, float | None]
_NONE: Outcome = (None, None)


class Policy(ABC):
    """A dispatch policy: places a batch of waiting requests and reserves their slots.

    ``bind`` gives it the dispatcher's view before a run; ``assign`` is called whenever capacity
    may have changed, with requests in submission order (oldest first).
    """

    name = "policy"
    #: Seconds a request may be held back for a warm agent (0: never deferred).
    wait_s = 0.0

    def __init__(self, policy: ScoringPolicy, seed: int = 0) -> None:
        self.policy = policy  # the hard-filter settings (heartbeat timeout); the scorer's weights
        self.rng = np.random.default_rng([seed, 37])
        self.view = FleetView()
        self.transfer: Callable[[str | None, str | None], float] = lambda a, b: 0.0

    def bind(self, view: FleetView, transfer: Callable[[str | None, str | None], float]) -> None:
        """Use ``view`` for what agents run and hold, ``transfer`` for region delays."""
        self.view, self.transfer = view, transfer

    @abstractmethod
    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        """One :data:`Outcome` per request, in order: placed on an agent (slot reserved), deferred
        (until when), or neither (no free eligible agent).

        ``keys[i]`` is request i's eligibility class: requests of one class have the same
        eligible agents, so once one of them finds none, the later ones need not look.
        ``submitted[i]`` is when request i was submitted (seconds since the epoch).
        """

    def release_at(self) -> float | None:
        """When a slot this policy held back at its last :meth:`assign` opens to every run
        (``None``: nothing held); the dispatcher offers its waiting runs again then."""
        return None

    def _reserve(self, fleet: Fleet, agent_id: str, request: DispatchRequest, now: float) -> None:
        fleet.reserve(agent_id)  # one more running, busy: as Fleet.dispatch does for its pick
        self.view.reserve(agent_id, request.required_models, now)


class Scorer(Policy):
    """The engine with its policy, as the API server's dispatch loop runs it: ``scoring.assign``
    on the batch (warm-first, deferring up to ``policy.locality_wait_s``), with freshly freed
    slots held for warm runs for ``hold_s`` while the batch outnumbers the free slots
    (:mod:`scoring.holds`; ``hold_s=0``: no hold)."""

    name = "scorer"

    def __init__(
        self, policy: ScoringPolicy, seed: int = 0, name: str = "scorer", hold_s: float = HOLD_S
    ) -> None:
        super().__init__(policy, seed)
        self.name = name
        self.wait_s = policy.locality_wait_s
        self.holds = SlotHolds(hold_s=hold_s) if hold_s > 0 else None

    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        if self.holds is not None:
            # One dispatcher, no other replica: whether the queue outnumbers the free slots
            # only matters to the owner's grace among replicas (scoring.holds), so it is not
            # counted (a scan of the fleet per call).
            requests = restrict(fleet, requests, self.holds.held(fleet, now))
        decisions = assign(fleet, list(requests), self.policy, now=now)
        # Held back while no agent at all is free for it: to the dispatcher that is "no room"
        # (its class waits for capacity instead of being offered on every event).
        out = [(d.agent_id, d.deferred_until if d.eligible > 0 else None) for d in decisions]
        for request, (agent_id, _) in zip(requests, out, strict=True):
            if agent_id is not None:
                self.view.reserve(agent_id, request.required_models, now)
        return out

    def release_at(self) -> float | None:
        return None if self.holds is None else self.holds.release_at()


class Chooser(Policy):
    """A policy that places requests first come, first served, each on one of the engine's
    eligible agents chosen by a rule of its own (:meth:`pick`)."""

    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        out: list[Outcome] = []
        blocked: set[Hashable] = set()
        for request, key in zip(requests, keys, strict=True):
            if key in blocked:
                out.append(_NONE)
                continue
            eligible = eligible_agents(fleet, request, self.policy, now)
            if not eligible:
                blocked.add(key)
                out.append(_NONE)
                continue
            # A fixed order (by id), so that the rule alone, not the fleet's row order, decides.
            eligible.sort()
            agent_id = self.pick(eligible, request, now)
            self._reserve(fleet, agent_id, request, now)
            out.append((agent_id, None))
        return out

    @abstractmethod
    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        """The id of one of the ``eligible`` agents (sorted by id, never empty)."""

    # --- helpers shared by the rules --------------------------------------------------------

    def _random(self, ids: Sequence[str]) -> str:
        return ids[int(self.rng.integers(len(ids)))] if len(ids) > 1 else ids[0]

    def _least_loaded(self, ids: Sequence[str]) -> str:
        """The largest free share of slots; ties at random."""
        view = self.view.agents
        load = [view[a].running / view[a].capacity for a in ids]
        best = min(load)
        return self._random([a for a, x in zip(ids, load, strict=True) if x == best])

    def _two_choices(self, ids: Sequence[str], load: Callable[[AgentView], float]) -> str:
        """Two distinct agents at random; the one with the lower ``load`` (random on a tie)."""
        if len(ids) == 1:
            return ids[0]
        i, j = self.rng.choice(len(ids), 2, replace=False)  # a random order as well
        a, b = self.view.agents[ids[int(i)]], self.view.agents[ids[int(j)]]
        return ids[int(j)] if load(b) < load(a) else ids[int(i)]


class RandomChoice(Chooser):
    """Any eligible agent, uniformly at random."""

    name = "random"

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        return self._random(eligible)


class RoundRobin(Chooser):
    """The first eligible agent after the last one chosen, in agent-id order."""

    name = "round_robin"

    def __init__(self, policy: ScoringPolicy, seed: int = 0) -> None:
        super().__init__(policy, seed)
        self.last = ""

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        self.last = next((a for a in eligible if a > self.last), eligible[0])
        return self.last


class LeastLoaded(Chooser):
    """The eligible agent with the largest free share of its slots; ties at random."""

    name = "least_loaded"

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        return self._least_loaded(eligible)


class PowerOfTwo(Chooser):
    """Two eligible agents at random; the one with the larger free share of its slots."""

    name = "p2c"

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        return self._two_choices(eligible, lambda a: a.running / a.capacity)


class Multiplex(Chooser):
    """Ray Serve model multiplexing, with its defaults (``PowerOfTwoChoicesRequestRouter`` with
    ``MultiplexMixin``, Ray 2.x): power of two choices by queue length (tasks running) among the
    eligible agents that have the request's model loaded; when none of them can take it, among
    the eligible agents with the fewest models loaded.

    Ray first offers a request only to replicas holding its model; a full replica rejects it and
    the router retries (after a backoff of tens of milliseconds) with the fewest-models
    replicas, and only after its matching timeout (1 s by default) with every replica. Here the
    offer and the retry happen at the same simulated instant among agents with a free slot, so
    the timeout never binds.
    """

    name = "multiplex"

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        models = request.required_models
        view = self.view.agents
        candidates = eligible
        if models:
            warm = [a for a in eligible if models <= view[a].cached]
            if warm:
                candidates = warm
            else:
                counts = [len(view[a].cached) for a in eligible]
                fewest = min(counts)
                candidates = [a for a, c in zip(eligible, counts, strict=True) if c == fewest]
        return self._two_choices(candidates, lambda a: a.running)


class GatewayInference(Chooser):
    """The Kubernetes Gateway API Inference Extension's default scorer profile, mapped to agents:
    ``2 x queue + 2 x utilisation + 3 x model affinity``, the highest total wins, random ties
    (``max-score-picker``).

    - queue (``queue-scorer``): ``(max q - q) / (max q - min q)`` over the candidates, 1.0 when
      all are equal; an agent's queue is the tasks it runs (agents hold no queue of their own);
    - utilisation (``kv-cache-utilization-scorer``): ``1 - running / slots``;
    - model affinity (``lora-affinity-scorer``): 1.0 when the model is cached; else 0.8 when the
      cache has room for one more model (cached plus loading below its size); else 0.6 when the
      model is already being loaded there; else 0.
    """

    name = "gie"
    WEIGHTS = (2.0, 2.0, 3.0)  # queue, utilisation, affinity

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        view = self.view.agents
        agents = [view[a] for a in eligible]
        queue = [a.running for a in agents]
        lo, hi = min(queue), max(queue)
        wq, wu, wa = self.WEIGHTS
        models = request.required_models
        best, ties = -math.inf, []
        for agent_id, agent, q in zip(eligible, agents, queue, strict=True):
            score = wq * ((hi - q) / (hi - lo) if hi > lo else 1.0)
            score += wu * (1.0 - agent.running / agent.capacity)
            score += wa * _affinity(agent, models)
            if score > best:
                best, ties = score, [agent_id]
            elif score == best:
                ties.append(agent_id)
        return self._random(ties)


def _affinity(agent: AgentView, models: frozenset[str]) -> float:
    if not models or models <= agent.cached:
        return 1.0
    if len(agent.cached) + len(agent.loading) < agent.cache_size:
        return 0.8
    if models <= agent.cached | agent.loading.keys():
        return 0.6
    return 0.0


class Startup(Chooser):
    """ServerlessLLM's startup-time-optimised scheduling (Fu et al., OSDI 2024): the eligible
    agent with the lowest estimated startup time, random ties. The estimate is the transfer
    delay between the submitter's and the agent's regions plus, for a model not cached there,
    the time left of a load already under way or else a full load (the trace's median, 22.7 s).
    ServerlessLLM also queues loads per server; agents here load models in parallel.
    """

    name = "startup"

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        view = self.view.agents
        models = request.required_models
        region = request.submitter_region
        best, ties = math.inf, []
        for agent_id in eligible:
            agent = view[agent_id]
            load = 0.0
            for model in models - agent.cached:
                ready = agent.loading.get(model)
                load = max(load, LOAD_ESTIMATE_S if ready is None else max(ready - now, 0.0))
            estimate = self.transfer(region, agent.region) + load
            if estimate < best:
                best, ties = estimate, [agent_id]
            elif estimate == best:
                ties.append(agent_id)
        return self._random(ties)


class Delay(Chooser):
    """Delay scheduling (Zaharia et al., EuroSys 2010) over least loaded.

    Requests are offered the free slots in submission order. One whose models are cached on a
    free eligible agent runs on the least loaded of those. One that would load cold is skipped
    (deferred) while it has waited less than ``wait_s`` and an agent of its pool that passes
    every filter but capacity has its models cached; the slot goes to a later request instead.
    Past the bound it runs on the least loaded eligible agent. ``wait_s`` is the scorer's
    ``locality_wait_s``: the same waiting budget, so only the choosing differs.
    """

    name = "delay"

    def __init__(self, policy: ScoringPolicy, seed: int = 0, wait_s: float | None = None) -> None:
        super().__init__(policy, seed)
        self.wait_s = policy.locality_wait_s if wait_s is None else float(wait_s)

    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        out: list[Outcome] = []
        blocked: set[Hashable] = set()
        capable: dict[Hashable, list[str]] = {}  # per class: agents failing at most capacity
        view = self.view.agents
        for request, key, at in zip(requests, keys, submitted, strict=True):
            if key in blocked:
                out.append(_NONE)
                continue
            eligible = eligible_agents(fleet, request, self.policy, now)
            if not eligible:
                blocked.add(key)
                out.append(_NONE)
                continue
            eligible.sort()
            models = request.required_models
            warm = [a for a in eligible if models <= view[a].cached] if models else eligible
            if warm:
                agent_id = self._least_loaded(warm)
            elif now - at < self.wait_s and self._warm_elsewhere(fleet, request, key, capable, now):
                out.append((None, deferral_ends(at, self.wait_s)))
                continue
            else:
                agent_id = self._least_loaded(eligible)
            self._reserve(fleet, agent_id, request, now)
            out.append((agent_id, None))
        return out

    def _warm_elsewhere(
        self,
        fleet: Fleet,
        request: DispatchRequest,
        key: Hashable,
        capable: dict[Hashable, list[str]],
        now: float,
    ) -> bool:
        """Whether an agent that fails no filter but capacity has the request's models."""
        if key not in capable:
            reasons = evaluate(fleet, request, self.policy, now)
            capable[key] = [a for a, (r, _) in reasons.items() if not r or r == ["capacity"]]
        view = self.view.agents
        return any(request.required_models <= view[a].cached for a in capable[key])

    def pick(self, eligible: list[str], request: DispatchRequest, now: float) -> str:
        return self._least_loaded(eligible)  # unused: assign decides


_CHOOSERS: dict[str, type[Chooser]] = {
    c.name: c
    for c in (RandomChoice, RoundRobin, LeastLoaded, PowerOfTwo, Multiplex, GatewayInference,
              Startup, Delay)
}  # fmt: skip
