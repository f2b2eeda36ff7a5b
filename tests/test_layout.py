"""The fleet's row layout: rows by (opted in, team), re-laid before a 32nd are out of place.

The kernels read a chunk of consecutive candidate rows as a range and any other chunk row by row
(``_kernels._scan_part``); both must give the same pick, counts and label AND. These cases
check the layout the fleet promises, that updates restore it once enough rows are out of place,
and that the two ways of reading a block agree on the same rows.
"""

from __future__ import annotations

import itertools
import random
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import Fleet, pick_agent
from scoring import _kernels as K
from scoring import reference as R
from scoring.models import DEFAULT_POLICY
from scoring.query import build_query
from tests.strategies import agent_lists, check_fleet, requests
from tests.test_worked_examples import NOW, agent

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

TEAMS = [uuid.UUID(int=k) for k in range(1, 5)]


def _keys(fleet: Fleet) -> list[tuple[bool, int]]:
    with fleet.lock:
        c = fleet.columns
        return list(zip((c.opt_pos >= 0).tolist(), c.team.tolist(), strict=True))


def _descents(fleet: Fleet) -> int:
    keys = _keys(fleet)
    return sum(b < a for a, b in itertools.pairwise(keys))


def test_rows_are_laid_out_by_opt_in_then_team():
    # input order interleaves the teams and the opted-in agents
    agents = [agent(f"a{k}", team_id=TEAMS[k % 3], community_opt_in=k % 2 == 1) for k in range(12)]
    fleet = Fleet.from_agents(agents)
    keys = _keys(fleet)
    assert keys == sorted(keys)
    assert keys[:6] == [(False, t) for t in (0, 0, 1, 1, 2, 2)]  # teams interned in input order
    with fleet.lock:
        # each team's index: its rows not opted in, then its opted-in rows, each run consecutive
        assert fleet.team_rows(0).tolist() == [0, 1, 6, 7]
        assert fleet.shared_rows().tolist() == list(range(6, 12))  # the community index: the tail
        c = fleet.columns
        for team in range(3):
            rows = fleet.team_rows(team)
            assert c.team_pos[rows].tolist() == list(range(4))
        assert c.opt_pos[6:].tolist() == list(range(6))
    assert {a.agent_id: a for a in fleet.agents()} == {a.agent_id: a for a in agents}


def test_updates_put_rows_out_of_place_until_a_32nd_then_the_layout_returns():
    agents = [agent(f"a{k:03}", team_id=TEAMS[k % 4]) for k in range(256)]
    fleet = Fleet.from_agents(agents)
    model = {a.agent_id: a for a in agents}
    assert _descents(fleet) == 0
    for k in range(7):
        new = agent(f"n{k}", team_id=TEAMS[0], running_count=k % 2)  # goes at the end
        fleet.upsert(new)
        model[new.agent_id] = new
        assert fleet._strays == k + 1 and _descents(fleet) == 1  # (False, 3) then (False, 0)
        req = requests_for_team(0)
        got = pick_agent(fleet, req, DEFAULT_POLICY, now=NOW)
        expected = R.pick_agent(list(model.values()), req, DEFAULT_POLICY, now=NOW)
        assert (got.agent_id, got.score, got.rejected) == (
            expected.agent_id, expected.score, expected.rejected)  # fmt: skip
    fleet.heartbeat("a000", NOW, running_count=1)  # written in place: no stray
    model["a000"] = model["a000"].model_copy(update={"running_count": 1})
    fleet.upsert(agent("a006", team_id=TEAMS[1]))  # a team change: the eighth (263 // 32 = 8)
    model["a006"] = agent("a006", team_id=TEAMS[1])
    assert fleet._strays == 8 and _descents(fleet) > 1
    fleet.remove("a005")  # the last row moves: the ninth of 262 rows, and the layout returns
    del model["a005"]
    assert fleet._strays == 0 and _descents(fleet) == 0
    check_fleet(fleet, model)


def requests_for_team(k: int):
    from scoring import DispatchRequest

    return DispatchRequest(team_id=TEAMS[k], tie_key="019abc12-9012-7890-abcd-ef1234567896")


@settings(max_examples=60, deadline=None)
@given(agent_lists(min_size=1), st.randoms(use_true_random=False), st.data())
def test_a_chunk_read_as_a_range_equals_the_same_rows_read_one_by_one(fleet_agents, rnd, data):
    """The same candidates, once in layout order (consecutive: the range path) and once
    shuffled (the row-by-row path): the same winner, score, eligible count, counts and label AND.
    """
    fleet = Fleet.from_agents(fleet_agents)
    request = data.draw(requests([a.agent_id for a in fleet_agents]))
    with fleet.lock:
        q = build_query(fleet, request, DEFAULT_POLICY, NOW)
        rows = np.sort(q.rows)
        consecutive = rows.size == 0 or rows[-1] - rows[0] == rows.size - 1
        shuffled = rows.copy()
        rnd.shuffle(shuffled)
        # every row of the fleet but the last, which takes one's place: chunks read as ranges
        # but the one with the stray, against the same rows shuffled
        n = len(fleet)
        stray = np.arange(max(n - 1, 1), dtype=np.int32)
        stray[rnd.randrange(stray.size)] = n - 1
        stray_shuffled = stray.copy()
        rnd.shuffle(stray_shuffled)
        ordered = K._pick(fleet.columns, q._replace(rows=rows))
        mixed = K._pick(fleet.columns, q._replace(rows=shuffled))
        every = {"shared": q.shared[:0], "team_rows": False}  # any rows: the full scan's
        fixed = K._pick(fleet.columns, q._replace(rows=stray, **every))
        gathered = K._pick(fleet.columns, q._replace(rows=stray_shuffled, **every))
    for a, b in ((ordered, mixed), (fixed, gathered)):
        assert a[:3] == b[:3]
        np.testing.assert_equal(a[3], b[3])
        assert np.array_equal(a[4], b[4]) and np.array_equal(a[5], b[5])
    # the layout makes the team's rows consecutive whenever the team has no opted-in agent
    team_agents = [a for a in fleet_agents if a.team_id == request.team_id]
    if not any(a.community_opt_in for a in team_agents):
        assert consecutive


def test_a_shuffled_fleet_picks_as_the_reference_does_on_both_paths():
    """A fleet grown one upsert at a time in random order (rows out of place until each
    re-lay), checked after every update against the reference."""
    rnd = random.Random(7)
    fleet, model = Fleet(), {}
    for k in range(300):
        a = agent(f"x{rnd.randrange(120):03}", team_id=rnd.choice(TEAMS),
                  community_opt_in=rnd.random() < 0.3, running_count=rnd.randrange(3))  # fmt: skip
        if a.agent_id in model and rnd.random() < 0.3:
            fleet.remove(a.agent_id)
            del model[a.agent_id]
        else:
            fleet.upsert(a)
            model[a.agent_id] = a
        assert fleet._strays <= len(fleet) // 32
        assert _descents(fleet) <= 2 * fleet._strays
        if k % 10 == 0:
            for team in range(len(TEAMS)):
                req = requests_for_team(team)
                got = pick_agent(fleet, req, DEFAULT_POLICY, now=NOW)
                expected = R.pick_agent(list(model.values()), req, DEFAULT_POLICY, now=NOW)
                assert (got.agent_id, got.score, got.rejected, got.considered) == (
                    expected.agent_id, expected.score, expected.rejected, expected.considered,
                )  # fmt: skip
    check_fleet(fleet, model)
