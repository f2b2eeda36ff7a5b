"""Queue assignment: a queue of requests onto the fleet's free slots, in one atomic call.

DESIGN section 9. Requests are taken oldest ``submitted_at`` first, and each placement reserves its
slot before the next request is considered, so a batch never over-fills an agent.

With ``policy.locality_wait_s == 0`` the result is exactly a loop of :meth:`Fleet.dispatch` in that
order. With a locality wait it is delay scheduling (Zaharia et al., EuroSys 2010) with warm-first
matching, in two passes over the queue:

1. Oldest first. A request older than the bound (``now - submitted_at >= locality_wait_s``) is
   placed as ``dispatch`` would place it: it is never deferred nor passed over. A younger request
   with required models takes the best free eligible agent that has all of them cached, if there
   is one; otherwise, if some agent of its pool that fails only ``capacity`` has them cached, it is
   deferred (``Decision.deferred``, naming those agents). Anything else waits for pass 2.
2. The requests left (young, and cold on every free agent) are placed oldest first on what
   remains, as ``dispatch`` would place them.

So a freed slot goes to a run whose model is cached there before one that would load cold, and a
cold run still takes a slot that no warm run wanted in the same call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from scoring import _kernels as K
from scoring.decision import Decision
from scoring.fleet import Fleet
from scoring.models import FACTORS, REASONS, DispatchRequest, ScoringPolicy
from scoring.pick import check_call, decide
from scoring.query import build_query

_CAPACITY_ONLY = 1 << REASONS.index("capacity")


def assign(
    fleet: Fleet,
    requests: Iterable[DispatchRequest],
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> list[Decision]:
    """Place a queue of requests onto free slots, atomically (DESIGN section 9).

    Parameters
    ----------
    fleet : Fleet
        Placed requests reserve a slot (``running_count`` + 1, an ``idle`` agent turns ``busy``).
    requests : iterable of DispatchRequest
        The waiting queue, in any order; ``submitted_at`` ``None`` means submitted ``now``.
    policy : ScoringPolicy, optional
        ``None`` means ``ScoringPolicy()``; its ``locality_wait_s`` bounds deferrals.
    now : float or datetime, optional
        Seconds since the epoch; ``None`` means the current time.

    Returns
    -------
    list of Decision
        One per request, in the order given: placed (``agent_id``), deferred (``deferred``), or
        neither, when no free eligible agent was left for it.
    """
    requests = list(requests)
    with fleet.lock:
        policy, now = check_call(fleet, requests, policy, now)
        decisions: list[Decision | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (_submitted(requests[i], now), i))
        wait = policy.locality_wait_s
        later = []
        for i in order:
            request = requests[i]
            if wait == 0.0 or not request.required_models or now - _submitted(request, now) >= wait:
                decisions[i] = _place(fleet, decide(fleet, request, policy, now))
                continue
            warm = _warm_choice(fleet, request, policy, now)
            if warm is None:
                later.append(i)
            else:
                decisions[i] = warm if warm.deferred else _place(fleet, warm)
        for i in later:
            decisions[i] = _place(fleet, decide(fleet, requests[i], policy, now))
        return decisions  # type: ignore[return-value]


def _submitted(request: DispatchRequest, now: float) -> float:
    return now if request.submitted_at is None else request.submitted_at


def _place(fleet: Fleet, decision: Decision) -> Decision:
    if decision.row >= 0:
        fleet.take_slot(decision.row)  # eligible, so it has a free slot
    return decision


def _warm_choice(
    fleet: Fleet, request: DispatchRequest, policy: ScoringPolicy, now: float
) -> Decision | None:
    """The young request's warm placement, its deferral, or ``None`` (cold on every agent)."""
    q = K.Query(*build_query(fleet, request, policy, now))
    n = len(fleet)
    masks, scores, hashes = np.empty(n, np.int64), np.empty(n), np.empty(n, np.uint64)
    K._scores(fleet.columns, q, scores, hashes, masks)
    warm = _has_all_models(fleet, q.models, len(request.required_models))
    free_warm = np.flatnonzero(warm & (masks == 0))
    busy_warm = np.flatnonzero(warm & (masks == _CAPACITY_ONLY))
    if free_warm.size == 0 and busy_warm.size == 0:
        return None
    pool = decide(fleet, request, policy, now)  # the pool's counts, for the explanation
    counts = [pool.rejected[r] for r in REASONS]
    if free_warm.size == 0:
        waiting = sorted(fleet.agent_id_at(int(r)) for r in busy_warm)
        return Decision(None, None, (), pool.eligible, counts, pool.considered,
                        pool.missing_labels, deferred=True, waiting_for=waiting)  # fmt: skip
    row = _best(free_warm, scores, hashes, policy.tie_band)
    factors = np.empty((1, len(FACTORS)))
    K._factor_rows(fleet.columns, q, np.array([row], np.int64), factors)
    return Decision(fleet.agent_id_at(row), float(scores[row]), factors[0].tolist(),
                    pool.eligible, counts, pool.considered, pool.missing_labels, row)  # fmt: skip


def _best(rows: np.ndarray, scores: np.ndarray, hashes: np.ndarray, band: float) -> int:
    """The pick's rule over ``rows``: best score (or within ``band`` of it), lowest tie hash."""
    s = scores[rows]
    top = s.max()
    tied = rows[s >= top - band] if band > 0.0 else rows[s == top]
    return int(tied[np.argmin(hashes[tied])])


def _has_all_models(fleet: Fleet, wanted: np.ndarray, n_models: int) -> np.ndarray:
    """Rows whose cache holds every required model (none when one is unknown to the fleet)."""
    if sum(int(w).bit_count() for w in wanted.tolist()) != n_models:
        return np.zeros(len(fleet), bool)
    cached = fleet.columns.cached_models
    return ((cached & wanted) == wanted).all(axis=1)
