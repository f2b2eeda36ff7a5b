"""Every hard filter and every scoring factor of the engine, each declared once (DESIGN section 5).

A filter (:class:`Filter`) is its reason name (``Decision.rejected``'s key, its bit in a reject
mask), its one-row predicate and, for the filters tested on every candidate row, its eight-row
predicate (:mod:`scoring._simd`: bit ``k`` for row ``start + k``). A factor (:class:`Factor`) is
its name, its formula for one row and, beside it, the largest value it can take for a request
(the bound by which the scan leaves rows unscored, ``_kernels._reaches``). The pick's scan
(``_kernels``), ``assign``'s kernels (``_assign_kernels``) and the explanation read these tables
(the kernels through functions generated from them, :mod:`scoring._rules_generated`); none of them
restates a rule. Adding one is an entry here, its field, the reference's copy
(:mod:`scoring.reference`, which shares no code with this) and a worked example.

Predicates take the fleet's columns ``c`` (:class:`~scoring.layout.Columns`), a translated request
``q`` (:class:`~scoring.layout.Query`) and a row ``i`` (one-row; plus ``wide``: the label bitsets
have more than one word) or ``start`` (eight rows). They never raise and never allocate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scoring._jit import bit_count, jit_inline
from scoring._simd import LANES, above, below, equal, lacking, not_below, older
from scoring.layout import FAILURE_STEPS, VRAM_UNKNOWN

_NONE, _BYTE = np.uint64(0), np.uint64(0xFF)
#: Rows the scan filters together (a word's bits), before the rows that passed are ranked.
CHUNK = 64

#: The statuses that can take a task, first in ``AgentStatus`` (``scoring.models`` checks): a
#: status code at most :data:`LAST_ELIGIBLE_STATUS` passes the ``status`` filter.
ELIGIBLE_STATUSES: tuple[str, ...] = ("idle", "busy")
LAST_ELIGIBLE_STATUS = len(ELIGIBLE_STATUSES) - 1


class Filter(NamedTuple):
    reason: str
    #: ``(c, q, i, wide) -> bool``: row ``i`` fails the filter
    row: Any
    #: ``(c, q, start) -> uint64``: bit ``k`` set when row ``start + k`` fails it (eight rows of
    #: a chunk read as a range); None for the two filters the scan does not test row by row:
    #: ``pool`` decides which rows are candidates at all, ``excluded`` names a few rows
    lanes: Any
    doc: str
    #: ``(q) -> bool``: whether the request uses the filter at all (None: every request does);
    #: a chunk skips the eight-row predicates of a filter its request does not use
    used: Any = None


# --- filters -------------------------------------------------------------------------------------


@jit_inline
def stale(c, q, i, wide):
    return q.now - c.last_heartbeat[i] > q.heartbeat_timeout_s


@jit_inline
def stale_lanes(c, q, start):
    return older(c.last_heartbeat, start, q.now, q.heartbeat_timeout_s)


@jit_inline
def status(c, q, i, wide):
    return c.status[i] > LAST_ELIGIBLE_STATUS


@jit_inline
def status_lanes(c, q, start):
    return above(c.status, start, LAST_ELIGIBLE_STATUS)


@jit_inline
def outside(c, q, i, wide):
    """Not the team's, and not opted in to a community request's pool (no short-circuit: the
    scan's loop stays a straight line)."""
    return (c.team[i] != q.team) & (not (q.community & (c.opt_pos[i] >= 0)))


@jit_inline
def labels(c, q, i, wide):
    """A label bitset has at least one word. ``wide`` False: the fleet's has exactly one and the
    word loop is compiled out (a loop over rows with a loop inside measured 2.5 ns a row
    slower, and 3.4 ns in a loop that vectorises without it)."""
    lacks = q.labels_unknown | ((q.labels[0] & ~c.labels[i, 0]) != _NONE)
    if wide:
        for w in range(1, q.labels.shape[0]):
            lacks |= (q.labels[w] & ~c.labels[i, w]) != _NONE
    return lacks


@jit_inline
def labels_lanes(c, q, start):
    """One label word (a chunk read as a range has narrow labels)."""
    return lacking(c.labels, start, q.labels[0]) | (_BYTE if q.labels_unknown else _NONE)


@jit_inline
def capacity(c, q, i, wide):
    return c.running_count[i] >= c.gpu_capacity[i]


@jit_inline
def capacity_lanes(c, q, start):
    return not_below(c.running_count, c.gpu_capacity, start)


@jit_inline
def vram(c, q, i, wide):
    """Unknown ``vram_gb`` fails a minimum; no minimum (-1) fails nobody (``layout.vram_floor``)."""
    v = c.vram_gb[i]
    return (q.min_vram >= 0) & ((v == VRAM_UNKNOWN) | (v < q.min_vram))


@jit_inline
def vram_used(q):
    return q.min_vram >= 0


@jit_inline
def vram_lanes(c, q, start):
    if q.min_vram < 0:
        return _NONE
    return equal(c.vram_gb, start, VRAM_UNKNOWN) | below(c.vram_gb, start, q.min_vram)


def failure_ceiling(max_failure_rate: float | None) -> int:
    """A request's ``max_failure_rate`` as the largest ``failure_rate`` code that passes, or -1
    for none: codes are integers and ``code / FAILURE_STEPS > m`` exactly when ``code >
    floor(m * FAILURE_STEPS)`` (the product is exact: FAILURE_STEPS is a power of two)."""
    if max_failure_rate is None:
        return -1
    return math.floor(max_failure_rate * FAILURE_STEPS)


@jit_inline
def failures(c, q, i, wide):
    """No maximum (-1) fails nobody (see :func:`failure_ceiling`)."""
    return (q.max_failures >= 0) & (c.failure_rate[i] > q.max_failures)


@jit_inline
def failures_used(q):
    return q.max_failures >= 0


@jit_inline
def failures_lanes(c, q, start):
    if q.max_failures < 0:
        return _NONE
    return above(c.failure_rate, start, q.max_failures)


_IDLE, _BUSY = ELIGIBLE_STATUSES.index("idle"), ELIGIBLE_STATUSES.index("busy")


@jit_inline
def reserve(c, i):
    """A placement on row ``i`` takes a slot: one more running, an idle agent turns busy (the
    rule ``Fleet.reserve`` applies to a record)."""
    c.running_count[i] += 1
    if c.status[i] == _IDLE:
        c.status[i] = _BUSY


@jit_inline
def excluded(c, q, i, wide):
    """``q.excluded`` is sorted."""
    rows = q.excluded
    if rows.shape[0] == 0:
        return False
    k = np.searchsorted(rows, i)
    return k < rows.shape[0] and rows[k] == i


#: Every hard filter, in the order of their bits in a reject mask (DESIGN section 3).
FILTERS: tuple[Filter, ...] = (
    Filter("stale", stale, stale_lanes, "now - last_heartbeat > heartbeat_timeout_s"),
    Filter("status", status, status_lanes, "status is not idle or busy"),
    Filter("pool", outside, None, "another team's agent, not opted in to a community request"),
    Filter("labels", labels, labels_lanes, "lacks a required label (the tool type is one)"),
    Filter("capacity", capacity, capacity_lanes, "running_count >= gpu_capacity"),
    Filter("vram", vram, vram_lanes, "min_vram_gb set and vram_gb below it or unknown", vram_used),
    Filter("excluded", excluded, None, "named in exclude_agents"),
    Filter(
        "failures",
        failures,
        failures_lanes,
        "max_failure_rate set and failure_rate above it",
        failures_used,
    ),
)
REASONS: tuple[str, ...] = tuple(f.reason for f in FILTERS)
N_REASONS = len(REASONS)
#: A reject mask has a bit per reason and one more, ``SKIPPED``: a community row of the
#: submitting team (read among the team's rows already); the scan counts each bit.
SKIPPED = N_REASONS
N_COUNTS = N_REASONS + 1
assert N_COUNTS <= 64, "a reject mask is one integer"
MASK = np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                     if np.dtype(t).itemsize * 8 >= N_COUNTS))  # fmt: skip


