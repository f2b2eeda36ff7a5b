"""Command line: ``python -m scoring.sim --agents 120 --tasks 20000 --out out/demo``.

Runs every policy on the same workload and fleet, prints a comparison table, and writes the PNG
plots and ``metrics.json`` (the configuration and every metric of every policy) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from scoring.models import FACTORS
from scoring.sim.catalog import policy_names
from scoring.sim.metrics import format_table
from scoring.sim.policies import POLICY_NAMES
from scoring.sim.simulation import SimConfig, compare
from scoring.sim.trace import find_trace
from scoring.warmup import compile_kernels

#: Default offered load of a trace replay. Over the whole span it is low, but the trace's busiest
#: hour has about 9 times the mean rate, so peaks still queue.
TRACE_LOAD = 0.1


def parse_weights(text: str) -> dict[str, float]:
    """``"region=2,warm=3"`` -> ``{"region": 2.0, "warm": 3.0}`` (omitted factors keep defaults)."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in FACTORS:
            raise argparse.ArgumentTypeError(
                f"bad weight {part!r}: expected FACTOR=NUMBER with FACTOR in {', '.join(FACTORS)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight {part!r}: not a number") from None
    return weights


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = policy_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}: choose from {', '.join(known)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m scoring.sim",
        description="Compare dispatch policies on a simulated BYOC GPU fleet.",
    )
    p.add_argument("--agents", type=int, default=d.n_agents, help="agents in the fleet")
    p.add_argument(
        "--tasks", type=int, default=None,
        help=f"tasks to submit (default {d.n_tasks}; with --trace: every finished request)",
    )  # fmt: skip
    p.add_argument(
        "--policies", type=parse_policies, default=list(POLICY_NAMES),
        help=f"comma-separated, from {','.join(POLICY_NAMES)} (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--weights", type=parse_weights, default=None,
        help="scorer weights, e.g. region=2,warm=3 (default: the engine's defaults)",
    )  # fmt: skip
    p.add_argument(
        "--trace", default=None,
        help="path of lora_request_trace.csv to replay, or 'auto' for ../shared/traces beside "
        "the repository (default: the synthetic workload)",
    )  # fmt: skip
    p.add_argument("--skip", type=int, default=0, help="trace rows to skip before replaying")
    p.add_argument(
        "--compress", type=float, default=None,
        help="divide gaps between arrivals by this (default: whatever reaches --load)",
    )  # fmt: skip
    p.add_argument(
        "--load", type=float, default=None,
        help="offered load (work / arrival span / slot-speed of the fleet) when --compress is not "
        f"given (default {d.load}; with --trace {TRACE_LOAD}: the trace is bursty, its busiest "
        "hour carries about 9 times its mean)",
    )  # fmt: skip
    p.add_argument("--teams", type=int, default=d.n_teams, help="teams (trace: tenant buckets)")
    p.add_argument("--cache-size", type=int, default=d.cache_size, help="models each agent caches")
    p.add_argument("--latencies", default=None, help="model-load latency .tar.gz (ms values)")
    p.add_argument(
        "--locality-wait", type=float, default=None,
        help="seconds a run may wait for an agent with its model cached: the scorer's "
        "locality_wait_s and the delay anchor's budget (default: the engine's)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="out/sim", help="directory for plots and metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    trace = args.trace
    if trace == "auto":
        trace = find_trace()
        if trace is None:
            raise SystemExit("--trace auto: no trace found beside the repository")
    n_tasks = args.tasks if args.tasks is not None else (None if trace else SimConfig.n_tasks)
    return replace(
        SimConfig(),
        n_agents=args.agents,
        n_tasks=n_tasks,  # None: the whole trace
        seed=args.seed,
        n_teams=args.teams,
        load=args.load if args.load is not None else (TRACE_LOAD if trace else SimConfig.load),
        compress=args.compress,
        trace=trace,
        trace_skip=args.skip,
        latencies=args.latencies,
        cache_size=args.cache_size,
        weights=args.weights,
        locality_wait_s=args.locality_wait,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    out = Path(args.out)
    # Compiled first, so that the first policy's tasks/s does not include it and a first run
    # says why it is quiet.
    compile_kernels(report=lambda line: print(line, file=sys.stderr, flush=True))
    results = compare(config, args.policies, progress=not args.no_progress)
    metrics = {name: r.metrics for name, r in results.items()}
    first = next(iter(results.values()))
    source = str(config.trace) if config.trace else "synthetic"
    print(
        f"\n{len(first.workload.tasks)} tasks ({source}), {len(first.agents)} agents, "
        f"{sum(a.capacity for a in first.agents)} slots, seed {config.seed}, "
        f"weights {dict(config.scoring_policy().weights.items())}"
    )
    print(format_table(metrics))
    out.mkdir(parents=True, exist_ok=True)
    document = {"config": _jsonable(asdict(config)), "metrics": _jsonable(metrics)}
    (out / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    written = [out / "metrics.json"]
    if not args.no_plots:
        from scoring.sim.plots import save_all  # matplotlib only when plotting

        written += save_all(results, out)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null; paths and other objects their strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
