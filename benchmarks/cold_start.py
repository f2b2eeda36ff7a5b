"""Cold start: a fresh process imports the package and makes its first pick.

Measured twice over one empty ``NUMBA_CACHE_DIR``: first without a compiled cache (numba compiles
every kernel the pick needs, then writes the cache), then with it (numba loads machine code from
disk). Building the fleet is not counted; the interpreter's own start-up is reported apart.

    python -m benchmarks.cold_start [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, time
t0 = time.perf_counter()
import scoring
from scoring import Fleet, pick_agent
t_import = time.perf_counter() - t0
from scoring.synthetic import NOW, synthetic_agents, synthetic_requests, team_ids
fleet = Fleet.from_agents(synthetic_agents(100))
request = synthetic_requests(1, teams=team_ids(4))[0]
t1 = time.perf_counter()
decision = pick_agent(fleet, request, now=NOW)
t_pick = time.perf_counter() - t1
print(json.dumps({"import_s": t_import, "first_pick_s": t_pick, "agent_id": decision.agent_id}))
"""


def run_child(cache_dir: str) -> dict:
    """One fresh interpreter; returns its import and first-pick times and its total wall time."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    env["NUMBA_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    result["import_and_pick_s"] = result["import_s"] + result["first_pick_s"]
    return result


def measure(runs: int = 3) -> dict:
    """``{"no_cache": {...}, "cache": {...}}``: one run without a cache, median of ``runs`` with."""
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache_dir:
        cold = run_child(cache_dir)
        warm = [run_child(cache_dir) for _ in range(runs)]
    keys = warm[0].keys() - {"agent_id"}
    median = {k: statistics.median(r[k] for r in warm) for k in keys}
    assert all(r["agent_id"] == cold["agent_id"] for r in warm)
    return {"no_cache": cold, "cache": median}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs with the cache (median)")
    args = parser.parse_args(argv)
    result = measure(args.runs)
    for name, r in result.items():
        print(
            f"{name:>8}: import {r['import_s'] * 1e3:7.1f} ms + first pick "
            f"{r['first_pick_s'] * 1e3:7.1f} ms = {r['import_and_pick_s'] * 1e3:7.1f} ms "
            f"(whole process {r['process_s'] * 1e3:7.1f} ms)"
        )


if __name__ == "__main__":
    main()
