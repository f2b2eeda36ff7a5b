"""Every jitted function of the package: eligibility, factors, score and the pick.

The kernels read the fleet's columns (a :class:`Columns`) and a request already translated into
numbers (a :class:`Query`); they never raise, never allocate Python objects, and never see a value
that the Python layer has not validated. One fused pass per decision computes, for each agent, the
bitmask of failed filters and, for eligible agents, the weighted score; the best agent and the
tie-break come out of the same pass.

Numba's dispatcher types a namedtuple of arrays about four times slower than the same arrays passed
flat (3.7 us against 1.0 us for a 13-column fleet, measured), and a pick over 100 agents must take
a few microseconds end to end. So the hot entry point, :func:`_pick_flat`, takes flat
arguments and rebuilds the two namedtuples inside compiled code, where that costs nothing; the
parallel pick (large fleets) and the ranking are called with the namedtuples directly.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import prange

from scoring._jit import jit, jit_parallel, jit_row

#: The fleet's columns, one array per ``Agent`` field (shapes ``(n,)``; bitsets ``(n, words)``).
Columns = namedtuple(
    "Columns",
    [
        "team",  # int32: interned team_id
        "status",  # uint8: AgentStatus code
        "community_opt_in",  # bool
        "region",  # int16: interned region, 0 = unknown
        "gpu_model",  # int16: interned gpu_model, 0 = unknown
        "last_heartbeat",  # float64: seconds since the epoch
        "gpu_capacity",  # uint16
        "running_count",  # uint16
        "vram_gb",  # float64: NaN = unknown
        "failure_rate",  # float64
        "id_hash",  # uint64: stable hash of agent_id (tie-break)
        "labels",  # uint64 (n, label_words): bit b set = label b interned by the fleet
        "cached_models",  # uint64 (n, model_words)
    ],
)

#: A request translated against one fleet and one policy.
Query = namedtuple(
    "Query",
    [
        "now",  # float64
        "heartbeat_timeout_s",  # float64
        "team",  # int64: interned team of the submitter, -1 if no agent of it is known
        "community",  # bool: community pool
        "labels",  # uint64 (label_words,): required labels, tool type included
        "labels_unknown",  # bool: a required label no agent of the fleet has ever had
        "min_vram_gb",  # float64: NaN = no minimum
        "excluded",  # int64 (k,): sorted rows of exclude_agents
        "models",  # uint64 (model_words,): required models known to the fleet
        "n_models",  # int64: number of required models (known or not)
        "region_table",  # float64 (regions,): region factor by interned agent region
        "gpu_table",  # float64 (gpu_models,): gpu factor by interned agent gpu_model
        "weights",  # float64 (7,): the six weights in FACTORS order, then their sum
        "tie_band",  # float64
        "tie_key_hash",  # uint64
    ],
)

N_REASONS = 7
N_MASKS = 1 << N_REASONS
STALE, STATUS, POOL, LABELS, CAPACITY, VRAM, EXCLUDED = (1 << r for r in range(N_REASONS))
LAST_ELIGIBLE_STATUS = 1  # idle = 0, busy = 1 (models.STATUS_CODES)
N_FACTORS = 6

_M32 = np.uint64(0xFFFFFFFF)
_S13, _S16, _S32 = np.uint64(13), np.uint64(16), np.uint64(32)
_C1, _C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
_ONE = np.uint64(1)
_MAX_HASH = np.uint64(0xFFFFFFFFFFFFFFFF)


@jit
def _fmix32(h):
    # MurmurHash3's 32-bit finaliser on a uint64 holding 32 bits. Both factors stay below 2**32,
    # so no product overflows 64 bits: the same code is exact in numba and in plain numpy.
    h ^= h >> _S16
    h = (h * _C1) & _M32
    h ^= h >> _S13
    h = (h * _C2) & _M32
    h ^= h >> _S16
    return h


@jit
def _tie_hash(id_hash, key_hash):
    """Bijective 64-bit mix of ``id_hash ^ key_hash``; the lowest value wins a tie."""
    x = id_hash ^ key_hash
    a = x & _M32
    b = x >> _S32
    hi = _fmix32(b ^ _fmix32(a))
    lo = _fmix32(a ^ hi)
    return (hi << _S32) | lo


@jit
def _popcount(x):
    count = 0
    while x:
        x &= x - _ONE
        count += 1
    return count


@jit_row
def _is_excluded(excluded, i):
    k = np.searchsorted(excluded, i)
    return k < excluded.shape[0] and excluded[k] == i


@jit_row
def _reject_mask(c, q, i):
    """Bitmask of every hard filter agent ``i`` fails (0 = eligible)."""
    mask = 0
    if q.now - c.last_heartbeat[i] > q.heartbeat_timeout_s:
        mask |= STALE
    if c.status[i] > LAST_ELIGIBLE_STATUS:
        mask |= STATUS
    if c.team[i] != q.team and not (q.community and c.community_opt_in[i]):
        mask |= POOL
    if q.labels_unknown:
        mask |= LABELS
    else:
        for w in range(q.labels.shape[0]):
            if q.labels[w] & ~c.labels[i, w]:
                mask |= LABELS
                break
    if c.running_count[i] >= c.gpu_capacity[i]:
        mask |= CAPACITY
    if not np.isnan(q.min_vram_gb) and not (c.vram_gb[i] >= q.min_vram_gb):
        mask |= VRAM  # an unknown (NaN) vram_gb fails a minimum too
    if q.excluded.shape[0] and _is_excluded(q.excluded, i):
        mask |= EXCLUDED
    return mask


@jit_row
def _factors(c, q, i):
    """Agent ``i``'s six factors, each in [0, 1], in FACTORS order."""
    region = q.region_table[c.region[i]]
    load = max(0.0, 1.0 - c.running_count[i] / c.gpu_capacity[i])
    pool = 1.0 if c.team[i] == q.team else 0.0
    if q.n_models == 0:
        warm = 0.5
    else:
        hits = 0
        for w in range(q.models.shape[0]):
            hits += _popcount(c.cached_models[i, w] & q.models[w])
        warm = hits / q.n_models
    gpu = q.gpu_table[c.gpu_model[i]]
    reliability = 1.0 - c.failure_rate[i]
    return region, load, pool, warm, gpu, reliability


