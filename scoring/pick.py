"""The pure API: ``pick_agent`` (one decision), ``rank_agents`` (the best k), ``evaluate`` and
``eligible_agents`` (why not, who could); and the pick behind :meth:`Fleet.dispatch`."""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple

import numba
import numpy as np

from scoring import _kernels as K
from scoring import checks
from scoring._jit import NativeEntry, python_values
from scoring.decision import Decision, RankedAgent, decided
from scoring.fleet import Fleet
from scoring.layout import PER_CALL, Query
from scoring.models import (
    DEFAULT_POLICY,
    FACTORS,
    MAX_TIMESTAMP,
    REASONS,
    DispatchRequest,
    ScoringPolicy,
)
from scoring.query import Parts, assemble, build_query, translation
from scoring.rules import MASK

#: Fleets at least this large are scanned by the parallel kernel, when numba has more than one
#: thread and the machine has idle cores (:func:`cores_idle`). Measured on 2 idle cores (OpenMP
#: layer, community-pool request): speed-up 1.12x at 100,000 agents, 1.51x at 300,000, 1.89x at
#: 1,000,000; below about 250,000 starting the threads costs what they save.
PARALLEL_THRESHOLD = 250_000
_pick_entry = NativeEntry(K._pick_records)
#: Chunks per thread in the parallel kernel, so an unlucky slow chunk does not idle the others.
CHUNKS_PER_THREAD = 4
#: Templates whose prebuilt pick arguments a fleet keeps (``fleet.pick_cache``) before it
#: forgets them all; a dispatcher sees a bounded variety of templates in practice.
_BOUND_LIMIT = 4096


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
        The agents; read under the fleet's lock and never modified. Only the request's pool is
        read: its team's rows, plus the community index for a community request.
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
    if not isinstance(fleet, Fleet):  # checked_fleet, inline: this is the 2.5 us path
        checked_fleet(fleet)
    with fleet.lock:
        return decide(fleet, request, policy, now)


def decide(
    fleet: Fleet, request: DispatchRequest, policy: Any, now: Any, full_scan: bool = False
) -> Decision:
    """:func:`pick_agent` under ``fleet.lock`` (held by the caller, who has checked that
    ``fleet`` is a Fleet).

    ``full_scan`` reads every row instead of the pool's (the reference path the tests compare
    the indexed pick with); the decision is the same.
    """
    policy, now = _check(request, policy, now)
    if not full_scan:
        bound = fleet.pick_cache.get(request.template_id)
        if bound is None or bound.policy is not policy:
            bound = _bind(fleet, request, policy)
        _, parts, serial, labels_and = bound
        if serial is not None:
            return tally(fleet, parts, serial(now, request.tie_key_hash), labels_and)
    parts = translation(fleet, request, policy)
    q = assemble(fleet, request, parts, now, full_scan)
    n = q.rows.shape[0] + q.shared.shape[0]
    if n >= PARALLEL_THRESHOLD and (threads := numba.get_num_threads()) > 1 and cores_idle(threads):
        out = K._pick_parallel(fleet.columns, q, threads * CHUNKS_PER_THREAD)
        row, score, eligible, factors, counts, labels_and = out
        rejected, considered = K._rejected(counts, n, q.fleet_size)
        picked = python_values((row, score, eligible, factors, rejected, considered))
        return tally(fleet, parts, picked, labels_and)
    counts, labels_and = fleet.scratch()
    picked = _pick_entry(fleet.columns, counts, labels_and, q[:-PER_CALL], *q[-PER_CALL:])
    return tally(fleet, parts, picked, labels_and)


class Bound(NamedTuple):
    """A template's pick against one state of a fleet: every kernel argument but the per-call
    ones (``now``, the tie key), prebuilt. Kept in ``fleet.pick_cache``, which the fleet empties
    whenever its ``version`` moves."""

    policy: ScoringPolicy
    parts: Parts
    #: The kernel's entry point (see NativeEntry.direct) with every argument but the per-call
    #: ones bound (a partial: 0.14 us faster than unpacking a kept tuple into the call); None
    #: for a pool large enough for the parallel kernel
    pick: Callable[[float, np.uint64], tuple[Any, ...]] | None
    labels_and: np.ndarray


