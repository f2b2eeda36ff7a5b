"""The kernels' arithmetic shortcuts give exactly the numbers of the arithmetic they replace.

A pick must score bit for bit as the plain-Python reference does, so each shortcut is checked
against the operation it stands for: quotients looked up in a table instead of divided
(``_kernels._ratio``), the score's division skipped for a weighted sum that cannot reach the best
score (``_kernels._floor``), and a request's minimum VRAM compared as the fleet's integer codes
(``layout.vram_floor``).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from scoring import _kernels as K
from scoring.layout import VRAM_STEPS_PER_GB, VRAM_UNKNOWN, vram_floor
from scoring.models import MAX_WEIGHT

SLOTS = st.integers(0, 65535)  # running_count and gpu_capacity are uint16 columns


def test_the_table_holds_each_small_quotient():
    for a in range(1, K.SMALL):
        for b in range(K.SMALL):
            assert K._ratio(np.uint16(b), np.uint16(a)) == b / a


def test_worked_example_of_table_and_division():
    # 1 of 3 slots in use: the table's entry 3 * 16 + 1 = 49 is 1/3, the float division makes
    assert K._RATIOS[49] == 1 / 3 and K._ratio(np.uint16(1), np.uint16(3)) == 1 / 3
    # 5 of 40 slots: 40 is not below SMALL (16), so the kernel divides: 0.125
    assert K._ratio(np.uint16(5), np.uint16(40)) == 0.125
    # more in use than slots (a full agent's load is never a table miss): 20 / 4 = 5.0
    assert K._ratio(np.uint16(20), np.uint16(4)) == 5.0


@given(SLOTS, SLOTS.filter(lambda a: a > 0))
def test_ratio_equals_the_division(b, a):
    assert K._ratio(np.uint16(b), np.uint16(a)) == b / a


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