@jit_row
def _score(c, q, i):
    """Weighted mean of agent ``i``'s factors: sum(w_f * x_f) / sum(w_f), in FACTORS order."""
    w = q.weights
    region, load, pool, warm, gpu, reliability = _factors(c, q, i)
    total = w[0] * region + w[1] * load + w[2] * pool + w[3] * warm + w[4] * gpu
    total += w[5] * reliability
    return total / w[6]


@jit_row
def _scan(c, q, lo, hi, mask_counts, missing):
    """One fused pass over rows ``[lo, hi)``.

    Counts each reject mask in ``mask_counts`` (int64[128], indexed by mask: one increment per
    agent, where counting each reason would branch seven times; see :func:`_rejected`) and ORs
    the required labels that a label-rejected agent lacks into ``missing``
    (uint64[label_words]). Returns ``(best_row, best_score, best_tie_hash)``: the best score,
    exact ties going to the lowest tie hash; ``best_row`` is -1 when no agent in the range is
    eligible.
    """
    best, best_score, best_hash = -1, -np.inf, _MAX_HASH
    for i in range(lo, hi):
        mask = _reject_mask(c, q, i)
        mask_counts[mask] += 1
        if mask:
            if mask & LABELS:
                for w in range(q.labels.shape[0]):
                    missing[w] |= q.labels[w] & ~c.labels[i, w]
            continue
        s = _score(c, q, i)
        if s >= best_score:
            h = _tie_hash(c.id_hash[i], q.tie_key_hash)
            if s > best_score or h < best_hash:
                best, best_score, best_hash = i, s, h
    return best, best_score, best_hash


@jit_row
def _band_pick(c, q, lo, hi, cut):
    """Among eligible rows of ``[lo, hi)`` scoring at least ``cut``: the lowest tie hash."""
    best, best_score, best_hash = -1, -np.inf, _MAX_HASH
    for i in range(lo, hi):
        if _reject_mask(c, q, i):
            continue
        s = _score(c, q, i)
        if s >= cut:
            h = _tie_hash(c.id_hash[i], q.tie_key_hash)
            if h < best_hash:
                best, best_score, best_hash = i, s, h
    return best, best_score, best_hash


@jit_row
def _pick_rows(c, q, mask_counts, missing):
    """The serial pick over every row; fills ``mask_counts`` and ``missing`` (see :func:`_scan`).

    Returns ``(row, score, factors)``; ``factors`` are the winner's (NaN if none).
    """
    n = c.team.shape[0]
    best, best_score, _ = _scan(c, q, 0, n, mask_counts, missing)
    if best >= 0 and q.tie_band > 0.0:
        best, best_score, _ = _band_pick(c, q, 0, n, best_score - q.tie_band)
    return best, best_score, _winner_factors(c, q, best)


@jit_row
def _winner_factors(c, q, best):
    nan = np.nan
    if best < 0:
        return nan, nan, nan, nan, nan, nan
    return _factors(c, q, best)


@jit_row
def _rejected(mask_counts):
    """Agents failing each filter, as a 7-tuple in REASONS order, from the reject-mask counts."""
    r0 = r1 = r2 = r3 = r4 = r5 = r6 = 0
    for mask in range(1, N_MASKS):
        k = mask_counts[mask]
        if k:  # most of the 127 masks never occur
            r0 += k * (mask & 1)
            r1 += k * (mask >> 1 & 1)
            r2 += k * (mask >> 2 & 1)
            r3 += k * (mask >> 3 & 1)
            r4 += k * (mask >> 4 & 1)
            r5 += k * (mask >> 5 & 1)
            r6 += k * (mask >> 6 & 1)
    return r0, r1, r2, r3, r4, r5, r6


