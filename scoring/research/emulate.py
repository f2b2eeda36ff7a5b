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

each then by score. They exist to gather evidence for the engine; ``python -m
scoring.research.emulate --policies scorer,cold:lru,...`` runs them beside the others (the
simulator's command line, with this family of policies registered: the simulator never imports
this package).

This restates ``assign``'s rules, so ``score`` is tested equal to ``scoring.assign`` on random
small fleets and queues (``tests/test_research_emulate.py``), the ``deferrals_per_slot`` cap and
the rule for stamps after ``now`` included.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from scoring import DispatchRequest, Fleet, ScoringPolicy, rank_agents
from scoring.assign import deferral_ends
from scoring.decision import RankedAgent
from scoring.pick import evaluate
from scoring.sim.catalog import register_family
from scoring.sim.policies import Outcome, Policy

COLD_RULES = ("score", "room", "fewest", "lru", "spare")
#: The prefix of this family's names in the simulator's catalogue (``cold:lru``).
PREFIX = "cold:"

#: One request's raw outcome: (agent id or None, deferred, free eligible agents when considered).
Raw = tuple[str | None, bool, int]


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
        # As the scorer reports it: deferred with no free eligible agent at all is "no room".
        raw = self.decide(fleet, requests, submitted, now)
        return [
            (a, deferral_ends(at, self.wait_s) if d and n > 0 else None)
            for (a, d, n), at in zip(raw, submitted, strict=True)
        ]

    def decide(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        submitted: Sequence[float],
        now: float,
    ) -> list[Raw]:
        """``assign``'s two passes over ``requests`` (oldest first) with this cold rule: one
        :data:`Raw` outcome per request."""
        out: list[Raw] = [(None, False, 0)] * len(requests)
        later = []
        view = self.view.agents
        deferred: Counter[tuple[Any, ...]] = Counter()  # per kind, in this call
        for i, (request, at) in enumerate(zip(requests, submitted, strict=True)):
            models = request.required_models
            age = now - at  # a stamp after now is never young (scoring.assign)
            if not models or not 0.0 <= age < self.wait_s:
                out[i] = self._place(fleet, request, now)
                continue
            ranked = rank_agents(fleet, request, self.policy, now, k=len(fleet))
            warm = [r for r in ranked if models <= view[r.agent_id].cached]
            if warm:
                out[i] = self._take(fleet, warm[0].agent_id, request, now, len(ranked))
                continue
            slots = self._busy_warm_slots(fleet, request, now)
            if deferred[request.kind] < self.policy.deferrals_per_slot * slots:
                deferred[request.kind] += 1
                out[i] = (None, True, len(ranked))
            else:
                later.append(i)
        for i in later:
            out[i] = self._place(fleet, requests[i], now)
        return out

    def _place(self, fleet: Fleet, request: DispatchRequest, now: float) -> Raw:
        ranked = rank_agents(fleet, request, self.policy, now, k=len(fleet))
        if not ranked:
            return (None, False, 0)
        models = request.required_models
        view = self.view.agents
        if models and not models <= view[ranked[0].agent_id].cached:
            chosen = self._cold(ranked)
        else:
            chosen = ranked[0].agent_id  # the best is warm (or nothing to load): as the engine
        return self._take(fleet, chosen, request, now, len(ranked))

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

    def _take(
        self, fleet: Fleet, agent_id: str, request: DispatchRequest, now: float, eligible: int
    ) -> Raw:
        self._reserve(fleet, agent_id, request, now)
        if request.required_models:
            self.last_used[agent_id] = now
        return (agent_id, False, eligible)

    def _busy_warm_slots(self, fleet: Fleet, request: DispatchRequest, now: float) -> int:
        """The busy slots of the pool's agents with the request's models cached that fail only
        ``capacity``: each frees when its run ends (what a deferral waits for)."""
        view = self.view.agents
        models = request.required_models
        return sum(
            view[a].running
            for a, (r, _) in evaluate(fleet, request, self.policy, now).items()
            if r == ["capacity"] and models <= view[a].cached
        )


def _cold_rule(policy: ScoringPolicy, seed: int, rule: str) -> ColdRule:
    return ColdRule(policy, seed, rule)


register_family(PREFIX, COLD_RULES, _cold_rule)


def main(argv: Sequence[str] | None = None) -> int:
    """The simulator's command line with the ``cold:`` policies available."""
    from scoring.sim.cli import main as simulate

    return simulate(argv)


if __name__ == "__main__":
    sys.exit(main())
