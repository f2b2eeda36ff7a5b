"""The pick as a good numpy user writes it: whole-column boolean masks, then the eligible rows.

Reads the fleet as a table (:func:`benchmarks.peers.table.fleet_table`: one array per field, in a
user's units, copied once). Per pick: translate the request (as the engine does), one vectorised
expression per filter over the whole fleet, compress to the eligible rows, score them, and break
exact ties with the tie hash of the best-scoring rows only (usually one or a handful). It gets no
index: every pick reads every agent.
"""

from __future__ import annotations

import numpy as np

from benchmarks.peers.table import fleet_table, min_vram_gb
from benchmarks.peers.tiehash import tie_hash
from scoring.fleet import Fleet
from scoring.layout import Query
from scoring.models import LAST_ELIGIBLE_STATUS
from scoring.query import build_query


class NumpyPeer:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.table = fleet_table(fleet)

    def __call__(self, request, policy, now) -> str | None:
        fleet = self.fleet
        with fleet.lock:
            q = Query(*build_query(fleet, request, policy, now))
        row = pick_row(self.table, q)
        return None if row < 0 else fleet.agent_id_at(row)


def pick_row(t: dict[str, np.ndarray], q) -> int:
    """Row of the chosen agent, or -1. ``t``: the fleet table; ``q``: a Query (only its request
    fields: the candidate rows it carries are the engine's index, which a user does not have)."""
    if q.tie_band != 0.0:
        raise ValueError("the numpy peer implements exact ties only (tie_band == 0)")
    if q.labels_unknown:
        return -1
    ok = (q.now - t["last_heartbeat"]) <= q.heartbeat_timeout_s  # not stale
    ok &= t["status"] <= LAST_ELIGIBLE_STATUS
    pool = t["team"] == q.team
    if q.community:
        pool |= t["community_opt_in"]
    ok &= pool
    ok &= ((t["labels"] & q.labels) == q.labels).all(axis=1)
    ok &= t["running_count"] < t["gpu_capacity"]
    if (minimum := min_vram_gb(q)) is not None:
        ok &= t["vram_gb"] >= minimum  # NaN (unknown) compares False: rejected
    if q.excluded.size:
        ok[q.excluded] = False
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return -1
    scores = _scores(t, q, rows)
    best = rows[scores == scores.max()]
    if best.size == 1:
        return int(best[0])
    return int(best[np.argmin(tie_hash(t["id_hash"][best], q.tie_key_hash))])


def _scores(t: dict[str, np.ndarray], q, rows: np.ndarray) -> np.ndarray:
    """Weighted mean of the six factors of ``rows``, summed in FACTORS order (as the engine)."""
    w = q.weights
    running = t["running_count"][rows]
    capacity = t["gpu_capacity"][rows]
    region = q.region_table[t["region"][rows]]
    load = np.maximum(0.0, 1.0 - running / capacity)
    pool = (t["team"][rows] == q.team).astype(np.float64)
    if q.n_models == 0:
        warm = 0.5
    else:
        hits = np.bitwise_count(t["cached_models"][rows] & q.models).sum(axis=1)
        warm = hits / q.n_models
    gpu = q.gpu_table[t["gpu_model"][rows]]
    reliability = 1.0 - t["failure_rate"][rows]
    total = w[0] * region + w[1] * load + w[2] * pool + w[3] * warm + w[4] * gpu
    total += w[5] * reliability
    return total / w[6]
