"""Every registered implementation of the pick (benchmarks/registry.py) answers with the engine's
agent, so the benchmarks time the same decision; and the benchmark module itself still runs.

Fleets here are tiny: this module runs in the default suite, with and without the JIT.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("polars")
pytest.importorskip("duckdb")

from benchmarks.peers.memory_limit import (
    INDEXED_UNREAD,
    PICK_COLUMNS,
    MemoryLimit,
    _read_rows,
    column_views,
)
from benchmarks.peers.table import fleet_table
from benchmarks.registry import PICKERS, Workload, build_workload, check_requests
from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy
from scoring import _kernels as K
from scoring.layout import COLUMNS, FAILURE_STEPS
from scoring.query import build_query
from scoring.synthetic import NOW, synthetic_agents, synthetic_requests, team_ids

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

ROOT = Path(__file__).resolve().parents[1]
NAMES = [impl.name for impl in PICKERS]
# The parallel kernel starts numba's threads on every call: 0.1 ms on an idle machine, but up to
# 150 ms with the OpenMP layer when the other core is busy (measured), so it is checked on fewer
# fleets than the others.
SERIAL = [name for name in NAMES if name != "engine-parallel"]
_WORKLOADS: dict[tuple, Workload] = {}


def workload(n: int, seed: int) -> Workload:
    if (n, seed) not in _WORKLOADS:
        _WORKLOADS[n, seed] = build_workload(n, seed=seed)
    return _WORKLOADS[n, seed]


def agreement(w: Workload, name: str) -> dict:
    impl = next(i for i in PICKERS if i.name == name)
    return w.disagreements(impl.make(w.fleet, w.agents))


@pytest.mark.parametrize(
    ("name", "n", "seed"),
    [(name, n, seed) for n, seed in [(1, 0), (40, 1), (300, 2)] for name in NAMES
     if name in SERIAL or n == 300],
)  # fmt: skip
def test_agrees_with_engine_on_seeded_fleets(name, n, seed):
    # team pool, community pool, unknown region, nerfstudio, excluded winner, nobody eligible,
    # an unknown label, and 8 synthetic requests
    assert agreement(workload(n, seed), name) == {}


@pytest.mark.parametrize("name", SERIAL)
def test_agrees_under_another_policy(name):
    policy = ScoringPolicy(
        weights={"region": 3.0, "load": 0.5, "pool": 0.0, "warm": 2.0, "gpu": 1.5,
                 "reliability": 0.25},
        heartbeat_timeout_s=10.0,
        region_affinity={("us-east", "us-west"): 0.6, ("eu-west", "eu-central"): 0.8},
    )  # fmt: skip
    assert agreement(dataclasses.replace(workload(300, 2), policy=policy), name) == {}


def _identical_fleet(n: int) -> Workload:
    """``n`` agents equal in every field but their id: every pick is an exact tie."""
    team = team_ids(1, seed=5)[0]
    agents = [
        Agent(agent_id=f"twin-{i:02d}", team_id=team, status="idle", labels={"gpu", "comfyui"},
              last_heartbeat=NOW, gpu_capacity=2, region="us-east")
        for i in range(n)
    ]  # fmt: skip
    fleet = Fleet.from_agents(agents)
    timed = [
        DispatchRequest(team_id=team, submitter_region="us-east", tie_key=f"task-{k}")
        for k in range(12)
    ]
    return Workload(fleet, agents, check_requests(fleet, [team]), timed)


@pytest.mark.parametrize("name", SERIAL)
def test_exact_ties_go_to_the_lowest_tie_hash(name):
    w = _identical_fleet(30)
    assert agreement(w, name) == {}
    assert len({w.expected[f"mixed-{k}"] for k in range(12)}) > 3  # ties spread across tasks


def _wide_fleet() -> Workload:
    """Over 64 distinct labels and models: the bitsets take two uint64 words."""
    rng = np.random.default_rng(9)
    base = synthetic_agents(120, seed=9, n_teams=3)
    extra_labels = [f"x-{k:02d}" for k in range(80)]
    extra_models = [f"loras/extra-{k:02d}.safetensors" for k in range(60)]
    agents = [
        a.model_copy(update={
            "labels": a.labels | {str(x) for x in rng.choice(extra_labels, 6)},
            "cached_models": a.cached_models | {str(m) for m in rng.choice(extra_models, 8)},
        })
        for a in base
    ]  # fmt: skip
    fleet = Fleet.from_agents(agents)
    teams = team_ids(3, seed=9)
    timed = [
        DispatchRequest(team_id=teams[k % 3], target_pool="community", required_labels={label},
                        required_models={extra_models[k], extra_models[k + 30]},
                        tie_key=f"wide-{k}")
        for k, label in enumerate(["x-70", "x-79", "x-03", "gpu"])
    ]  # fmt: skip
    return Workload(fleet, agents, check_requests(fleet, teams), timed)


@pytest.mark.parametrize("name", NAMES)
def test_agrees_on_two_word_bitsets(name):
    w = _wide_fleet()
    assert w.fleet.columns.labels.shape[1] == 2
    assert w.fleet.columns.cached_models.shape[1] == 2
    assert agreement(w, name) == {}


@pytest.mark.parametrize("name", ["numpy", "polars", "duckdb"])
def test_peers_refuse_a_tie_band(name):
    w = workload(40, 1)
    picker = next(i for i in PICKERS if i.name == name).make(w.fleet, w.agents)
    with pytest.raises(ValueError, match="exact ties only"):
        picker(w.timed[0], ScoringPolicy(tie_band=0.05), NOW)


@pytest.mark.parametrize("mix", ["team", "community"])
def test_memory_limit_reads_every_candidate_value(mix):
    w = workload(300, 2)
    limit = MemoryLimit(w.fleet)
    for request in w.requests(mix):
        rows, shared = limit.candidates(request, w.policy, w.now)
        assert len(rows) + len(shared) > 0 or mix == "team"
        candidates = np.concatenate([rows, shared])
        scalars, bitsets = column_views(w.fleet)
        expected = np.uint64(0)
        for column in scalars:
            expected ^= np.bitwise_xor.reduce(column[candidates].astype(np.uint64))
        for words in bitsets:
            expected ^= np.bitwise_xor.reduce(words[candidates].reshape(-1))
        assert _read_rows(rows, shared, scalars, bitsets) == expected
        assert limit(request, w.policy, w.now) == int(expected)


def test_memory_limit_reads_what_a_pick_reads():
    """Every column but the team index's bookkeeping and the opt-in position (which an indexed
    pick never reads: see the next test), in their own widths (no wider copies)."""
    assert set(PICK_COLUMNS) == {c.name for c in COLUMNS} - {"team_pos", "opt_pos"}
    scalars, bitsets = column_views(workload(40, 1).fleet)
    widths = [v.dtype.itemsize for v in scalars]
    declared = [np.dtype(c.dtype).itemsize for c in COLUMNS if c.name in PICK_COLUMNS]
    assert widths + [8] * len(bitsets) == declared


@pytest.mark.parametrize("n", [300, 3000])
def test_an_indexed_pick_never_reads_opt_pos(n):
    """What the memory limit leaves out (INDEXED_UNREAD) an indexed pick does not read: with
    ``opt_pos`` scrambled (the indexes untouched), every request decides the same, serial and
    parallel. Exclusions are dropped: counting an excluded agent tests its pool (and a full scan
    reads the column: scrambled, its community rows would fall outside the pool)."""
    w = workload(n, 2)
    rng = np.random.default_rng(n)
    c = w.fleet.columns
    scrambled = c._replace(opt_pos=rng.integers(-1, 1, len(w.fleet)).astype(np.int32))
    assert set(INDEXED_UNREAD) == {"opt_pos"}
    for _, request in w.cases():
        request = request.model_copy(update={"exclude_agents": frozenset()})
        q = K.Query(*build_query(w.fleet, request, w.policy, w.now))
        for pick in (K._pick, lambda cols, q: K._pick_parallel(cols, q, 3)):
            honest, blind = pick(c, q), pick(scrambled, q)
            assert honest[:3] == blind[:3]
            np.testing.assert_equal(honest[3], blind[3])
            assert np.array_equal(honest[4], blind[4]) and np.array_equal(honest[5], blind[5])
    full = K.Query(*build_query(w.fleet, w.requests("community")[0], w.policy, w.now, True))
    assert not np.array_equal(K._pick(c, full)[4], K._pick(scrambled, full)[4])


def test_table_has_every_field_in_user_units():
    w = workload(300, 2)
    table = fleet_table(w.fleet)
    by_id = {a.agent_id: a for a in w.agents}
    for rid in range(len(w.fleet)):
        agent = by_id[w.fleet.agent_id_at(rid)]
        assert table["community_opt_in"][rid] == agent.community_opt_in
        if agent.vram_gb is None:
            assert np.isnan(table["vram_gb"][rid])
        else:
            assert table["vram_gb"][rid] == agent.vram_gb
        steps = round(agent.failure_rate * FAILURE_STEPS)  # the fleet keeps 1/32768 steps
        assert table["failure_rate"][rid] == steps / FAILURE_STEPS
    assert "team_pos" not in table and "opt_pos" not in table
    layout = {c.name for c in COLUMNS} - {"team_pos", "opt_pos"}
    assert layout | {"rid", "community_opt_in"} == set(table)


def test_unknown_team_requests_pick_nobody():
    w = workload(40, 1)
    request = synthetic_requests(1, seed=3, teams=[uuid.UUID(int=11)])[0]
    for impl in PICKERS:
        picker = impl.make(w.fleet, w.agents)
        if request.target_pool == "team":
            assert picker(request, w.policy, w.now) is None


def test_benchmark_module_runs_in_quick_mode():
    """The benchmark suite, smallest rung, one call per benchmark, slow ones deselected."""
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--sizes", "100", "--quick",
           "--benchmark-disable", "-m", "not slow", "-q", "-p", "no:cacheprovider"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
