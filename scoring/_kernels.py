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

Every filter and factor is read from :mod:`scoring.rules` (through the functions generated from its
tables, :mod:`scoring._rules_generated`): nothing here restates a rule. The hot entry point,
:func:`_pick_records`, takes the columns and the query as records; called through its compiled
entry point (``_jit.NativeEntry``, no numba dispatch) it costs what 35 flat arguments did (1.0 us
either way for a 100-agent pick, measured).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from scoring import _rules_generated as G
from scoring import rules
from scoring._jit import (
    bit_count,
    fixed_tuple,
    jit,
    jit_inline,
    jit_parallel,
    jit_row,
    lowest_bit,
    set_item,
)
from scoring._simd import LANES, and_where, at_most, equal
from scoring.layout import Query, column_dtypes
from scoring.rules import (
    LABEL_BIT,
    N_COUNTS,
    N_FACTORS,
    N_REASONS,
    POOL_BIT,
    POOL_FACTOR,
    RELIABILITY,
    ROW_INDEX,
    SKIP_BIT,
    SKIPPED,
)

_MASK = rules.MASK.type  # a reject mask: a bit per reason, and SKIP_BIT
POOL = rules.REASONS.index("pool")
LABELS = rules.REASONS.index("labels")
EXCLUDED = rules.REASONS.index("excluded")
EXCLUDED_BIT = rules.EXCLUDED_BIT
#: Counts of a chunk's mask bits are kept four to a word, one to a 16-bit lane (see _lanes)
N_LANE_WORDS = (N_COUNTS + 3) // 4
_LABELS_WORD, _LABELS_SHIFT = LABELS // 4, np.uint64(16 * (LABELS % 4))
N_ROW_FILTERS = len(ROW_INDEX)
_LABELS_AT = ROW_INDEX.index(LABELS)  # the labels filter's word in _chunk_words
SLACK = 1.0 - 2.0**-49  # see _floor
_TINY = 1e-290
BOUND_SLACK, BOUND_ABS = 1.0 + 2.0**-40, 1e-300  # see _reaches
MOST_FAILURES = int(np.iinfo(column_dtypes()["failure_rate"]).max)  # the largest code
CHUNK = rules.CHUNK  # rows filtered together, before the rows that passed are ranked
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
_NO_LANES = (_NONE,) * N_LANE_WORDS
_NO_FACTORS = (np.nan,) * N_FACTORS
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


@jit_inline
def _filters(c, q, i, wide):
    """Row ``i``'s failed filters but ``pool`` (:func:`_outside`) and ``excluded`` as a bitmask
    (:data:`scoring.rules.ROW_FILTERS`). ``wide``: the label bitsets have more than one word."""
    return G.row_mask(c, q, i, wide)


@jit_inline
def _outside(c, q, i):
    """Whether row ``i`` is outside the request's pool (:func:`scoring.rules.outside`)."""
    return rules.outside(c, q, i, False)


@jit_row
def _factors(c, q, i):
    """Row ``i``'s factors, each in [0, 1], in FACTORS order (``rules.FACTOR_TABLE``)."""
    return G.factors(c, q, i)


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
    mask = _MASK(_filters(c, q, i, wide))
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
    """Whether row ``i`` is in ``q.excluded`` (:func:`scoring.rules.excluded`)."""
    return rules.excluded(None, q, i, False)


@jit_row
def _in_pool(c, q, i):
    return not _outside(c, q, i)


# --- the scan ----------------------------------------------------------------------------------


@jit_inline
def _chunk(c, q, block, first, ranged, part, wide, limit_team, limit_other):
    """The candidate rows ``block`` (at most :data:`CHUNK`) in one pass: ``(passed, clean, lanes,
    labels)``.

    ``clean`` has bit ``j`` set when ``block[j]`` passed every filter, ``passed`` when it also
    may reach the floor: its failure_rate code is at most ``limit_team`` for a row of the
    submitting team, ``limit_other`` for another (:func:`_most_failures`). Only those need
    scoring. ``lanes`` holds the counts of the masks' bits, bits ``4w`` to ``4w + 3`` in word
    ``w``, one to a 16-bit lane (see :func:`_lanes`; a lane cannot overflow); ``labels`` is the
    AND of the first label word of the label-rejected rows (``required & ~labels`` is then the
    OR over those rows of ``required & ~label``: the labels some of them lack). ``ranged``: the
    rows are ``first, first + 1, ...`` and are read as a range, which vectorises. ``part``: what
    the rows are (:func:`_part_mask`; rows of the submitting team in the community index are
    skipped). ``wide``: see :func:`_filters`.

    One loop computes everything a row's mask gives, so the mask never goes to memory and the
    rows are read once: a pass for the masks, then one each for the counts, the label AND and the
    passing rows took 1.4-1.6 ns a row (100,000 and 1,000,000 agents), this loop 0.6-0.9 in a
    probe.
    """
    passed, clean, lanes, labels = _NONE, _NONE, _NO_LANES, _ALL
    for j in range(block.shape[0]):
        # Rows as unsigned numbers: a signed index makes numba wrap negative ones around, and that
        # branch kept the loop from vectorising (5.3 -> 3.6 ns a row gathered, measured).
        i = np.uint64(first) + np.uint64(j) if ranged else np.uint64(block[j])
        mask = np.uint64(_part_mask(c, q, i, part, wide))
        for w in range(N_LANE_WORDS):
            lanes = set_item(lanes, w, lanes[w] + _lanes((mask >> np.uint64(4 * w)) & _LOW4))
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
    return passed, clean, lanes, labels


