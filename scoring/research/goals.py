"""The issue's goal table: the engine's default policy against the best anchor, per load and seed.

``python -m scoring.research.goals --trace auto`` replays the full trace at loads 0.1, 0.2 and 0.3
with seeds 0 and 1 under every policy (each simulation one Dask task, see
:mod:`scoring.research.cluster`) and checks, for each load and seed:

- cold-load rate at most 0.7 x the best anchor's (the lowest of ``multiplex``, ``gie``,
  ``startup``, ``delay``);
- ``overhead_p95_s`` at most 0.8 x the best anchor's;
- ``latency_p95_s`` at most 0.9 x the best anchor's;
- Jain's fairness index at least 0.95;
- no team's mean slowdown more than 10% above its mean slowdown under ``least_loaded``.

It prints one Markdown table per scenario and writes them, with every policy's metrics, to
``--out`` (``goals.md``, ``goals.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from scoring.research.cluster import Job, connect, run_jobs
from scoring.research.sweep import add_scenario_arguments, scenario
from scoring.sim.cli import _jsonable
from scoring.sim.policies import ANCHORS, POLICY_NAMES

#: (metric, the scorer's value may be at most this times the best anchor's).
RATIO_GOALS = (("cold_load_rate", 0.7), ("overhead_p95_s", 0.8), ("latency_p95_s", 0.9))
FAIRNESS_GOAL = 0.95
TEAM_SLOWDOWN_GOAL = 1.10


def check(metrics: Mapping[str, Mapping[str, float]], subject: str = "scorer") -> list[dict]:
    """The goal rows of one scenario from every policy's metrics (``metrics[policy][key]``)."""
    mine = metrics[subject]
    rows: list[dict[str, Any]] = []
    anchors = [a for a in ANCHORS if a in metrics]
    for key, bound in RATIO_GOALS:
        best = min(anchors, key=lambda a: metrics[a][key])
        ratio = mine[key] / metrics[best][key]
        rows.append(
            {
                "goal": f"{key} <= {bound} x best anchor",
                "value": mine[key],
                "reference": f"{best} {metrics[best][key]:.4g}",
                "ratio": ratio,
                "met": ratio <= bound,
            }
        )
    fair = mine["fairness_jain"]
    rows.append(
        {
            "goal": f"fairness_jain >= {FAIRNESS_GOAL}",
            "value": fair,
            "reference": "-",
            "ratio": math.nan,
            "met": fair >= FAIRNESS_GOAL,
        }
    )
    if "least_loaded" in metrics:
        base = metrics["least_loaded"]
        teams = [k for k in mine if k.startswith("slowdown_team_")]
        ratios = {
            k.removeprefix("slowdown_team_"): mine[k] / base[k]
            for k in teams
            if math.isfinite(mine[k]) and math.isfinite(base.get(k, math.nan)) and base[k] > 0
        }
        worst = max(ratios, key=lambda t: ratios[t])
        rows.append(
            {
                "goal": f"worst team slowdown <= {TEAM_SLOWDOWN_GOAL} x least_loaded",
                "value": mine[f"slowdown_team_{worst}"],
                "reference": f"team {worst}",
                "ratio": ratios[worst],
                "met": ratios[worst] <= TEAM_SLOWDOWN_GOAL,
            }
        )
    return rows


def markdown(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| goal | scorer | reference | ratio | met |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.3f}"
        lines.append(
            f"| {r['goal']} | {r['value']:.4g} | {r['reference']} | {ratio} | "
            f"{'yes' if r['met'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scoring.research.goals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scenario_arguments(p)
    p.set_defaults(seeds="0,1")
    p.add_argument("--loads", default="0.1,0.2,0.3", help="comma-separated offered loads")
    p.add_argument("--policies", default=",".join(POLICY_NAMES))
    p.add_argument(
        "--reuse",
        metavar="GOALS_JSON",
        help="take the metrics of policies not in --policies from this earlier goals.json (the "
        "simulation is deterministic: re-run only the scorer after changing it)",
    )
    p.add_argument("--out", default="out/goals")
    args = p.parse_args(argv)
    base = scenario(args)
    loads = [float(x) for x in args.loads.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.policies.split(",") if n]
    scenarios = [(load, seed) for load in loads for seed in seeds]
    earlier = _earlier_metrics(p, args.reuse, scenarios, names)
    if "scorer" not in names or not any(
        a in names or a in earlier.get(sc, {}) for sc in scenarios for a in ANCHORS
    ):
        p.error("the goals compare 'scorer' with an anchor: list both in --policies (or --reuse)")
    jobs = [Job(replace(base, load=ld, seed=s), n) for ld, s in scenarios for n in names]
    began = time.perf_counter()
    client = None if args.serial else connect(args.scheduler, args.workers)
    try:
        results = run_jobs(jobs, client, not args.no_progress, desc="goals")
    finally:
        if client is not None:
            client.close()
    document: dict[str, Any] = {"config": _jsonable(vars(args)), "scenarios": []}
    sections = []
    for k, (load, seed) in enumerate(scenarios):
        metrics = {**earlier.get((load, seed), {}),
                   **dict(zip(names, results[k * len(names) : (k + 1) * len(names)],
                              strict=True))}  # fmt: skip
        rows = check(metrics)
        title = f"load {load:g}, seed {seed}"
        sections.append(markdown(title, rows))
        document["scenarios"].append(
            {"load": load, "seed": seed, "goals": rows, "metrics": metrics}
        )
    text = "\n\n".join(sections)
    print(text)
    print(f"\n{len(jobs)} simulations in {time.perf_counter() - began:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "goals.md").write_text(text + "\n")
    (out / "goals.json").write_text(json.dumps(_jsonable(document), indent=1) + "\n")
    return 0


def _earlier_metrics(
    parser: argparse.ArgumentParser,
    path: str | None,
    scenarios: Sequence[tuple[float, int]],
    names: Sequence[str],
) -> dict[tuple[float, int], dict[str, Any]]:
    """``--reuse``: every scenario's metrics of the policies not re-run, from a goals.json."""
    if path is None:
        return {}
    try:
        document = json.loads(Path(path).read_text())
        found = {(sc["load"], sc["seed"]): sc["metrics"] for sc in document["scenarios"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"--reuse {path}: not a goals.json ({err})")
    missing = [sc for sc in scenarios if sc not in found]
    if missing:
        parser.error(f"--reuse {path}: no metrics for load, seed {missing}")
    return {sc: {k: v for k, v in found[sc].items() if k not in names} for sc in scenarios}


if __name__ == "__main__":
    raise SystemExit(main())
