"""Policies by name: the one place that knows every policy the simulation can run.

Other packages add families of policies under a name prefix (:func:`register_family`; the
``cold:`` experiments of :mod:`scoring.research.emulate` register themselves when imported): the
simulator imports none of them, research builds on the simulator and never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scoring import ScoringPolicy
from scoring.models import MAX_SLOTS
from scoring.sim.policies import _CHOOSERS, POLICY_NAMES, Delay, Policy, Scorer

#: The scorer without :mod:`scoring.holds` (accepted by :func:`make_policy`, not in the default
#: list of policies).
NO_HOLD = "scorer-no-hold"
#: The scorer deferring any number of runs per busy warm slot (``deferrals_per_slot`` at its
#: maximum: delay scheduling as published), for comparison; accepted, not listed by default.
NO_CAP = "scorer-no-cap"
VARIANTS = (NO_HOLD, NO_CAP)

#: A family's policy from the run's policy, its seed and the name after the prefix.
Factory = Callable[[ScoringPolicy, int, str], Policy]
#: prefix -> (the names after it, the factory): see :func:`register_family`.
FAMILIES: dict[str, tuple[tuple[str, ...], Factory]] = {}


def register_family(prefix: str, names: Sequence[str], factory: Factory) -> None:
    """Accept ``prefix + name`` for each of ``names`` in :func:`make_policy` (and the command
    line), built by ``factory(policy, seed, name)``. Registering a prefix again replaces it."""
    FAMILIES[prefix] = (tuple(names), factory)


def policy_names() -> tuple[str, ...]:
    """Every name :func:`make_policy` accepts now."""
    family = tuple(p + n for p, (names, _) in FAMILIES.items() for n in names)
    return POLICY_NAMES + VARIANTS + family


def make_policy(
    name: str, policy: ScoringPolicy, seed: int = 0, wait_s: float | None = None
) -> Policy:
    """The policy called ``name`` (one of :func:`policy_names`); ``policy`` gives the scorer its
    weights and waiting budget and every policy its hard-filter settings; ``wait_s`` overrides
    the waiting budget of ``delay`` (default: ``policy.locality_wait_s``)."""
    if name == "scorer":
        return Scorer(policy, seed)
    if name == NO_HOLD:  # the engine without the dispatcher's slot holds, for comparison
        return Scorer(policy, seed, name=NO_HOLD, hold_s=0.0)
    if name == NO_CAP:
        unbounded = policy.model_copy(update={"deferrals_per_slot": MAX_SLOTS})
        return Scorer(unbounded, seed, name=NO_CAP)
    if name == "delay":
        return Delay(policy, seed, wait_s)
    for prefix, (names, factory) in FAMILIES.items():
        if name.startswith(prefix) and name.removeprefix(prefix) in names:
            return factory(policy, seed, name.removeprefix(prefix))
    try:
        return _CHOOSERS[name](policy, seed)
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (expected one of {policy_names()})") from None
