"""Running many simulations at once on Dask (``dask.distributed``): one task per simulation.

:func:`run_jobs` takes :class:`Job` s and returns their metrics in the same order. With a
``client`` the jobs run on its cluster (a :class:`distributed.LocalCluster` by default, or a
running cluster's scheduler: :func:`connect`), with a progress bar; without one they run one
after another in this process. Each worker process prepares a workload (and fleet) once and
reuses it for every job on the same scenario; the trace path must be readable by the workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from scoring.sim.simulation import SimConfig, prepare, simulate


@dataclass(frozen=True)
class Job:
    """One simulation: a scenario, a policy name, and the scorer's weights and waiting budget
    (``None``: the scenario's)."""

    config: SimConfig
    policy: str = "scorer"
    weights: tuple[tuple[str, float], ...] | None = None
    locality_wait_s: float | None = None

    def resolved(self) -> SimConfig:
        config = self.config
        if self.weights is not None:
            config = replace(config, weights=dict(self.weights))
        if self.locality_wait_s is not None:
            config = replace(config, locality_wait_s=self.locality_wait_s)
        return config


#: Per worker process: the last few prepared scenarios (workload and agents).
_PREPARED: dict[Any, Any] = {}
_PREPARED_KEEP = 4


def _prepared(config: SimConfig) -> Any:
    key = replace(config, weights=None, locality_wait_s=None)
    if key not in _PREPARED:
        while len(_PREPARED) >= _PREPARED_KEEP:
            del _PREPARED[next(iter(_PREPARED))]
        _PREPARED[key] = prepare(key)
    return _PREPARED[key]


def run_job(job: Job) -> dict[str, float]:
    """Run one job and return its metrics (the function each Dask task calls)."""
    workload, agents = _prepared(job.config)
    return simulate(job.resolved(), job.policy, workload, agents).metrics


def connect(scheduler: str | None = None, workers: int = 2) -> Any:
    """A ``distributed.Client``: on the scheduler at ``scheduler`` (``tcp://host:8786``), else on
    a new LocalCluster of ``workers`` single-threaded worker processes (the simulation is
    pure Python, so threads would share one GIL)."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",  # a local cluster listens on this machine only
        dashboard_address=":0",  # any free port: never collide with another cluster's 8787
        # Workers inherit this; numba threads would only oversubscribe the cores.
        env={"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    return Client(cluster)


def run_jobs(
    jobs: Sequence[Job], client: Any = None, progress: bool = True, desc: str = "simulations"
) -> list[dict[str, float]]:
    """Every job's metrics, in the order given; on ``client``'s cluster when one is given."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    try:
        if client is None:
            results = []
            for job in jobs:
                results.append(run_job(job))
                bar.update()
            return results
        from distributed import as_completed

        # pure=False: two identical jobs are still two simulations (never deduplicated).
        futures = [client.submit(run_job, job, pure=False) for job in jobs]
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[dict[str, float] | None] = [None] * len(jobs)
        for future in as_completed(futures):
            out[index[future.key]] = future.result()
            bar.update()
        return [m for m in out if m is not None]
    finally:
        bar.close()


def default_workers() -> int:
    """Worker processes for a LocalCluster: the machine's cores."""
    return max(os.cpu_count() or 1, 1)
