"""Policies by name: the one place that knows every policy the simulation can run, the
cold-placement experiments of :mod:`scoring.sim.emulate` included (they build on
:mod:`scoring.sim.policies`, so the catalogue sits above both)."""

from __future__ import annotations

from scoring import ScoringPolicy
from scoring.models import MAX_SLOTS
from scoring.sim.emulate import ColdRule
from scoring.sim.policies import _CHOOSERS, POLICY_NAMES, Delay, Policy, Scorer

#: The scorer without :mod:`scoring.holds` (accepted by :func:`make_policy`, not in the default
#: list of policies).
NO_HOLD = "scorer-no-hold"
#: The scorer deferring any number of runs per busy warm slot (``deferrals_per_slot`` at its
#: maximum: delay scheduling as published), for comparison; accepted, not listed by default.
NO_CAP = "scorer-no-cap"
VARIANTS = (NO_HOLD, NO_CAP)


def make_policy(
    name: str, policy: ScoringPolicy, seed: int = 0, wait_s: float | None = None
) -> Policy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`); ``policy`` gives the scorer its
    weights and waiting budget and every policy its hard-filter settings; ``wait_s`` overrides
    the waiting budget of ``delay`` (default: ``policy.locality_wait_s``)."""
    if name == "scorer":
        return Scorer(policy, seed)
    if name == NO_HOLD:  # the engine without the dispatcher's slot holds, for comparison
        return Scorer(policy, seed, name=NO_HOLD, hold_s=0.0)
    if name == NO_CAP:
        unbounded = policy.model_copy(update={"deferrals_per_slot": MAX_SLOTS})
        return Scorer(unbounded, seed, name=NO_CAP)
    if name.startswith("cold:"):  # experiments on cold placement (scoring.sim.emulate)
        return ColdRule(policy, seed, name.removeprefix("cold:"))
    if name == "delay":
        return Delay(policy, seed, wait_s)
    try:
        return _CHOOSERS[name](policy, seed)
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (expected one of {POLICY_NAMES})") from None
