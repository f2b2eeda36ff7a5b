"""Dispatch policies compared by the simulation: the scorer and four baselines.

Every policy answers one question, "which agent runs this request now?", and reserves a slot on
it. All of them use the engine's own eligibility: the scorer through :meth:`Fleet.dispatch`, the
baselines through :func:`scoring.rank_agents` with ``k=len(fleet)``, which returns exactly the
eligible agents (same hard filters, same heartbeat timeout). Only the choice among the eligible
differs, so a difference in the metrics is a difference in choosing, never in filtering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from scoring import DispatchRequest, Fleet, ScoringPolicy, rank_agents
from scoring.decision import RankedAgent

#: Names accepted by :func:`make_policy` (and the CLI's ``--policies``).
POLICY_NAMES = ("scorer", "random", "round_robin", "least_loaded", "p2c")


class Scorer:
    """The engine: best weighted score, picked and reserved atomically by ``Fleet.dispatch``."""

    def __init__(self, policy: ScoringPolicy, name: str = "scorer") -> None:
        self.policy, self.name = policy, name

    def choose(self, fleet: Fleet, request: DispatchRequest, now: float) -> str | None:
        return fleet.dispatch(request, self.policy, now=now).agent_id


class Baseline(ABC):
    """A policy that picks among the engine's eligible agents by a rule of its own."""

    name = "baseline"

    def __init__(self, policy: ScoringPolicy, seed: int = 0) -> None:
        self.policy = policy  # only its hard-filter settings (heartbeat timeout) matter here
        self.rng = np.random.default_rng([seed, 37])

    def choose(self, fleet: Fleet, request: DispatchRequest, now: float) -> str | None:
        eligible = rank_agents(fleet, request, self.policy, now=now, k=len(fleet))
        if not eligible:
            return None
        # A fixed order, so that the rule alone (not the scorer's ranking) decides.
        eligible.sort(key=lambda r: r.agent_id)
        agent_id = self.pick(eligible)
        fleet.reserve(agent_id)  # one more running, busy: as Fleet.dispatch does for its pick
        return agent_id

    @abstractmethod
    def pick(self, eligible: Sequence[RankedAgent]) -> str:
        """The id of one of the ``eligible`` agents (sorted by id)."""


class RandomChoice(Baseline):
    name = "random"

    def pick(self, eligible: Sequence[RankedAgent]) -> str:
        return eligible[int(self.rng.integers(len(eligible)))].agent_id


class RoundRobin(Baseline):
    """The first eligible agent after the last one chosen, in agent-id order."""

    name = "round_robin"

    def __init__(self, policy: ScoringPolicy, seed: int = 0) -> None:
        super().__init__(policy, seed)
        self.last = ""

    def pick(self, eligible: Sequence[RankedAgent]) -> str:
        after = [r.agent_id for r in eligible if r.agent_id > self.last]
        self.last = after[0] if after else eligible[0].agent_id
        return self.last


class LeastLoaded(Baseline):
    """The eligible agent with the largest free share of its slots; ties at random."""

    name = "least_loaded"

    def pick(self, eligible: Sequence[RankedAgent]) -> str:
        best = max(r.factors["load"] for r in eligible)
        ties = [r for r in eligible if r.factors["load"] == best]
        return ties[int(self.rng.integers(len(ties)))].agent_id


class PowerOfTwo(Baseline):
    """Two eligible agents at random; the less loaded of them (the first on a tie)."""

    name = "p2c"

    def pick(self, eligible: Sequence[RankedAgent]) -> str:
        if len(eligible) == 1:
            return eligible[0].agent_id
        i, j = self.rng.choice(len(eligible), 2, replace=False)
        a, b = eligible[int(i)], eligible[int(j)]
        return (b if b.factors["load"] > a.factors["load"] else a).agent_id


_BASELINES: dict[str, type[Baseline]] = {
    c.name: c for c in (RandomChoice, RoundRobin, LeastLoaded, PowerOfTwo)
}


def make_policy(name: str, policy: ScoringPolicy, seed: int = 0) -> Scorer | Baseline:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`); ``policy`` gives the scorer its
    weights and every policy its hard-filter settings."""
    if name == "scorer":
        return Scorer(policy)
    try:
        return _BASELINES[name](policy, seed)
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (expected one of {POLICY_NAMES})") from None
