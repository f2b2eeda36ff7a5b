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
from scoring.models import FACTORS, LAST_ELIGIBLE_STATUS, REASONS

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

# A reject mask has bit r set when the agent fails filter REASONS[r] (see _block_masks).
N_REASONS = len(REASONS)
EXCLUDED = 1 << REASONS.index("excluded")
N_FACTORS = len(FACTORS)
BLOCK = 1024  # rows whose reject masks are computed together, before their eligible rows score

_M32 = np.uint64(0xFFFFFFFF)
_S13, _S16, _S32 = np.uint64(13), np.uint64(16), np.uint64(32)
_C1, _C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
_ONE = np.uint64(1)
_NONE, _ALL = np.uint64(0), np.uint64(0xFFFFFFFFFFFFFFFF)
_BLOCK = np.uint64(BLOCK)
_MAX_HASH = _ALL


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
def _filters(c, q, i):
    """Agent ``i``'s filters other than labels and ``excluded``, as booleans, without a branch."""
    stale = q.now - c.last_heartbeat[i] > q.heartbeat_timeout_s
    status = c.status[i] > LAST_ELIGIBLE_STATUS
    pool = (c.team[i] != q.team) & (not (q.community & c.community_opt_in[i]))
    capacity = c.running_count[i] >= c.gpu_capacity[i]
    # NaN (unknown vram_gb) fails a minimum; a NaN minimum (none) fails nobody
    vram = (not np.isnan(q.min_vram_gb)) & (not (c.vram_gb[i] >= q.min_vram_gb))
    return stale, status, pool, capacity, vram


@jit_row
def _block_masks(c, q, start, m, masks, reasons, all_labels):
    """Phase 1 of a block: the reject masks of rows ``[start, start + m)``, without a branch.

    Writes each row's mask (every filter but ``excluded``, see :func:`_block_eligibility`) into
    ``masks[:m]`` (uint8), adds the rows failing each filter to ``reasons`` (int64[7]), and ANDs
    the labels of the label-rejected rows into ``all_labels``: ``required & ~all_labels`` is then
    the OR over those rows of ``required & ~labels`` (De Morgan), the labels some of them lack.
    Indices are unsigned, so numba adds no negative-index wrapping and LLVM vectorises the loop
    (measured: 3.0 ns per agent for a mask-only loop over signed indices, 0.5 ns unsigned). A
    fleet with at most 64 labels (one word) takes a loop without an inner one, which vectorises.
    """
    r0 = r1 = r2 = r3 = r4 = r5 = 0
    if q.labels.shape[0] == 1:
        required, unknown, all0 = q.labels[0], q.labels_unknown, all_labels[0]
        for j in range(m):
            i = start + j
            stale, status, pool, capacity, vram = _filters(c, q, i)
            label = unknown | ((required & ~c.labels[i, 0]) != _NONE)
            all0 &= c.labels[i, 0] | (_NONE if label else _ALL)
            r0, r1, r2, r3, r4, r5 = r0 + stale, r1 + status, r2 + pool, r3 + label, \
                r4 + capacity, r5 + vram  # fmt: skip
            masks[j] = stale | status << 1 | pool << 2 | label << 3 | capacity << 4 | vram << 5
        all_labels[0] = all0
    else:
        for j in range(m):
            i = start + j
            stale, status, pool, capacity, vram = _filters(c, q, i)
            label = q.labels_unknown
            for w in range(q.labels.shape[0]):
                label |= (q.labels[w] & ~c.labels[i, w]) != _NONE
            keep = _NONE if label else _ALL
            for w in range(q.labels.shape[0]):
                all_labels[w] &= c.labels[i, w] | keep
            r0, r1, r2, r3, r4, r5 = r0 + stale, r1 + status, r2 + pool, r3 + label, \
                r4 + capacity, r5 + vram  # fmt: skip
            masks[j] = stale | status << 1 | pool << 2 | label << 3 | capacity << 4 | vram << 5
    reasons[0] += r0
    reasons[1] += r1
    reasons[2] += r2
    reasons[3] += r3
    reasons[4] += r4
    reasons[5] += r5


