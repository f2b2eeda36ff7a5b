"""What the dispatcher knows about each agent besides the fleet's eligibility: its dispatcher view.

The anchors rank the engine's eligible agents by what a router of their kind reads from its
replicas: how many tasks an agent runs, which models it reported cached, how many models its
cache holds, and which models it was sent to load. Reading those back from the fleet with
``Fleet.get`` would rebuild a pydantic record per agent per pick, so the simulation keeps this
mirror instead, updated at exactly the moments it updates the fleet (connect, reserve, release,
cache report). It never decides eligibility: that is always the engine's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: What a router expects a cold load to take when it has nothing better: the trace's median
#: base-model load time (seconds), as :data:`scoring.sim.trace.LOAD_MEDIAN_S`.
LOAD_ESTIMATE_S = 22.7


@dataclass(slots=True)
class AgentView:
    """One agent as the dispatcher sees it."""

    capacity: int
    region: str | None
    cache_size: int
    team: int
    community_opt_in: bool
    running: int = 0
    ready: bool = False  # idle or busy as last reported
    cached: frozenset[str] = frozenset()
    #: Models the dispatcher sent this agent to load and not yet reported cached -> when it
    #: expects each to be ready (dispatch time plus :data:`LOAD_ESTIMATE_S`).
    loading: dict[str, float] = field(default_factory=dict)
    #: When the dispatcher last sent this agent a run of each model (its caches evict the least
    #: recently used model, so this orders its cache as the agent does).
    used: dict[str, float] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.capacity - self.running if self.ready else 0


class FleetView:
    """The dispatcher's view of every agent, keyed by agent id."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentView] = {}
        self._free = 0  # sum of every agent's free slots, kept at each change (free_slots)

    def __getitem__(self, agent_id: str) -> AgentView:
        return self.agents[agent_id]

    def connect(
        self,
        agent_id: str,
        capacity: int,
        region: str | None,
        cache_size: int,
        team: int,
        community_opt_in: bool,
        models: Iterable[str],
    ) -> None:
        """A (re)connected agent: nothing running, syncing, its cache as reported."""
        old = self.agents.get(agent_id)
        self._free -= old.free if old is not None else 0
        self.agents[agent_id] = AgentView(
            capacity, region, cache_size, team, community_opt_in, cached=frozenset(models)
        )  # not ready: no free slot yet

    def set_ready(self, agent_id: str, ready: bool) -> None:
        agent = self.agents[agent_id]
        self._free -= agent.free
        agent.ready = ready
        self._free += agent.free

    def reserve(self, agent_id: str, models: Iterable[str], now: float) -> None:
        """One more task on ``agent_id``; models it lacks start loading there."""
        agent = self.agents[agent_id]
        self._free -= agent.free
        agent.running += 1
        self._free += agent.free
        for model in models:
            agent.used[model] = now
            if model not in agent.cached and model not in agent.loading:
                agent.loading[model] = now + LOAD_ESTIMATE_S

    def release(self, agent_id: str) -> None:
        agent = self.agents[agent_id]
        self._free -= agent.free
        agent.running = max(agent.running - 1, 0)
        self._free += agent.free

    def report_cache(self, agent_id: str, models: Iterable[str]) -> None:
        agent = self.agents[agent_id]
        agent.cached = frozenset(models)
        for model in agent.cached:
            agent.loading.pop(model, None)

    def victim(self, agent_id: str) -> str | None:
        """The model ``agent_id`` would evict for one more (the least recently sent of its
        cache), or ``None`` when its cache has room."""
        agent = self.agents[agent_id]
        if len(agent.cached) + len(agent.loading) < agent.cache_size:
            return None
        return min(agent.cached, key=lambda m: (agent.used.get(m, -1.0), m), default=None)

    def free_slots(self) -> int:
        """Free slots of ready agents: an upper bound on how many tasks could be placed now
        (an agent that went silent still counts until its record turns stale).

        Kept as agents change rather than summed per call (one sum over the fleet per offer);
        equal to ``sum(a.free for a in self.agents.values())``, which the tests check."""
        return self._free