@jit_inline
def _chunk_words(c, q, first, part, limit):
    """:func:`_chunk` of the :data:`CHUNK` consecutive rows from ``first`` in a :data:`TEAM` or
    :data:`SHARED` part with one label word, eight rows at a time (the filters' eight-row
    predicates of :data:`scoring.rules.ROW_FILTERS`): one word of rows for each filter, each
    filter counted by its word's popcount. ``limit``: the part's failure limit
    (:func:`_most_failures`).

    :func:`_chunk`'s loop vectorises too, but builds each row's mask and then moves its bits
    into the words and lanes with vector shifts: this way the filter loop of a community pick
    over 1,000,000 agents went from 1.33 to 0.89 ns a candidate, a busy team's from 1.44 to
    1.03 (measured).
    """
    own, fit = _NONE, _NONE
    if part == SHARED or limit >= 0:
        for b in range(CHUNK // LANES):
            start, at = np.uint64(first) + np.uint64(b * LANES), np.uint64(b * LANES)
            if part == SHARED:
                own |= equal(c.team, start, q.team) << at
            if limit >= 0:
                fit |= at_most(c.failure_rate, start, limit) << at
    # the team's rows in the community index count as skipped and nothing else
    words = G.chunk_words(c, q, first)
    failed, lanes = own, _tally(_NO_LANES, SKIPPED, own)
    for k in range(N_ROW_FILTERS):
        word = words[k] & ~own
        failed |= word
        lanes = _tally(lanes, ROW_INDEX[k], word)
    labels = words[_LABELS_AT] & ~own
    clean = ~failed
    labels_and = _ALL
    for b in range(CHUNK // LANES):
        start, at = np.uint64(first) + np.uint64(b * LANES), np.uint64(b * LANES)
        labels_and &= and_where(c.labels, start, (labels >> at) & _BYTE)
    return clean & fit, clean, lanes, labels_and


@jit_row
def _tally(lanes, k, word):
    """``lanes`` (see :func:`_chunk`) with the count of ``word``'s set bits added to mask bit
    ``k``'s lane."""
    w = k // 4
    return set_item(lanes, w, lanes[w] + (np.uint64(bit_count(word)) << np.uint64(16 * (k % 4))))


@jit_inline
def _bound_rest(q):
    """The most the factors :func:`_reaches` does not take can add to a row's weighted sum:
    each weight times the factor's largest value for the request
    (:data:`scoring.rules.FACTOR_TABLE`), in FACTORS order."""
    return G.largest_rest(q)


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
    most = rest + w[POOL_FACTOR] * pool + w[RELIABILITY] * rules.reliability_of(failures)
    return most * BOUND_SLACK + BOUND_ABS >= floor


@jit_row
def _limits(w, rest, floor):
    """``(limit_team, limit_other)`` for ``floor``: the failure limits of rows of the submitting
    team and of others (:func:`_most_failures`) for the bound's constant part ``rest``
    (:func:`_bound_rest`). One call taking the weights, not the Query: with the searches inlined
    in the scan, a pick over 100 agents (which never searches) took 0.15 us longer, this way
    0.05 (measured)."""
    return _most_failures(w, rest, 1.0, floor), _most_failures(w, rest, 0.0, floor)


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
def _flush(lanes, counts):
    """Add the lane counts ``lanes`` (see :func:`_chunk`) to ``counts``."""
    for k in range(N_COUNTS):
        counts[k] += np.int64((lanes[k // 4] >> np.uint64(16 * (k % 4))) & _LANE)


@jit_inline
def _add_lanes(a, b):
    for w in range(N_LANE_WORDS):
        a = set_item(a, w, a[w] + b[w])
    return a


@jit_inline
def _wide_labels(c, q, block, part, lanes, all_labels):
    """AND the label words after the first of a chunk's label-rejected rows into
    ``all_labels`` (read again, only when the labels are wide and some row was rejected on
    them; the first word comes from :func:`_chunk`). A chunk with wide labels is never read as a
    range."""
    words = q.labels.shape[0]
    if words > 1 and (lanes[_LABELS_WORD] >> _LABELS_SHIFT) & _LANE:
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
    lane_sum, labels_and, chunks = _NO_LANES, _ALL, 0
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
            if np.isnan(rest):
                rest = _bound_rest(q)
            limit_team, limit_other = _limits(q.weights, rest, least)
            limits_floor = least
        if part == FULL:  # the reference path: one general loop
            passed, clean, lanes, labels = _chunk(c, q, block, first, False, FULL, True,
                                                   limit_team, limit_other)  # fmt: skip
        elif ranged and block.shape[0] == CHUNK:
            passed, clean, lanes, labels = _chunk_words(
                c, q, first, part, limit_team if part == TEAM else limit_other
            )
        elif ranged:
            passed, clean, lanes, labels = _chunk(c, q, block, first, True, part, False,
                                                   limit_team, limit_other)  # fmt: skip
        elif narrow:  # no inner loop then: the loop stays a straight line
            passed, clean, lanes, labels = _chunk(c, q, block, first, False, part, False,
                                                   limit_team, limit_other)  # fmt: skip
        else:
            passed, clean, lanes, labels = _chunk(c, q, block, first, False, part, True,
                                                   limit_team, limit_other)  # fmt: skip
        eligible += bit_count(clean)
        _wide_labels(c, q, block, part, lanes, all_labels)
        lane_sum = _add_lanes(lane_sum, lanes)
        labels_and &= labels
        chunks += 1
        if chunks == FLUSH:
            _flush(lane_sum, counts)
            lane_sum, chunks = _NO_LANES, 0
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
    _flush(lane_sum, counts)
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


@jit
def _scan_slab(c, q, lo, hi, cut, counts, all_labels):
    """:func:`_scan`, not inlined: numba's parfor array analysis fails (an IndexError in its
    shape inference) on the inlined scan's tuple updates in a ``prange`` body, so the parallel
    kernel calls the scan, once a slab, through this."""
    return _scan(c, q, lo, hi, cut, counts, all_labels)


@jit
def _parallel_tail(c, q, best, total):
    """:func:`_count_excluded` and :func:`_winner_factors`, not inlined (as :func:`_scan_slab`)."""
    _count_excluded(c, q, total)
    return _winner_factors(c, q, best)


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
        rows[k], scores[k], hashes[k], eligible[k] = _scan_slab(
            c, q, lo, hi, np.nan, counts[k], all_labels[k]
        )
    k = _best_chunk(rows, scores, hashes)
    if k >= 0 and q.tie_band > 0.0:
        cut = scores[k] - q.tie_band
        band_counts = np.zeros((n_chunks, N_COUNTS), np.int64)
        band_labels = np.full((n_chunks, words), _ALL)
        for j in prange(n_chunks):
            lo, hi = min(n, j * step), min(n, (j + 1) * step)
            rows[j], scores[j], hashes[j], _ = _scan_slab(
                c, q, lo, hi, cut, band_counts[j], band_labels[j]
            )
        k = _best_chunk(rows, np.zeros(n_chunks), hashes)  # every candidate is in the band
    best, best_score = (rows[k], scores[k]) if k >= 0 else (-1, -np.inf)
    combined = np.full(words, _ALL)
    for j in range(n_chunks):
        combined &= all_labels[j]
    total = counts.sum(axis=0)
    factors = _parallel_tail(c, q, best, total)
    return best, best_score, eligible.sum(), factors, total, combined


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
            mask |= EXCLUDED_BIT
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


# --- the entry point ----------------------------------------------------------------------------


@jit_row  # borrows its arguments, allocates nothing: no reference counting
def _pick_records(c, counts, labels_and, fixed, now, tie_key_hash):
    """Serial pick over the columns ``c``, the scratch (``counts``, ``labels_and``) and the
    query: its fields but the per-call ones (``fixed``, a tuple in :data:`QUERY_FIELDS` order),
    then those (``now``, the tie key's hash), so that a caller can keep everything before them.

    Returns ``(row, score, eligible, factors, rejected, considered)`` (see :func:`_rejected`): no
    array, so nothing is allocated; the tuples are boxed in 0.17 us less than Python takes to
    read the counts from the scratch (measured). The required labels that label-rejected rows
    lack are ``q.labels & ~labels_and[:words]``.
    """
    q = Query(*fixed, now, tie_key_hash)
    best, best_score, eligible, factors = _pick_rows(c, q, counts, labels_and)
    rejected, considered = _rejected(counts, q.rows.shape[0] + q.shared.shape[0], q.fleet_size)
    return best, best_score, eligible, factors, rejected, considered
