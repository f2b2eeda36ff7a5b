"""Sweep the scorer's weights on a workload and rank the weightings by end-to-end latency.

``python -m scoring.sim.sweep --trace auto`` replays the Stable Diffusion trace under a grid of
weights (several seeds: fleets, regions and lifecycle events differ between seeds) and prints a
Markdown table, best first, with the baselines below for scale. This is the evidence behind the
default weights of ``ScoringPolicy`` (see ``notebooks/WEIGHTS.md``).

Only ratios of weights matter (the score is a weighted mean), so ``reliability`` stays at 1 and
the others move around it. The trace names no preferred GPU, so the ``gpu`` factor is a constant
0.5 there and its weight cannot change a pick; it stays at 1.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from scoring.sim.simulation import SimConfig, prepare, simulate
from scoring.sim.trace import find_trace

#: Metrics averaged over seeds and shown in the table: (key, header, format).
COLUMNS = (
    ("latency_mean_s", "e2e mean", "{:.1f}"),
    ("latency_p95_s", "e2e p95", "{:.1f}"),
    ("wait_p95_s", "wait p95", "{:.1f}"),
    ("wait_p99_s", "wait p99", "{:.1f}"),
    ("cold_load_rate", "cold", "{:.3f}"),
    ("region_match_rate", "region", "{:.3f}"),
    ("fairness_jain", "Jain", "{:.3f}"),
    ("utilisation", "util", "{:.3f}"),
)


def default_grid() -> list[dict[str, float]]:
    """108 weightings: region, load, warm and pool around reliability = gpu = 1."""
    grid = []
    for region, load, warm, pool in itertools.product(
        (0.5, 1.0, 2.0), (0.5, 1.0, 2.0), (1.0, 2.0, 4.0), (0.0, 1.0, 2.0, 4.0)
    ):
        grid.append(
            {"region": region, "load": load, "pool": pool, "warm": warm, "gpu": 1.0,
             "reliability": 1.0}
        )  # fmt: skip
    return grid


def fine_grid() -> list[dict[str, float]]:
    """The neighbourhood of the coarse grid's winners, with every weight positive (``pool`` and
    ``reliability`` small but not zero), as the engine's defaults must be."""
    grid = []
    for region, load, pool, reliability in itertools.product(
        (0.5, 1.0), (0.5, 1.0), (0.1, 0.25, 0.5, 1.0), (1.0, 2.0)
    ):
        grid.append(
            {"region": region, "load": load, "pool": pool, "warm": 2.0, "gpu": 1.0,
             "reliability": reliability}
        )  # fmt: skip
    return grid


def _run(job: tuple[SimConfig, str, dict[str, float] | None]) -> dict[str, float]:
    config, policy, weights = job
    workload, agents = _prepared(config)
    return simulate(replace(config, weights=weights), policy, workload, agents).metrics


_CACHE: dict[Any, Any] = {}


def _prepared(config: SimConfig) -> Any:
    key = replace(config, weights=None)
    if key not in _CACHE:
        _CACHE.clear()  # one workload per worker at a time is plenty
        _CACHE[key] = prepare(key)
    return _CACHE[key]