def bit(reason: str) -> Any:
    """``reason``'s bit in a reject mask, as a :data:`MASK` integer."""
    return MASK.type(1 << REASONS.index(reason))


POOL_BIT, LABEL_BIT, CAPACITY_BIT, EXCLUDED_BIT = (
    bit(r) for r in ("pool", "labels", "capacity", "excluded")
)
SKIP_BIT = MASK.type(1 << SKIPPED)


#: The filters the scan tests on every candidate row (those with an eight-row predicate).
ROW_FILTERS = tuple(f for f in FILTERS if f.lanes is not None)
ROW_INDEX = tuple(REASONS.index(f.reason) for f in ROW_FILTERS)


# --- factors -------------------------------------------------------------------------------------


class Factor(NamedTuple):
    name: str
    #: ``(c, q, i) -> float`` in [0, 1]
    value: Any
    #: ``(q) -> float``: the largest value any row can have for the request; None for the two
    #: factors the scan's bound takes per row (``pool`` by :func:`pool_of`, ``reliability``
    #: by :func:`reliability_of`: see ``_kernels._reaches``)
    largest: Any
    doc: str


#: ``b / a`` at ``a * SMALL + b`` for ``0 < a < SMALL`` and ``0 <= b < SMALL`` (0 for ``a`` = 0,
#: never read): a row's ``running_count / gpu_capacity`` and a request's share of warm models by
#: a lookup instead of a division (the same float: the table is made by the same division), for
#: the small numbers nearly every fleet and request has. Three divisions a scored row took 8% of
#: a busy team's pick (measured).
SMALL = 16
_RATIOS = np.array([b / a if a else 0.0 for a in range(SMALL) for b in range(SMALL)])


