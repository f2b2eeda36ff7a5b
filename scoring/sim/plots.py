"""PNG plots of a comparison: wait-time CDFs, cold-load and region-match rates, utilisation.

Each function draws on the ``ax`` it is given (in a notebook: from ``plt.subplots()``) or on a
new figure of its own. Figures are built without pyplot, so saving PNGs needs no display and
never changes the backend a notebook has chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from scoring.sim.simulation import SimResult

#: Waits below this are drawn at it, so that a log axis can show the many zero waits.
_FLOOR_S = 0.1


def wait_cdf(results: Mapping[str, SimResult], ax: Axes | None = None) -> Axes:
    """Empirical CDF of each policy's waits (and, dashed, end-to-end latencies)."""
    ax = ax or Figure(figsize=(7, 4.5)).add_subplot()
    for i, (name, result) in enumerate(results.items()):
        log = result.log
        arrival = np.array([t.arrival for t in result.workload.tasks])
        done = log.completions > 0
        color = f"C{i}"
        for values, style, label in (
            (log.start[done] - arrival[done], "-", f"{name} wait"),
            (log.end[done] - arrival[done], ":", f"{name} end-to-end"),
        ):
            x = np.sort(np.maximum(values, _FLOOR_S))
            y = np.arange(1, x.size + 1) / max(x.size, 1)
            ax.step(x, y, style, where="post", color=color, label=label, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds since submit (waits under {_FLOOR_S} s drawn at {_FLOOR_S} s)")
    ax.set_ylabel("share of completed tasks")
    ax.set_title("Wait (solid) and end-to-end latency (dotted) CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")  # "best" is slow on many points
    return ax


def rates(results: Mapping[str, SimResult], ax: Axes | None = None) -> Axes:
    """Cold-load rate and region-match rate per policy, side by side."""
    ax = ax or Figure(figsize=(7, 4)).add_subplot()
    names = list(results)
    x = np.arange(len(names))
    for offset, key, label in (
        (-0.2, "cold_load_rate", "cold-load rate (lower is better)"),
        (0.2, "region_match_rate", "region-match rate (higher is better)"),
    ):
        values = [results[n].metrics[key] for n in names]
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_title("Cold model loads and region matches")
    ax.legend(fontsize=8, loc="upper right")
    return ax


def utilisation(results: Mapping[str, SimResult], ax: Axes | None = None) -> Axes:
    """Share of connected slot-time holding a task, per policy."""
    ax = ax or Figure(figsize=(7, 4)).add_subplot()
    names = list(results)
    bars = ax.bar(names, [results[n].metrics["utilisation"] for n in names], color="C2")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.tick_params(axis="x", rotation=15)
    ax.set_ylabel("busy slot-seconds / connected slot-seconds")
    ax.set_title("Utilisation (includes model loads; lower for the same work is better)")
    return ax


def overhead(results: Mapping[str, SimResult], ax: Axes | None = None) -> Axes:
    """What dispatching added to each run (end to end minus its own run time): p50, p95, p99."""
    ax = ax or Figure(figsize=(8, 4)).add_subplot()
    names = list(results)
    x = np.arange(len(names))
    for k, p in enumerate((50, 95, 99)):
        values = [results[n].metrics[f"overhead_p{p}_s"] for n in names]
        bars = ax.bar(x + (k - 1) * 0.27, values, 0.27, label=f"p{p}")
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("seconds")
    ax.set_title("Dispatcher overhead: queueing, waiting, transfer, model load, retries")
    ax.legend(fontsize=8, loc="upper right")
    return ax


def save_all(results: Mapping[str, SimResult], out: str | Path) -> list[Path]:
    """Write ``wait_cdf.png``, ``rates.png``, ``overhead.png`` and ``utilisation.png`` into
    ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw, size in (
        ("wait_cdf", wait_cdf, (7, 4.5)),
        ("rates", rates, (8, 4)),
        ("overhead", overhead, (8, 4)),
        ("utilisation", utilisation, (7, 4)),
    ):
        fig = Figure(figsize=size)
        draw(results, fig.add_subplot())
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
