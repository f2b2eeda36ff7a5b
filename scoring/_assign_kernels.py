"""The jitted side of :func:`scoring.assign`: a queue of requests onto free slots in one call.

Requests that share everything that decides eligibility and score except the tie key form a
*group*; each group scans its pool once, into a max-heap of its eligible rows keyed by score, and
every request of the group then takes the heap's best in O(log n). Within one call scores only
ever fall (a reservation lowers the load factor; nothing is released), so a key is an upper bound
of its row's current score: a popped row is re-scored and pushed back when its key was stale
(lazy deletion), and a full one is dropped. The ties of the best score (or the rows within the
tie band) are popped together and the request's lowest tie hash wins, exactly as the pick does.

Groups are packed into arrays (one row per group, ragged parts in CSR form) and rebuilt as a
:class:`~scoring.layout.Query` inside compiled code, so a whole queue is one kernel call.

Nothing here allocates, so every function is compiled without reference counting
(:func:`~scoring._jit.jit_row`): with it, each call of a helper taking the columns and a Query
counted every array of both up and down, atomically; a queue of 10,000 requests onto 10,000
agents took 6.5 ms in the kernel, 1.7 ms without (measured). The helpers a placement calls are
inlined (:func:`~scoring._jit.jit_inline`): a call passes the columns and the Query as some 150
machine words; inlined, the same queue took 0.95 ms (measured).
"""

from __future__ import annotations

import numpy as np

from scoring import _rules_generated as G
from scoring import rules
from scoring._jit import bit_count, jit_inline, jit_row
from scoring._kernels import (
    _NO_FACTORS,
    _NONE,
    EXCLUDED_BIT,
    _factors,
    _is_excluded,
    _mask,
    _row_at,
    _score,
    _tie_hash,
)
from scoring.layout import Query
from scoring.rules import CAPACITY_BIT, LABEL_BIT, N_FACTORS, N_REASONS, POOL_BIT

CAPACITY = rules.REASONS.index("capacity")
EXCLUDED = rules.REASONS.index("excluded")
#: What happened to each request (``out_state``).
NONE, PLACED, DEFERRED, LATER = 0, 1, 2, 3


@jit_inline
def _group_query(g, common, groups, tie_key_hash, excluded):
    """Group ``g``'s Query, for a request with ``tie_key_hash`` that excludes the sorted rows
    ``excluded`` (a group holds requests of one kind: their exclusions are their own)."""
    now, timeout, weights, tie_band, shared, fleet_size = common
    (team, community, labels, labels_unknown, min_vram, max_failures, models, n_models,
     region_table, gpu_table, rows_off, rows_flat) = groups  # fmt: skip
    return Query(
        timeout, team[g], community[g], labels[g], labels_unknown[g], min_vram[g],
        max_failures[g], excluded, models[g], n_models[g], region_table[g],
        gpu_table[g], weights, tie_band, rows_flat[rows_off[g] : rows_off[g + 1]],
        shared if community[g] else shared[:0], True, fleet_size, now, tie_key_hash,
    )  # fmt: skip


# --- a max-heap of (score, row) in keys[base:], rows[base:] --------------------------------------


@jit_inline
def _push(keys, rows, base, size, key, row):
    i = size
    keys[base + i], rows[base + i] = key, row
    while i > 0:
        parent = (i - 1) // 2
        if keys[base + parent] >= keys[base + i]:
            break
        keys[base + parent], keys[base + i] = keys[base + i], keys[base + parent]
        rows[base + parent], rows[base + i] = rows[base + i], rows[base + parent]
        i = parent
    return size + 1


@jit_inline
def _pop(keys, rows, base, size):
    size -= 1
    keys[base], rows[base] = keys[base + size], rows[base + size]
    i = 0
    while True:
        left, best = 2 * i + 1, i
        if left < size and keys[base + left] > keys[base + best]:
            best = left
        if left + 1 < size and keys[base + left + 1] > keys[base + best]:
            best = left + 1
        if best == i:
            return size
        keys[base + best], keys[base + i] = keys[base + i], keys[base + best]
        rows[base + best], rows[base + i] = rows[base + i], rows[base + best]
        i = best


@jit_inline
def _full(c, r):
    return rules.capacity(c, None, r, False)


