"""The one declaration of the engine's data layout: the fleet's columns and the query's fields.

The fleet allocates its columns from :data:`COLUMNS`, the kernels take them as :class:`Columns`,
the request translation returns a :class:`Query`, and the benchmarks' peers read the same names.
The kernels' flat entry point spells these names out as its parameters (numba needs a plain
signature there); :mod:`scoring._kernels` checks at import that they agree with this module.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np


class Column(NamedTuple):
    name: str
    dtype: Any
    doc: str
    bitset: bool = False  # shape (n, words) of uint64; otherwise (n,)


#: One array per ``Agent`` field the kernels read, plus the row's place in the pool indexes.
COLUMNS: tuple[Column, ...] = (
    Column("team", np.int32, "interned team_id"),
    Column("status", np.uint8, "AgentStatus code"),
    Column("opt_pos", np.int32, "position in the community index; -1: not opted in"),
    Column("team_pos", np.int32, "position in its team's index"),
    Column("region", np.int16, "interned region, 0 = unknown"),
    Column("gpu_model", np.int16, "interned gpu_model, 0 = unknown"),
    Column("last_heartbeat", np.float64, "seconds since the epoch"),
    Column("gpu_capacity", np.uint16, "task slots"),
    Column("running_count", np.uint16, "slots in use"),
    Column("vram_gb", np.uint16, "quarter GB (the Agent keeps that precision); 65535 = unknown"),
    Column("failure_rate", np.uint16, "in steps of 1/32768 (the Agent keeps that precision)"),
    Column("id_hash", np.uint64, "stable hash of agent_id (tie-break)"),
    Column("labels", np.uint64, "bit b set = label b interned by the fleet", bitset=True),
    Column("cached_models", np.uint64, "bit b set = model b interned by the fleet", bitset=True),
)
BITSETS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.bitset)
if TYPE_CHECKING:  # built from the declaration at run time, which a type checker cannot follow
    Columns = Any
else:
    Columns = namedtuple("Columns", [c.name for c in COLUMNS])


class Field(NamedTuple):
    name: str
    doc: str


#: A request translated against one fleet and one policy, in the kernels' argument order. The
#: last :data:`PER_CALL` fields change from call to call; the others are the same for every
#: request of one template against one state of the fleet (``scoring.pick`` keeps them).
QUERY_FIELDS: tuple[Field, ...] = (
    Field("heartbeat_timeout_s", "float64"),
    Field("team", "int64: interned team of the submitter, -1 if no agent of it is known"),
    Field("community", "bool: community pool"),
    Field("labels", "uint64 (label_words,): required labels, tool type included"),
    Field("labels_unknown", "bool: a required label no agent of the fleet has"),
    Field("min_vram", "int64: the least vram_gb code that passes; -1: no minimum (see vram_floor)"),
    Field("max_failures", "int64: the largest failure_rate code that passes; -1: no maximum"),
    Field("excluded", "int64 (k,): sorted rows of exclude_agents"),
    Field("models", "uint64 (model_words,): required models known to the fleet"),
    Field("n_models", "int64: number of required models (known or not)"),
    Field("region_table", "float64 (regions,): region factor by interned agent region"),
    Field("gpu_table", "float64 (gpu_models,): gpu factor by interned agent gpu_model"),
    Field("weights", "float64 (factors + 1,): the weights in FACTORS order, then their sum"),
    Field("tie_band", "float64"),
    Field("rows", "int32 (k,): candidate rows (the team's, or every row for a full scan)"),
    Field("shared", "int32 (j,): more candidate rows, those of the team skipped (community)"),
    Field("team_rows", "bool: every row of rows is the team's (False: any rows, the full scan)"),
    Field("fleet_size", "int64: agents in the fleet (each outside the pool counts under pool)"),
    Field("now", "float64"),
    Field("tie_key_hash", "uint64"),
)
PER_CALL = 2
assert [f.name for f in QUERY_FIELDS[-PER_CALL:]] == ["now", "tie_key_hash"]
if TYPE_CHECKING:
    Query = Any
else:
    Query = namedtuple("Query", [f.name for f in QUERY_FIELDS])


#: ``vram_gb`` column units per GB, and its code for "unknown".
VRAM_STEPS_PER_GB = 4
VRAM_UNKNOWN = 65535
#: ``failure_rate`` column steps per 1.0.
FAILURE_STEPS = 32768  # a power of two: 0.25, 0.5 and 1.0 stay exact


def vram_floor(min_vram_gb: float | None) -> int:
    """A request's ``min_vram_gb`` as the least ``vram_gb`` column code that meets it, or -1 for
    none. Codes are integers and ``code / VRAM_STEPS_PER_GB >= m`` exactly when ``code >=
    ceil(m * VRAM_STEPS_PER_GB)`` (both products exact), so the kernels compare integers; a floor
    above every known code is ``VRAM_UNKNOWN``, which fails a minimum anyway."""
    if min_vram_gb is None:
        return -1
    return min(math.ceil(min_vram_gb * VRAM_STEPS_PER_GB), VRAM_UNKNOWN)


def column_dtypes() -> dict[str, np.dtype]:
    """``{name: dtype}`` of every column (bitsets are uint64 words)."""
    return {c.name: np.dtype(c.dtype) for c in COLUMNS}
