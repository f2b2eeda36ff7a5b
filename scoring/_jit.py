"""The one place that sets numba's options for the whole package.

Every kernel is compiled with ``nogil=True`` (the dispatcher's threads can score while others hold
the GIL), ``cache=True`` (a warm process starts in well under a second) and fastmath off, so NaN and
infinities keep IEEE semantics and scores are bit-identical to the plain-Python reference.
"""

from __future__ import annotations

from numba import njit

_OPTIONS = {"nogil": True, "cache": True, "fastmath": False}


def jit(func):
    """Compile ``func`` as a serial kernel with the package's options."""
    return njit(**_OPTIONS)(func)


def jit_parallel(func):
    """Compile ``func`` as a parallel kernel (``prange`` loops) with the package's options."""
    return njit(parallel=True, **_OPTIONS)(func)
