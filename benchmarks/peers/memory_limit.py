"""The machine's limit for a pick: one pass that only reads, once, the candidate rows' columns.

The pass walks the same row lists the engine's pick walks (``Query.rows``, then ``Query.shared``:
the team's index, then the community index), chunk by chunk as the pick does, and reads, for
each of those rows, every column that a pick reads. No filter, no score, no branch on the data:
each value goes into an integer checksum, returned so that the compiler cannot drop the reads. A
pick that reads the same bytes of the same rows cannot beat this pass; the benchmarks report the
engine's time over it.

Which columns a pick reads is taken from the kernels' own source (every ``c.<column>[...]`` in
:mod:`scoring._kernels` and in the rules they read, :mod:`scoring.rules`), so a column the layout
adds or a kernel starts reading is counted here without an edit; ``team_pos`` (index
bookkeeping) is never read, and ``opt_pos`` only by the full scan and the pool test of an
excluded agent (:data:`INDEXED_UNREAD`; an indexed pick knows its rows are in the pool:
``tests/test_peers.py`` checks that scrambling the column changes nothing).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import numpy as np
from numba import njit

from scoring import _kernels, rules
from scoring.fleet import Fleet
from scoring.layout import COLUMNS
from scoring.query import build_query

_READ = {  # c.<column>[row]
    name
    for module in (_kernels, rules)
    for name in re.findall(r"\bc\.(\w+)\[", inspect.getsource(module))
}
assert _READ <= {c.name for c in COLUMNS}, "a kernel reads a column the layout does not declare"
#: Columns the kernels read that an indexed pick (its rows in the pool) never does.
INDEXED_UNREAD = ("opt_pos",)
#: The columns a pick reads, in layout order.
PICK_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.name in _READ and c.name not in INDEXED_UNREAD
)


def _kernel_source(n_scalars: int, n_bitsets: int) -> str:
    """The pass with one parameter per column (scalars ``s0..``, bitsets ``b0..``).

    Read as the engine's scan reads (``_kernels._scan_part``) and as fast as the machine
    allows: the row lists in chunks, a chunk of consecutive rows as a range and any other row by
    row, rows as unsigned numbers (a signed index costs a branch that keeps a loop from
    vectorising), bitsets of one word without a loop over words. XOR-ing every value into one
    word vectorises: a reduction of integers needs no reordering of float sums.
    """
    scalars = [f"s{k}" for k in range(n_scalars)]
    bitsets = [f"b{k}" for k in range(n_bitsets)]
    one_word = " ^ ".join([*(f"np.uint64({name}[i])" for name in scalars),
                           *(f"{name}[i, 0]" for name in bitsets)]) or "np.uint64(0)"  # fmt: skip
    narrow = " and ".join(f"{name}.shape[1] == 1" for name in bitsets) or "True"
    lines = [
        f"def _read_rows(rows, shared, {', '.join(scalars + bitsets)}):",
        "    s = np.uint64(0)",
        "    for part in (rows, shared):",
        "        for start in range(0, part.shape[0], CHUNK):",
        "            block = part[start : min(start + CHUNK, part.shape[0])]",
        "            m = block.shape[0]",
        "            first = block[0]",
        "            strays = np.uint32(0)",
        "            for j in range(m):",
        "                strays |= np.uint32(block[j]) ^ (np.uint32(first) + np.uint32(j))",
        "            base = np.uint64(first)",
        f"            if strays == 0 and {narrow}:",
        "                for j in range(m):",
        "                    i = base + np.uint64(j)",
        f"                    s ^= {one_word}",
        "            else:",
        "                for j in range(m):",
        "                    i = np.uint64(block[j])",
        f"                    s ^= {one_word}",
    ]
    for name in bitsets:
        lines += [f"                    for w in range(1, {name}.shape[1]):",
                  f"                        s ^= {name}[i, w]"]  # fmt: skip
    return "\n".join([*lines, "    return s", ""])


def _compile(n_scalars: int, n_bitsets: int):
    namespace = {"np": np, "CHUNK": _kernels.CHUNK}
    exec(_kernel_source(n_scalars, n_bitsets), namespace)  # source built from the layout only
    # Not cached: numba caches only functions that live in a source file; this one compiles in
    # a fraction of a second, before any timing. Otherwise the package's options (no fastmath).
    return njit(nogil=True, fastmath=False, error_model="numpy")(namespace["_read_rows"])


def _read_rows(rows, shared, scalars, bitsets):
    """XOR of every value of the candidate rows ``rows`` then ``shared`` (int32 rows) in the
    columns ``scalars`` (1-d unsigned arrays) and ``bitsets`` (2-d uint64), as uint64.

    XOR rather than a sum: it never overflows (numpy would warn when the kernel runs as Python,
    under NUMBA_DISABLE_JIT=1), and every read feeds it. The compiled pass takes one parameter
    per column, like the engine's flat entry point: looping over a tuple of columns of different
    dtypes (numba's ``literal_unroll``) measured ten times slower (1.9 ms against 0.2 ms over
    30,000 candidate rows).
    """
    key = (len(scalars), len(bitsets))
    kernel = _KERNELS.get(key) or _KERNELS.setdefault(key, _compile(*key))
    return kernel(rows, shared, *scalars, *bitsets)


_KERNELS: dict[tuple[int, int], Any] = {}


def column_views(fleet: Fleet) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """``(scalars, bitsets)``: the fleet's columns that a pick reads, as unsigned integer views of
    the same width (no copies; floats by their bits), split as :func:`_read_rows` takes them."""
    c = fleet.columns
    scalars, bitsets = [], []
    for name in PICK_COLUMNS:
        values = getattr(c, name)
        if values.ndim == 2:
            bitsets.append(values)
        else:
            scalars.append(values.view(f"u{values.dtype.itemsize}"))
    return tuple(scalars), tuple(bitsets)


class MemoryLimit:
    """Times the read-only pass over a request's candidate rows; answers no agent.

    The candidate rows come from ``build_query`` (the engine's own pool indexes), translated on
    a request's first call and kept, so a call is the kernel and nothing else (the fleet must not
    change meanwhile: benchmark fleets never do).
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        with fleet.lock:
            self.views = column_views(fleet)
        self.rows: dict[tuple, tuple] = {}

    def candidates(self, request, policy, now) -> tuple[np.ndarray, np.ndarray]:
        key = (id(request), id(policy), now)
        found = self.rows.get(key)
        if found is None:
            with self.fleet.lock:
                q = build_query(self.fleet, request, policy, now)
            found = self.rows[key] = (request, policy, q.rows, q.shared)  # keeps the ids alive
        return found[2], found[3]

    def __call__(self, request, policy, now) -> int:
        rows, shared = self.candidates(request, policy, now)
        return int(_read_rows(rows, shared, *self.views))
