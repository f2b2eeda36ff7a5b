"""A prototype of the engine's serial scan, kept beside the engine so the benchmark measures both.

Two changes to the engine's ``_scan``, each measured (ns per agent at 100,000 / 1,000,000 agents,
the benchmark's timed requests, one run, see RESULTS.md): engine kernel (13ce6ec) 6.5 / 7.3,
this prototype 2.0 / 3.9, the read-only pass over the same columns 0.7 / 1.6.

1. Loops run over unsigned indices. With ``for i in range(lo, hi)`` numba cannot prove ``i >= 0``
   and wraps negative indices on every array read, which blocks LLVM's vectoriser: a mask-only
   loop took 3.0 ns per agent over ``range(lo, hi)`` and 0.5 ns over ``range(np.uint64(lo),
   np.uint64(hi))`` (or ``range(n)``).
2. Blocks of 1,024 rows in two phases: the reject masks of the block without a branch (they
   vectorise), counting reasons in registers and folding the labels of label-rejected agents
   into one AND (``missing = required & ~AND(labels)``, by De Morgan equal to the OR of
   ``required & ~labels``); then a scalar pass over the block's eligible rows only.

Exact ties only (the engine's band pass is not reproduced). Same answers as the engine
(tests/test_peers.py); delete this module once the engine adopts the idea.
"""

from __future__ import annotations

import numpy as np

from scoring._jit import jit, jit_row
from scoring._kernels import Columns, Query
from scoring.fleet import Fleet
from scoring.query import build_query

BLOCK = 1024
_U1 = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_MAX_HASH = _ALL
_M32, _C1, _C2 = np.uint64(0xFFFFFFFF), np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
_S13, _S16, _S32 = np.uint64(13), np.uint64(16), np.uint64(32)


@jit
def _fmix32(h):
    h ^= h >> _S16
    h = (h * _C1) & _M32
    h ^= h >> _S13
    h = (h * _C2) & _M32
    return h ^ (h >> _S16)


@jit
def _tie_hash(id_hash, key_hash):
    x = id_hash ^ key_hash
    a, b = x & _M32, x >> _S32
    hi = _fmix32(b ^ _fmix32(a))
    return (hi << _S32) | _fmix32(a ^ hi)


@jit_row
def _masks(c, q, start, m, masks, counts, and_labels):
    """Phase 1: reject masks of rows ``[start, start + m)`` (uint64 indices), no branches.

    Also adds each reason's count into ``counts`` and ANDs the labels of label-rejected rows into
    ``and_labels``. Fleets with up to 64 labels (one word) take the loop without inner loops,
    which is the one that vectorises.
    """
    if q.labels.shape[0] == 1:
        and_labels[0] &= _masks_one_word(c, q, start, m, masks, counts)
    else:
        _masks_words(c, q, start, m, masks, counts, and_labels)


@jit_row
def _masks_one_word(c, q, start, m, masks, counts):
    now, timeout, team, community = q.now, q.heartbeat_timeout_s, q.team, q.community
    min_vram = q.min_vram_gb
    has_vram = not np.isnan(min_vram)
    unknown = q.labels_unknown
    l0 = q.labels[0]
    and0 = _ALL
    r0 = r1 = r2 = r3 = r4 = r5 = 0
    for j in range(m):
        i = start + j
        stale = now - c.last_heartbeat[i] > timeout
        status = c.status[i] > 1
        pool = (c.team[i] != team) & ~(community & c.community_opt_in[i])
        lab = unknown | ((l0 & ~c.labels[i, 0]) != 0)
        cap = c.running_count[i] >= c.gpu_capacity[i]
        vram = has_vram & ~(c.vram_gb[i] >= min_vram)
        r0 += stale
        r1 += status
        r2 += pool
        r3 += lab
        r4 += cap
        r5 += vram
        and0 &= c.labels[i, 0] | (_ALL * np.uint64(1 - lab))  # all ones unless label-rejected
        masks[j] = stale | status | pool | lab | cap | vram
    _add_counts(counts, r0, r1, r2, r3, r4, r5)
    return and0


