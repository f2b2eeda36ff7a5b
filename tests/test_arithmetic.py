"""The kernels' arithmetic shortcuts give exactly the numbers of the arithmetic they replace.

A pick must score bit for bit as the plain-Python reference does, so each shortcut is checked
against the operation it stands for: quotients looked up in a table instead of divided
(``rules.ratio``), the score's division skipped for a weighted sum that cannot reach the best
score (``_kernels._floor``), a row left unscored because a bound of its weighted sum is below
that floor (``_kernels._reaches``, ``_kernels._most_failures``), and a request's minimum VRAM
compared as the fleet's integer codes (``layout.vram_floor``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring import _kernels as K
from scoring import rules
from scoring.layout import (
    FAILURE_STEPS,
    VRAM_STEPS_PER_GB,
    VRAM_UNKNOWN,
    Columns,
    Query,
    vram_floor,
)
from scoring.models import FACTORS, MAX_WEIGHT

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

SLOTS = st.integers(0, 65535)  # running_count and gpu_capacity are uint16 columns


def test_the_table_holds_each_small_quotient():
    for a in range(1, rules.SMALL):
        for b in range(rules.SMALL):
            assert rules.ratio(np.uint16(b), np.uint16(a)) == b / a


def test_worked_example_of_table_and_division():
    # 1 of 3 slots in use: the table's entry 3 * 16 + 1 = 49 is 1/3, the float division makes
    assert rules._RATIOS[49] == 1 / 3 and rules.ratio(np.uint16(1), np.uint16(3)) == 1 / 3
    # 5 of 40 slots: 40 is not below SMALL (16), so the kernel divides: 0.125
    assert rules.ratio(np.uint16(5), np.uint16(40)) == 0.125
    # more in use than slots (a full agent's load is never a table miss): 20 / 4 = 5.0
    assert rules.ratio(np.uint16(20), np.uint16(4)) == 5.0


@given(SLOTS, SLOTS.filter(lambda a: a > 0))
def test_ratio_equals_the_division(b, a):
    assert rules.ratio(np.uint16(b), np.uint16(a)) == b / a


def test_worked_example_of_the_floor():
    # weights summing to 6.5, best score 0.5: the best sum is 3.25, and a sum below
    # 3.25 * (1 - 2**-49) cannot score 0.5; the largest float below that floor scores less
    floor = K._floor(0.5, 6.5)
    assert floor == 3.25 * (1 - 2.0**-49) < 3.25
    assert np.nextafter(floor, -np.inf) / 6.5 < 0.5
    # no best yet (or a best score among the subnormal numbers): nothing is skipped
    assert K._floor(-np.inf, 6.5) == -np.inf and K._floor(1e-300, 6.5) == -np.inf


@given(
    st.floats(0.0, 6 * MAX_WEIGHT, allow_subnormal=True),
    st.floats(1e-300, 6 * MAX_WEIGHT),
)
def test_a_sum_scoring_as_high_as_the_best_is_never_below_the_floor(total, weight):
    """The floor skips only sums whose score is below the best: a sum whose score equals a best
    score (so ties, or beats, the best) is at least that score's floor."""
    score = total / weight
    assert total >= K._floor(score, weight)
    below = np.nextafter(K._floor(score, weight), -np.inf)
    assert below < 0 or below / weight < score


@given(st.floats(0.0, 1e5, allow_subnormal=True), st.integers(0, VRAM_UNKNOWN - 1))
def test_vram_floor_compares_codes_as_the_reference_compares_gigabytes(minimum, code):
    agent_gb = code / VRAM_STEPS_PER_GB  # the agent's vram_gb, a multiple of a quarter GB
    assert (agent_gb >= minimum) == (code >= vram_floor(minimum))


