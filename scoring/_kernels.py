"""Every jitted function of the package: eligibility, factors, score and the pick.

The kernels read the fleet's columns (a :class:`~scoring.layout.Columns`) and a request already
translated into numbers (a :class:`~scoring.layout.Query`); they never raise, never allocate Python
objects, and never see a value that the Python layer has not validated. One fused pass per decision
over the request's candidate rows computes, for each row, the bitmask of failed filters and, for
the eligible rows that a bound of the score does not rule out (see :func:`_reaches`), the
weighted score; the best row and the tie-break come out of the same pass.

Candidate rows are ``q.rows`` (the submitting team's rows, ``q.team_rows``; every row for the
full-scan reference path) followed by ``q.shared`` (the community index; rows of the submitting
team there are skipped, having been read in ``q.rows``). An agent outside the request's pool (only
the full scan meets one) counts once, under ``pool``, whatever else it fails (DESIGN section 4).
So an indexed pick never tests the pool: each part's scan is compiled for what its rows are
(:data:`FULL`, :data:`TEAM`, :data:`SHARED`), and reads ``opt_pos`` only to count an excluded
agent (:func:`_count_excluded`).

Numba's dispatcher types a namedtuple of arrays about four times slower than the same arrays passed
flat (3.7 us against 1.0 us for a 13-column fleet, measured), and a pick over 100 agents must take
about two microseconds end to end. So the hot entry point, :func:`_pick_flat`, takes flat
arguments and rebuilds the two namedtuples inside compiled code, where that costs nothing; the
parallel pick (large fleets) and the ranking are called with the namedtuples directly.
"""

from __future__ import annotations

import inspect

import numpy as np
from numba import prange

from scoring._jit import (
    bit_count,
    fixed_tuple,
    jit,
    jit_inline,
    jit_parallel,
    jit_row,
    lowest_bit,
)
from scoring._simd import LANES, above, and_where, at_most, below, equal, lacking, not_below, older
from scoring.layout import COLUMNS, FAILURE_STEPS, QUERY_FIELDS, VRAM_UNKNOWN, Columns, Query
from scoring.models import FACTORS, LAST_ELIGIBLE_STATUS, REASONS

#: Filters computed per row (``pool`` by :func:`_outside`, the others by :func:`_filters`;
#: ``excluded`` is looked up separately: it names a handful of rows). Each reason's bit in a
#: reject mask is its position in REASONS.
FILTERS = ("stale", "status", "pool", "labels", "capacity", "vram")
assert set(REASONS) == {*FILTERS, "excluded"}, "REASONS and the kernels' filters disagree"
STALE_BIT, STATUS_BIT, _, LABELS_BIT, CAPACITY_BIT, VRAM_BIT = (
    1 << REASONS.index(reason) for reason in FILTERS
)
N_REASONS = len(REASONS)
N_FACTORS = len(FACTORS)
POOL = REASONS.index("pool")
LABELS = REASONS.index("labels")
EXCLUDED = REASONS.index("excluded")
STALE, STATUS, CAPACITY, VRAM = (REASONS.index(r) for r in ("stale", "status", "capacity", "vram"))
SKIPPED = N_REASONS  # counts slot (and mask bit) of a community row of the submitting team
assert max(STALE, STATUS, LABELS) < 4 <= min(CAPACITY, VRAM, SKIPPED), "see _chunk_words' lanes"
POOL_BIT = np.uint8(1 << POOL)
LABEL_BIT = np.uint8(1 << LABELS)
_LABELS_SHIFT = np.uint64(16 * (LABELS % 4))
SKIP_BIT = np.uint8(1 << SKIPPED)
N_COUNTS = N_REASONS + 1
SLACK = 1.0 - 2.0**-49  # see _floor
_TINY = 1e-290
BOUND_SLACK, BOUND_ABS = 1.0 + 2.0**-40, 1e-300  # see _reaches
MOST_FAILURES = 65535  # the largest failure_rate code (a uint16 column)
_BOUNDED = ("region", "load", "pool", "warm", "gpu", "reliability")
REGION, LOAD, POOL_FACTOR, WARM, GPU, RELIABILITY = (FACTORS.index(f) for f in _BOUNDED)
assert sorted(FACTORS) == sorted(_BOUNDED), "a factor needs its term in _reaches or _bound_rest"
CHUNK = 64  # rows filtered together (a word's bits), before the rows that passed are ranked
#: The least rows left in a part for which the bound's failure limits are worked out when the
#: floor rises: the search (two binary searches of 16 steps) costs about as much as scoring
#: some thirty rows, more than it can save near a part's end.
BOUND_ROWS = 2 * CHUNK
FLUSH = 1000  # chunks whose counts add up in 16-bit lanes before they go to the scratch