@jit_row
def _block_eligibility(c, q, start, m, masks, reasons, all_labels, e):
    """Full reject masks of a block: :func:`_block_masks`, then the ``excluded`` bit.

    ``q.excluded`` holds sorted rows; ``e`` is the position of the first one not before
    ``start``. Returns the position after the block's excluded rows.
    """
    _block_masks(c, q, start, m, masks, reasons, all_labels)
    excluded, end = q.excluded, start + m
    while e < excluded.shape[0] and np.uint64(excluded[e]) < end:
        masks[np.uint64(excluded[e]) - start] |= EXCLUDED
        reasons[6] += 1
        e += 1
    return e


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
def _scan(c, q, lo, hi, cut, scratch, reasons, all_labels):
    """One fused pass over rows ``[lo, hi)`` (uint64), block by block.

    Each block's reject masks come first (:func:`_block_eligibility`, into the uint8[BLOCK]
    ``scratch``), then only its eligible rows are scored. With ``cut`` NaN, the best score wins
    and exact ties go to the lowest tie hash; otherwise (the tie band's second pass) every
    eligible row scoring at least ``cut`` ranks equal and the lowest tie hash wins. Returns
    ``(best_row, best_score, best_tie_hash, eligible)``; ``best_row`` is -1 when no agent in the
    range qualifies.
    """
    banded = not np.isnan(cut)
    best, best_rank, best_score, best_hash, eligible = -1, -np.inf, -np.inf, _MAX_HASH, 0
    e = np.searchsorted(q.excluded, np.int64(lo))
    for start in range(lo, hi, _BLOCK):
        m = min(_BLOCK, hi - start)
        e = _block_eligibility(c, q, start, m, scratch, reasons, all_labels, e)
        for j in range(m):
            if scratch[j]:
                continue
            i = start + j
            eligible += 1
            s = _score(c, q, i)
            if banded and s < cut:
                continue
            rank = 0.0 if banded else s
            if rank >= best_rank:
                h = _tie_hash(c.id_hash[i], q.tie_key_hash)
                if rank > best_rank or h < best_hash:
                    best, best_rank, best_score, best_hash = np.int64(i), rank, s, h
    return best, best_score, best_hash, eligible


@jit_row
def _pick_rows(c, q, masks, counts, labels):
    """The serial pick over every row, tallying into scratch (see :func:`_scratch`).

    Returns ``(row, score, eligible, factors)``; ``factors`` are the winner's (NaN if none).
    ``counts[:7]`` then holds the agents failing each filter and ``labels[:words]`` the AND of
    the labels of label-rejected agents; the rest is the band pass's throwaway tally.
    """
    words = q.labels.shape[0]
    for r in range(2 * N_REASONS):
        counts[r] = 0
    for w in range(2 * words):
        labels[w] = _ALL
    n = np.uint64(c.team.shape[0])
    reasons, all_labels = counts[:N_REASONS], labels[:words]
    best, best_score, _, eligible = _scan(c, q, _NONE, n, np.nan, masks, reasons, all_labels)
    if best >= 0 and q.tie_band > 0.0:
        cut = best_score - q.tie_band
        best, best_score, _, _ = _scan(
            c, q, _NONE, n, cut, masks, counts[N_REASONS:], labels[words:]
        )
    return best, best_score, eligible, _winner_factors(c, q, best)


@jit_row
def _winner_factors(c, q, best):
    nan = np.nan
    if best < 0:
        return nan, nan, nan, nan, nan, nan
    return _factors(c, q, best)


@jit
def _scratch(label_words):
    """Working memory of one serial pick: block masks, reason counts, label ANDs (each twice
    as long as one pass needs: the tie band's pass tallies into the second half).

    Python callers keep one (the fleet does, used under its lock), so a pick allocates nothing.
    """
    return (
        np.empty(BLOCK, np.uint8),
        np.zeros(2 * N_REASONS, np.int64),
        np.full(2 * label_words, _ALL),
    )


@jit
def _rejected(counts):
    r = counts
    return r[0], r[1], r[2], r[3], r[4], r[5], r[6]


@jit
def _answer(best, best_score, eligible, factors, reasons, all_labels, required):
    """The kernels' answer: ``(row, score, eligible, factors, rejected, missing)``.

    ``factors`` (6 floats) and ``rejected`` (7 counts) are tuples, which numba hands back to
    Python faster than arrays; ``missing`` is the uint64 bitset of the required labels that some
    label-rejected agent lacks.
    """
    missing = required & ~all_labels[: required.shape[0]]
    return best, best_score, eligible, factors, _rejected(reasons), missing


@jit
def _pick(c, q):
    """Serial pick; see :func:`_answer` for what it returns."""
    masks, counts, labels = _scratch(q.labels.shape[0])
    best, best_score, eligible, factors = _pick_rows(c, q, masks, counts, labels)
    return _answer(best, best_score, eligible, factors, counts, labels, q.labels)