def test_worked_example_of_vram_floor():
    assert vram_floor(None) == -1  # no minimum: every code passes, unknown too
    assert vram_floor(24) == 96  # 24 GB is 96 quarter GB: an agent with 24 GB passes
    assert vram_floor(24.1) == 97  # 24.1 GB is 96.4 quarter GB: 24.25 GB is the least that passes
    assert vram_floor(0) == 0  # a zero minimum: every known code passes, unknown (65535) fails
    assert vram_floor(1e5) == VRAM_UNKNOWN == 65535  # above every known code: all fail
    assert math.ceil(24.1 * VRAM_STEPS_PER_GB) == 97


# --- the bound: a row is left unscored only when its weighted sum is below the floor ----------

WEIGHTS = st.floats(0.0, MAX_WEIGHT, allow_subnormal=True)
FACTOR = st.floats(0.0, 1.0, allow_subnormal=True)


def _one_row(team, region, gpu_model, running, capacity, failure, cached):
    """A fleet of one agent as the kernels read it (only the columns the factors read matter)."""
    u16 = lambda x: np.array([x], np.uint16)  # noqa: E731
    return Columns(
        team=np.array([team], np.int32), status=np.zeros(1, np.uint8),
        opt_pos=np.array([0], np.int32), team_pos=np.zeros(1, np.int32),
        region=np.array([region], np.int16), gpu_model=np.array([gpu_model], np.int16),
        last_heartbeat=np.zeros(1), gpu_capacity=u16(capacity), running_count=u16(running),
        vram_gb=u16(0), failure_rate=u16(failure), id_hash=np.zeros(1, np.uint64),
        labels=np.zeros((1, 1), np.uint64), cached_models=np.array([[cached]], np.uint64),
    )  # fmt: skip


def _query(weights, region_table, gpu_table, models, n_models, team=0):
    w = np.array([*weights, math.fsum(weights)])
    none = np.zeros(0, np.int64)
    return Query(
        heartbeat_timeout_s=30.0, team=team, community=True, labels=np.zeros(1, np.uint64),
        labels_unknown=False, min_vram=-1, max_failures=-1, excluded=none,
        models=np.array([models], np.uint64),
        n_models=n_models, region_table=np.array(region_table), gpu_table=np.array(gpu_table),
        weights=w, tie_band=0.0, rows=np.zeros(1, np.int32), shared=np.zeros(0, np.int32),
        team_rows=True, fleet_size=1, now=0.0, tie_key_hash=np.uint64(0),
    )  # fmt: skip


@given(
    weights=st.lists(WEIGHTS, min_size=len(FACTORS), max_size=len(FACTORS)).filter(
        lambda w: math.fsum(w) > 0
    ),
    region_table=st.lists(FACTOR, min_size=1, max_size=4),
    gpu_table=st.lists(FACTOR, min_size=1, max_size=4),
    row=st.tuples(
        st.integers(0, 1),
        st.integers(0, 3),
        st.integers(0, 3),
        SLOTS,
        SLOTS.filter(bool),
        st.integers(0, FAILURE_STEPS),
        st.integers(0, 2**64 - 1),
    ),
    models=st.integers(0, 2**64 - 1),
    extra_models=st.integers(0, 3),
)
def test_a_row_whose_sum_reaches_the_floor_is_never_left_unscored(
    weights, region_table, gpu_table, row, models, extra_models
):
    """Differential: the bound against the weighted sum the scan would compute. The floor at the
    sum itself is the hardest case (any lower floor is easier to reach)."""
    team, region, gpu_model, running, capacity, failure, cached = row
    region, gpu_model = min(region, len(region_table) - 1), min(gpu_model, len(gpu_table) - 1)
    c = _one_row(team, region, gpu_model, running, capacity, failure, cached)
    n_models = bin(models).count("1") + extra_models  # some required models the fleet lacks
    q = _query(weights, region_table, gpu_table, models, n_models)
    total = K._weighted(q, K._factors(c, q, 0))
    assert _kept(q, c, total) and _kept(q, c, -np.inf)


def _rest(q):
    return K._bound_rest(q)


