"""What a run records, and the metrics computed from it.

Definitions (all times in simulated seconds):

- **wait**: submit to the start of the attempt that completed the task (time spent queued,
  including earlier attempts that failed or were lost);
- **latency**: submit to completion (end to end: wait, transfer, model load, run);
- **overhead**: latency minus the task's own run time on the agent that completed it (its
  service time divided by that GPU's speed): what dispatching added (queueing, deferral,
  transfer, model load, earlier failed or lost attempts);
- **slowdown**: latency divided by the task's service time on a speed-1.0 GPU; **fairness** is
  Jain's index of the teams' mean slowdowns, ``(sum x)^2 / (n sum x^2)``: 1 when every team
  waits alike, ``1/n`` when one team takes all the slowdown; ``slowdown_team_T`` is team T's
  mean slowdown (NaN when it completed nothing);
- **cold-load rate**: attempts that waited for a model load / attempts that needed a model;
- **region match**: completed tasks run in the submitter's region / completed tasks whose
  submitter and agent regions are both known;
- **utilisation**: slot-seconds holding a task / slot-seconds of connected agents;
- **waiting**: tasks never started by the end; **in flight**: started but not completed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TaskLog:
    """Per-task outcomes (arrays of length ``n``) and per-run counters."""

    n: int
    start: np.ndarray = field(init=False)
    end: np.ndarray = field(init=False)
    run_s: np.ndarray = field(init=False)  # the completing attempt's own run time
    agent: np.ndarray = field(init=False)
    completions: np.ndarray = field(init=False)
    attempts: np.ndarray = field(init=False)
    cold: np.ndarray = field(init=False)
    region_match: np.ndarray = field(init=False)  # 1 match, 0 mismatch, -1 a region unknown
    placements: list[tuple[int, int]] = field(default_factory=list)  # (task, agent index)
    attempts_with_model: int = 0
    cold_attempts: int = 0
    failed_attempts: int = 0
    lost_attempts: int = 0
    busy_slot_s: float = 0.0
    connected_slot_s: float = 0.0
    sim_end_s: float = 0.0
    wall_s: float = 0.0
    picks: int = 0
    deferrals: int = 0

    def __post_init__(self) -> None:
        n = self.n
        self.start = np.full(n, np.nan)
        self.end = np.full(n, np.nan)
        self.run_s = np.full(n, np.nan)
        self.agent = np.full(n, -1, np.int64)
        self.completions = np.zeros(n, np.int64)
        self.attempts = np.zeros(n, np.int64)
        self.cold = np.zeros(n, np.bool_)
        self.region_match = np.full(n, -1, np.int8)


def jain(values: Sequence[float] | np.ndarray) -> float:
    """Jain's fairness index of non-negative ``values`` (1.0 for an empty or all-zero input)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.any(x):
        return 1.0
    return float(x.sum() ** 2 / (x.size * np.square(x).sum()))


def summarize(
    log: TaskLog,
    arrival: np.ndarray,
    service: np.ndarray,
    team: np.ndarray,
    n_teams: int | None = None,
) -> dict[str, float]:
    """Every metric of one run (see the module docstring), as a flat dict of floats."""
    done = log.completions > 0
    wait = log.start[done] - arrival[done]
    latency = log.end[done] - arrival[done]
    overhead = latency - log.run_s[done]
    slowdown = latency / service[done]
    teams = team[done]
    per_team = [slowdown[teams == t].mean() for t in np.unique(teams)]
    known = log.region_match[done] >= 0
    m: dict[str, float] = {
        "tasks": float(log.n),
        "completed": float(done.sum()),
        "waiting": float((log.attempts == 0).sum()),
        "in_flight": float(((log.attempts > 0) & ~done).sum()),
    }
    for name, values in (("wait", wait), ("latency", latency), ("overhead", overhead)):
        m[f"{name}_mean_s"] = _mean(values)
        for p in (50, 95, 99):
            m[f"{name}_p{p}_s"] = float(np.percentile(values, p)) if values.size else np.nan
    m["slowdown_mean"] = _mean(slowdown)
    for t in range(int(team.max()) + 1 if n_teams is None and team.size else n_teams or 0):
        mine = slowdown[teams == t]
        m[f"slowdown_team_{t}"] = _mean(mine)
    m["fairness_jain"] = jain(per_team)
    m["cold_load_rate"] = _ratio(log.cold_attempts, log.attempts_with_model)
    m["region_match_rate"] = _ratio(int((log.region_match[done] == 1).sum()), int(known.sum()))
    m["utilisation"] = _ratio(log.busy_slot_s, log.connected_slot_s)
    m["retries"] = float(log.failed_attempts + log.lost_attempts)
    m["failed_attempts"] = float(log.failed_attempts)
    m["lost_attempts"] = float(log.lost_attempts)
    m["sim_hours"] = log.sim_end_s / 3600.0
    m["wall_s"] = log.wall_s
    m["tasks_per_wall_s"] = _ratio(float(done.sum()), log.wall_s)
    m["picks"] = float(log.picks)
    m["deferrals"] = float(log.deferrals)
    return m


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else np.nan


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else np.nan


#: Columns of the printed comparison: (metric, header, format).
TABLE = (
    ("wait_p50_s", "wait p50", "{:.1f}s"),
    ("wait_p95_s", "wait p95", "{:.1f}s"),
    ("wait_p99_s", "wait p99", "{:.1f}s"),
    ("latency_p50_s", "e2e p50", "{:.1f}s"),
    ("latency_p95_s", "e2e p95", "{:.1f}s"),
    ("overhead_p95_s", "ovh p95", "{:.1f}s"),
    ("cold_load_rate", "cold", "{:.1%}"),
    ("region_match_rate", "region", "{:.1%}"),
    ("utilisation", "util", "{:.1%}"),
    ("fairness_jain", "fair", "{:.3f}"),
    ("retries", "retries", "{:.0f}"),
    ("waiting", "waiting", "{:.0f}"),
    ("tasks_per_wall_s", "tasks/s", "{:.0f}"),
)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width comparison table: one row per policy, one column per headline metric."""
    names = list(results)
    width = max([len("policy"), *map(len, names)])
    cells = [[fmt.format(results[n][key]) for key, _, fmt in TABLE] for n in names]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, (_, h, _) in enumerate(TABLE)]
    header = (
        "policy".ljust(width)
        + "  "
        + "  ".join(h.rjust(w) for (_, h, _), w in zip(TABLE, widths, strict=True))
    )
    lines = [header, "-" * len(header)]
    for name, row in zip(names, cells, strict=True):
        lines.append(
            name.ljust(width)
            + "  "
            + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
        )
    return "\n".join(lines)