@jit_parallel
def _pick_parallel(c, q, n_chunks):
    """The same pick as :func:`_pick`, over ``n_chunks`` slabs scanned in parallel."""
    # Each chunk owns one row of every slab; the reductions below are serial: no shared writes.
    n = np.uint64(c.team.shape[0])
    chunks = np.uint64(n_chunks)
    step = (n + chunks - _ONE) // chunks
    words = q.labels.shape[0]
    scratch = np.empty((n_chunks, BLOCK), np.uint8)
    reasons = np.zeros((n_chunks, N_REASONS), np.int64)
    all_labels = np.full((n_chunks, words), _ALL)
    rows = np.full(n_chunks, -1, np.int64)
    scores = np.full(n_chunks, -np.inf)
    hashes = np.full(n_chunks, _MAX_HASH, np.uint64)
    counts = np.zeros(n_chunks, np.int64)
    for k in prange(n_chunks):
        lo, hi = min(n, np.uint64(k) * step), min(n, np.uint64(k + 1) * step)
        rows[k], scores[k], hashes[k], counts[k] = _scan(
            c, q, lo, hi, np.nan, scratch[k], reasons[k], all_labels[k]
        )
    k = _best_chunk(rows, scores, hashes)
    if k >= 0 and q.tie_band > 0.0:
        cut = scores[k] - q.tie_band
        band_reasons = np.zeros((n_chunks, N_REASONS), np.int64)
        band_labels = np.full((n_chunks, words), _ALL)
        for j in prange(n_chunks):
            lo, hi = min(n, np.uint64(j) * step), min(n, np.uint64(j + 1) * step)
            rows[j], scores[j], hashes[j], _ = _scan(
                c, q, lo, hi, cut, scratch[j], band_reasons[j], band_labels[j]
            )
        k = _best_chunk(rows, np.zeros(n_chunks), hashes)  # every candidate is in the band
    best, best_score = (rows[k], scores[k]) if k >= 0 else (-1, -np.inf)
    combined = np.full(words, _ALL)
    for j in range(n_chunks):
        combined &= all_labels[j]
    factors = _winner_factors(c, q, best)
    return _answer(best, best_score, counts.sum(), factors, reasons.sum(axis=0), combined, q.labels)


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
    n = np.uint64(c.team.shape[0])
    masks, counts, labels = _scratch(q.labels.shape[0])
    e = 0
    for start in range(_NONE, n, _BLOCK):
        m = min(_BLOCK, n - start)
        e = _block_eligibility(c, q, start, m, masks, counts, labels, e)
        for j in range(m):
            i = start + j
            out_masks[i] = masks[j]
            out_scores[i] = -np.inf if masks[j] else _score(c, q, i)
            out_hashes[i] = _tie_hash(c.id_hash[i], q.tie_key_hash)


@jit
def _factor_rows(c, q, rows, out):
    """The six factors of each row in ``rows`` (int64[k]) into ``out`` (float64[k, 6])."""
    for k in range(rows.shape[0]):
        f = _factors(c, q, rows[k])
        for x in range(N_FACTORS):
            out[k, x] = f[x]


# --- the flat entry point (see the module docstring for why it is flat) ------------------------


@jit
def _pick_flat(
    team, status, opt_in, region, gpu, heartbeat, capacity, running, vram, failure, id_hash,
    labels, models,
    now, timeout, q_team, community, q_labels, labels_unknown, min_vram, excluded, q_models,
    n_models, region_table, gpu_table, weights, tie_band, tie_key_hash,
    masks, counts, labels_and,
):  # fmt: skip
    """Serial pick over flat arguments (``Columns``, ``Query``, then :func:`_scratch`).

    Returns ``(row, score, eligible, factors, rejected)``: no array, so nothing is allocated or
    boxed; the required labels that label-rejected agents lack are
    ``q_labels & ~labels_and[:words]``.
    """
    c = Columns(team, status, opt_in, region, gpu, heartbeat, capacity, running, vram, failure,
                id_hash, labels, models)  # fmt: skip
    q = Query(now, timeout, q_team, community, q_labels, labels_unknown, min_vram, excluded,
              q_models, n_models, region_table, gpu_table, weights, tie_band,
              tie_key_hash)  # fmt: skip
    best, best_score, eligible, factors = _pick_rows(c, q, masks, counts, labels_and)
    return best, best_score, eligible, factors, _rejected(counts)