def _bind(fleet: Fleet, request: DispatchRequest, policy: ScoringPolicy) -> Bound:
    """Build and keep (in ``fleet.pick_cache``, by template) the request's :class:`Bound`."""
    parts = translation(fleet, request, policy)
    q = assemble(fleet, request, parts, 0.0)
    n = q.rows.shape[0] + q.shared.shape[0]
    scratch = fleet.scratch()
    serial = None
    if n < PARALLEL_THRESHOLD:
        args = (fleet.columns, *scratch, q[:-PER_CALL])
        serial = partial(_pick_entry.direct((*args, *q[-PER_CALL:])), *args)
    bound = Bound(policy, parts, serial, scratch[1])
    cache = fleet.pick_cache  # emptied by the fleet when its version moves (Fleet._changed)
    if len(cache) >= _BOUND_LIMIT:
        cache.clear()
    cache[request.template_id] = bound
    return bound


def tally(
    fleet: Fleet,
    parts: Parts,
    out: tuple[int, float, int, tuple[float, ...], tuple[int, ...], int],
    labels_and: np.ndarray,
) -> Decision:
    """The Decision of a pick from the kernel's output ``(row, score, eligible, factors,
    rejected, considered)`` and the AND of the label-rejected rows' labels."""
    row, score, eligible, factors, rejected, considered = out
    missing = parts.missing(labels_and) if rejected[K.LABELS] else ()
    if row < 0:
        return decided(None, None, (), eligible, rejected, considered, missing, -1)
    return decided(fleet.agent_id_at(row), score, factors, eligible, rejected, considered, missing,
                   row)  # fmt: skip


def _dispatch(fleet: Fleet, request: DispatchRequest, policy: Any, now: Any) -> Decision:
    """:meth:`Fleet.dispatch`: pick and reserve under the fleet's lock."""
    with checked_fleet(fleet).lock:
        decision = decide(fleet, request, policy, now)
        if decision.row >= 0:
            fleet.take_slot(decision.row)  # eligible, so it has a free slot
    return decision


