"""Differential properties: the engine decides exactly as the plain-Python reference.

Scores are compared exactly: kernel and reference sum the same float64 products in the same order
(fastmath is off), so any difference, however small, is a bug; the tolerance is zero.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import DispatchRequest, Fleet, pick_agent, rank_agents
from scoring import _kernels as K
from scoring import pick as pick_module
from scoring import reference as R
from scoring.layout import PER_CALL
from scoring.pick import eligible_agents, evaluate, only_excluded_fit
from tests.strategies import FOREIGN_TEAM, NOW, policies, requests, scenarios, seeded_agent_lists

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

SCORE_TOLERANCE = 0.0


def _assert_same_decision(got, expected):
    assert got.agent_id == expected.agent_id
    assert got.eligible == expected.eligible
    assert got.rejected == expected.rejected
    assert got.considered == expected.considered
    assert got.missing_labels == expected.missing_labels
    if expected.agent_id is None:
        assert got.score is None and got.factors == {}
    else:
        assert abs(got.score - expected.score) <= SCORE_TOLERANCE
        assert got.factors == expected.factors


@given(scenarios())
def test_pick_equals_reference(scenario):
    agents, request, policy = scenario
    got = pick_agent(Fleet.from_agents(agents), request, policy, now=NOW)
    _assert_same_decision(got, R.pick_agent(agents, request, policy, now=NOW))


@settings(max_examples=25)
@given(scenarios(min_agents=100, max_agents=300))
def test_pick_equals_reference_on_larger_fleets(scenario):
    agents, request, policy = scenario
    got = pick_agent(Fleet.from_agents(agents), request, policy, now=NOW)
    _assert_same_decision(got, R.pick_agent(agents, request, policy, now=NOW))


@settings(max_examples=10)
@given(scenarios(min_agents=K.CHUNK + 1, max_agents=3 * K.CHUNK), st.integers(1, 5))
def test_fleets_of_several_chunks_equal_reference(scenario, n_chunks):
    """Chunk boundaries, exclusions in later chunks, and parallel slabs that end inside a
    chunk."""
    agents, request, policy = scenario
    fleet = Fleet.from_agents(agents)
    expected = R.pick_agent(agents, request, policy, now=NOW)
    _assert_same_decision(pick_agent(fleet, request, policy, now=NOW), expected)
    with fleet.lock:
        q = pick_module.build_query(fleet, request, policy, NOW, full_scan=True)
        parallel = K._pick_parallel(fleet.columns, q, n_chunks)
        _assert_same_decision(pick_module.decide(fleet, request, policy, NOW, True), expected)
    row, eligible = parallel[0], parallel[2]
    assert (None if row < 0 else fleet.agent_id_at(row)) == expected.agent_id
    assert eligible == expected.eligible


def _full_chunks(rows: np.ndarray) -> int:
    """How many of the scan's chunks of ``rows`` are CHUNK consecutive rows."""
    return sum(
        rows[s : s + K.CHUNK].size == K.CHUNK and rows[s + K.CHUNK - 1] - rows[s] == K.CHUNK - 1
        for s in range(0, rows.size, K.CHUNK)
    )


@settings(max_examples=15)
@given(seeded_agent_lists(400, 700, wide=False), requests(), policies())
def test_chunks_read_eight_rows_at_a_time_equal_reference(agents, request, policy):
    """Teams and a community index several chunks long, one label word: the chunks the scan
    reads eight rows at a time (``_chunk_words``), against the plain-Python reference and the
    full scan (which reads every row alone)."""
    fleet = Fleet.from_agents(agents)
    with fleet.lock:
        q = pick_module.build_query(fleet, request, policy, NOW)
        assert q.labels.shape[0] == 1
        if request.team_id != FOREIGN_TEAM:  # the case this test is for does happen
            assert _full_chunks(q.rows) + _full_chunks(q.shared) > 0
        full = pick_module.decide(fleet, request, policy, NOW, full_scan=True)
    expected = R.pick_agent(agents, request, policy, now=NOW)
    _assert_same_decision(pick_agent(fleet, request, policy, now=NOW), expected)
    _assert_same_decision(full, expected)


@given(scenarios())
def test_every_reject_mask_and_score_equals_reference(scenario):
    agents, request, policy = scenario
    got = evaluate(Fleet.from_agents(agents), request, policy, now=NOW)
    for agent in agents:
        reasons, score = got[agent.agent_id]
        assert reasons == R.pool_reasons(agent, request, policy, NOW), agent.agent_id
        if reasons:
            assert score is None
        else:
            assert abs(score - R.score(agent, request, policy)) <= SCORE_TOLERANCE


@given(scenarios(), st.integers(0, 8))
def test_rank_equals_reference(scenario, k):
    agents, request, policy = scenario
    got = rank_agents(Fleet.from_agents(agents), request, policy, now=NOW, k=k)
    expected = R.rank_agents(agents, request, policy, now=NOW, k=k)
    assert [(r.agent_id, r.score) for r in got] == expected
    for entry in got:
        agent = next(a for a in agents if a.agent_id == entry.agent_id)
        assert entry.factors == R.factors(agent, request, policy)


