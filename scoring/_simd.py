"""Eight consecutive rows at a time: comparisons that give one bit a row, for the scan's chunks.

Each function reads ``LANES`` consecutive values of a column from row ``start`` (the caller
guarantees they exist) and returns a ``uint64`` whose bit ``k`` answers the question for row
``start + k``. Compiled, each is one vector load, one vector compare and the compare's mask moved
to an integer register (LLVM's ``<8 x i1>`` bitcast to ``i8``): the scan builds a chunk's words
of failed filters eight rows at a time, and counts each filter by the popcount of its word. Numba
vectorises a loop over rows by itself, but it builds a per-row mask there and then moves each
bit back into place with vector shifts, about twice the instructions (measured: see
``_kernels._chunk_words``).

With numba's JIT disabled the same functions run as numpy, so that the kernels' bodies still run
(and are covered) as plain Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import config
from numba.core import cgutils, types
from numba.core.extending import intrinsic

#: Rows a call reads.
LANES = 8
_WEIGHTS = np.uint64(1) << np.arange(LANES, dtype=np.uint64)


def _bits(flags: Any) -> np.uint64:
    return np.uint64(np.sum(np.asarray(flags, dtype=np.uint64) * _WEIGHTS, dtype=np.uint64))


if config.DISABLE_JIT:  # type: ignore[attr-defined]  # intrinsics run only compiled

    def below(column: Any, start: Any, value: Any) -> np.uint64:
        """Bit ``k``: ``column[start + k] < value``."""
        return _bits(column[start : start + LANES] < value)

    def above(column: Any, start: Any, value: Any) -> np.uint64:
        """Bit ``k``: ``column[start + k] > value``."""
        return _bits(column[start : start + LANES] > value)

    def equal(column: Any, start: Any, value: Any) -> np.uint64:
        """Bit ``k``: ``column[start + k] == value``."""
        return _bits(column[start : start + LANES] == value)

    def at_most(column: Any, start: Any, value: Any) -> np.uint64:
        """Bit ``k``: ``column[start + k] <= value``."""
        return _bits(column[start : start + LANES] <= value)

    def not_below(column: Any, other: Any, start: Any) -> np.uint64:
        """Bit ``k``: ``column[start + k] >= other[start + k]``."""
        return _bits(column[start : start + LANES] >= other[start : start + LANES])

    def older(column: Any, start: Any, now: Any, timeout: Any) -> np.uint64:
        """Bit ``k``: ``now - column[start + k] > timeout`` (float64)."""
        return _bits(now - column[start : start + LANES] > timeout)

    def lacking(words: Any, start: Any, required: Any) -> np.uint64:
        """Bit ``k``: ``required & ~words[start + k, 0] != 0`` (``words`` one column wide)."""
        return _bits((required & ~words[start : start + LANES, 0]) != 0)

    def and_where(words: Any, start: Any, bits: Any) -> np.uint64:
        """The AND of ``words[start + k, 0]`` over the set bits ``k`` of ``bits`` (all ones for
        none; ``words`` one column wide)."""
        out = np.uint64(0xFFFFFFFFFFFFFFFF)
        for k in range(LANES):
            if int(bits) >> k & 1:
                out &= words[start + k, 0]
        return out

else:
    from llvmlite import ir

    _I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    _MASK = ir.VectorType(ir.IntType(1), LANES)

    def _lanes(context: Any, builder: Any, arytype: Any, array: Any, start: Any) -> Any:
        """The ``LANES`` values of ``array`` from row ``start`` as an LLVM vector (a row of a
        2-d array is its first word: the caller passes arrays one column wide)."""
        ary = context.make_array(arytype)(context, builder, array)
        elem = context.get_data_type(arytype.dtype)
        ptr = builder.gep(ary.data, [start])
        vector = ir.VectorType(elem, LANES)
        align = context.get_abi_sizeof(elem)
        return builder.load(builder.bitcast(ptr, vector.as_pointer()), align=align)

    def _splat(context: Any, builder: Any, value: Any, fromty: Any, toty: Any) -> Any:
        scalar = context.cast(builder, value, fromty, toty)
        vector = ir.VectorType(scalar.type, LANES)
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, _I32(0))
        zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
        return builder.shuffle_vector(one, one, zeros)

    def _compare(builder: Any, dtype: Any, op: str, a: Any, b: Any) -> Any:
        if isinstance(dtype, types.Float):
            return builder.fcmp_ordered(op, a, b)
        if dtype.signed:
            return builder.icmp_signed(op, a, b)
        return builder.icmp_unsigned(op, a, b)

    def _word(builder: Any, mask: Any) -> Any:
        return builder.zext(builder.bitcast(mask, _I8), _I64)

    def _scalar_compare(op: str) -> Any:
        def compare(typingctx: Any, column: Any, start: Any, value: Any) -> Any:
            if not isinstance(column, types.Array) or not isinstance(start, types.Integer):
                return None

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                arytype, _, valuetype = signature.args
                lanes = _lanes(context, builder, arytype, args[0], args[1])
                splat = _splat(context, builder, args[2], valuetype, arytype.dtype)
                return _word(builder, _compare(builder, arytype.dtype, op, lanes, splat))

            return types.uint64(column, start, value), codegen

        return compare

    below = intrinsic(_scalar_compare("<"))  # type: ignore[no-redef]
    above = intrinsic(_scalar_compare(">"))  # type: ignore[no-redef]
    equal = intrinsic(_scalar_compare("=="))  # type: ignore[no-redef]
    at_most = intrinsic(_scalar_compare("<="))  # type: ignore[no-redef]

    @intrinsic
    def not_below(typingctx: Any, column: Any, other: Any, start: Any) -> Any:  # type: ignore[no-redef]
        if not isinstance(column, types.Array) or column != other:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arytype = signature.args[0]
            a = _lanes(context, builder, arytype, args[0], args[2])
            b = _lanes(context, builder, arytype, args[1], args[2])
            return _word(builder, _compare(builder, arytype.dtype, ">=", a, b))

        return types.uint64(column, other, start), codegen

    @intrinsic
    def older(typingctx: Any, column: Any, start: Any, now: Any, timeout: Any) -> Any:  # type: ignore[no-redef]
        if not isinstance(column, types.Array) or column.dtype != types.float64:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arytype, _, nowtype, timeouttype = signature.args
            lanes = _lanes(context, builder, arytype, args[0], args[1])
            now = _splat(context, builder, args[2], nowtype, types.float64)
            timeout = _splat(context, builder, args[3], timeouttype, types.float64)
            age = builder.fsub(now, lanes)
            return _word(builder, builder.fcmp_ordered(">", age, timeout))

        return types.uint64(column, start, now, timeout), codegen

    def _on_words(body: Any) -> Any:
        """An intrinsic ``(words, start, value) -> uint64`` over the ``LANES`` words of a bitset
        column from row ``start``: ``body(context, builder, lanes, value, valuetype)``."""

        def typer(typingctx: Any, words: Any, start: Any, value: Any) -> Any:
            if not isinstance(words, types.Array) or words.dtype != types.uint64:
                return None

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                arytype, _, valuetype = signature.args
                lanes = _lanes(context, builder, arytype, args[0], args[1])
                return body(context, builder, lanes, args[2], valuetype)

            return types.uint64(words, start, value), codegen

        return intrinsic(typer)

    @_on_words
    def lacking(context: Any, builder: Any, lanes: Any, required: Any, requiredtype: Any) -> Any:  # type: ignore[no-redef]
        need = _splat(context, builder, required, requiredtype, types.uint64)
        missing = builder.and_(need, builder.not_(lanes))
        return _word(builder, builder.icmp_unsigned("!=", missing, ir.Constant(missing.type, None)))

    @_on_words
    def and_where(context: Any, builder: Any, lanes: Any, bits: Any, bitstype: Any) -> Any:  # type: ignore[no-redef]
        byte = builder.trunc(context.cast(builder, bits, bitstype, types.uint64), _I8)
        ones = ir.Constant(lanes.type, [2**64 - 1] * LANES)
        kept = builder.select(builder.bitcast(byte, _MASK), lanes, ones)
        fnty = ir.FunctionType(_I64, [lanes.type])
        name = f"llvm.vector.reduce.and.v{LANES}i64"
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [kept])