Fleet._dispatcher = _dispatch


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
    were then removed: the first entry is always ``pick_agent``'s choice. O(n log n) in the
    pool's size, tie band or not.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError("k must be a non-negative integer")
    with checked_fleet(fleet).lock:
        policy, now = _check(request, policy, now)
        q = build_query(fleet, request, policy, now)
        rows, masks, scores, hashes = candidates(fleet, q)
        ok = masks == 0
        rows, scores, hashes = rows[ok], scores[ok], hashes[ok]
        order = np.lexsort((hashes, -scores))  # score desc, then tie hash
        chosen = order[band_order(scores[order], hashes[order], policy.tie_band, k)]
        factors = np.empty((len(chosen), len(FACTORS)))
        K._factor_rows(fleet.columns, q, rows[chosen].astype(np.int64), factors)
        return [
            RankedAgent(fleet.agent_id_at(int(r)), float(s), dict(zip(FACTORS, f, strict=True)))
            for r, s, f in zip(rows[chosen], scores[chosen], factors.tolist(), strict=True)
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
    with checked_fleet(fleet).lock:
        policy, now = _check(request, policy, now)
        rows, masks, _, _ = candidates(fleet, build_query(fleet, request, policy, now))
        return [fleet.agent_id_at(row) for row in np.sort(rows[masks == 0]).tolist()]


def only_excluded_fit(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> bool:
    """Whether the only agents that could take ``request``, free or busy, are ones it excludes.

    True when at least one agent of the pool passes every hard filter but ``capacity`` and
    ``excluded``, and each such agent is in ``exclude_agents``: nowhere else will ever take the
    run while the fleet stays as it is. The server lifts a retried run's exclusions then (a run
    that failed on every agent of a two-agent team is tried again on one of them, within its
    attempts, rather than queued for ever). One scan of the pool; called only for a run that
    could not be placed.
    """
    with checked_fleet(fleet).lock:
        policy, now = _check(request, policy, now)
        if not request.exclude_agents:
            return False
        q = build_query(fleet, request, policy, now, full_scan=True)
        _, masks, _, _ = candidates(fleet, q)
        masks = masks.astype(np.int64)
        busy_or_excluded = (1 << REASONS.index("capacity")) | (1 << REASONS.index("excluded"))
        could = (masks & ~busy_or_excluded) == 0
        excluded = (masks >> REASONS.index("excluded")) & 1 == 1
        return bool(could.any()) and not bool((could & ~excluded).any())


def evaluate(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> dict[str, tuple[list[str], float | None]]:
    """Every agent's failed filters and, when eligible, its score: ``{agent_id: (reasons, score)}``.

    For looking into one decision ("why not gpu-node-07?"); a pick never builds this. As in a
    decision's counts, an agent outside the request's pool shows only ``pool``.
    """
    with checked_fleet(fleet).lock:
        policy, now = _check(request, policy, now)
        q = build_query(fleet, request, policy, now, full_scan=True)
        rows, masks, scores, _ = candidates(fleet, q)
        out = {}
        for row, mask, score in zip(rows.tolist(), masks.tolist(), scores.tolist(), strict=True):
            reasons = [r for bit, r in enumerate(REASONS) if mask >> bit & 1]
            out[fleet.agent_id_at(row)] = (reasons, None if mask else score)
        return out


def candidates(fleet: Fleet, q: Query) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate's row, mask, score and tie hash (community rows of the team dropped)."""
    n = q.rows.shape[0] + q.shared.shape[0]
    rows, masks = np.empty(n, np.int64), np.empty(n, MASK)
    scores, hashes = np.empty(n), np.empty(n, np.uint64)
    K._scores(fleet.columns, q, rows, scores, hashes, masks)
    keep = (masks & K.SKIP_BIT) == 0
    return rows[keep], masks[keep], scores[keep], hashes[keep]


def band_order(scores: np.ndarray, hashes: np.ndarray, band: float, k: int) -> np.ndarray:
    """Repeated picks with a tie band over candidates sorted by (score desc, hash asc).

    Each pick takes, among the remaining candidates within ``band`` of the best remaining score,
    the lowest hash. The best remaining score never rises, so the band only ever takes in more
    candidates: one pointer walks the sorted scores and a heap keyed by hash holds the band,
    O(n log n) in all. Returns the positions chosen, in order.
    """
    n = len(scores)
    if band == 0.0:
        return np.arange(min(k, n))
    heap: list[tuple[int, int]] = []
    taken = np.zeros(n, bool)
    top = nxt = 0
    chosen: list[int] = []
    score_list, hash_list = scores.tolist(), hashes.tolist()
    while len(chosen) < min(k, n):
        while taken[top]:
            top += 1
        cut = score_list[top] - band
        while nxt < n and score_list[nxt] >= cut:
            heapq.heappush(heap, (hash_list[nxt], nxt))
            nxt += 1
        _, pos = heapq.heappop(heap)
        taken[pos] = True
        chosen.append(pos)
    return np.array(chosen, np.int64)


def check_call(
    fleet: Any, requests: Any, policy: Any, now: Any
) -> tuple[list[DispatchRequest], ScoringPolicy, float]:
    """Check a batch call's arguments: the requests as a list, the policy (defaults for
    ``None``) and ``now`` in seconds."""
    checked_fleet(fleet)
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise ValueError(f"requests must be an iterable of DispatchRequest, got {_kind(requests)}")
    requests = list(requests)
    for request in requests:
        if not isinstance(request, DispatchRequest):
            raise ValueError(f"request must be a DispatchRequest, got {_kind(request)}")
    return requests, *_check_policy_now(policy, now)


def checked_fleet(fleet: Any) -> Fleet:
    """``fleet``, if it is a Fleet (checked before its lock is taken)."""
    if not isinstance(fleet, Fleet):
        raise ValueError(f"fleet must be a Fleet, got {_kind(fleet)}")
    return fleet


def _check(request: Any, policy: Any, now: Any) -> tuple[ScoringPolicy, float]:
    """Check one pick's arguments (the fleet is checked before its lock is taken)."""
    if not isinstance(request, DispatchRequest):
        raise ValueError(f"request must be a DispatchRequest, got {_kind(request)}")
    if type(now) is float and 0.0 <= now <= MAX_TIMESTAMP:  # the common case, without a call
        if policy is None:
            return DEFAULT_POLICY, now
        if type(policy) is ScoringPolicy:
            return policy, now
    return _check_policy_now(policy, now)


def _check_policy_now(policy: Any, now: Any) -> tuple[ScoringPolicy, float]:
    if policy is None:
        policy = DEFAULT_POLICY
    elif not isinstance(policy, ScoringPolicy):
        raise ValueError(f"policy must be a ScoringPolicy, got {_kind(policy)}")
    if now is None:
        return policy, time.time()
    if type(now) is float and 0.0 <= now <= MAX_TIMESTAMP:  # the common case, checked fast
        return policy, now
    return policy, checks.timestamp(now, "now")


def _kind(value: Any) -> str:
    return type(value).__name__