@jit_inline
def ratio(b, a):
    """``b / a`` for integers ``0 <= b`` and ``0 < a`` (by :data:`_RATIOS` when both are small)."""
    if a < SMALL and b < SMALL:
        return _RATIOS[np.uint64(a) * np.uint64(SMALL) + np.uint64(b)]
    return b / a


@jit_inline
def _largest_of(table):
    top = 0.0
    for k in range(table.shape[0]):
        top = max(top, table[k])
    return top


@jit_inline
def region(c, q, i):
    # codes as unsigned numbers: no wraparound of a negative index (see _kernels._chunk)
    return q.region_table[np.uint64(c.region[i])]


@jit_inline
def region_largest(q):
    return _largest_of(q.region_table)


@jit_inline
def load(c, q, i):
    return max(0.0, 1.0 - ratio(c.running_count[i], c.gpu_capacity[i]))


@jit_inline
def load_largest(q):
    return 1.0  # an idle agent


@jit_inline
def pool_of(own):
    """The pool factor of a row of the submitting team (``own``) or of another."""
    return 1.0 if own else 0.0


@jit_inline
def pool(c, q, i):
    return pool_of(c.team[i] == q.team)


@jit_inline
def warm(c, q, i):
    if q.n_models == 0:
        return 0.5
    # a bitset has a word at least; the first outside the loop, which then runs only for wider
    # bitsets (the loop alone: a vectorised loop's checks on every row)
    hits = bit_count(c.cached_models[i, 0] & q.models[0])
    for w in range(1, q.models.shape[0]):
        hits += bit_count(c.cached_models[i, w] & q.models[w])
    return ratio(hits, q.n_models)


@jit_inline
def warm_largest(q):
    return 0.5 if q.n_models == 0 else 1.0


@jit_inline
def gpu(c, q, i):
    return q.gpu_table[np.uint64(c.gpu_model[i])]


@jit_inline
def gpu_largest(q):
    return _largest_of(q.gpu_table)


@jit_inline
def reliability_of(failures):
    """The reliability factor of a row with ``failure_rate`` code ``failures``; never rises with
    ``failures`` (each operation rounds monotonically: ``_kernels._most_failures`` searches on
    it)."""
    return 1.0 - failures / FAILURE_STEPS


@jit_inline
def reliability(c, q, i):
    return reliability_of(c.failure_rate[i])


#: Every factor, in the order a Decision's factors and the policy's weights take them.
FACTOR_TABLE: tuple[Factor, ...] = (
    Factor("region", region, region_largest, "the policy's affinity of the two regions"),
    Factor("load", load, load_largest, "1 - running_count / gpu_capacity"),
    Factor("pool", pool, None, "1 for the submitting team's agent, 0 for a community agent"),
    Factor("warm", warm, warm_largest, "share of required_models cached; 0.5 for none"),
    Factor("gpu", gpu, gpu_largest, "1 matching preferred_gpu, 0 not, 0.5 no preference"),
    Factor("reliability", reliability, None, "1 - failure_rate"),
)
FACTORS: tuple[str, ...] = tuple(f.name for f in FACTOR_TABLE)
N_FACTORS = len(FACTORS)
POOL_FACTOR, RELIABILITY = FACTORS.index("pool"), FACTORS.index("reliability")
assert {k for k, f in enumerate(FACTOR_TABLE) if f.largest is None} == {POOL_FACTOR, RELIABILITY}, (
    "the scan's bound takes pool and reliability per row and every other factor at its largest"
)