_M32 = np.uint64(0xFFFFFFFF)
_S13, _S16, _S32 = np.uint64(13), np.uint64(16), np.uint64(32)
_C1, _C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
_ONE = np.uint64(1)
_NONE, _ALL = np.uint64(0), np.uint64(0xFFFFFFFFFFFFFFFF)
_SPREAD4, _LANES = np.uint64(0x0000200040008001), np.uint64(0x0001000100010001)
_LOW4, _FOUR, _LANE = np.uint64(15), np.uint64(4), np.uint64(0xFFFF)
_BYTE = np.uint64(0xFF)
assert CHUNK <= 64, "_chunk marks a chunk's passing rows in one word"
assert FLUSH * CHUNK < 1 << 16, "_scan_part sums lane counts of FLUSH chunks in 16 bits"
assert N_COUNTS <= 8, "_chunk counts a mask's bits in two words of four 16-bit lanes"
_MAX_HASH = _ALL
#: What a part of the candidate rows is (:func:`_part_mask`): any rows, each tested for the pool
#: (the full scan); the submitting team's rows (``q.rows`` of an indexed pick: all in the pool);
#: the community index (all opted in: in a community request's pool; the team's rows skipped).
FULL, TEAM, SHARED = 0, 1, 2


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


@jit_row
def _lanes(x):
    """Bit k of a 4-bit ``x`` at bit 16k: ``x * (1 + 2**15 + 2**30 + 2**45)`` puts a copy of
    ``x`` at bits 15k (the copies never overlap, so nothing carries), bit k of copy k at 16k."""
    return (x * _SPREAD4) & _LANES


# --- one row: filters and factors ----------------------------------------------------------------


@jit_row
def _filters(c, q, i, wide):
    """Row ``i``'s failed filters but ``pool`` (:func:`_outside`) as a bitmask, each filter on its
    own line under its name.

    A label bitset has at least one word. ``wide`` False: the fleet's has exactly one, and the
    word loop is compiled out; a loop over rows with a loop inside measured 2.5 ns a row slower,
    and 3.4 ns in a loop that vectorises without it.
    """
    labels = q.labels_unknown | ((q.labels[0] & ~c.labels[i, 0]) != _NONE)
    if wide:
        for w in range(1, q.labels.shape[0]):
            labels |= (q.labels[w] & ~c.labels[i, w]) != _NONE
    # unknown vram_gb fails a minimum; no minimum (-1) fails nobody (see layout.vram_floor)
    vram = c.vram_gb[i]
    return (
        STALE_BIT * (q.now - c.last_heartbeat[i] > q.heartbeat_timeout_s)
        | STATUS_BIT * (c.status[i] > LAST_ELIGIBLE_STATUS)
        | LABELS_BIT * labels
        | CAPACITY_BIT * (c.running_count[i] >= c.gpu_capacity[i])
        | VRAM_BIT * ((q.min_vram >= 0) & ((vram == VRAM_UNKNOWN) | (vram < q.min_vram)))
    )


@jit_row
def _outside(c, q, i):
    """Whether row ``i`` is outside the request's pool: not the team's, and not opted in to a
    community request's pool (no short-circuit: the scan's loop stays a straight line)."""
    return (c.team[i] != q.team) & (not (q.community & (c.opt_pos[i] >= 0)))


#: ``b / a`` at ``a * SMALL + b`` for ``0 < a < SMALL`` and ``0 <= b < SMALL`` (0 for ``a`` = 0,
#: never read): a row's ``running_count / gpu_capacity`` and a request's share of warm models by
#: a lookup instead of a division (the same float: the table is made by the same division), for
#: the small numbers nearly every fleet and request has. Three divisions a scored row took 8% of
#: a busy team's pick (measured).
SMALL = 16
_RATIOS = np.array([b / a if a else 0.0 for a in range(SMALL) for b in range(SMALL)])


@jit_row
def _ratio(b, a):
    """``b / a`` for integers ``0 <= b`` and ``0 < a`` (by :data:`_RATIOS` when both are small)."""
    if a < SMALL and b < SMALL:
        return _RATIOS[np.uint64(a) * np.uint64(SMALL) + np.uint64(b)]
    return b / a


@jit_row
def _factors(c, q, i):
    """Row ``i``'s factors, each in [0, 1], in FACTORS order."""
    # codes and rows as unsigned numbers: no wraparound of a negative index (see _chunk)
    region = q.region_table[np.uint64(c.region[i])]
    load = max(0.0, 1.0 - _ratio(c.running_count[i], c.gpu_capacity[i]))
    pool = 1.0 if c.team[i] == q.team else 0.0
    if q.n_models == 0:
        warm = 0.5
    else:
        # a bitset has a word at least; the first outside the loop, which then runs only for
        # wider bitsets (the loop alone: a vectorised loop's checks on every row)
        hits = bit_count(c.cached_models[i, 0] & q.models[0])
        for w in range(1, q.models.shape[0]):
            hits += bit_count(c.cached_models[i, w] & q.models[w])
        warm = _ratio(hits, q.n_models)
    gpu = q.gpu_table[np.uint64(c.gpu_model[i])]
    reliability = 1.0 - c.failure_rate[i] / FAILURE_STEPS
    return region, load, pool, warm, gpu, reliability


