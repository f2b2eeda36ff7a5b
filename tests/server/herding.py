"""Herding measured: lost races per placement and placements per second with 1, 2 and 4
replicas under the same load, with and without each mitigation (DESIGN section 11).

``python -m tests.server.herding [--runs 600] [--out out/server/herding.json]`` starts a
throwaway PostgreSQL cluster, then for each variant and replica count a fresh database, the
replicas, 16 clients and 30 simulated agents (the load harness of the tests), and writes one row
per combination. A measurement, not a test: it runs for minutes.

Variants: ``baseline`` picks on the counts of the last poll with exact ties only; ``tie_band``
spreads picks among agents within 0.05 of the best score by the task id's hash; ``refresh``
reads the counts at the start of every round (``--refresh-each-round``); ``slot_holds`` (the
default) leaves a freshly freed slot of another replica's agent to its owner while the queue is
longer than the free slots (:mod:`scoring.holds`). The first three race for every slot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from scoring.server import db

from .conftest import ROOT, new_database, postgres_cluster
from .load import check, run_load
from .replicas import dispatch_figures, replicas, write_rows

VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": ("--no-slot-holds", "--tie-band", "0"),
    "tie_band": ("--no-slot-holds", "--tie-band", "0.05"),
    "refresh": ("--no-slot-holds", "--refresh-each-round", "--tie-band", "0"),
    "slot_holds": ("--tie-band", "0"),
}


def measure(url_template: str, n: int, extra: tuple[str, ...], runs: int) -> dict[str, Any]:
    """One load on ``n`` fresh replicas; the figures of :func:`dispatch_figures` plus rates."""
    with tempfile.TemporaryDirectory(prefix="herding-") as tmp:
        database = new_database(url_template)
        with replicas(Path(tmp), database, n, *extra) as servers:
            result = run_load(servers, runs=runs, clients=16, capacity=2, deadline_s=120,
                              drain_s=60)  # fmt: skip
        check(servers[0], result, 2)
        figures = dispatch_figures(servers)
        engine = db.Database(database)
        with engine.read() as conn:
            first, last = conn.execute(
                select(func.min(db.task_events.c.at), func.max(db.task_events.c.at)).where(
                    db.task_events.c.status == "dispatched"
                )
            ).one()
        engine.dispose()
    return {
        **figures,
        "placements_per_s": figures["placements"] / max(last - first, 1e-9),
        "runs_per_s": result.figures()["runs_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every variant with 1, 2 and 4 replicas and write the rows as JSON."""
    p = argparse.ArgumentParser(prog="python -m tests.server.herding", description=__doc__)
    p.add_argument("--runs", type=int, default=600)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--variant", choices=list(VARIANTS), action="append")
    p.add_argument("--out", default=str(ROOT / "out" / "server" / "herding.json"))
    a = p.parse_args(argv)
    rows = []
    with postgres_cluster() as url:
        for name in a.variant or list(VARIANTS):
            for n in a.replicas:
                row = {"variant": name, **measure(url, n, VARIANTS[name], a.runs)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
