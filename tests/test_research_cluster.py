"""Sweeps on Dask: each simulation is one task on a LocalCluster of worker processes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from scoring.research.cluster import Job, connect, run_jobs
from scoring.sim import SimConfig, simulate

# A Dask LocalCluster of two worker processes: `make test-all`, not CI (sweeps are not the demo).
pytestmark = pytest.mark.slow

TINY = SimConfig(n_agents=12, n_tasks=80, n_teams=3)
WALL_CLOCK = {"wall_s", "tasks_per_wall_s"}


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    keys = a.keys() - WALL_CLOCK
    return keys == b.keys() - WALL_CLOCK and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in keys
    )


@pytest.fixture(scope="module")
def client():
    c = connect(workers=2)  # LocalCluster(n_workers=2, processes=True)
    yield c
    c.close()
    c.cluster.close()


def test_local_cluster_has_two_worker_processes(client):
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2
    assert len({w["host"] + str(w.get("pid", k)) for k, w in workers.items()}) == 2


def test_jobs_on_the_cluster_equal_jobs_run_here(client):
    jobs = [
        Job(TINY, "scorer"),
        Job(replace(TINY, seed=1), "delay", locality_wait_s=5.0),
        Job(TINY, "scorer", weights=(("warm", 4.0),)),
        Job(TINY, "gie"),
    ]
    remote = run_jobs(jobs, client, progress=False)
    assert len(remote) == len(jobs)
    local = [simulate(j.resolved(), j.policy).metrics for j in jobs]
    for got, expected in zip(remote, local, strict=True):
        assert _same(got, expected)
    assert remote[0]["completed"] == TINY.n_tasks


def test_sweep_command_runs_on_a_local_cluster(capsys):
    from scoring.research.sweep import main

    argv = ["--trace", "none", "--agents", "12", "--tasks", "60", "--teams", "3", "--seeds", "0",
            "--grid", "none", "--extra", "warm=3", "--search", "both", "--trials", "1",
            "--workers", "2", "--others", "least_loaded", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "engine defaults" in out and "(grid)" in out and "(optuna)" in out
    assert "| - | least_loaded |" in out
    assert "best of grid (1 weightings x 1 seeds)" in out
