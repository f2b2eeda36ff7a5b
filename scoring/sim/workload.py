"""Tasks and seeded synthetic workloads.

A :class:`Workload` is what the platform's clients submit: tasks in arrival order, each from one of
``n_teams`` teams, for the team's own agents or the community pool, from a submitter region, with
one required model and a service time measured on a reference GPU (speed 1.0). The synthetic
workload has the shape of the Stable Diffusion trace (see :mod:`scoring.sim.trace`): skewed team
sizes, Zipf model popularity, heavy-tailed run times, a share of community-pool runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from scoring.synthetic import MODELS, zipf_shares

#: Regions the simulated fleet lives in: two continents of three regions and one of two, so that
#: same-region, same-continent and cross-continent placements all happen.
SIM_REGIONS = (
    "us-east", "us-west", "us-central", "eu-west", "eu-central", "eu-north",
    "ap-northeast", "ap-southeast",
)  # fmt: skip


def continent(region: str | None) -> str | None:
    """``"us-east"`` -> ``"us"``; ``None`` (unknown) stays ``None``."""
    return None if region is None else region.split("-", 1)[0]


def same_continent_affinity(regions: tuple[str, ...] = SIM_REGIONS, value: float = 0.6) -> dict:
    """``region_affinity`` for a ScoringPolicy: ``value`` for every pair on one continent."""
    return {
        (a, b): value
        for i, a in enumerate(regions)
        for b in regions[i + 1 :]
        if continent(a) == continent(b)
    }


@dataclass(frozen=True, slots=True)
class Task:
    """One submitted run.

    ``task_id`` is the arrival rank (0, 1, ...); ``arrival`` is in seconds from the start of the
    simulation; ``service_s`` is the run time on a speed-1.0 GPU (an agent divides it by its GPU's
    speed); ``model`` is the required model (``None``: no model needed).
    """

    task_id: int
    arrival: float
    team: int
    pool: str = "team"
    region: str | None = None
    model: str | None = None
    service_s: float = 20.0
    min_vram_gb: float | None = None
    preferred_gpu: str | None = None


@dataclass(frozen=True)
class Workload:
    """Tasks in arrival order plus what the fleet builder needs to know about the teams.

    ``team_regions[t]`` is team ``t``'s home region (its agents and submitters are mostly there);
    ``team_demand[t]`` its share of the submitted work.
    """

    tasks: tuple[Task, ...]
    n_teams: int
    team_regions: tuple[str, ...]
    models: tuple[str, ...]
    name: str = "synthetic"
    team_demand: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if len(self.team_demand) != self.n_teams:
            work = np.zeros(self.n_teams)
            for t in self.tasks:
                work[t.team] += t.service_s
            object.__setattr__(self, "team_demand", work / max(work.sum(), 1e-12))

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival."""
        return self.tasks[-1].arrival - self.tasks[0].arrival if self.tasks else 0.0

    @property
    def work_s(self) -> float:
        """Total service time on a speed-1.0 GPU."""
        return float(sum(t.service_s for t in self.tasks))

    def compressed(self, factor: float) -> Workload:
        """The same workload with every gap between arrivals divided by ``factor``."""
        if not factor > 0:
            raise ValueError("compression factor must be positive")
        if factor == 1.0 or not self.tasks:
            return self
        t0 = self.tasks[0].arrival
        tasks = tuple(replace(t, arrival=t0 + (t.arrival - t0) / factor) for t in self.tasks)
        return replace(self, tasks=tasks)


def team_home_regions(n_teams: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Each team's home region; the first regions are the most popular."""
    picks = rng.choice(len(SIM_REGIONS), n_teams, p=zipf_shares(len(SIM_REGIONS), 0.6))
    return tuple(SIM_REGIONS[i] for i in picks)


def submitter_regions(
    teams: np.ndarray, homes: tuple[str, ...], rng: np.random.Generator
) -> list[str | None]:
    """Where each task is submitted from: 85% the team's home, 10% elsewhere, 5% unknown."""
    u = rng.random(len(teams))
    other = rng.integers(len(SIM_REGIONS), size=len(teams))
    return [
        homes[t] if x < 0.85 else (SIM_REGIONS[o] if x < 0.95 else None)
        for t, x, o in zip(teams.tolist(), u.tolist(), other.tolist(), strict=True)
    ]


def synthetic_workload(
    n_tasks: int,
    seed: int = 0,
    n_teams: int = 16,
    n_models: int = 24,
    community_share: float = 0.3,
    mean_gap_s: float = 1.0,
    model_exponent: float = 1.0,
    team_exponent: float = 1.1,
) -> Workload:
    """A seeded workload of ``n_tasks`` Poisson arrivals (mean gap ``mean_gap_s``).

    Team sizes and model popularity are Zipf-skewed; service times are lognormal around 20 s with
    batches of 1, 2, 4 or 8 images as in the trace; one task in ten asks for 24 GB of VRAM.
    ``simulate`` usually rescales the gaps to reach a target load, so ``mean_gap_s`` is only a
    starting point.
    """
    if n_tasks < 0:
        raise ValueError("n_tasks must be non-negative")
    n_models = min(n_models, len(MODELS))
    rng = np.random.default_rng([seed, 11])
    homes = team_home_regions(n_teams, rng)
    arrival = np.cumsum(rng.exponential(mean_gap_s, n_tasks))
    team = rng.choice(n_teams, n_tasks, p=zipf_shares(n_teams, team_exponent))
    model = rng.choice(n_models, n_tasks, p=zipf_shares(n_models, model_exponent))
    batch = rng.choice([1, 2, 4, 8], n_tasks, p=[0.58, 0.08, 0.19, 0.15])
    # Run time grows sub-linearly with the batch (the GPU batches images): about 23 s median
    # overall and a p99 near 100 s, like the trace's exec_time_seconds.
    service = rng.lognormal(np.log(15.0), 0.45, n_tasks) * batch**0.35
    community = rng.random(n_tasks) < community_share
    big = rng.random(n_tasks) < 0.1
    regions = submitter_regions(team, homes, rng)
    tasks = tuple(
        Task(
            task_id=i,
            arrival=float(arrival[i]),
            team=int(team[i]),
            pool="community" if community[i] else "team",
            region=regions[i],
            model=MODELS[model[i]],
            service_s=float(round(service[i], 3)),
            min_vram_gb=24.0 if big[i] else None,
        )
        for i in range(n_tasks)
    )
    return Workload(tasks, n_teams, homes, MODELS[:n_models], name="synthetic")
