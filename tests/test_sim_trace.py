"""Replay of the real Stable Diffusion serving trace, on a slice (the file stays in shared/).

The trace is found beside the repository, as CI lays it out: ``<repo>/../shared/traces/...``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from scoring.sim import POLICY_NAMES, SimConfig, compare, find_trace, load_latencies, load_trace
from scoring.sim.trace import latency_file

REPO = Path(__file__).resolve().parents[1]
TRACE = find_trace(REPO / "pyproject.toml")
needs_trace = pytest.mark.skipif(TRACE is None, reason="shared/traces not beside the repository")


def test_the_trace_is_looked_up_beside_the_repository():
    expected = REPO.parent / "shared/traces/alibaba-gentd26-sd-serving/lora_request_trace.csv"
    assert TRACE == (expected if expected.exists() else None)


@needs_trace
def test_unfinished_requests_are_dropped_and_fields_mapped():
    workload = load_trace(TRACE, n_teams=8)
    # 26,823 rows: 30 PENDING and 3 PROCESSING never finished
    assert len(workload.tasks) == 26_823 - 33
    arrivals = np.array([t.arrival for t in workload.tasks])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    # 23 days from the first to the last arrival
    assert 22 * 86400 < workload.span_s < 24 * 86400
    assert {t.team for t in workload.tasks} == set(range(8))
    # The README's 87 distinct values include the empty one, found only on PENDING rows.
    assert len(workload.models) == 86
    assert workload.models[:2] == ("M0002", "M0001")  # most requested first
    assert min(t.service_s for t in workload.tasks) >= 1.0
    assert np.median([t.service_s for t in workload.tasks]) == 23.0
    first = workload.tasks[0]  # 2024-11-15 16:57:50, SUCCEED, 32 s, M0000, 1 image
    assert (first.model, first.service_s, first.min_vram_gb) == ("M0000", 32.0, None)


@needs_trace
def test_a_slice_compressed_keeps_the_gaps_in_proportion():
    workload = load_trace(TRACE, limit=200, skip=5000)
    assert len(workload.tasks) == 200
    fast = workload.compressed(10.0)
    np.testing.assert_allclose(
        np.diff([t.arrival for t in fast.tasks]),
        np.diff([t.arrival for t in workload.tasks]) / 10.0,
    )


@needs_trace
def test_basemodel_load_latencies():
    path = latency_file(TRACE)
    assert path is not None
    seconds = load_latencies(path)
    assert seconds.size == 7531
    assert np.median(seconds) == pytest.approx(22.7, abs=0.1)  # the README's median


def test_latencies_from_a_small_archive(tmp_path):
    body = b"timestamp_anon,value,container_ip\n1.0,2500.0,aa\n2.0,40000.0,bb\n3.0,,cc\n"
    archive = tmp_path / "lat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("lat.csv")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    np.testing.assert_allclose(load_latencies(archive), [2.5, 40.0])


@needs_trace
def test_replay_of_a_slice_with_every_policy():
    config = SimConfig(n_agents=24, n_tasks=300, n_teams=6, trace=TRACE, trace_skip=8000, load=0.3)
    results = compare(config, POLICY_NAMES)
    for name, result in results.items():
        m = result.metrics
        assert m["completed"] == 300, name
        assert 0 < m["cold_load_rate"] < 1 and 0 < m["region_match_rate"] <= 1
        assert 0 < m["utilisation"] < 1
        assert m["wait_p50_s"] <= m["wait_p95_s"] <= m["wait_p99_s"]
        # a replay uses the trace's run times: speed-1 service is exec_time_seconds
        services = sorted(t.service_s for t in result.workload.tasks)
        assert services == sorted(
            t.service_s for t in load_trace(TRACE, limit=300, skip=8000).tasks
        )
