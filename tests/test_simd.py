"""The eight-rows-at-a-time comparisons (scoring._simd) against plain Python, row by row.

Compiled, each is an LLVM vector compare whose mask becomes an integer; with the JIT off, numpy.
Both must give bit ``k`` for row ``start + k`` exactly as Python's comparison of that one row
(NaN compares false; unsigned and signed columns compare by their own signedness).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scoring import _simd as S
from scoring._jit import jit

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

ROWS = 3 * S.LANES


def _expected(flags) -> int:
    return sum(1 << k for k, flag in enumerate(flags) if flag)


@jit
def _compiled(floats, status, team, small, other, words, start, value, now, limit, need, bits):
    return (
        S.older(floats, start, now, value),
        S.above(status, start, np.uint8(2)),
        S.equal(team, start, limit),
        S.below(small, start, limit),
        S.at_most(small, start, limit),
        S.not_below(small, other, start),
        S.lacking(words, start, need),
        S.and_where(words, start, bits),
    )


@settings(max_examples=200)
@given(
    floats=hnp.arrays(np.float64, ROWS, elements=st.floats(allow_nan=True, width=64)),
    status=hnp.arrays(np.uint8, ROWS),
    team=hnp.arrays(np.int32, ROWS, elements=st.integers(-3, 3)),
    small=hnp.arrays(np.uint16, ROWS, elements=st.sampled_from([0, 1, 2, 65534, 65535])),
    other=hnp.arrays(np.uint16, ROWS, elements=st.sampled_from([0, 1, 2, 65535])),
    words=hnp.arrays(np.uint64, (ROWS, 1)),
    start=st.integers(0, ROWS - S.LANES),
    value=st.floats(-1e9, 1e9),
    now=st.floats(-1e9, 1e9),
    limit=st.integers(0, 65535),
    need=st.integers(0, 2**64 - 1),
    bits=st.integers(0, 255),
)
def test_each_bit_is_its_rows_comparison(
    floats, status, team, small, other, words, start, value, now, limit, need, bits
):
    rows = range(start, start + S.LANES)
    got = _compiled(floats, status, team, small, other, words, np.uint64(start), value, now,
                    np.int64(limit), np.uint64(need), np.uint64(bits))  # fmt: skip
    kept = [int(words[i, 0]) for k, i in enumerate(rows) if bits >> k & 1]
    want = (
        _expected(now - floats[i] > value for i in rows),
        _expected(int(status[i]) > 2 for i in rows),
        _expected(int(team[i]) == limit for i in rows),
        _expected(int(small[i]) < limit for i in rows),
        _expected(int(small[i]) <= limit for i in rows),
        _expected(int(small[i]) >= int(other[i]) for i in rows),
        _expected(need & ~int(words[i, 0]) & (2**64 - 1) for i in rows),
        np.bitwise_and.reduce(np.array(kept, np.uint64)) if kept else 2**64 - 1,
    )
    assert [int(x) for x in got] == [int(x) for x in want]