@given(scenarios(), st.integers(1, 7), st.booleans())
def test_parallel_kernel_equals_serial(scenario, n_chunks, full_scan):
    """The parallel kernel's slabs and reduction give the serial kernel's answer, bit for bit."""
    agents, request, policy = scenario
    fleet = Fleet.from_agents(agents)
    with fleet.lock:
        q = pick_module.build_query(fleet, request, policy, NOW, full_scan)
        serial = K._pick(fleet.columns, q)
        scratch = fleet.scratch()
        flat = K._pick_records(fleet.columns, *scratch, q[:-PER_CALL], *q[-PER_CALL:])
        parallel = K._pick_parallel(fleet.columns, q, n_chunks)
    np.testing.assert_equal(flat[:4], serial[:4])  # the flat entry point with the fleet's scratch
    row, score, eligible, factors, counts, labels_and = serial
    # its tally: the pool's size, and each agent outside the pool once under pool
    considered = len(q.rows) + len(q.shared) - counts[K.SKIPPED] - counts[K.POOL]
    rejected = counts[: K.N_REASONS].copy()
    rejected[K.POOL] = len(fleet) - considered
    assert flat[4:] == (tuple(rejected.tolist()), considered)
    assert parallel[0] == row and parallel[2] == eligible
    assert np.array_equal(parallel[4], counts) and np.array_equal(parallel[5], labels_and)
    if row >= 0:
        assert parallel[1] == score and parallel[3] == factors


@given(scenarios())
def test_indexed_pick_equals_full_scan(scenario):
    """Reading only the pool's rows decides exactly as reading every row (the reference path)."""
    agents, request, policy = scenario
    fleet = Fleet.from_agents(agents)
    with fleet.lock:
        indexed = pick_module.decide(fleet, request, policy, NOW)
        full = pick_module.decide(fleet, request, policy, NOW, full_scan=True)
    assert indexed == full and indexed.factors == full.factors


@pytest.mark.parametrize("threshold", [0, 10**9], ids=["parallel", "serial"])
@settings(max_examples=20)
@given(scenario=scenarios())
def test_pick_agent_path_equals_reference(threshold, scenario):
    """``pick_agent`` through both of its paths (parallel above the size threshold)."""
    agents, request, policy = scenario
    saved = pick_module.PARALLEL_THRESHOLD, pick_module.cores_idle
    pick_module.PARALLEL_THRESHOLD = threshold
    pick_module.cores_idle = lambda threads: True  # take the parallel path even on a busy machine
    try:
        got = pick_agent(Fleet.from_agents(agents), request, policy, now=NOW)
    finally:
        pick_module.PARALLEL_THRESHOLD, pick_module.cores_idle = saved
    _assert_same_decision(got, R.pick_agent(agents, request, policy, now=NOW))


@given(scenarios())
def test_eligible_agents_equal_reference(scenario):
    agents, request, policy = scenario
    fleet = Fleet.from_agents(agents)
    got = eligible_agents(fleet, request, policy, now=NOW)
    # in the fleet's order (its layout: by opt-in, then team), which Fleet.agents() lists
    order = [a.agent_id for a in fleet.agents()]
    by_id = {a.agent_id: a for a in agents}
    assert sorted(order) == sorted(by_id)
    assert got == [i for i in order if not R.reject_reasons(by_id[i], request, policy, NOW)]


@given(scenarios(), st.data())
def test_only_excluded_fit_equals_reference(scenario, data):
    """True exactly when some agent of the pool fails no filter but ``capacity`` and
    ``excluded``, and every such agent is one the request excludes. Half the requests exclude
    every agent that fits them, or all but one (random exclusions almost never do)."""
    agents, request, policy = scenario
    fits = sorted(
        a.agent_id
        for a in agents
        if not set(R.pool_reasons(a, request, policy, NOW)) - {"capacity", "excluded"}
    )
    if fits and data.draw(st.booleans()):
        spared = data.draw(st.sampled_from([None, *fits]))
        request = request.model_copy(
            update={"exclude_agents": frozenset(i for i in fits if i != spared)}
        )
    got = only_excluded_fit(Fleet.from_agents(agents), request, policy, now=NOW)
    could = [
        a.agent_id
        for a in agents
        if set(R.pool_reasons(a, request, policy, NOW)) <= {"capacity", "excluded"}
    ]
    expected = bool(could) and all(i in request.exclude_agents for i in could)
    assert got == expected


def test_a_pool_of_more_rows_than_a_flush_counts_every_row():
    """The scan sums its counts in 16-bit lanes and adds them to the tally every
    ``K.FLUSH`` chunks: a community pool longer than that (70,000 agents, all opted in) counts
    every row, as the reference does, for requests of a few shapes; and a day later, when every
    agent is stale, for a team with no agent of its own (so all 70,000 come from the community
    index, in one part of the scan: more than a 16-bit lane holds)."""
    from scoring.synthetic import NOW as SYNTHETIC_NOW
    from scoring.synthetic import synthetic_agents, synthetic_requests

    n = 70_000
    assert n > K.FLUSH * K.CHUNK
    agents = synthetic_agents(n, seed=5, n_teams=4, community_share=1.0)
    fleet = Fleet.from_agents(agents)
    requests = synthetic_requests(4, seed=5, community_share=1.0)
    stranger = DispatchRequest(team_id=uuid.UUID(int=1), target_pool="community", tie_key="k")
    for request, now in [
        *((r, SYNTHETIC_NOW) for r in requests),
        (stranger, SYNTHETIC_NOW + 1e5),
    ]:
        got = pick_agent(fleet, request, now=now)
        expected = R.pick_agent(agents, request, now=now)
        assert got.considered > K.FLUSH * K.CHUNK
        _assert_same_decision(got, expected)
    assert got.rejected["stale"] == n  # the last pick's
