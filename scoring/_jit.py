"""The one place that sets numba's options for the whole package.

Every kernel is compiled with ``nogil=True`` (the dispatcher's threads can score while others hold
the GIL), ``cache=True`` (a warm process starts in well under a second) and fastmath off, so NaN and
infinities keep IEEE semantics and scores are bit-identical to the plain-Python reference; and with
numpy's error model: a division by zero gives an infinity or NaN instead of a check and a branch
before every division (which keeps a loop from vectorising). No kernel divides by a value the
Python layer has not checked: a capacity is at least 1, the weights sum above 0.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import config, njit, typeof
from numba.core import types
from numba.core.extending import intrinsic
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.cpython.unsafe.tuple import tuple_setitem
from numba.np.unsafe.ndarray import to_fixed_tuple

_OPTIONS = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


def _fingerprint() -> str:
    """A hash of the sources whose constants the kernels compile in.

    Numba's on-disk cache is keyed by the kernel file's own timestamp only, so a constant changed
    in the layout or the models (a column's unit, a reason's bit), or an intrinsic of ``_simd``
    that the kernels inline, would keep running stale machine code. Caching under a directory
    named by this hash makes any such change a fresh compile.
    """
    package = Path(__file__).parent
    digest = hashlib.blake2b(digest_size=8)
    for name in ("_jit.py", "_kernels.py", "_simd.py", "layout.py", "models.py", "rules.py",
                 "_rules_generated.py"):  # fmt: skip
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


if not os.environ.get("NUMBA_CACHE_DIR"):  # a directory the user chose wins
    config.CACHE_DIR = str(  # type: ignore[attr-defined]
        Path(__file__).parent / "__pycache__" / f"numba-{_fingerprint()}"
    )


def jit(func):
    """Compile ``func`` as a serial kernel with the package's options."""
    return njit(**_OPTIONS)(func)


def jit_row(func):
    """Compile ``func`` without reference counting (``_nrt=False``): for kernels that never
    allocate, the per-agent helpers and the pick's flat entry point.

    Row helpers take the fleet's columns and the query as namedtuples of arrays. With numba's
    reference counting on, every call would increment and decrement the count of every array in
    both tuples: 90 ns per agent against 3.5 ns without (measured on a 10,000-agent fleet), which
    is the whole difference between a memory-bound scan and a slow one. Called from Python, an
    entry point without it also borrows its arrays instead of wrapping each one in a counted
    handle: 0.24 us against 0.87 us to call a function of the pick's 34 arguments (measured).
    """
    return njit(_nrt=False, **_OPTIONS)(func)


def jit_inline(func):
    """:func:`jit_row`, inlined into its callers (numba's ``inline="always"``): for the scan's
    steps, each called a few times per pick. Called, each passed the columns and the query as
    structs of some 150 machine words; inlined, a pick over an empty pool went from 0.71 to
    0.45 us end to end, and one over 69 agents from 1.46 to 1.08 us (measured)."""
    return njit(_nrt=False, inline="always", **_OPTIONS)(func)


def jit_parallel(func):
    """Compile ``func`` as a parallel kernel (``prange`` loops) with the package's options."""
    return njit(parallel=True, **_OPTIONS)(func)


if config.DISABLE_JIT:  # type: ignore[attr-defined]  # numba's intrinsics run only compiled

    def fixed_tuple(array: Any, length: int) -> tuple[Any, ...]:
        """The first ``length`` items of ``array`` as a tuple (numba's ``to_fixed_tuple``)."""
        return tuple(array[:length].tolist())

    def lowest_bit(word: Any) -> int:
        """The position of the lowest set bit of a nonzero ``word`` (numba's
        ``trailing_zeros``: one instruction)."""
        word = int(word)
        return (word & -word).bit_length() - 1

    def bit_count(word: Any) -> int:
        """The number of set bits of ``word`` (in compiled code one instruction, ``popcnt``)."""
        return int(word).bit_count()

    def set_item(items: tuple[Any, ...], index: int, value: Any) -> tuple[Any, ...]:
        """``items`` with ``items[index]`` replaced by ``value`` (numba's ``tuple_setitem``)."""
        return (*items[:index], type(items[index])(value), *items[index + 1 :])

else:
    fixed_tuple: Callable[..., Any] = to_fixed_tuple  # type: ignore[no-redef]
    set_item: Callable[..., Any] = tuple_setitem  # type: ignore[no-redef]
    lowest_bit: Callable[..., Any] = trailing_zeros  # type: ignore[no-redef]

    @intrinsic
    def bit_count(typingctx: Any, word: Any) -> Any:  # type: ignore[no-redef]
        """The number of set bits of an integer ``word``: LLVM's ``ctpop``, one instruction
        (where a loop clearing the lowest bit relies on the optimiser recognising it)."""
        if not isinstance(word, types.Integer):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.ctpop(args[0])

        return word(word), codegen


def python_values(value: Any) -> Any:
    """``value`` with every numpy scalar in it (in tuples, at any depth) made a Python number.

    A compiled kernel returns Python ints and floats; the same kernel run as Python
    (``NUMBA_DISABLE_JIT=1``) returns numpy scalars, which must not reach a Decision
    (``json.dumps`` refuses ``numpy.int64``).
    """
    if isinstance(value, tuple):
        return tuple(python_values(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class NativeEntry:
    """Call a kernel's compiled entry point directly, skipping numba's per-call type dispatch.

    Numba's dispatcher computes the numba type of every argument on every call to choose the
    compiled version: for the 28 arguments of a pick that is about 2 us of a 100-agent pick's
    5 us budget (measured). The pick's argument types are fixed by construction (the fleet's
    columns have fixed dtypes and are C-contiguous views; the query is built by one function), so
    the entry point is resolved once, from the first call's types, and reused.

    The check is there, not trusted: with ``SCORING_CHECK_ENTRY=1`` (the test suite sets it) every
    call verifies that its argument types are those the entry point was compiled for.
    """

    def __init__(self, dispatcher: Any) -> None:
        self._dispatcher = dispatcher
        self._entry: Callable[..., Any] | None = None
        self._types: tuple[Any, ...] | None = None
        self._check = os.environ.get("SCORING_CHECK_ENTRY") == "1"

    def __call__(self, *args: Any) -> Any:
        entry = self._entry
        if entry is None:
            entry = self._resolve(args)
        elif self._check and tuple(typeof(a) for a in args) != self._types:
            raise TypeError("argument types differ from the compiled entry point's")
        return entry(*args)

    def direct(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        """The callable to use for arguments of the types of ``args``: the compiled entry point
        itself (no per-call work at all), or this checking wrapper when checks are on."""
        entry = self._entry
        if entry is None:
            entry = self._resolve(args)
        if self._check:
            self(*args)  # raises if the types differ
            return self
        return entry

    def _resolve(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        if config.DISABLE_JIT:  # type: ignore[attr-defined]  # a plain Python function
            dispatcher = self._dispatcher

            def entry(*args: Any) -> Any:
                return python_values(dispatcher(*args))

            self._entry, self._check = entry, False
            return entry
        types = tuple(typeof(a) for a in args)
        self._dispatcher.compile(types)  # loads from the on-disk cache when it can
        self._entry, self._types = self._dispatcher.overloads[types].entry_point, types
        return self._entry
