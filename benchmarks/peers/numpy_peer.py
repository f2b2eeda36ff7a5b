"""The pick as a good numpy user writes it: whole-column boolean masks, then the eligible rows.

Reads the fleet's own columns (no copy). Per pick: translate the request (as the engine does),
one vectorised expression per filter, compress to the eligible rows, score them, and break exact
ties with the tie hash of the best-scoring rows only (usually one or a handful).
"""

from __future__ import annotations

import numpy as np

from benchmarks.peers.tiehash import tie_hash
from scoring._kernels import Query
from scoring.fleet import Fleet
from scoring.query import build_query

LAST_ELIGIBLE_STATUS = 1  # idle = 0, busy = 1


class NumpyPeer:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def __call__(self, request, policy, now) -> str | None:
        fleet = self.fleet
        with fleet.lock:
            c = fleet.columns
            q = Query(*build_query(fleet, request, policy, now))
            row = pick_row(c, q)
            return None if row < 0 else fleet.agent_id_at(row)


def pick_row(c, q) -> int:
    """Row of the chosen agent, or -1. ``c``: the fleet's Columns; ``q``: a Query."""
    if q.tie_band != 0.0:
        raise ValueError("the numpy peer implements exact ties only (tie_band == 0)")
    if q.labels_unknown:
        return -1
    ok = (q.now - c.last_heartbeat) <= q.heartbeat_timeout_s  # not stale
    ok &= c.status <= LAST_ELIGIBLE_STATUS
    pool = c.team == q.team
    if q.community:
        pool |= c.community_opt_in
    ok &= pool
    ok &= ((c.labels & q.labels) == q.labels).all(axis=1)
    ok &= c.running_count < c.gpu_capacity
    if not np.isnan(q.min_vram_gb):
        ok &= c.vram_gb >= q.min_vram_gb  # NaN (unknown) compares False: rejected
    if q.excluded.size:
        ok[q.excluded] = False
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return -1
    scores = _scores(c, q, rows)
    best = rows[scores == scores.max()]
    if best.size == 1:
        return int(best[0])
    return int(best[np.argmin(tie_hash(c.id_hash[best], q.tie_key_hash))])


def _scores(c, q, rows: np.ndarray) -> np.ndarray:
    """Weighted mean of the six factors of ``rows``, summed in FACTORS order (as the engine)."""
    w = q.weights
    running = c.running_count[rows]
    capacity = c.gpu_capacity[rows]
    region = q.region_table[c.region[rows]]
    load = np.maximum(0.0, 1.0 - running / capacity)
    pool = (c.team[rows] == q.team).astype(np.float64)
    if q.n_models == 0:
        warm = 0.5
    else:
        hits = np.bitwise_count(c.cached_models[rows] & q.models).sum(axis=1)
        warm = hits / q.n_models
    gpu = q.gpu_table[c.gpu_model[rows]]
    reliability = 1.0 - c.failure_rate[rows]
    total = w[0] * region + w[1] * load + w[2] * pool + w[3] * warm + w[4] * gpu
    total += w[5] * reliability
    return total / w[6]