@jit
def _answer(best, best_score, factors, mask_counts, missing):
    """The kernels' answer: ``(row, score, eligible, factors, rejected, missing)``.

    ``factors`` (6 floats) and ``rejected`` (7 counts) are tuples, which numba hands back to
    Python faster than arrays; ``missing`` is the uint64 bitset of missing required labels.
    """
    return best, best_score, mask_counts[0], factors, _rejected(mask_counts), missing


@jit
def _pick(c, q):
    """Serial pick; see :func:`_answer` for what it returns."""
    mask_counts = np.zeros(N_MASKS, np.int64)
    missing = np.zeros(q.labels.shape[0], np.uint64)
    best, best_score, factors = _pick_rows(c, q, mask_counts, missing)
    return _answer(best, best_score, factors, mask_counts, missing)


@jit_parallel
def _pick_parallel(c, q, n_chunks):
    """The same pick as :func:`_pick`, over ``n_chunks`` slabs scanned in parallel."""
    # Each chunk owns one row of every slab; the reductions below are serial: no shared writes.
    n = c.team.shape[0]
    step = (n + n_chunks - 1) // n_chunks
    mask_counts = np.zeros((n_chunks, N_MASKS), np.int64)
    missing = np.zeros((n_chunks, q.labels.shape[0]), np.uint64)
    rows = np.full(n_chunks, -1, np.int64)
    scores = np.full(n_chunks, -np.inf)
    hashes = np.full(n_chunks, _MAX_HASH, np.uint64)
    for k in prange(n_chunks):
        lo, hi = k * step, min(n, (k + 1) * step)
        rows[k], scores[k], hashes[k] = _scan(c, q, lo, hi, mask_counts[k], missing[k])
    k = _best_chunk(rows, scores, hashes)
    if k >= 0 and q.tie_band > 0.0:
        cut = scores[k] - q.tie_band
        for j in prange(n_chunks):
            lo, hi = j * step, min(n, (j + 1) * step)
            rows[j], scores[j], hashes[j] = _band_pick(c, q, lo, hi, cut)
        k = _best_chunk(rows, np.zeros(n_chunks), hashes)  # every candidate is in the band
    best, best_score = (rows[k], scores[k]) if k >= 0 else (-1, -np.inf)
    total_missing = np.zeros(q.labels.shape[0], np.uint64)
    for j in range(n_chunks):
        total_missing |= missing[j]
    factors = _winner_factors(c, q, best)
    return _answer(best, best_score, factors, mask_counts.sum(axis=0), total_missing)


@jit
def _best_chunk(rows, scores, hashes):
    """Index of the chunk holding the best (score desc, tie hash asc) row, or -1."""
    best, best_score, best_hash = -1, -np.inf, _MAX_HASH
    for k in range(rows.shape[0]):
        if rows[k] < 0:
            continue
        if scores[k] > best_score or (scores[k] == best_score and hashes[k] < best_hash):
            best, best_score, best_hash = k, scores[k], hashes[k]
    return best


@jit
def _scores(c, q, out_scores, out_hashes, out_masks):
    """Every agent's reject mask, score (-inf when ineligible) and tie hash, for ranking."""
    for i in range(c.team.shape[0]):
        mask = _reject_mask(c, q, i)
        out_masks[i] = mask
        out_scores[i] = -np.inf if mask else _score(c, q, i)
        out_hashes[i] = _tie_hash(c.id_hash[i], q.tie_key_hash)


# --- the flat entry point (see the module docstring for why it is flat) ------------------------


@jit
def _pick_flat(
    team, status, opt_in, region, gpu, heartbeat, capacity, running, vram, failure, id_hash,
    labels, models,
    now, timeout, q_team, community, q_labels, labels_unknown, min_vram, excluded, q_models,
    n_models, region_table, gpu_table, weights, tie_band, tie_key_hash,
):  # fmt: skip
    """Serial pick over flat arguments (``Columns`` then ``Query``); see :func:`_answer`."""
    c = Columns(team, status, opt_in, region, gpu, heartbeat, capacity, running, vram, failure,
                id_hash, labels, models)  # fmt: skip
    q = Query(now, timeout, q_team, community, q_labels, labels_unknown, min_vram, excluded,
              q_models, n_models, region_table, gpu_table, weights, tie_band,
              tie_key_hash)  # fmt: skip
    mask_counts = np.zeros(N_MASKS, np.int64)
    missing = np.zeros(q_labels.shape[0], np.uint64)
    best, best_score, factors = _pick_rows(c, q, mask_counts, missing)
    return _answer(best, best_score, factors, mask_counts, missing)
