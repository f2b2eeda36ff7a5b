"""Search the scorer's weights (and waiting budget) on a workload, on Dask.

``python -m scoring.research.sweep --trace auto --load 0.2`` replays the Stable Diffusion trace
under many weightings, several seeds each (fleets, regions and lifecycle events differ between
seeds), every simulation one task on a Dask cluster (a LocalCluster by default, ``--scheduler
ADDRESS`` for a running one), and prints a Markdown table, best first, with other policies
below for scale. This is the evidence behind the defaults of ``ScoringPolicy`` (see
``notebooks/WEIGHTS.md``).

Two searches spend the same number of simulations: ``grid`` (the built-in grids) and
``optuna`` (Optuna's TPE sampler, seeded, asking for as many trials at a time as there are
workers); ``--search both`` runs both and reports which found the better weighting.

The objective, lower is better, is the sum of three ratios to the engine's current defaults on
the same seeds: mean and p95 end-to-end latency and p95 dispatcher overhead (3.0: as good as
the defaults). Only ratios of weights matter (the score is a weighted mean), so
``reliability`` stays at 1 and the others move around it; the workloads name no preferred GPU,
so the ``gpu`` factor is a constant 0.5 there and its weight stays at 1.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from scoring.research.cluster import Job, connect, run_jobs
from scoring.sim.simulation import SimConfig
from scoring.sim.trace import find_trace

#: Metrics averaged over seeds and shown in the table: (key, header, format).
COLUMNS = (
    ("latency_mean_s", "e2e mean", "{:.1f}"),
    ("latency_p95_s", "e2e p95", "{:.1f}"),
    ("overhead_p95_s", "ovh p95", "{:.1f}"),
    ("wait_p95_s", "wait p95", "{:.1f}"),
    ("cold_load_rate", "cold", "{:.3f}"),
    ("region_match_rate", "region", "{:.3f}"),
    ("fairness_jain", "Jain", "{:.3f}"),
    ("utilisation", "util", "{:.3f}"),
)
#: The objective's terms, each divided by the engine defaults' value.
OBJECTIVE = ("latency_mean_s", "latency_p95_s", "overhead_p95_s")
#: What the search may vary, with its range (log-uniform for weights).
SPACE = {"region": (0.1, 4.0), "load": (0.1, 4.0), "pool": (0.01, 4.0), "warm": (0.5, 8.0)}

Weighting = dict[str, float]


def default_grid() -> list[Weighting]:
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


def fine_grid() -> list[Weighting]:
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


def _jobs(
    config: SimConfig, weighting: Weighting | None, seeds: Sequence[int], wait: float | None
) -> list[Job]:
    weights = None if weighting is None else tuple(sorted(weighting.items()))
    return [Job(replace(config, seed=s), "scorer", weights, wait) for s in seeds]


def _mean(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = set(metrics[0]).intersection(*metrics[1:])
    return {k: float(np.nanmean([m[k] for m in metrics])) for k in sorted(keys)}


def objective(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Sum of :data:`OBJECTIVE` ratios to ``reference`` (3.0 when equal; lower is better)."""
    return float(sum(metrics[k] / reference[k] for k in OBJECTIVE))


def grid_search(
    config: SimConfig,
    grid: Sequence[Weighting | None],
    seeds: Sequence[int],
    client: Any = None,
    waits: Sequence[float | None] = (None,),
    progress: bool = True,
) -> list[tuple[str, dict[str, float]]]:
    """Mean metrics over ``seeds`` of the scorer under each weighting (and waiting budget)."""
    combos = [(w, t) for w in grid for t in waits]
    jobs = [job for w, t in combos for job in _jobs(config, w, seeds, t)]
    results = run_jobs(jobs, client, progress, desc="grid")
    n = len(seeds)
    return [(_label(w, t), _mean(results[k * n : (k + 1) * n])) for k, (w, t) in enumerate(combos)]


