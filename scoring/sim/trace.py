"""Replay of the Alibaba GenTD26 Stable Diffusion serving trace (given by path, never shipped).

``lora_request_trace.csv`` gives one row per request: the arrival (``gmt_create``), the service
time (``exec_time_seconds``), the tenant (``groupId``) and the base checkpoint
(``checkpoint_model_version_id``). Tenants are bucketed into a manageable number of teams by a
stable hash. The trace has no regions, pools or GPU sizes, so those are synthesised, seeded, the
same way as in :func:`scoring.sim.workload.synthetic_workload`. PENDING and PROCESSING rows never
finished and are dropped; FAILED rows did run (and held a GPU), so they are replayed like the rest.

``container_latency/basemodel_update_latency_anon.tar.gz`` holds measured base-model load times;
:func:`load_latencies` reads them (``value`` is in milliseconds) for the cold-load delay.

Source: Lin et al., "Understanding Diffusion Model Serving in Production", SoCC '25 (research use).
"""

from __future__ import annotations

import csv
import io
import tarfile
import zlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from scoring.sim.workload import Task, Workload, submitter_regions, team_home_regions

TRACE_DIR = Path("traces") / "alibaba-gentd26-sd-serving"
TRACE_FILE = "lora_request_trace.csv"
BASEMODEL_LATENCY = Path("container_latency") / "basemodel_update_latency_anon.tar.gz"
#: Requests that never finished: no service time to replay.
UNFINISHED = frozenset({"PENDING", "PROCESSING"})
#: Median base-model load time of the trace (22.7 s) and the spread of its logarithm, for the
#: lognormal used when the latency file is not given.
LOAD_MEDIAN_S = 22.7
LOAD_SIGMA = 1.0


def find_trace(start: str | Path | None = None) -> Path | None:
    """The trace CSV in ``shared/traces`` beside the repository holding ``start``, if present.

    CI clones the repository with ``shared/`` beside it, so from any file in the repository the
    trace is ``<repo>/../shared/traces/alibaba-gentd26-sd-serving/lora_request_trace.csv``.
    """
    here = Path(start or __file__).resolve()
    for parent in [here, *here.parents]:
        if (parent / "pyproject.toml").exists():
            candidate = parent.parent / "shared" / TRACE_DIR / TRACE_FILE
            return candidate if candidate.exists() else None
    return None


def latency_file(trace: str | Path) -> Path | None:
    """The base-model load latency archive beside a trace CSV, if present."""
    path = Path(trace).parent / BASEMODEL_LATENCY
    return path if path.exists() else None


def load_latencies(path: str | Path) -> np.ndarray:
    """Load times in seconds, float64 (n,), from a one-CSV ``.tar.gz`` (column ``value``, ms)."""
    with tarfile.open(path, "r:gz") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".csv"))
        handle = archive.extractfile(member)
        if handle is None:
            raise ValueError(f"{path}: {member.name} is not a regular file")
        rows = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8"))
        values = np.array([float(r["value"]) for r in rows if r["value"]], dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)] / 1000.0
    if values.size == 0:
        raise ValueError(f"{path}: no latency values")
    return values


def load_trace(
    path: str | Path,
    n_teams: int = 24,
    limit: int | None = None,
    skip: int = 0,
    seed: int = 0,
    community_share: float = 0.3,
) -> Workload:
    """Read the request trace into a :class:`Workload` (arrivals in real time, uncompressed).

    Parameters
    ----------
    path : path of ``lora_request_trace.csv``
    n_teams : tenants are bucketed into this many teams (``crc32(groupId) % n_teams``)
    limit, skip : replay only ``limit`` finished requests after skipping the first ``skip``
    seed : seeds the synthesised parts (team home regions, submitter regions, pools)
    community_share : share of tasks submitted to the community pool

    Requests with 8 or more images per prompt need 24 GB of VRAM (an assumption: the trace has
    no memory sizes, and large batches are what runs out of memory on 16 GB cards).
    """
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["predict_status"] in UNFINISHED:
                continue
            rows.append(row)
    rows = rows[skip:]
    if limit is not None:
        rows = rows[:limit]
    rng = np.random.default_rng([seed, 17])
    homes = team_home_regions(n_teams, rng)
    stamps = [_seconds(r["gmt_create"]) for r in rows]
    t0 = stamps[0] if stamps else 0.0
    team = np.array([zlib.crc32(r["groupId"].encode()) % n_teams for r in rows], dtype=np.int64)
    regions = submitter_regions(team, homes, rng)
    community = rng.random(len(rows)) < community_share
    tasks = []
    for i, row in enumerate(rows):
        images = float(row["num_images_per_prompt"] or 1)
        tasks.append(
            Task(
                task_id=i,
                arrival=stamps[i] - t0,
                team=int(team[i]),
                pool="community" if community[i] else "team",
                region=regions[i],
                model=row["checkpoint_model_version_id"] or None,
                service_s=max(float(row["exec_time_seconds"] or 0.0), 1.0),
                min_vram_gb=24.0 if images >= 8 else None,
            )
        )
    # Most requested first: the fleet builder warms agents' caches with the head of this list.
    counts = Counter(t.model for t in tasks if t.model is not None)
    models = tuple(sorted(counts, key=lambda m: (-counts[m], m)))
    return Workload(tuple(tasks), n_teams, homes, models, name=f"trace:{Path(path).name}")


def _seconds(stamp: str) -> float:
    # UTC on purpose: a local time zone with a daylight-saving change would distort the gaps.
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
