"""One table copied from the fleet's columns, for the dataframe and SQL peers (built before timing).

Interned codes stay integers (the peers translate requests with the engine's own interners, so
they compare integers, not strings); bitsets become one UInt64 column per 64-bit word; an unknown
``vram_gb`` becomes null, as a user of a dataframe or a database stores it (polars orders NaN
above every number, so NaN would pass a ``>=`` minimum).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from scoring.fleet import Fleet

SCALARS = ("team", "status", "community_opt_in", "region", "gpu_model", "last_heartbeat",
           "gpu_capacity", "running_count", "vram_gb", "failure_rate", "id_hash")  # fmt: skip


def fleet_arrays(fleet: Fleet) -> dict[str, np.ndarray]:
    """Copies of the fleet's columns: ``rid`` (the fleet row) and one array per field or word."""
    with fleet.lock:
        c = fleet.columns
        data = {"rid": np.arange(len(fleet), dtype=np.int64)}
        data.update({name: getattr(c, name).copy() for name in SCALARS})
        for name in ("labels", "cached_models"):
            words = getattr(c, name)
            for w in range(words.shape[1]):
                data[f"{name}_{w}"] = words[:, w].copy()
    return data


def fleet_frame(fleet: Fleet) -> pl.DataFrame:
    """The fleet as a polars DataFrame (unknown ``vram_gb`` as null)."""
    return pl.DataFrame(fleet_arrays(fleet)).with_columns(pl.col("vram_gb").fill_nan(None))


def word_count(columns, name: str) -> int:
    """Number of 64-bit words of bitset ``name`` among ``columns`` (names like ``labels_0``)."""
    return sum(1 for col in columns if col.startswith(f"{name}_"))