@jit_row
def _weighted(q, f):
    """sum(w_f * x_f) over factors ``f``, summed in FACTORS order (the score times the weights'
    sum)."""
    total = 0.0
    for k in range(N_FACTORS):
        total += q.weights[k] * f[k]
    return total


@jit_row
def _score(c, q, i):
    """Weighted mean of row ``i``'s factors: sum(w_f * x_f) / sum(w_f), summed in FACTORS order."""
    return _weighted(q, _factors(c, q, i)) / q.weights[N_FACTORS]


@jit_row
def _mask(c, q, i, skip, wide=True):
    """Row ``i``'s reject mask: every failed filter in the pool, only ``pool`` outside it, only
    :data:`SKIP_BIT` for a community row of the submitting team (``skip``). ``wide``: see
    :func:`_filters`."""
    mask = _part_mask(c, q, i, FULL, wide)
    if skip and c.team[i] == q.team:
        mask = SKIP_BIT
    return mask


@jit_row
def _part_mask(c, q, i, part, wide):
    """:func:`_mask` of row ``i`` of a part of the candidates (:data:`FULL`, :data:`TEAM` or
    :data:`SHARED`), testing only what can fail there: the pool only in a :data:`FULL` part,
    the team (to skip its rows) only in the :data:`SHARED` one. A team's pick over 1,000,000
    agents took 9% less time without the pool's test (measured)."""
    mask = np.uint8(_filters(c, q, i, wide))
    if part == FULL and _outside(c, q, i):
        mask = POOL_BIT
    if part == SHARED and c.team[i] == q.team:
        mask = SKIP_BIT
    return mask


@jit_row
def _row_at(q, p, n_rows):
    """The candidate at position ``p``, and whether it comes from the community index."""
    if p < n_rows:
        return q.rows[p], False
    return q.shared[p - n_rows], True


@jit_row
def _is_excluded(q, i):
    excluded = q.excluded
    if excluded.shape[0] == 0:
        return False
    k = np.searchsorted(excluded, i)
    return k < excluded.shape[0] and excluded[k] == i


@jit_row
def _in_pool(c, q, i):
    return not _outside(c, q, i)


# --- the scan ----------------------------------------------------------------------------------


@jit_inline
def _chunk(c, q, block, first, ranged, part, wide, limit_team, limit_other):
    """The candidate rows ``block`` (at most :data:`CHUNK`) in one pass: ``(passed, clean, low,
    high, labels)``.

    ``clean`` has bit ``j`` set when ``block[j]`` passed every filter, ``passed`` when it also
    may reach the floor: its failure_rate code is at most ``limit_team`` for a row of the
    submitting team, ``limit_other`` for another (:func:`_most_failures`). Only those need
    scoring. ``low`` and ``high`` hold the counts of the masks' bits 0-3 and 4-7, one to a
    16-bit lane (see :func:`_lanes`; a lane cannot overflow); ``labels`` is the AND of the first
    label word of the label-rejected rows (``required & ~labels`` is then the OR over those rows
    of ``required & ~label``: the labels some of them lack). ``ranged``: the rows are ``first,
    first + 1, ...`` and are read as a range, which vectorises. ``part``: what the rows are
    (:func:`_part_mask`; rows of the submitting team in the community index are skipped).
    ``wide``: see :func:`_filters`.

    One loop computes everything a row's mask gives, so the mask never goes to memory and the
    rows are read once: a pass for the masks, then one each for the counts, the label AND and the
    passing rows took 1.4-1.6 ns a row (100,000 and 1,000,000 agents), this loop 0.6-0.9 in a
    probe.
    """
    passed, clean, low, high, labels = _NONE, _NONE, _NONE, _NONE, _ALL
    for j in range(block.shape[0]):
        # Rows as unsigned numbers: a signed index makes numba wrap negative ones around, and that
        # branch kept the loop from vectorising (5.3 -> 3.6 ns a row gathered, measured).
        i = np.uint64(first) + np.uint64(j) if ranged else np.uint64(block[j])
        mask = np.uint64(_part_mask(c, q, i, part, wide))
        low += _lanes(mask & _LOW4)
        high += _lanes(mask >> _FOUR)
        labels &= c.labels[i, 0] | (_NONE if mask & LABEL_BIT else _ALL)
        ok = np.uint64(mask == 0) << np.uint64(j)
        clean |= ok
        if part == TEAM:
            limit = limit_team
        elif part == SHARED:  # the team's rows are skipped
            limit = limit_other
        else:
            limit = limit_team if c.team[i] == q.team else limit_other
        passed |= ok & (_ALL if np.int64(c.failure_rate[i]) <= limit else _NONE)
    return passed, clean, low, high, labels