def sweep(
    config: SimConfig,
    grid: Sequence[dict[str, float] | None],
    seeds: Iterable[int] = (0, 1, 2),
    baselines: Sequence[str] = ("least_loaded", "random"),
    workers: int = 2,
) -> list[tuple[str, dict[str, float]]]:
    """Mean metrics over ``seeds`` of the scorer under each weighting, then of each baseline.

    Returns ``(label, metrics)`` pairs: scorer rows sorted by mean plus p95 end-to-end latency
    (each relative to the best), baselines after them.
    """
    seeds = list(seeds)
    jobs = [(replace(config, seed=s), "scorer", w) for w in grid for s in seeds]
    jobs += [(replace(config, seed=s), b, None) for b in baselines for s in seeds]
    # Jobs of one seed are adjacent, so each worker prepares each workload once in a row.
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].seed)
    ordered = [jobs[i] for i in order]
    if workers <= 1:
        outputs = [_run(job) for job in ordered]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(_run, ordered, chunksize=4))
    done = dict(zip(order, outputs, strict=True))
    results = [done[i] for i in range(len(jobs))]
    rows: list[tuple[str, dict[str, float]]] = []
    n = len(seeds)
    for k, weights in enumerate(grid):
        rows.append((_label(weights), _mean(results[k * n : (k + 1) * n])))
    best_mean = min(m["latency_mean_s"] for _, m in rows)
    best_p95 = min(m["latency_p95_s"] for _, m in rows)
    for _, m in rows:
        m["objective"] = m["latency_mean_s"] / best_mean + m["latency_p95_s"] / best_p95
    rows.sort(key=lambda r: r[1]["objective"])
    base = len(grid) * n
    for k, name in enumerate(baselines):
        rows.append((name, _mean(results[base + k * n : base + (k + 1) * n])))
    return rows


def _label(weights: dict[str, float] | None) -> str:
    if weights is None:
        return "engine defaults"
    shown = {k: v for k, v in weights.items() if k != "gpu"}
    if shown.get("reliability") == 1.0:
        del shown["reliability"]  # the coarse grid's constant
    return " ".join(f"{k}={v:g}" for k, v in shown.items())


def _mean(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def markdown(rows: Sequence[tuple[str, dict[str, float]]], top: int | None = None) -> str:
    """A Markdown table of ``rows`` (the first ``top`` scorer rows, then every baseline)."""
    head = "| rank | weights | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    scorer = [r for r in rows if "objective" in r[1]]
    others = [r for r in rows if "objective" not in r[1]]
    shown = scorer[:top] if top else scorer
    for i, (label, m) in enumerate(shown, 1):
        cells = " | ".join(fmt.format(m[key]) for key, _, fmt in COLUMNS)
        lines.append(f"| {i} | {label} | {cells} |")
    for label, m in others:
        cells = " | ".join(fmt.format(m[key]) for key, _, fmt in COLUMNS)
        lines.append(f"| - | {label} (baseline) | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoring.sim.sweep", description=__doc__)
    p.add_argument("--trace", default="auto", help="trace CSV, 'auto', or 'none' (synthetic)")
    p.add_argument("--agents", type=int, default=120)
    p.add_argument("--tasks", type=int, default=None, help="trace rows (default: all)")
    p.add_argument("--teams", type=int, default=16)
    p.add_argument("--load", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--grid", choices=("coarse", "fine", "none"), default="coarse",
        help="the built-in grid to run besides the defaults and any --extra ('none': only those)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=20, help="scorer rows shown (0: all)")
    p.add_argument("--extra", action="append", default=[], help="more weightings: k=v,k=v")
    args = p.parse_args(argv)
    trace = find_trace() if args.trace == "auto" else (None if args.trace == "none" else args.trace)
    if args.trace == "auto" and trace is None:
        raise SystemExit("no trace beside the repository")
    tasks = args.tasks if args.tasks is not None else (None if trace else 20_000)
    config = SimConfig(
        n_agents=args.agents, n_tasks=tasks, n_teams=args.teams, load=args.load, trace=trace
    )
    grid: list[dict[str, float] | None] = [
        None,
        *{"coarse": default_grid, "fine": fine_grid, "none": list}[args.grid](),
    ]
    for extra in args.extra:
        grid.append({k: float(v) for k, v in (kv.split("=") for kv in extra.split(","))})
    began = time.perf_counter()
    rows = sweep(config, grid, [int(s) for s in args.seeds.split(",")], workers=args.workers)
    print(markdown(rows, args.top))
    print(f"\n{len(grid)} weightings x {len(args.seeds.split(','))} seeds "
          f"in {time.perf_counter() - began:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
