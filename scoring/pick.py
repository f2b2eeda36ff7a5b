"""The pure API: ``pick_agent`` (one decision) and ``rank_agents`` (the best k)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numba
import numpy as np

from scoring import _kernels as K
from scoring._jit import NativeEntry
from scoring.decision import Decision, RankedAgent
from scoring.fleet import Fleet
from scoring.models import (
    DEFAULT_POLICY,
    FACTORS,
    REASONS,
    DispatchRequest,
    ScoringPolicy,
    to_epoch_seconds,
)
from scoring.query import MissingLabels, build_query

#: Fleets at least this large are scanned by the parallel kernel, when numba has more than one
#: thread and the machine has idle cores (:func:`cores_idle`). Measured on 2 idle cores (OpenMP
#: layer, community-pool request): speed-up 1.12x at 100,000 agents, 1.51x at 300,000, 1.89x at
#: 1,000,000; below about 250,000 starting the threads costs what they save.
PARALLEL_THRESHOLD = 250_000
_pick_entry = NativeEntry(K._pick_flat)
#: Chunks per thread in the parallel kernel, so an unlucky slow chunk does not idle the others.
CHUNKS_PER_THREAD = 4


def pick_agent(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> Decision:
    """Choose the agent that should run ``request``.

    Parameters
    ----------
    fleet : Fleet
        The agents; read under the fleet's lock and never modified.
    request : DispatchRequest
    policy : ScoringPolicy, optional
        ``None`` means ``ScoringPolicy()``.
    now : float or datetime, optional
        Seconds since the epoch; ``None`` means the current time.

    Returns
    -------
    Decision
        The best eligible agent (ties broken by a hash of ``tie_key`` and ``agent_id``), or a
        decision with ``agent_id=None`` and the reasons when no agent is eligible.
    """
    with fleet.lock:
        return decide(fleet, request, policy, now)


def decide(fleet: Fleet, request: DispatchRequest, policy: Any, now: Any) -> Decision:
    """:func:`pick_agent` without taking the lock (the caller holds ``fleet.lock``)."""
    policy, now = _check(fleet, request, policy, now)
    q = build_query(fleet, request, policy, now)
    c = fleet.columns
    n = len(fleet)
    if n >= PARALLEL_THRESHOLD and (threads := numba.get_num_threads()) > 1 and cores_idle(threads):
        out = K._pick_parallel(c, K.Query(*q), threads * CHUNKS_PER_THREAD)
        row, score, eligible, factors, rejected, missing = out
    else:
        masks, counts, labels_and = fleet.scratch()
        row, score, eligible, factors, rejected = _pick_entry(*c, *q, masks, counts, labels_and)
        if rejected[3]:
            required = q[4]  # Query.labels
            missing = required & ~labels_and[: required.shape[0]]
    # Label names are looked up only if someone reads them (the interner never forgets a bit).
    missing_labels = MissingLabels(fleet.labels, missing, request) if rejected[3] else ()
    if row < 0:
        return Decision(None, None, (), eligible, rejected, n, missing_labels)
    return Decision(
        fleet.agent_id_at(row), score, factors, eligible, rejected, n, missing_labels, row
    )


def cores_idle(threads: int) -> bool:
    """Whether ``threads`` threads would each find a core (by the 1-minute load average).

    OpenMP's worker threads spin while they wait; when the other cores are busy, a parallel pick
    waits for a descheduled thread: about 100 ms instead of 4 ms at 1,000,000 agents (measured on
    2 cores with the other one loaded), while the waiting policy that avoids the stall
    (``OMP_WAIT_POLICY=passive``, or numba's workqueue layer) made the parallel kernel no faster
    than the serial one. So the parallel kernel runs only when there is room for it.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: assume room
        return True
    # This process's own scan is already counted in the load; half a core of slack for the
    # load average's lag and for short-lived processes.
    return load + threads - 1 <= (os.cpu_count() or 1) + 0.5


def rank_agents(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
    k: int = 10,
) -> list[RankedAgent]:
    """The best ``k`` eligible agents, best first, each with its score and factors.

    The order is the order in which :func:`pick_agent` would choose them if each chosen agent
    were then removed: the first entry is always ``pick_agent``'s choice.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError("k must be a non-negative integer")
    with fleet.lock:
        policy, now = _check(fleet, request, policy, now)
        c = fleet.columns
        q = K.Query(*build_query(fleet, request, policy, now))
        masks, scores, hashes = _evaluate(c, q, len(fleet))
        rows = np.flatnonzero(masks == 0)
        rows = rows[np.lexsort((hashes[rows], -scores[rows]))]  # score desc, then tie hash
        chosen = _band_order(rows, scores, hashes, policy.tie_band, k)
        factors = np.empty((len(chosen), len(FACTORS)))
        K._factor_rows(c, q, np.array(chosen, np.int64), factors)
        return [
            RankedAgent(fleet.agent_id_at(r), float(scores[r]), dict(zip(FACTORS, f, strict=True)))
            for r, f in zip(chosen, factors.tolist(), strict=True)
        ]


def eligible_agents(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> list[str]:
    """Ids of every agent that passes all hard filters, in fleet order (no scores, no ranking).

    For dispatch rules of one's own over the engine's eligibility (the simulation's baselines).
    """
    with fleet.lock:
        policy, now = _check(fleet, request, policy, now)
        q = K.Query(*build_query(fleet, request, policy, now))
        masks, _, _ = _evaluate(fleet.columns, q, len(fleet))
        return [fleet.agent_id_at(row) for row in np.flatnonzero(masks == 0).tolist()]


def evaluate(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> dict[str, tuple[list[str], float | None]]:
    """Every agent's failed filters and, when eligible, its score: ``{agent_id: (reasons, score)}``.

    For looking into one decision ("why not gpu-node-07?"); a pick never builds this.
    """
    with fleet.lock:
        policy, now = _check(fleet, request, policy, now)
        q = K.Query(*build_query(fleet, request, policy, now))
        masks, scores, _ = _evaluate(fleet.columns, q, len(fleet))
        out = {}
        for row, (mask, score) in enumerate(zip(masks.tolist(), scores.tolist(), strict=True)):
            reasons = [r for bit, r in enumerate(REASONS) if mask >> bit & 1]
            out[fleet.agent_id_at(row)] = (reasons, None if mask else score)
        return out


def _evaluate(c: K.Columns, q: K.Query, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masks, scores, hashes = np.empty(n, np.int64), np.empty(n), np.empty(n, np.uint64)
    K._scores(c, q, scores, hashes, masks)
    return masks, scores, hashes


def _band_order(
    rows: np.ndarray, scores: np.ndarray, hashes: np.ndarray, band: float, k: int
) -> list[int]:
    """Repeated picks from ``rows`` (sorted by score desc, hash asc) with a tie band."""
    if band == 0.0:
        return rows[:k].tolist()
    remaining = rows.tolist()
    chosen: list[int] = []
    while remaining and len(chosen) < k:
        cut = scores[remaining[0]] - band
        in_band = [r for r in remaining if scores[r] >= cut]
        best = min(in_band, key=lambda r: hashes[r])
        chosen.append(best)
        remaining.remove(best)
    return chosen


def check_call(
    fleet: Any, requests: list[Any], policy: Any, now: Any
) -> tuple[ScoringPolicy, float]:
    """Check a batch call's arguments; the policy (defaults for ``None``) and ``now`` in seconds."""
    for request in requests:
        if not isinstance(request, DispatchRequest):
            raise TypeError(f"request must be a DispatchRequest, got {type(request).__name__}")
    return _check(fleet, None, policy, now)


def _check(fleet: Any, request: Any, policy: Any, now: Any) -> tuple[ScoringPolicy, float]:
    if not isinstance(fleet, Fleet):
        raise TypeError(f"fleet must be a Fleet, got {type(fleet).__name__}")
    if request is not None and not isinstance(request, DispatchRequest):
        raise TypeError(f"request must be a DispatchRequest, got {type(request).__name__}")
    if policy is None:
        policy = DEFAULT_POLICY
    elif not isinstance(policy, ScoringPolicy):
        raise TypeError(f"policy must be a ScoringPolicy, got {type(policy).__name__}")
    if now is None:
        return policy, time.time()
    now = to_epoch_seconds(now)
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be finite seconds since the epoch or a datetime, got {now!r}")
    return policy, float(now)