# --- the kernels' combinations of the rules, generated from the tables ---------------------------

#: Written from the tables above by :func:`generated_source` (checked at import, rewritten when
#: stale): the kernels call these, in which numba inlines every rule. Unrolling tuples of kernels
#: in the kernels themselves (``numba.literal_unroll``) took three times as long to compile.
GENERATED = Path(__file__).with_name("_rules_generated.py")


def generated_source() -> str:
    """The source of :mod:`scoring._rules_generated`."""

    def call(kernel: Any, args: str) -> str:
        found = getattr(kernel, "py_func", kernel).__name__
        assert globals()[found] is kernel, f"{found} is not this module's {found}"
        return f"rules.{found}({args})"

    def word(k: int) -> str:
        return f"{ROW_FILTERS[k].reason}_rows"

    def function(signature: str, doc: str, body: list[str]) -> list[str]:
        return ["", "", "@jit_inline", f"def {signature}:", f'    """{doc}"""', *body]

    rest = [(k, f) for k, f in enumerate(FACTOR_TABLE) if f.largest is not None]
    lines = [
        '"""Generated by ``scoring.rules.generated_source`` from its tables; an import of',
        '``scoring.rules`` rewrites this file when they change: do not edit."""',
        "",
        "import numpy as np",
        "",
        "from scoring import rules",
        "from scoring._jit import jit_inline",
        *function(
            "row_mask(c, q, i, wide)",
            "Row ``i``'s reject mask of ``rules.ROW_FILTERS`` (int64).",
            ["    mask = np.int64(0)"]
            + [f"    mask |= np.int64({1 << REASONS.index(f.reason)})"
               f" * np.int64({call(f.row, 'c, q, i, wide')})" for f in ROW_FILTERS]
            + ["    return mask"],
        ),
        *function(
            "chunk_words(c, q, first)",
            "Bit ``k`` for row ``first + k`` failing each of ``rules.ROW_FILTERS`` (CHUNK rows).",
            [f"    {word(k)} = np.uint64(0)" for k in range(len(ROW_FILTERS))]
            + [f"    for b in range({CHUNK // LANES}):",
               f"        at = np.uint64(b * {LANES})",
               "        start = np.uint64(first) + at"]
            + [f"        {word(k)} |= np.uint64({call(f.lanes, 'c, q, start')}) << at"
               for k, f in enumerate(ROW_FILTERS) if f.used is None]
            + [line for k, f in enumerate(ROW_FILTERS) if f.used is not None
               for line in (f"    if {call(f.used, 'q')}:  # one branch a chunk",
                            f"        for b in range({CHUNK // LANES}):",
                            f"            at = np.uint64(b * {LANES})",
                            f"            {word(k)} |= np.uint64("
                            f"{call(f.lanes, 'c, q, np.uint64(first) + at')}) << at")]
            + [f"    return ({', '.join(word(k) for k in range(len(ROW_FILTERS)))})"],
        ),
        *function(
            "passes_but_capacity(c, q, i)",
            "Whether row ``i`` passes every filter of ``rules.ROW_FILTERS`` but capacity.",
            [line for f in ROW_FILTERS if f.reason != "capacity"
             for line in (f"    if {call(f.row, 'c, q, i, True')}:", "        return False")]
            + ["    return True"],
        ),
        *function(
            "factors(c, q, i)",
            "Row ``i``'s factors, in ``rules.FACTORS`` order.",
            ["    return ("]
            + [f"        {call(f.value, 'c, q, i')}," for f in FACTOR_TABLE]
            + ["    )"],
        ),
        *function(
            "largest_rest(q)",
            "Each weight times its factor's largest value (those that have one), summed.",
            ["    rest = 0.0"]
            + [f"    rest += q.weights[{k}] * {call(f.largest, 'q')}" for k, f in rest]
            + ["    return rest"],
        ),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def _write_generated() -> None:
    source = generated_source()
    try:
        current = GENERATED.read_text()
    except FileNotFoundError:
        current = None
    if current != source:  # a new table: written so that a concurrent reader sees old or new
        temporary = GENERATED.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(source)
        os.replace(temporary, GENERATED)


_write_generated()