def optuna_search(
    config: SimConfig,
    n_trials: int,
    seeds: Sequence[int],
    reference: dict[str, float],
    client: Any = None,
    batch: int = 2,
    search_wait: bool = False,
    sampler_seed: int = 0,
    progress: bool = True,
) -> list[tuple[str, dict[str, float]]]:
    """``n_trials`` weightings proposed by Optuna's TPE sampler, ``batch`` at a time, each
    measured on every seed; returns their mean metrics like :func:`grid_search`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=sampler_seed)
    )
    rows: list[tuple[str, dict[str, float]]] = []
    n = len(seeds)
    while len(rows) < n_trials:
        trials = [study.ask() for _ in range(min(batch, n_trials - len(rows)))]
        asked = []
        for trial in trials:
            weights = {"gpu": 1.0, "reliability": 1.0}
            for factor, (lo, hi) in SPACE.items():
                weights[factor] = round(trial.suggest_float(factor, lo, hi, log=True), 3)
            wait = trial.suggest_float("locality_wait_s", 0.0, 60.0) if search_wait else None
            asked.append((weights, None if wait is None else round(wait, 1)))
        jobs = [job for w, t in asked for job in _jobs(config, w, seeds, t)]
        results = run_jobs(jobs, client, progress, desc=f"optuna {len(rows)}/{n_trials}")
        for k, (trial, (w, t)) in enumerate(zip(trials, asked, strict=True)):
            mean = _mean(results[k * n : (k + 1) * n])
            study.tell(trial, objective(mean, reference))
            rows.append((_label(w, t), mean))
    return rows


def rank(
    rows: list[tuple[str, dict[str, float]]], reference: dict[str, float]
) -> list[tuple[str, dict[str, float]]]:
    """``rows`` with their objective against ``reference``, best first."""
    for _, m in rows:
        m["objective"] = objective(m, reference)
    return sorted(rows, key=lambda r: r[1]["objective"])


def sweep(
    config: SimConfig,
    grid: Sequence[Weighting | None],
    seeds: Iterable[int] = (0, 1, 2),
    baselines: Sequence[str] = ("least_loaded", "random"),
    client: Any = None,
    progress: bool = False,
) -> list[tuple[str, dict[str, float]]]:
    """Mean metrics over ``seeds`` of the scorer under each weighting, ranked by the objective
    against the engine defaults, then of each other policy in ``baselines``."""
    seeds = list(seeds)
    reference = _mean(run_jobs(_jobs(config, None, seeds, None), client, progress, "defaults"))
    rows = rank(grid_search(config, grid, seeds, client, progress=progress), reference)
    return rows + others(config, baselines, seeds, client, progress)


def others(
    config: SimConfig, names: Sequence[str], seeds: Sequence[int], client: Any, progress: bool
) -> list[tuple[str, dict[str, float]]]:
    """Mean metrics over ``seeds`` of each policy in ``names`` (for scale)."""
    jobs = [Job(replace(config, seed=s), name) for name in names for s in seeds]
    results = run_jobs(jobs, client, progress, desc="others")
    n = len(seeds)
    return [(name, _mean(results[k * n : (k + 1) * n])) for k, name in enumerate(names)]


def _label(weights: Weighting | None, wait: float | None = None) -> str:
    if weights is None:
        text = "engine defaults"
    else:
        shown = {k: v for k, v in weights.items() if k != "gpu"}
        if shown.get("reliability") == 1.0:
            del shown["reliability"]  # the constant of the grids and the search
        text = " ".join(f"{k}={v:g}" for k, v in shown.items())
    return text if wait is None else f"{text} wait={wait:g}"


def markdown(rows: Sequence[tuple[str, dict[str, float]]], top: int | None = None) -> str:
    """A Markdown table of ``rows`` (the first ``top`` scorer rows, then every other policy)."""
    head = "| rank | weights | objective | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    scorer = [r for r in rows if "objective" in r[1]]
    others_ = [r for r in rows if "objective" not in r[1]]
    shown = scorer[:top] if top else scorer
    for i, (label, m) in enumerate(shown, 1):
        cells = " | ".join(_cell(m, key, fmt) for key, _, fmt in COLUMNS)
        lines.append(f"| {i} | {label} | {m['objective']:.3f} | {cells} |")
    for label, m in others_:
        cells = " | ".join(_cell(m, key, fmt) for key, _, fmt in COLUMNS)
        lines.append(f"| - | {label} | - | {cells} |")
    return "\n".join(lines)


def _cell(m: dict[str, float], key: str, fmt: str) -> str:
    value = m.get(key, math.nan)
    return "-" if not math.isfinite(value) else fmt.format(value)


def scenario(args: argparse.Namespace) -> SimConfig:
    """The SimConfig of the command line's ``--trace``, ``--agents``, ``--tasks``, ``--teams``
    and ``--load``."""
    trace = find_trace() if args.trace == "auto" else (None if args.trace == "none" else args.trace)
    if args.trace == "auto" and trace is None:
        raise SystemExit("no trace beside the repository")
    tasks = args.tasks if args.tasks is not None else (None if trace else 20_000)
    return SimConfig(
        n_agents=args.agents, n_tasks=tasks, n_teams=args.teams, load=args.load, trace=trace,
        locality_wait_s=args.locality_wait,
    )  # fmt: skip


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="auto", help="trace CSV, 'auto', or 'none' (synthetic)")
    p.add_argument("--agents", type=int, default=120)
    p.add_argument("--tasks", type=int, default=None, help="trace rows (default: all)")
    p.add_argument("--teams", type=int, default=16)
    p.add_argument("--load", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument(
        "--locality-wait", type=float, default=None,
        help="locality_wait_s of the scorer and the delay anchor (default: the engine's)",
    )  # fmt: skip
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--serial", action="store_true", help="no Dask: run here, one at a time")
    p.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scoring.research.sweep", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_scenario_arguments(p)
    p.add_argument(
        "--search", choices=("grid", "optuna", "both"), default="optuna",
        help="Optuna found a better weighting than the fine grid for the same simulations "
        "(notebooks/WEIGHTS.md); the grids reproduce the earlier tables",
    )  # fmt: skip
    p.add_argument(
        "--grid", choices=("coarse", "fine", "none"), default="fine",
        help="the built-in grid ('none': only --extra weightings)",
    )  # fmt: skip
    p.add_argument(
        "--trials", type=int, default=None, help="Optuna trials (default: as many as the grid has)"
    )
    p.add_argument(
        "--waits", default=None,
        help="comma-separated locality_wait_s values crossed with the grid (default: the engine's)",
    )  # fmt: skip
    p.add_argument("--search-wait", action="store_true", help="Optuna also searches the wait")
    p.add_argument("--top", type=int, default=15, help="scorer rows shown (0: all)")
    p.add_argument("--extra", action="append", default=[], help="more weightings: k=v,k=v")
    p.add_argument("--others", default="least_loaded,multiplex,gie,startup,delay",
                   help="other policies shown for scale")  # fmt: skip
    args = p.parse_args(argv)
    config = scenario(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    progress = not args.no_progress
    grid: list[Weighting | None] = list(
        {"coarse": default_grid, "fine": fine_grid, "none": list}[args.grid]()
    )
    for extra in args.extra:
        grid.append({k: float(v) for k, v in (kv.split("=") for kv in extra.split(","))})
    waits: list[float | None] = [float(w) for w in args.waits.split(",")] if args.waits else [None]
    began = time.perf_counter()
    client = None if args.serial else connect(args.scheduler, args.workers)
    try:
        reference = _mean(run_jobs(_jobs(config, None, seeds, None), client, progress, "defaults"))
        rows: list[tuple[str, dict[str, float]]] = []
        searches: dict[str, list[tuple[str, dict[str, float]]]] = {}
        n_sims = len(grid) * len(waits)
        if args.search in ("grid", "both"):
            searches["grid"] = rank(
                grid_search(config, grid, seeds, client, waits, progress), reference
            )
        if args.search in ("optuna", "both"):
            trials = args.trials or n_sims
            searches["optuna"] = rank(
                optuna_search(config, trials, seeds, reference, client,
                              batch=max(args.workers, 1), search_wait=args.search_wait,
                              progress=progress),
                reference,
            )  # fmt: skip
        for name, found in searches.items():
            rows += [(f"{label} ({name})" if len(searches) > 1 else label, m) for label, m in found]
        rows = rank([("engine defaults", dict(reference)), *rows], reference)
        names = [n for n in args.others.split(",") if n]
        rows += others(config, names, seeds, client, progress)
    finally:
        if client is not None:
            client.close()
    print(markdown(rows, args.top))
    for name, found in searches.items():
        best = found[0]
        print(f"\nbest of {name} ({len(found)} weightings x {len(seeds)} seeds): "
              f"{best[0]}, objective {best[1]['objective']:.4f}")  # fmt: skip
    print(f"\n{time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
