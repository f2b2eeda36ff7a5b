"""The pick as one DuckDB SQL query, ``... ORDER BY score DESC, tiebreak LIMIT 1``, the way many
dispatchers pick in a database. The table is loaded from the fleet's columns once (not timed).

The tie break is computed in SQL, per pick, from the stored ``id_hash`` and the task's tie-key
hash (a query parameter), over a chain of nested SELECTs, each reading the previous one's columns:
written inline (or as DuckDB macros, which expand inline) every step reads its input twice and the
expression grows about 600-fold; with lateral column aliases the query took 400 ms at 1,000 agents.
"""

from __future__ import annotations

import duckdb

from benchmarks.peers.table import fleet_arrays, min_vram_gb, word_count
from scoring.fleet import Fleet
from scoring.layout import Query
from scoring.models import LAST_ELIGIBLE_STATUS
from scoring.query import build_query

M32 = "4294967295::UBIGINT"


def _tie_steps() -> list[str]:
    """Projections, one per nested SELECT, that end in column ``tiebreak``."""
    x = "xor(id_hash, $key::UBIGINT)"
    steps = [f"{x} & {M32} AS a, {x} >> 32 AS b"]
    # MurmurHash3's finaliser of column h, in two projections; its last step is folded into the
    # projection that uses it.
    for h, nxt in (("a", "xor(b, {}) AS t"), ("t", "{} AS hi, xor(a, {}) AS u"),
                   ("u", "(hi << 32) | {} AS tiebreak")):  # fmt: skip
        steps.append(f"(xor({h}, {h} >> 16) * 2246822507::UBIGINT) & {M32} AS {h}1")
        steps.append(f"(xor({h}1, {h}1 >> 13) * 3266489909::UBIGINT) & {M32} AS {h}2")
        final = f"xor({h}2, {h}2 >> 16)"
        steps.append(nxt.format(final, final) if "{}" in nxt else nxt)
    return steps


class DuckDBPeer:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        arrays = fleet_arrays(fleet)
        self.con = duckdb.connect()
        # DuckDB scans a dict of numpy arrays by its variable name, and loads NaN as null, which
        # is what an unknown vram_gb must be here (null fails `vram_gb >= $min_vram`).
        self.con.register("arrays", arrays)
        self.con.execute("CREATE TABLE fleet AS SELECT * FROM arrays")
        self.con.unregister("arrays")
        # Top-N late materialisation re-plans the tie-hash projections per query: 48 ms against
        # 4 ms at 1,000 agents (measured); a user tuning this query turns it off.
        self.con.execute("SET disabled_optimizers = 'late_materialization'")
        self.label_words = word_count(arrays, "labels")
        self.model_words = word_count(arrays, "cached_models")
        self._sql: dict[tuple, str] = {}

    def __call__(self, request, policy, now) -> str | None:
        with self.fleet.lock:
            q = Query(*build_query(self.fleet, request, policy, now))
        if q.tie_band != 0.0:
            raise ValueError("the DuckDB peer implements exact ties only (tie_band == 0)")
        if q.labels_unknown:
            return None
        shape = (q.n_models > 0, min_vram_gb(q) is not None, q.excluded.size > 0)
        sql = self._sql.get(shape) or self._sql.setdefault(shape, self.sql(*shape))
        row = self.con.execute(sql, self.params(q, *shape)).fetchone()
        return None if row is None else self.fleet.agent_id_at(row[0])

    def sql(self, models: bool, min_vram: bool, excluded: bool) -> str:
        where = [
            "$now - last_heartbeat <= $timeout",
            f"status <= {LAST_ELIGIBLE_STATUS}",
            "(team = $team OR ($community AND community_opt_in))",
            "running_count < gpu_capacity",
        ]
        for w in range(self.label_words):
            where.append(f"(labels_{w} & $l{w}::UBIGINT) = $l{w}::UBIGINT")
        if min_vram:
            where.append("vram_gb >= $min_vram")  # null (unknown) fails
        if excluded:
            where.append("NOT list_contains($excluded, rid)")
        if models:
            hits = " + ".join(
                f"bit_count(cached_models_{m} & $m{m}::UBIGINT)::INTEGER"
                for m in range(self.model_words)
            )
            warm = f"({hits})::DOUBLE / $n_models"
        else:
            warm = "0.5::DOUBLE"
        score = (
            "($w0 * $region_table[region + 1]"
            " + $w1 * greatest(0.0::DOUBLE, 1.0::DOUBLE - running_count::DOUBLE / gpu_capacity)"
            " + $w2 * (CASE WHEN team = $team THEN 1.0::DOUBLE ELSE 0.0::DOUBLE END)"
            f" + $w3 * {warm}"
            " + $w4 * $gpu_table[gpu_model + 1]"
            " + $w5 * (1.0::DOUBLE - failure_rate)) / $wsum"
        )
        sql = f"SELECT rid, id_hash, {score} AS score FROM fleet WHERE {' AND '.join(where)}"
        for step in _tie_steps():
            sql = f"SELECT *, {step} FROM ({sql})"
        return f"SELECT rid FROM ({sql}) ORDER BY score DESC, tiebreak LIMIT 1"

    def params(self, q, models: bool, min_vram: bool, excluded: bool) -> dict:
        w = q.weights.tolist()
        p = {
            "now": q.now,
            "timeout": q.heartbeat_timeout_s,
            "team": int(q.team),
            "community": bool(q.community),
            "region_table": q.region_table.tolist(),
            "gpu_table": q.gpu_table.tolist(),
            "key": int(q.tie_key_hash),
            **{f"w{i}": w[i] for i in range(6)},
            "wsum": w[6],
            **{f"l{i}": int(q.labels[i]) for i in range(self.label_words)},
        }
        if models:
            p.update({f"m{i}": int(q.models[i]) for i in range(self.model_words)})
            p["n_models"] = int(q.n_models)
        if min_vram:
            p["min_vram"] = min_vram_gb(q)
        if excluded:
            p["excluded"] = q.excluded.tolist()
        return p