@jit_inline
def _take(c, q, keys, rows, base, size, tie_rows, tie_scores, aside_rows, aside_keys):
    """Reserve the heap's best row for the request whose tie key hash and exclusions are in
    ``q``.

    Returns ``(row, score, factors, size)``; ``row`` -1 when the heap holds no row with a free
    slot that the request does not exclude. ``score`` and ``factors`` are the row's before its
    reservation. Rows the request excludes are popped aside (into ``aside_rows`` and
    ``aside_keys``, as long as ``q.excluded``) and pushed back before returning: the heap is
    its group's, shared by requests that exclude different agents.
    """
    n_aside = 0
    while size > 0:  # a valid top: free, not excluded, and its key its current score
        r = rows[base]
        if _full(c, r):
            size = _pop(keys, rows, base, size)
            continue
        if _is_excluded(q, r):
            aside_rows[n_aside], aside_keys[n_aside] = r, keys[base]
            n_aside += 1
            size = _pop(keys, rows, base, size)
            continue
        s = _score(c, q, r)
        if s < keys[base]:
            size = _pop(keys, rows, base, size)
            size = _push(keys, rows, base, size, s, r)
            continue
        break
    if size == 0:
        for k in range(n_aside):
            size = _push(keys, rows, base, size, aside_keys[k], aside_rows[k])
        return -1, np.nan, _NO_FACTORS, size
    best = keys[base]
    cut = best - q.tie_band if q.tie_band > 0.0 else best
    m = 0
    while size > 0 and keys[base] >= cut:  # every row within the band, re-scored
        r, keys_popped = rows[base], keys[base]
        size = _pop(keys, rows, base, size)
        if m == 0:  # the top: free, and scored just now
            tie_rows[0], tie_scores[0] = r, best
            m = 1
            continue
        if _full(c, r):
            continue
        if _is_excluded(q, r):
            aside_rows[n_aside], aside_keys[n_aside] = r, keys_popped
            n_aside += 1
            continue
        s = _score(c, q, r)
        if s >= cut:
            tie_rows[m], tie_scores[m] = r, s
            m += 1
        else:  # below the band now: it cannot come back to the top in this loop
            size = _push(keys, rows, base, size, s, r)
    j, low = 0, _tie_hash(c.id_hash[tie_rows[0]], q.tie_key_hash)
    for k in range(1, m):
        h = _tie_hash(c.id_hash[tie_rows[k]], q.tie_key_hash)
        if h < low:
            j, low = k, h
    for k in range(m):
        if k != j:
            size = _push(keys, rows, base, size, tie_scores[k], tie_rows[k])
    for k in range(n_aside):
        size = _push(keys, rows, base, size, aside_keys[k], aside_rows[k])
    r = tie_rows[j]
    factors = _factors(c, q, r)
    rules.reserve(c, r)
    if not _full(c, r):
        size = _push(keys, rows, base, size, _score(c, q, r), r)
    return r, tie_scores[j], factors, size


# --- groups --------------------------------------------------------------------------------------


@jit_inline
def _warm(c, q, r):
    """Whether row ``r`` caches every required model (the query knows all of them): its warm
    factor is 1 (a share of integers, exact)."""
    return rules.warm(c, q, r) == 1.0


@jit_row
def _knows_all_models(q):
    known = 0
    for w in range(q.models.shape[0]):
        known += bit_count(q.models[w])
    return q.n_models > 0 and known == q.n_models


@jit_row
def _init_group(c, q, g, heap, warm, warm_rows, counts, labels_and, considered):
    """Scan group ``g``'s pool once: its heaps, warm rows, counts and label AND."""
    keys, rows, base, size = heap[0], heap[1], heap[2][g], 0
    wkeys, wrows, wbase, wsize = warm[0], warm[1], warm[2][g], 0
    n_rows = q.rows.shape[0]
    knows = _knows_all_models(q)
    n_warm = 0
    for p in range(n_rows + q.shared.shape[0]):
        r, skip = _row_at(q, p, n_rows)
        mask = _mask(c, q, r, skip)
        if mask & POOL_BIT or (skip and c.team[r] == q.team):
            continue  # outside the pool, or read already among the team's rows
        considered[g] += 1
        if _is_excluded(q, r):
            mask |= EXCLUDED_BIT
        for k in range(N_REASONS):
            counts[g, k] += (mask >> k) & 1
        if mask & LABEL_BIT:
            for w in range(q.labels.shape[0]):
                labels_and[g, w] &= c.labels[r, w]
        is_warm = knows and _warm(c, q, r)
        if is_warm:
            warm_rows[wbase + n_warm] = r
            n_warm += 1
        if mask == 0:
            s = _score(c, q, r)
            size = _push(keys, rows, base, size, s, r)
            if is_warm:
                wsize = _push(wkeys, wrows, wbase, wsize, s, r)
    heap[3][g], warm[3][g], warm[4][g] = size, wsize, n_warm


@jit_row
def _busy_warm(c, q, g, warm, warm_rows):
    """The busy slots of the pool's warm rows that fail only ``capacity`` (what a deferral can
    wait for: each frees when its run ends)."""
    base, n, slots = warm[2][g], warm[4][g], 0
    for k in range(n):
        r = warm_rows[base + k]
        if _mask(c, q, r, False) == CAPACITY_BIT and not _is_excluded(q, r):
            slots += np.int64(c.running_count[r])  # uint16: no wraparound without the JIT
    return slots


@jit_inline
def _passes_but_capacity(c, common, groups, g, r):
    """Whether row ``r`` is in group ``g``'s pool and passes every filter but ``capacity`` (and
    ``excluded``: a group's requests each exclude their own rows, see ``_own_exclusions``): the
    filters of :data:`scoring.rules.ROW_FILTERS`, asked of the group's Query (inlined, only the
    fields they read are built)."""
    q = _group_query(g, common, groups, _NONE, groups[0][:0])  # no exclusions (int64, empty)
    if rules.outside(c, q, r, True):
        return False, False
    return True, G.passes_but_capacity(c, q, r)