@jit_row
def _masks_words(c, q, start, m, masks, counts, and_labels):
    now, timeout, team, community = q.now, q.heartbeat_timeout_s, q.team, q.community
    min_vram = q.min_vram_gb
    has_vram = not np.isnan(min_vram)
    r0 = r1 = r2 = r3 = r4 = r5 = 0
    for j in range(m):
        i = start + j
        stale = now - c.last_heartbeat[i] > timeout
        status = c.status[i] > 1
        pool = (c.team[i] != team) & ~(community & c.community_opt_in[i])
        lab = q.labels_unknown
        for w in range(q.labels.shape[0]):
            lab |= (q.labels[w] & ~c.labels[i, w]) != 0
        for w in range(q.labels.shape[0]):
            and_labels[w] &= c.labels[i, w] | (_ALL * np.uint64(1 - lab))
        cap = c.running_count[i] >= c.gpu_capacity[i]
        vram = has_vram & ~(c.vram_gb[i] >= min_vram)
        r0 += stale
        r1 += status
        r2 += pool
        r3 += lab
        r4 += cap
        r5 += vram
        masks[j] = stale | status | pool | lab | cap | vram
    _add_counts(counts, r0, r1, r2, r3, r4, r5)


@jit_row
def _add_counts(counts, r0, r1, r2, r3, r4, r5):
    counts[0] += r0
    counts[1] += r1
    counts[2] += r2
    counts[3] += r3
    counts[4] += r4
    counts[5] += r5


@jit_row  # no reference counting of the tuples' arrays per call (see scoring._jit)
def _score(c, q, i):
    w = q.weights
    region = q.region_table[c.region[i]]
    load = max(0.0, 1.0 - c.running_count[i] / c.gpu_capacity[i])
    pool = 1.0 if c.team[i] == q.team else 0.0
    if q.n_models == 0:
        warm = 0.5
    else:
        hits = 0
        for m in range(q.models.shape[0]):
            x = c.cached_models[i, m] & q.models[m]
            while x:
                x &= x - _U1
                hits += 1
        warm = hits / q.n_models
    gpu = q.gpu_table[c.gpu_model[i]]
    total = w[0] * region + w[1] * load + w[2] * pool + w[3] * warm + w[4] * gpu
    total += w[5] * (1.0 - c.failure_rate[i])
    return total / w[6]


@jit
def _blocked_pick(c, q):
    """``(row, score, eligible, rejected int64[7], missing uint64[label_words])``."""
    n = np.uint64(c.team.shape[0])
    masks = np.empty(BLOCK, np.bool_)
    counts = np.zeros(7, np.int64)
    and_labels = np.full(q.labels.shape[0], _ALL)
    best, best_score, best_hash, eligible = -1, -np.inf, _MAX_HASH, 0
    excluded = q.excluded
    for start in range(np.uint64(0), n, np.uint64(BLOCK)):
        m = min(np.uint64(BLOCK), n - start)
        _masks(c, q, start, m, masks, counts, and_labels)
        for j in range(m):  # phase 2: the block's eligible rows
            if masks[j]:
                continue
            i = np.int64(start + j)
            if excluded.shape[0]:
                k = np.searchsorted(excluded, i)
                if k < excluded.shape[0] and excluded[k] == i:
                    continue
            eligible += 1
            s = _score(c, q, i)
            if s >= best_score:
                h = _tie_hash(c.id_hash[i], q.tie_key_hash)
                if s > best_score or h < best_hash:
                    best, best_score, best_hash = i, s, h
    counts[6] = excluded.shape[0]  # every excluded row is in the fleet (Fleet.rows_of)
    return best, best_score, eligible, counts, q.labels & ~and_labels


class BlockedScan:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.queries: dict[tuple, tuple] = {}

    def __call__(self, request, policy, now) -> str | None:
        key = (id(request), id(policy), now)
        found = self.queries.get(key)
        if found is None:  # translated once per request, as for the engine's kernel alone
            with self.fleet.lock:
                q = Query(*build_query(self.fleet, request, policy, now))
            found = self.queries[key] = (request, policy, q)
        if found[2].tie_band != 0.0:
            raise ValueError("the blocked prototype implements exact ties only (tie_band == 0)")
        row = _blocked_pick(Columns(*self.fleet.columns), found[2])[0]
        return None if row < 0 else self.fleet.agent_id_at(row)