@jit_inline
def _chunk_words(c, q, first, part, limit):
    """:func:`_chunk` of the :data:`CHUNK` consecutive rows from ``first`` in a :data:`TEAM` or
    :data:`SHARED` part with one label word, eight rows at a time (:mod:`scoring._simd`): one
    word of rows for each filter, each filter counted by its word's popcount. ``limit``: the
    part's failure limit (:func:`_most_failures`).

    :func:`_chunk`'s loop vectorises too, but builds each row's mask and then moves its bits
    into the words and lanes with vector shifts: this way the filter loop of a community pick
    over 1,000,000 agents went from 1.33 to 0.89 ns a candidate, a busy team's from 1.44 to
    1.03 (measured).
    """
    stale, status, labels, capacity = _NONE, _NONE, _NONE, _NONE
    vram, own, fit = _NONE, _NONE, _NONE
    minimum = q.min_vram >= 0
    for b in range(CHUNK // LANES):
        start, at = np.uint64(first) + np.uint64(b * LANES), np.uint64(b * LANES)
        stale |= older(c.last_heartbeat, start, q.now, q.heartbeat_timeout_s) << at
        status |= above(c.status, start, LAST_ELIGIBLE_STATUS) << at
        labels |= lacking(c.labels, start, q.labels[0]) << at
        capacity |= not_below(c.running_count, c.gpu_capacity, start) << at
        if minimum:  # unknown vram_gb fails a minimum (see _filters)
            short = equal(c.vram_gb, start, VRAM_UNKNOWN) | below(c.vram_gb, start, q.min_vram)
            vram |= short << at
        if part == SHARED:
            own |= equal(c.team, start, q.team) << at
        if limit >= 0:
            fit |= at_most(c.failure_rate, start, limit) << at
    if q.labels_unknown:
        labels = _ALL
    # the team's rows in the community index count as skipped and nothing else
    stale, status, labels = stale & ~own, status & ~own, labels & ~own
    capacity, vram = capacity & ~own, vram & ~own
    clean = ~(stale | status | labels | capacity | vram | own)
    low = _tally(_tally(_tally(_NONE, STALE, stale), STATUS, status), LABELS, labels)
    high = _tally(_tally(_tally(_NONE, CAPACITY - 4, capacity), VRAM - 4, vram), SKIPPED - 4, own)
    labels_and = _ALL
    for b in range(CHUNK // LANES):
        start, at = np.uint64(first) + np.uint64(b * LANES), np.uint64(b * LANES)
        labels_and &= and_where(c.labels, start, (labels >> at) & _BYTE)
    return clean & fit, clean, low, high, labels_and


@jit_row
def _tally(lanes, lane, word):
    """``lanes`` with the count of ``word``'s set bits added to 16-bit lane ``lane``."""
    return lanes + (np.uint64(bit_count(word)) << np.uint64(16 * lane))


@jit_row
def _bound_rest(w, n_models, region_table, gpu_table):
    """The most the factors :func:`_reaches` does not take can add to a row's weighted sum:
    each weight times the factor's largest value for the request (load: 1, an idle agent)."""
    warm = 0.5 if n_models == 0 else 1.0
    return (w[REGION] * _largest(region_table) + w[LOAD] + w[WARM] * warm
            + w[GPU] * _largest(gpu_table))  # fmt: skip


@jit_row
def _largest(factors):
    """The largest of some factors (each in [0, 1]); 0 for none."""
    top = 0.0
    for k in range(factors.shape[0]):
        top = max(top, factors[k])
    return top


@jit_row
def _reaches(w, rest, pool, failures, floor):
    """False only when the weighted sum (see :func:`_weighted`) of a row with pool factor
    ``pool`` and failure_rate code ``failures`` is surely below ``floor`` (:func:`_floor`:
    positive, or -inf), judged from those two factors (the same values as :func:`_factors`) and
    ``rest`` for the others (:func:`_bound_rest`).

    Every term is at least 0 and the bound and the weighted sum are each computed with at most
    a dozen roundings, so each is within ``1 + 12u`` (``u = 2**-53``) of its exact value, plus at
    most 12 times the smallest subnormal where terms underflow; :data:`BOUND_SLACK` and
    :data:`BOUND_ABS` cover both many times over. Each operation rounds monotonically, so the
    computed bound never rises with ``failures`` (see :func:`_most_failures`).
    """
    reliability = 1.0 - failures / FAILURE_STEPS
    most = rest + w[POOL_FACTOR] * pool + w[RELIABILITY] * reliability
    return most * BOUND_SLACK + BOUND_ABS >= floor


@jit_row
def _limits(w, n_models, region_table, gpu_table, rest, floor):
    """``(rest, limit_team, limit_other)`` for ``floor``: the bound's constant part
    (:func:`_bound_rest`, worked out if ``rest`` is NaN) and the failure limits of rows of the
    submitting team and of others (:func:`_most_failures`). One call taking a few arrays, not
    the Query: with the searches inlined in the scan, a pick over 100 agents (which never
    searches) took 0.15 us longer, this way 0.05 (measured)."""
    if np.isnan(rest):
        rest = _bound_rest(w, n_models, region_table, gpu_table)
    return rest, _most_failures(w, rest, 1.0, floor), _most_failures(w, rest, 0.0, floor)


@jit_row
def _most_failures(w, rest, pool, floor):
    """The largest failure_rate code for which :func:`_reaches` holds (rows with pool factor
    ``pool``), or -1 if none: the filter loop then compares integers (a row's bound in floating
    point, computed there, took a third of that loop's time). A binary search: :func:`_reaches`
    never turns true as ``failures`` grows. The load factor in the bound too (its exact value,
    not 1) pruned a few more rows but made the filter loop slower than it saved (measured)."""
    if _reaches(w, rest, pool, MOST_FAILURES, floor):
        return np.int64(MOST_FAILURES)
    if not _reaches(w, rest, pool, 0, floor):
        return np.int64(-1)
    low, high = 0, MOST_FAILURES  # reaches at low, not at high
    while high - low > 1:
        middle = (low + high) // 2
        if _reaches(w, rest, pool, middle, floor):
            low = middle
        else:
            high = middle
    return np.int64(low)


@jit_inline
def _consecutive(block, first):
    """Whether ``block`` holds ``first, first + 1, ...`` (an OR of XORs: a loop that vectorises)."""
    strays = np.uint32(0)
    start = np.uint32(first)
    for j in range(block.shape[0]):
        strays |= np.uint32(block[j]) ^ (start + np.uint32(j))
    return strays == 0


@jit_inline
def _flush(low, high, counts):
    """Add the lane counts ``low`` and ``high`` (see :func:`_chunk`) to ``counts``."""
    for k in range(4):
        counts[k] += np.int64((low >> np.uint64(16 * k)) & _LANE)
        counts[4 + k] += np.int64((high >> np.uint64(16 * k)) & _LANE)


@jit_inline
def _wide_labels(c, q, block, part, low, high, all_labels):
    """AND the label words after the first of a chunk's label-rejected rows into
    ``all_labels`` (read again, only when the labels are wide and some row was rejected on
    them; the first word comes from :func:`_chunk`). A chunk with wide labels is never read as a
    range."""
    words = q.labels.shape[0]
    if words > 1 and ((low if LABELS < 4 else high) >> _LABELS_SHIFT) & _LANE:
        for j in range(block.shape[0]):
            i = np.uint64(block[j])
            if _part_mask(c, q, i, part, True) & LABEL_BIT:
                for w in range(1, words):
                    all_labels[w] &= c.labels[i, w]


@jit_inline
def _scan(c, q, lo, hi, cut, counts, all_labels):
    """One fused pass over candidate positions ``[lo, hi)`` (``q.rows``, then ``q.shared``).

    With ``cut`` NaN the best score wins and exact ties go to the lowest tie hash; otherwise (the
    tie band's second pass) every eligible row scoring at least ``cut`` ranks equal and the lowest
    tie hash wins. Returns ``(best_row, best_score, best_tie_hash, eligible)``; ``best_row`` is -1
    when no row in the range qualifies.
    """
    n_rows = q.rows.shape[0]
    best = (np.int64(-1), -np.inf, -np.inf, _MAX_HASH, np.int64(0))
    if q.team_rows:
        best = _scan_part(c, q, q.rows, TEAM, min(lo, n_rows), min(hi, n_rows), cut, counts,
                          all_labels, best)  # fmt: skip
    else:
        best = _scan_part(c, q, q.rows, FULL, min(lo, n_rows), min(hi, n_rows), cut, counts,
                          all_labels, best)  # fmt: skip
    best = _scan_part(c, q, q.shared, SHARED, max(lo - n_rows, 0), max(hi - n_rows, 0), cut,
                      counts, all_labels, best)  # fmt: skip
    row, _, score, tie_hash, eligible = best
    return row, score, tie_hash, eligible


@jit_inline
def _scan_part(c, q, rows, part, lo, hi, cut, counts, all_labels, best):
    """:func:`_scan` over ``rows[lo:hi]``, :data:`CHUNK` rows at a time, carrying ``best`` =
    ``(row, rank, score, tie_hash, eligible)`` from part to part.

    Each chunk's filters come first (:func:`_chunk`: a word with a bit set for each row that
    passed them and whose bound reaches the floor, :func:`_reaches`), then only those rows are
    ranked, lowest first. The bound left some 80-98% of the passing rows of a busy team's or a
    community pick unscored (measured on the benchmark's requests), and a busy team's pick over
    1,000,000 agents went from 3.05 to 1.79 ns a candidate (1.60 with the bound compared as
    integers, :func:`_most_failures`). With rows to exclude, every passing row is visited (an
    excluded one is uncounted there), so no bound is used. A chunk of consecutive rows is read
    as a range (the fleet lays its rows out so that nearly every chunk is one), any other
    row by row. A row's weighted sum of factors is its score times the weights' sum; the division
    is done only for a sum that could reach the best score (or the band's cut): a sum below
    ``floor`` cannot, as the score is a correctly rounded quotient (see :func:`_floor`).
    """
    banded = not np.isnan(cut)
    best_row, best_rank, best_score, best_hash, eligible = best
    # the chunks' lane counts and first label words, summed in registers and added to the
    # scratch every FLUSH chunks (a 16-bit lane then holds at most FLUSH * CHUNK) and at the end
    low_sum, high_sum, labels_and, chunks = _NONE, _NONE, _ALL, 0
    weight = q.weights[N_FACTORS]
    floor = _floor(cut if banded else best_score, weight)
    narrow = q.labels.shape[0] == 1
    n = c.team.shape[0]
    # with rows to exclude every clean row is visited (and an excluded one uncounted): no bound
    bounded = q.excluded.shape[0] == 0
    # the failure limits hold for limits_floor (a lower floor keeps more rows: still sound)
    rest, limits_floor = np.nan, -np.inf
    limit_team, limit_other = np.int64(MOST_FAILURES), np.int64(MOST_FAILURES)
    for start in range(lo, hi, CHUNK):
        block = rows[start : min(start + CHUNK, hi)]
        first = np.int64(block[0])
        ranged = narrow and first + block.shape[0] <= n and _consecutive(block, first)
        least = floor if bounded else -np.inf
        if least > limits_floor and hi - start >= BOUND_ROWS:  # the floor rose
            rest, limit_team, limit_other = _limits(q.weights, q.n_models, q.region_table,
                                                    q.gpu_table, rest, least)  # fmt: skip
            limits_floor = least
        if part == FULL:  # the reference path: one general loop
            passed, clean, low, high, labels = _chunk(c, q, block, first, False, FULL, True,
                                                      limit_team, limit_other)  # fmt: skip
        elif ranged and block.shape[0] == CHUNK:
            passed, clean, low, high, labels = _chunk_words(
                c, q, first, part, limit_team if part == TEAM else limit_other
            )
        elif ranged:
            passed, clean, low, high, labels = _chunk(c, q, block, first, True, part, False,
                                                      limit_team, limit_other)  # fmt: skip
        elif narrow:  # no inner loop then: the loop stays a straight line
            passed, clean, low, high, labels = _chunk(c, q, block, first, False, part, False,
                                                      limit_team, limit_other)  # fmt: skip
        else:
            passed, clean, low, high, labels = _chunk(c, q, block, first, False, part, True,
                                                      limit_team, limit_other)  # fmt: skip
        eligible += bit_count(clean)
        _wide_labels(c, q, block, part, low, high, all_labels)
        low_sum += low
        high_sum += high
        labels_and &= labels
        chunks += 1
        if chunks == FLUSH:
            _flush(low_sum, high_sum, counts)
            low_sum, high_sum, chunks = _NONE, _NONE, 0
        while passed:
            j = lowest_bit(passed)
            passed &= passed - _ONE
            i = np.uint64(block[j])  # unsigned: see _chunk
            if _is_excluded(q, np.int64(i)):
                eligible -= 1
                continue
            total = _weighted(q, _factors(c, q, i))
            if total < floor:
                continue
            s = total / weight
            if banded and s < cut:
                continue
            rank = 0.0 if banded else s
            if rank >= best_rank:
                h = _tie_hash(c.id_hash[i], q.tie_key_hash)
                if rank > best_rank or h < best_hash:
                    best_row, best_rank, best_score, best_hash = np.int64(i), rank, s, h
                    if not banded:
                        floor = _floor(s, weight)
    _flush(low_sum, high_sum, counts)
    all_labels[0] &= labels_and
    return best_row, best_rank, best_score, best_hash, eligible


@jit_row
def _floor(score, weight):
    """A weighted sum below this has a score below ``score`` (the weights summing to ``weight``):
    the score is the quotient of the sum by ``weight``, correctly rounded, so a sum
    ``(1 - SLACK)`` below ``score * weight`` (itself rounded twice) ends below ``score``. Not for
    a score near the smallest normal float, where roundings are not relative: -inf then."""
    if score > _TINY:
        return score * weight * SLACK
    return -np.inf


@jit_inline
def _count_excluded(c, q, counts):
    """Add the excluded rows that are in the request's pool to ``counts[EXCLUDED]``."""
    for k in range(q.excluded.shape[0]):
        if _in_pool(c, q, q.excluded[k]):
            counts[EXCLUDED] += 1


@jit_inline
def _pick_rows(c, q, counts, labels):
    """The serial pick over every candidate, tallying into scratch (see :func:`_scratch`).

    Returns ``(row, score, eligible, factors)``; ``factors`` are the winner's (NaN if none).
    ``counts[:N_COUNTS]`` then holds the rows failing each filter (``pool`` only for rows outside
    the pool) and, last, the skipped community rows; ``labels[:words]`` the AND of the labels of
    label-rejected rows; the rest is the band pass's throwaway tally.
    """
    words = q.labels.shape[0]
    for r in range(2 * N_COUNTS):
        counts[r] = 0
    for w in range(2 * words):
        labels[w] = _ALL
    n = q.rows.shape[0] + q.shared.shape[0]
    cut, eligible = np.nan, 0
    for band in range(2):  # one inlined copy of _scan, not two: the first pick compiled in
        # 8 s instead of 10 (the band's pass tallies into the second halves of the scratch)
        found = _scan(c, q, 0, n, cut, counts[band * N_COUNTS : (band + 1) * N_COUNTS],
                      labels[band * words : (band + 1) * words])  # fmt: skip
        best, best_score = found[0], found[1]
        if band == 0:
            eligible = found[3]
            _count_excluded(c, q, counts[:N_COUNTS])
        if best < 0 or q.tie_band <= 0.0:
            break
        cut = best_score - q.tie_band
    return best, best_score, eligible, _winner_factors(c, q, best)


@jit_row
def _rejected(counts, n, fleet_size):
    """A pick's ``(rejected, considered)`` from its ``counts`` over ``n`` candidates: the
    candidates minus the skipped community rows and those outside the pool are the pool
    (``considered``); ``rejected`` holds each reason's count, ``pool`` counting every agent of
    the fleet outside the pool once (DESIGN section 4), and ``counts[POOL]`` holds that too
    afterwards."""
    considered = int(n - counts[SKIPPED] - counts[POOL])  # a Python int with the JIT off too
    counts[POOL] = fleet_size - considered
    return fixed_tuple(counts, N_REASONS), considered


@jit_inline
def _winner_factors(c, q, best):
    if best < 0:
        nan = np.nan
        return nan, nan, nan, nan, nan, nan
    return _factors(c, q, best)


@jit
def _scratch(label_words):
    """Working memory of one serial pick: its counts and label ANDs (each twice as long as one
    pass needs: the tie band's pass tallies into the second halves).

    Python callers keep one (the fleet does, used under its lock), so a pick allocates nothing.
    """
    return (
        np.zeros(2 * N_COUNTS, np.int64),
        np.full(2 * label_words, _ALL),
    )


@jit
def _pick(c, q):
    """Serial pick: ``(row, score, eligible, factors, counts, labels_and)`` (fresh scratch)."""
    counts, labels = _scratch(q.labels.shape[0])
    best, best_score, eligible, factors = _pick_rows(c, q, counts, labels)
    return best, best_score, eligible, factors, counts[:N_COUNTS], labels[: q.labels.shape[0]]


@jit_parallel
def _pick_parallel(c, q, n_chunks):
    """The same pick as :func:`_pick`, over ``n_chunks`` slabs of candidates scanned in parallel."""
    # Each chunk owns one row of every slab; the reductions below are serial: no shared writes.
    n = q.rows.shape[0] + q.shared.shape[0]
    step = (n + n_chunks - 1) // n_chunks
    words = q.labels.shape[0]
    counts = np.zeros((n_chunks, N_COUNTS), np.int64)
    all_labels = np.full((n_chunks, words), _ALL)
    rows = np.full(n_chunks, -1, np.int64)
    scores = np.full(n_chunks, -np.inf)
    hashes = np.full(n_chunks, _MAX_HASH, np.uint64)
    eligible = np.zeros(n_chunks, np.int64)
    for k in prange(n_chunks):
        lo, hi = min(n, k * step), min(n, (k + 1) * step)
        rows[k], scores[k], hashes[k], eligible[k] = _scan(
            c, q, lo, hi, np.nan, counts[k], all_labels[k]
        )
    k = _best_chunk(rows, scores, hashes)
    if k >= 0 and q.tie_band > 0.0:
        cut = scores[k] - q.tie_band
        band_counts = np.zeros((n_chunks, N_COUNTS), np.int64)
        band_labels = np.full((n_chunks, words), _ALL)
        for j in prange(n_chunks):
            lo, hi = min(n, j * step), min(n, (j + 1) * step)
            rows[j], scores[j], hashes[j], _ = _scan(
                c, q, lo, hi, cut, band_counts[j], band_labels[j]
            )
        k = _best_chunk(rows, np.zeros(n_chunks), hashes)  # every candidate is in the band
    best, best_score = (rows[k], scores[k]) if k >= 0 else (-1, -np.inf)
    combined = np.full(words, _ALL)
    for j in range(n_chunks):
        combined &= all_labels[j]
    total = counts.sum(axis=0)
    _count_excluded(c, q, total)
    return best, best_score, eligible.sum(), _winner_factors(c, q, best), total, combined


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
def _scores(c, q, out_rows, out_scores, out_hashes, out_masks):
    """Every candidate's row, reject mask (with the ``excluded`` bit), score (-inf when
    ineligible) and tie hash, by candidate position, for ranking and explaining."""
    n_rows = q.rows.shape[0]
    for p in range(n_rows + q.shared.shape[0]):
        i, skip = _row_at(q, p, n_rows)
        mask = _mask(c, q, i, skip)
        if (mask & (POOL_BIT | SKIP_BIT)) == 0 and _is_excluded(q, i):
            mask |= np.uint8(1 << EXCLUDED)
        out_rows[p] = i
        out_masks[p] = mask
        out_scores[p] = -np.inf if mask else _score(c, q, i)
        out_hashes[p] = _tie_hash(c.id_hash[i], q.tie_key_hash)


@jit
def _remap_bits(old, old_to_new, out):
    """Rewrite bitset rows after renumbering: bit ``b`` of ``old`` becomes ``old_to_new[b]``."""
    for i in range(old.shape[0]):
        for w in range(old.shape[1]):
            word = old[i, w]
            b = 0
            while word:
                if word & _ONE:
                    new = old_to_new[w * 64 + b]
                    out[i, new >> 6] |= _ONE << np.uint64(new & 63)
                word >>= _ONE
                b += 1


@jit
def _factor_rows(c, q, rows, out):
    """The factors of each row in ``rows`` (int64[k]) into ``out`` (float64[k, N_FACTORS])."""
    for k in range(rows.shape[0]):
        f = _factors(c, q, rows[k])
        for x in range(N_FACTORS):
            out[k, x] = f[x]


# --- the flat entry point (see the module docstring for why it is flat) ------------------------


@jit_row  # borrows its arguments, allocates nothing: no reference counting
def _pick_flat(
    team, status, opt_pos, team_pos, region, gpu_model, last_heartbeat, gpu_capacity,
    running_count, vram_gb, failure_rate, id_hash, labels, cached_models,
    counts, labels_and,
    q_heartbeat_timeout_s, q_team, q_community, q_labels, q_labels_unknown, q_min_vram,
    q_excluded, q_models, q_n_models, q_region_table, q_gpu_table, q_weights, q_tie_band,
    q_rows, q_shared, q_team_rows, q_fleet_size, q_now, q_tie_key_hash,
):  # fmt: skip
    """Serial pick over flat arguments: the columns, the scratch, the query (``q_`` + field).

    The query comes last, its per-call fields (``now``, the tie key) at the very end, so that a
    caller can keep everything before them in one tuple. Returns ``(row, score, eligible,
    factors, rejected, considered)`` (see :func:`_rejected`): no array, so nothing is allocated;
    the tuples are boxed in 0.17 us less than Python takes to read the counts from the scratch
    (measured). The required labels that label-rejected rows lack are
    ``q_labels & ~labels_and[:words]``.
    """
    c = Columns(team, status, opt_pos, team_pos, region, gpu_model, last_heartbeat, gpu_capacity,
                running_count, vram_gb, failure_rate, id_hash, labels, cached_models)  # fmt: skip
    q = Query(q_heartbeat_timeout_s, q_team, q_community, q_labels, q_labels_unknown,
              q_min_vram, q_excluded, q_models, q_n_models, q_region_table, q_gpu_table,
              q_weights, q_tie_band, q_rows, q_shared, q_team_rows, q_fleet_size, q_now,
              q_tie_key_hash)  # fmt: skip
    best, best_score, eligible, factors = _pick_rows(c, q, counts, labels_and)
    rejected, considered = _rejected(counts, q.rows.shape[0] + q.shared.shape[0], q.fleet_size)
    return best, best_score, eligible, factors, rejected, considered


def _check_flat_signature() -> None:
    """The flat entry point's parameters are the declared columns, the scratch, then the query's
    fields; and it builds its two namedtuples from them in declared order."""
    func = getattr(_pick_flat, "py_func", _pick_flat)
    names = list(inspect.signature(func).parameters)
    columns = [c.name for c in COLUMNS]
    fields = [f"q_{f.name}" for f in QUERY_FIELDS]
    source = " ".join(inspect.getsource(func).split())
    if (
        names != [*columns, "counts", "labels_and", *fields]
        or f"Columns({', '.join(columns)})" not in source
        or f"Query({', '.join(fields)})" not in source
    ):
        raise ImportError("_pick_flat's parameters disagree with scoring.layout")


_check_flat_signature()