@jit_inline
def _account(c, common, groups, r, counts, eligible, versions):
    """Row ``r`` was just reserved: if that filled it, every group whose pool holds it counts one
    more ``capacity``, and one eligible fewer where it was eligible; its version moves on (by
    the number of groups: group ``g``'s versions stay ``g`` modulo that, unique to it)."""
    if not _full(c, r):
        return
    for g in range(eligible.shape[0]):
        in_pool, passes = _passes_but_capacity(c, common, groups, g, r)
        if in_pool:
            counts[g, CAPACITY] += 1
            versions[g] += versions.shape[0]
            if passes:
                eligible[g] -= 1


@jit_inline
def _own_exclusions(c, q, i, out_counts, out_eligible):
    """Request ``i``'s counts from its group's: each agent of the pool it excludes counts under
    ``excluded``, and one eligible fewer if it passes every other filter now."""
    for k in range(q.excluded.shape[0]):
        mask = _mask(c, q, q.excluded[k], False)
        if not mask & POOL_BIT:
            out_counts[i, EXCLUDED] += 1
            if mask == 0:
                out_eligible[i] -= 1


@jit_row
def _assign(c, common, groups, req_group, req_hash, req_excluded, req_young, req_later, heap,
            warm, warm_rows, deferrals, counts, eligible, versions, tie_rows, tie_scores, aside,
            out):  # fmt: skip
    """Place requests (in the order of ``req_group``) and write what happened to each into
    ``out`` = ``(state, row, score, factors, eligible, counts, version)``: ``version`` is
    ``versions[g]`` of the request's group ``g`` when the request was considered; it changes
    whenever the group's counts or eligible do (:func:`_account`), so requests with equal versions
    and states have equal outcomes.

    A young request (``req_young``) with required models takes a warm row, else is deferred when
    a warm row is merely full and fewer than ``per_slot`` times its busy slots were deferred in
    its kind before it, else is marked LATER (to place in a second call, ``req_later``).
    ``deferrals`` = ``(per_slot, kind of each group, deferred so far per kind, busy warm slots
    per group)``; the last is a cache (-1: not counted yet), dropped whenever a placement fills
    a row: only then can a group's busy warm slots change within a call. A request's own
    exclusions (``req_excluded`` = ``(offsets, sorted rows)``, CSR) are applied to its group's
    counts and heaps as it is considered; ``aside`` = ``(rows, keys)`` has room for the most
    exclusions a request can have.
    """
    per_slot, template, deferred, busy = deferrals
    ex_off, ex_rows = req_excluded
    state, out_row, out_score, out_factors, out_eligible, out_counts, out_version = out
    for i in range(req_group.shape[0]):
        g = req_group[i]
        q = _group_query(g, common, groups, req_hash[i], ex_rows[ex_off[i] : ex_off[i + 1]])
        out_eligible[i] = eligible[g]
        out_version[i] = versions[g]
        for k in range(N_REASONS):
            out_counts[i, k] = counts[g, k]
        _own_exclusions(c, q, i, out_counts, out_eligible)
        if req_young[i] and not req_later[i]:
            r, s, f, size = _take(c, q, warm[0], warm[1], warm[2][g], warm[3][g], tie_rows,
                                  tie_scores, aside[0], aside[1])  # fmt: skip
            warm[3][g] = size
            if r < 0:
                t = template[g]
                if q.excluded.shape[0]:  # its own busy warm slots: not the group's
                    slots = _busy_warm(c, q, g, warm, warm_rows)
                else:
                    if busy[g] < 0:
                        busy[g] = _busy_warm(c, q, g, warm, warm_rows)
                    slots = busy[g]
                if deferred[t] < per_slot * slots:
                    state[i] = DEFERRED
                    deferred[t] += 1
                else:
                    state[i] = LATER
                continue
        else:
            r, s, f, size = _take(c, q, heap[0], heap[1], heap[2][g], heap[3][g], tie_rows,
                                  tie_scores, aside[0], aside[1])  # fmt: skip
            heap[3][g] = size
            if r < 0:
                state[i] = NONE
                continue
        state[i], out_row[i], out_score[i] = PLACED, r, s
        for k in range(N_FACTORS):
            out_factors[i, k] = f[k]
        if _full(c, r):
            busy[:] = -1
        _account(c, common, groups, r, counts, eligible, versions)


@jit_row
def _init_groups(c, common, groups, heap, warm, warm_rows, counts, labels_and, considered,
                 eligible, no_rows):  # fmt: skip
    for g in range(eligible.shape[0]):
        q = _group_query(g, common, groups, _NONE, no_rows)
        _init_group(c, q, g, heap, warm, warm_rows, counts, labels_and, considered)
        eligible[g] = heap[3][g]
