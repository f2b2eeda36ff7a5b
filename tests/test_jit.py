"""The native entry point refuses arguments of other types than it was compiled for."""

from __future__ import annotations

import numpy as np
import pytest
from numba import config

from scoring._jit import NativeEntry, jit

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels


@jit
def _total(values):
    return values.sum()


def test_native_entry_calls_the_kernel_and_checks_argument_types():
    entry = NativeEntry(_total)
    assert entry(np.arange(4.0)) == 6.0
    assert entry(np.arange(5.0)) == 10.0  # same types: the resolved entry point is reused
    if config.DISABLE_JIT:
        assert entry(np.arange(3)) == 3  # plain Python: any argument works
    else:
        with pytest.raises(TypeError, match="argument types differ"):
            entry(np.arange(3))  # int64 array: the float64 entry point must not see it
