"""The pick as a polars lazy query over a DataFrame copied from the fleet (copy not timed).

Filter on every rule, score the eligible rows, compute the tie hash in polars expressions (UInt64
arithmetic: shifts as floor divisions by powers of two, since polars has no shift operator), then
sort by (score desc, tie hash) and take the first row; polars turns sort + head into a top-k.
"""

from __future__ import annotations

import polars as pl

from benchmarks.peers.table import fleet_frame, min_vram_gb, word_count
from scoring.fleet import Fleet
from scoring.layout import Query
from scoring.models import LAST_ELIGIBLE_STATUS
from scoring.query import build_query

M32 = 0xFFFFFFFF
C1, C2 = 0x85EBCA6B, 0xC2B2AE35


def _u64(value) -> pl.Expr:
    return pl.lit(int(value), dtype=pl.UInt64)


def _shr(h: pl.Expr, bits: int) -> pl.Expr:
    return h // _u64(1 << bits)


def _tie_steps() -> list[dict[str, pl.Expr]]:
    """Column definitions, one ``with_columns`` each, that end in column ``tie``.

    Each step reads the previous step's columns by name: written as one nested expression, every
    finaliser would read its input eight times and the tree would grow about 600-fold.
    """
    col = pl.col
    steps: list[dict[str, pl.Expr]] = [{"a": col("x") & _u64(M32), "b": _shr(col("x"), 32)}]
    # MurmurHash3's finaliser of column h in two steps; its last step is folded into the next.
    for h, nxt in (("a", lambda f: {"t": col("b").xor(f)}),
                   ("t", lambda f: {"hi": f, "u": col("a").xor(f)}),
                   ("u", lambda f: {"tie": (col("hi") * _u64(1 << 32)) | f})):  # fmt: skip
        v = col(h)
        steps.append({f"{h}1": (v.xor(_shr(v, 16)) * _u64(C1)) & _u64(M32)})
        v = col(f"{h}1")
        steps.append({f"{h}2": (v.xor(_shr(v, 13)) * _u64(C2)) & _u64(M32)})
        v = col(f"{h}2")
        steps.append(nxt(v.xor(_shr(v, 16))))
    return steps


TIE_STEPS = _tie_steps()  # built once: they do not depend on the request


class PolarsPeer:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.frame = fleet_frame(fleet)
        self.label_words = word_count(self.frame.columns, "labels")
        self.model_words = word_count(self.frame.columns, "cached_models")

    def __call__(self, request, policy, now) -> str | None:
        with self.fleet.lock:
            q = Query(*build_query(self.fleet, request, policy, now))
        if q.tie_band != 0.0:
            raise ValueError("the polars peer implements exact ties only (tie_band == 0)")
        if q.labels_unknown:
            return None
        out = self.query(q).collect()
        return None if out.height == 0 else self.fleet.agent_id_at(out.item(0, "rid"))

    def query(self, q) -> pl.LazyFrame:
        col = pl.col
        ok = (q.now - col("last_heartbeat") <= q.heartbeat_timeout_s) & (
            col("status") <= LAST_ELIGIBLE_STATUS
        )
        pool = col("team") == q.team
        if q.community:
            pool = pool | col("community_opt_in")
        ok = ok & pool & (col("running_count") < col("gpu_capacity"))
        for w in range(self.label_words):
            need = _u64(q.labels[w])
            ok = ok & ((col(f"labels_{w}") & need) == need)
        if (minimum := min_vram_gb(q)) is not None:
            ok = ok & (col("vram_gb") >= minimum)  # null (unknown) fails
        if q.excluded.size:
            ok = ok & ~col("rid").is_in(q.excluded.tolist())
        w = q.weights.tolist()
        region = pl.lit(pl.Series(q.region_table)).gather(col("region"))
        load = pl.max_horizontal(
            pl.lit(0.0), 1.0 - col("running_count").cast(pl.Float64) / col("gpu_capacity")
        )
        pool_f = (col("team") == q.team).cast(pl.Float64)
        if q.n_models == 0:
            warm = pl.lit(0.5)
        else:
            hits = sum(
                (col(f"cached_models_{m}") & _u64(q.models[m])).bitwise_count_ones().cast(pl.Int64)
                for m in range(self.model_words)
            )
            warm = hits / q.n_models
        gpu = pl.lit(pl.Series(q.gpu_table)).gather(col("gpu_model"))
        total = w[0] * region + w[1] * load + w[2] * pool_f + w[3] * warm + w[4] * gpu
        total = total + w[5] * (1.0 - col("failure_rate"))
        x = col("id_hash").xor(_u64(q.tie_key_hash))
        lf = self.frame.lazy().filter(ok).select("rid", (total / w[6]).alias("score"), x.alias("x"))
        for step in TIE_STEPS:
            lf = lf.with_columns(**step)
        return lf.sort(["score", "tie"], descending=[True, False]).head(1).select("rid")
