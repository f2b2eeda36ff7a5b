"""What slot holds do to decisions: the trace replayed with the scorer placing as one dispatcher
without holds, with them (the default), and as 2 and 4 replicas that also leave each other's
freshly freed slots to their owners (:mod:`scoring.holds`).

``python -m tests.server.shares_sim [--trace auto] [--loads 0.1 0.2 0.3] [--seeds 0 1]`` prints,
per load and seed, the cold-load rate, the end-to-end p95 and the dispatcher's overhead p95 of
each, and writes them to ``--out`` (JSON). A measurement, not a test.

Known limit: since the simulation's dispatcher wakes whenever a held slot opens, 2 and 4 replicas
are slow on the full trace (each wake-up offers every waiting class again, and the replicas'
placements keep restarting each other's holds: a 3,000-task run at load 0.3 did not finish in
5 minutes where one dispatcher takes 15 s). Rate-limiting those wake-ups is the next step.

The simulation has one exact view of the fleet, so replicas never race here: what it shows is
only what holding does to the decisions. Each dispatch event's batch (oldest first) is dealt to
the replicas in turn, as replicas claiming the queue's oldest tasks concurrently would share it;
each replica then places its share on the fleet as the server's dispatch loop does, with the
agents it holds excluded (:func:`scoring.holds.restrict`). The queue counts as longer than the
free slots when the batch is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Hashable, Sequence
from typing import Any

from scoring import DispatchRequest, Fleet
from scoring.holds import HOLD_S, SlotHolds, free_slots, restrict
from scoring.sim.policies import Outcome, Policy, Scorer
from scoring.sim.simulation import SimConfig, prepare, simulate
from scoring.sim.trace import find_trace
from scoring.sim.view import FleetView

from .conftest import ROOT
from .replicas import write_rows


class Replicated(Policy):
    """The scorer placing as ``replicas`` server replicas with slot holds would."""

    def __init__(self, config: SimConfig, replicas: int) -> None:
        super().__init__(config.scoring_policy())
        self.inner = Scorer(config.scoring_policy(), config.seed, hold_s=0.0)
        self.name = f"scorer-x{replicas}"
        self.wait_s = self.inner.wait_s
        self.shares = [SlotHolds(f"replica-{k}") for k in range(replicas)]
        self.ids = tuple(s.replica_id for s in self.shares)

    def release_at(self) -> float | None:
        ends = [at for s in self.shares if (at := s.release_at()) is not None]
        return min(ends, default=None)

    def bind(self, view: FleetView, transfer: Any) -> None:
        super().bind(view, transfer)
        self.inner.bind(view, transfer)

    def assign(
        self,
        fleet: Fleet,
        requests: Sequence[DispatchRequest],
        keys: Sequence[Hashable],
        submitted: Sequence[float],
        now: float,
    ) -> list[Outcome]:
        saturated = len(requests) > free_slots(fleet)
        out: list[Outcome] = [(None, False)] * len(requests)
        n = len(self.shares)
        for k, shares in enumerate(self.shares):
            mine = list(range(k, len(requests), n))
            if not mine:
                continue
            shares.update(self.ids, saturated)
            held = shares.held(fleet, now)
            batch = restrict(fleet, [requests[i] for i in mine], held)
            placed = self.inner.assign(fleet, batch, [keys[i] for i in mine],
                                       [submitted[i] for i in mine], now)  # fmt: skip
            for i, outcome in zip(mine, placed, strict=True):
                out[i] = outcome
        return out


def run(config: SimConfig, replicas: Sequence[int]) -> dict[int, dict[str, float]]:
    """The scorer's metrics as ``r`` replicas, for each ``r`` (1: the default scorer, one
    dispatcher with holds; 0: one dispatcher without them)."""
    workload, agents = prepare(config)
    out = {}
    for r in replicas:
        policy: Policy
        if r <= 1:
            policy = Scorer(config.scoring_policy(), config.seed, hold_s=0.0 if r == 0 else HOLD_S)
        else:
            policy = Replicated(config, r)
        out[r] = simulate(config, policy, workload, agents).metrics
    return out


KEYS = ("cold_load_rate", "latency_p95_s", "overhead_p95_s", "completed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.server.shares_sim", description=__doc__)
    p.add_argument("--trace", default="auto", help="trace CSV, 'auto', or 'none' (synthetic)")
    p.add_argument("--tasks", type=int, default=None, help="trace rows (default: all)")
    p.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--replicas", type=int, nargs="+", default=[0, 1, 2, 4],
                   help="0: one dispatcher without holds")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "out" / "server" / "shares_sim.json"))
    a = p.parse_args(argv)
    trace = find_trace() if a.trace == "auto" else (None if a.trace == "none" else a.trace)
    rows = []
    for load in a.loads:
        for seed in a.seeds:
            tasks = a.tasks if a.tasks is not None or trace else 20_000
            config = SimConfig(trace=trace, n_tasks=tasks, load=load, seed=seed)
            for r, metrics in run(config, a.replicas).items():
                row = {"load": load, "seed": seed, "replicas": r,
                       **{k: metrics.get(k) for k in KEYS}}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
