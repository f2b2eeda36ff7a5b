"""Experiments on cold placement: the engine's ``assign`` rules with another choice for cold loads.

When a run must load its model cold, the agent it loads on evicts a model (its caches are
full after the warm-up), so where it loads decides which models the fleet loses. The engine
places a cold run on its best-scoring free agent, which knows nothing about caches. The policies
here follow ``scoring.assign`` exactly (oldest first; a young request with its models cached on a
free eligible agent takes the best-scoring of those; one whose models are cached only on busy
agents of its pool is deferred; the young cold ones are placed last, warm-first), scoring with
:func:`scoring.rank_agents`, and change only the cold choice:

- ``score``: the best score (what the engine does; the emulation's check);
- ``room``: agents whose cache has room for one more model first (no eviction);
- ``fewest``: agents with the fewest models cached first (Ray Serve's fallback);
- ``lru``: the agent whose cache served a run least recently first (its models are the least
  in demand);
- ``spare``: agents with cache room first, then those whose next eviction (their least recently
  used model) loses a model with the most other copies in the fleet;

each then by score. They exist to gather evidence for the engine; ``python -m scoring.sim
--policies scorer,cold:lru,...`` runs them beside the others.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from scoring import DispatchRequest, Fleet, ScoringPolicy, rank_agents
from scoring.decision import RankedAgent
from scoring.pick import evaluate
from scoring.sim.policies import Outcome, Policy

COLD_RULES = ("score", "room", "fewest", "lru", "spare")


class ColdRule(Policy):
    """``scoring.assign``'s rules with ``rule`` choosing where cold loads go (module docstring)."""

    def __init__(self, policy: ScoringPolicy, seed: int = 0, rule: str = "score") -> None:
        super().__init__(policy, seed)
        if rule not in COLD_RULES:
            raise ValueError(f"unknown cold rule {rule!r} (expected one of {COLD_RULES})")
        self.rule, self.name = rule, f"cold:{rule}"
        self.wait_s = policy.locality_wait_s
        self.last_used: dict[str, float] = {}

    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        out: list[Outcome] = [(None, False)] * len(requests)
        later = []
        view = self.view.agents
        for i, (request, at) in enumerate(zip(requests, submitted, strict=True)):
            models = request.required_models
            if self.wait_s == 0 or not models or now - at >= self.wait_s:
                out[i] = self._place(fleet, request, now)
                continue
            ranked = rank_agents(fleet, request, self.policy, now, k=len(fleet))
            warm = [r for r in ranked if models <= view[r.agent_id].cached]
            if warm:
                out[i] = self._take(fleet, warm[0].agent_id, request, now)
            elif self._busy_warm(fleet, request, now):
                out[i] = (None, True)
            else:
                later.append(i)
        for i in later:
            out[i] = self._place(fleet, requests[i], now)
        return out

    def _place(self, fleet: Fleet, request: DispatchRequest, now: float) -> Outcome:
        ranked = rank_agents(fleet, request, self.policy, now, k=len(fleet))
        if not ranked:
            return (None, False)
        models = request.required_models
        view = self.view.agents
        if models and not models <= view[ranked[0].agent_id].cached:
            chosen = self._cold(ranked)
        else:
            chosen = ranked[0].agent_id  # the best is warm (or nothing to load): as the engine
        return self._take(fleet, chosen, request, now)

    def _cold(self, ranked: list[RankedAgent]) -> str:
        view = self.view.agents
        if self.rule == "score":
            return ranked[0].agent_id
        if self.rule == "room":
            room = [
                r for r in ranked
                if len(view[r.agent_id].cached) + len(view[r.agent_id].loading)
                < view[r.agent_id].cache_size
            ]  # fmt: skip
            return (room or ranked)[0].agent_id
        if self.rule == "fewest":
            fewest = min(len(view[r.agent_id].cached) for r in ranked)
            return next(r.agent_id for r in ranked if len(view[r.agent_id].cached) == fewest)
        if self.rule == "spare":
            copies: dict[str | None, int] = {None: 1 << 20}  # room: nothing is lost

            def spare(r: RankedAgent) -> int:
                victim = self.view.victim(r.agent_id)
                if victim not in copies:
                    copies[victim] = sum(victim in a.cached for a in view.values())
                return copies[victim]

            return max(ranked, key=spare).agent_id  # max keeps the best-ranked of equals
        # lru: ranked is best first, and min keeps the first of equal ages
        return min(ranked, key=lambda r: self.last_used.get(r.agent_id, -1.0)).agent_id

    def _take(self, fleet: Fleet, agent_id: str, request: DispatchRequest, now: float) -> Outcome:
        self._reserve(fleet, agent_id, request, now)
        if request.required_models:
            self.last_used[agent_id] = now
        return (agent_id, False)

    def _busy_warm(self, fleet: Fleet, request: DispatchRequest, now: float) -> bool:
        view = self.view.agents
        models = request.required_models
        return any(
            r == ["capacity"] and models <= view[a].cached
            for a, (r, _) in evaluate(fleet, request, self.policy, now).items()
        )
