"""The fleet as a user's table: one row per agent, one column per field, copied once (not timed).

The columns come from :data:`scoring.layout.COLUMNS`, so a column added to the layout appears here
without an edit. Each is stored the way a user of numpy, a dataframe or a database stores that
field, not in the engine's packed units:

- ``opt_pos`` (the row's place in the engine's community index) becomes the boolean
  ``community_opt_in``: the peers get no index, only the fact;
- ``team_pos`` (the row's place in its team's index) is not agent data and is left out;
- ``vram_gb`` becomes GB as float64 (the layout's quarter-GB steps divided by
  ``VRAM_STEPS_PER_GB``; the unknown code becomes NaN, and null in polars and DuckDB: polars
  orders NaN above every number, so NaN would pass a ``>=`` minimum);
- ``failure_rate`` becomes the fraction as float64 (steps divided by ``FAILURE_STEPS``, a power
  of two, so the value is the one the engine computes, bit for bit);
- bitsets stay uint64 words: ``(n, words)`` for numpy, one ``UInt64`` column per word
  (``labels_0``, ``labels_1``, ...) for polars and DuckDB.

Interned codes stay integers: the peers translate requests with the engine's own interners (via
``build_query``), so they compare integers, not strings. ``rid`` is the fleet row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import polars as pl

from scoring.fleet import Fleet
from scoring.layout import COLUMNS, FAILURE_STEPS, VRAM_STEPS_PER_GB, VRAM_UNKNOWN


def _gb(code: np.ndarray) -> np.ndarray:
    return np.where(code == VRAM_UNKNOWN, np.nan, code / VRAM_STEPS_PER_GB)


def min_vram_gb(q: Any) -> float | None:
    """A translated request's VRAM minimum in GB, as the table stores VRAM: the least code that
    meets it (``Query.min_vram``, see ``layout.vram_floor``) in GB; None for no minimum."""
    return None if q.min_vram < 0 else q.min_vram / VRAM_STEPS_PER_GB


#: Columns stored under another name or unit: ``layout name -> (table name, decoder)``.
DECODED: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "opt_pos": ("community_opt_in", lambda pos: pos >= 0),
    "vram_gb": ("vram_gb", _gb),
    "failure_rate": ("failure_rate", lambda steps: steps / FAILURE_STEPS),
}
#: Columns that only place a row in the engine's indexes.
INDEX_ONLY = frozenset({"team_pos"})
assert {*DECODED, *INDEX_ONLY} <= {c.name for c in COLUMNS}, "the layout renamed a column"


def fleet_table(fleet: Fleet) -> dict[str, np.ndarray]:
    """``{name: array}``: ``rid`` then every field, decoded (bitsets as ``(n, words)`` uint64)."""
    with fleet.lock:
        c = fleet.columns
        table = {"rid": np.arange(len(fleet), dtype=np.int64)}
        for column in COLUMNS:
            if column.name in INDEX_ONLY:
                continue
            values = getattr(c, column.name)
            name, decode = DECODED.get(column.name, (column.name, np.copy))
            table[name] = np.ascontiguousarray(decode(values))
    return table


def fleet_arrays(fleet: Fleet) -> dict[str, np.ndarray]:
    """:func:`fleet_table` with each bitset split into one uint64 array per word."""
    flat = {}
    for name, values in fleet_table(fleet).items():
        if values.ndim == 1:
            flat[name] = values
        else:
            for w in range(values.shape[1]):
                flat[f"{name}_{w}"] = np.ascontiguousarray(values[:, w])
    return flat


def fleet_frame(fleet: Fleet) -> pl.DataFrame:
    """The fleet as a polars DataFrame (unknown ``vram_gb`` as null)."""
    return pl.DataFrame(fleet_arrays(fleet)).with_columns(pl.col("vram_gb").fill_nan(None))


def word_count(columns: Iterable[str], name: str) -> int:
    """Number of 64-bit words of bitset ``name`` among ``columns`` (names like ``labels_0``)."""
    return sum(1 for col in columns if col.startswith(f"{name}_"))