def _kept(q, c, floor):
    """Whether the scan's filter loop would let row 0 be scored, and the bound agrees."""
    rest, pool = _rest(q), 1.0 if c.team[0] == q.team else 0.0
    failures = int(c.failure_rate[0])
    kept = failures <= K._most_failures(q.weights, rest, pool, floor)
    assert kept == K._reaches(q.weights, rest, pool, failures, floor)
    return kept


@given(
    weights=st.lists(WEIGHTS, min_size=len(FACTORS), max_size=len(FACTORS)).filter(
        lambda w: math.fsum(w) > 0
    ),
    rest=st.floats(0.0, 6 * MAX_WEIGHT, allow_subnormal=True),
    pool=st.sampled_from([0.0, 1.0]),
    floor=st.floats(0.0, 7 * MAX_WEIGHT, allow_subnormal=True) | st.just(-np.inf),
)
def test_the_failure_limit_is_the_last_code_whose_bound_reaches_the_floor(
    weights, rest, pool, floor
):
    q = _query(weights, [1.0], [1.0], 0, 0)
    limit = K._most_failures(q.weights, rest, pool, floor)
    assert -1 <= limit <= K.MOST_FAILURES
    if limit >= 0:
        assert K._reaches(q.weights, rest, pool, limit, floor)
    if limit < K.MOST_FAILURES:
        assert not K._reaches(q.weights, rest, pool, limit + 1, floor)


def test_worked_example_of_the_bound():
    # every weight 1 (sum 6); the largest region factor 1.0, the largest gpu factor 0.5, no
    # required models (warm 0.5 for every agent); load bounded by 1 (an idle agent): the factors
    # the bound does not take add at most 1 + 1 + 0.5 + 0.5 = 3.0
    q = _query([1.0] * 6, [0.0, 1.0], [0.5], 0, 0)
    assert _rest(q) == 3.0
    # an agent of the team (pool 1.0) failing a quarter of its runs (reliability 0.75), in a
    # region that scores 0 and 3 of 4 slots busy: its sum is 0 + 0.25 + 1 + 0.5 + 0.5 + 0.75 = 3.0
    c = _one_row(0, 0, 0, 3, 4, FAILURE_STEPS // 4, 0)
    assert K._weighted(q, K._factors(c, q, 0)) == 3.0
    # its bound is 3.0 + 1.0 + 0.75 = 4.75: a best score of 0.8 (a floor near 0.8 * 6 = 4.8)
    # leaves it unscored; a best of 0.75 (floor just below 4.5) does not
    assert not _kept(q, c, K._floor(0.8, 6.0))
    assert _kept(q, c, K._floor(0.75, 6.0))
    # against a floor of 4.5: a team row's bound 4.0 + reliability reaches it from reliability
    # 0.5 (16,384 failure steps of 32,768) down; the bound's slack admits not one step more
    assert K._most_failures(q.weights, 3.0, 1.0, 4.5) == FAILURE_STEPS // 2
    # a row of another team (pool 0) needs reliability 1.5: none reaches 4.5
    assert K._most_failures(q.weights, 3.0, 0.0, 4.5) == -1


@given(weights=st.lists(WEIGHTS, min_size=len(FACTORS), max_size=len(FACTORS)).filter(
           lambda w: math.fsum(w) > 0),
       tables=st.tuples(FACTOR, FACTOR), models=st.integers(1, 2**64 - 1))  # fmt: skip
def test_the_bound_holds_for_a_row_at_every_factor_s_maximum(weights, tables, models):
    """The tightest case: an idle agent of the team with every required model, in the region and
    with the GPU that score highest. Its bound and its sum then add the same exact terms in
    different orders, so only the slack keeps the bound above the sum's rounding."""
    region, gpu = tables
    c = _one_row(0, 0, 0, 0, 1, 0, models)
    q = _query(weights, [region], [gpu], models, bin(models).count("1"))
    total = K._weighted(q, K._factors(c, q, 0))
    assert _kept(q, c, total)
