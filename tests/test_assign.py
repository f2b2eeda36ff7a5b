"""``assign``: a queue onto free slots (DESIGN section 9), against the reference and by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, assign, models, pick_agent
from scoring import _assign_kernels as A
from scoring import reference as R
from tests.strategies import NOW, agent_lists, policies, requests

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

waits = st.sampled_from([0.0, 0.0, 1.0, 5.0, 30.0])
ages = st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 4.999, 5.0, 29.0, 30.0, 100.0]))


@st.composite
def queues(draw, max_agents: int = 30, max_requests: int = 12):
    """``(agents, requests, policy)``: a fleet and a queue with mixed ages and a locality wait."""
    agents = draw(agent_lists(0, max_agents))
    ids = [a.agent_id for a in agents]
    queue = []
    for _ in range(draw(st.integers(0, max_requests))):
        age = draw(ages)
        r = draw(requests(ids))
        queue.append(r.model_copy(update={"submitted_at": None if age is None else NOW - age}))
    policy = draw(policies())
    per_slot = draw(st.sampled_from([1, 1, 2, models.MAX_SLOTS]))
    return (
        agents,
        queue,
        policy.model_copy(update={"locality_wait_s": draw(waits), "deferrals_per_slot": per_slot}),
    )


def _outcome(decisions):
    return [(d.agent_id, d.deferred, d.waiting_for) for d in decisions]


def equals_reference(queue) -> None:
    """``assign`` places, defers and leaves the queue as the reference does."""
    agents, reqs, policy = queue
    fleet = Fleet.from_agents(agents)
    got = assign(fleet, reqs, policy, now=NOW)
    expected, after = R.assign(agents, reqs, policy, now=NOW)
    assert _outcome(got) == [(a.agent_id, a.deferred, a.waiting_for) for a in expected]
    by_id = lambda a: a.agent_id  # noqa: E731
    assert sorted(fleet.agents(), key=by_id) == sorted(after, key=by_id)


@settings(max_examples=200)
@given(queues())
def test_assign_equals_reference(queue):
    equals_reference(queue)


@given(queues())
def test_without_a_wait_assign_is_a_dispatch_loop(queue):
    is_a_dispatch_loop(queue)


def is_a_dispatch_loop(queue) -> None:
    """Without a wait, ``assign`` equals a loop of ``Fleet.dispatch``: decisions (counts,
    eligible, factors, explanations, rows) and the fleet afterwards."""
    agents, reqs, policy = queue
    policy = policy.model_copy(update={"locality_wait_s": 0.0})
    fleet, loop = Fleet.from_agents(agents), Fleet.from_agents(agents)
    got = assign(fleet, reqs, policy, now=NOW)
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].submitted_at or NOW, i))
    expected = {i: loop.dispatch(reqs[i], policy, now=NOW) for i in order}
    assert got == [expected[i] for i in range(len(reqs))]
    for i, decision in enumerate(got):  # assign keeps factors and counts packed: same values
        want = expected[i]
        assert (decision.factors, decision.rejected, decision.explain(), decision.row) == (
            want.factors, want.rejected, want.explain(), want.row)  # fmt: skip
    assert fleet.agents() == loop.agents()


@given(queues())
def test_assign_invariants(queue):
    agents, reqs, policy = queue
    fleet = Fleet.from_agents(agents)
    before = {a.agent_id: a for a in agents}
    decisions = assign(fleet, reqs, policy, now=NOW)
    placed: dict[str, int] = {}
    for r, d in zip(reqs, decisions, strict=True):
        age = NOW - (NOW if r.submitted_at is None else r.submitted_at)
        if d.deferred:
            assert d.agent_id is None and age < policy.locality_wait_s and r.required_models
            assert d.waiting_for  # names the warm agents it waits for
        if d.agent_id is not None:
            placed[d.agent_id] = placed.get(d.agent_id, 0) + 1
            # eligible when chosen: in the pool, passing every filter, on the fleet before
            assert R.reject_reasons(before[d.agent_id], r, policy, NOW) in ([], ["capacity"])
    for agent in fleet.agents():
        start = before[agent.agent_id]
        assert agent.running_count == start.running_count + placed.get(agent.agent_id, 0)
        if placed.get(agent.agent_id):
            assert agent.running_count <= agent.gpu_capacity  # never over-filled
    # Deferrals of one template: at most deferrals_per_slot per busy slot of the warm agents
    # it waits for (their slots when the call ends: a call only fills slots).
    by_template: dict[tuple, list[DispatchRequest]] = {}
    for r, d in zip(reqs, decisions, strict=True):
        if d.deferred:
            by_template.setdefault(r.template, []).append(d)
    for deferred in by_template.values():
        slots = sum(fleet.get(a).running_count for a in deferred[-1].waiting_for)
        assert len(deferred) <= policy.deferrals_per_slot * slots
    # A request neither placed nor deferred has no free eligible agent left.
    for r, d in zip(reqs, decisions, strict=True):
        if d.agent_id is None and not d.deferred:
            assert pick_agent(fleet, r, policy, now=NOW).agent_id is None


# --- delay scheduling, by hand ----------------------------------------------------------------

TEAM = "11111111-1111-4111-8111-111111111111"
MODEL = "models/sdxl.safetensors"
WAIT = ScoringPolicy(locality_wait_s=5.0)


def _fleet() -> Fleet:
    """``warm`` has the model cached but its one slot is taken; ``cold`` is free, cache empty."""
    base = dict(team_id=TEAM, labels={"comfyui"}, last_heartbeat=NOW, gpu_capacity=1)
    return Fleet.from_agents([
        Agent(agent_id="warm", status="busy", running_count=1, cached_models={MODEL}, **base),
        Agent(agent_id="cold", status="idle", **base),
    ])  # fmt: skip


def _run(submitted_at: float) -> DispatchRequest:
    return DispatchRequest(team_id=TEAM, required_models={MODEL}, submitted_at=submitted_at,
                           tie_key="run-1")  # fmt: skip


def test_a_run_waits_two_seconds_for_the_warm_agent_instead_of_loading_cold():
    fleet = _fleet()
    # t = 0: the warm agent is full; the run is 0 s old (< 5 s), so it waits for it.
    [d] = assign(fleet, [_run(NOW)], WAIT, now=NOW)
    assert d.deferred and d.agent_id is None and d.waiting_for == ("warm",)
    assert d.explain().startswith("deferred for a warm agent (warm); 1/2 agents eligible")
    assert fleet.get("cold").running_count == 0  # nothing reserved
    # t = 2: the warm agent's task ends; the run (2 s old) now goes there, not to "cold".
    fleet.release("warm")
    [d] = assign(fleet, [_run(NOW)], WAIT, now=NOW + 2.0)
    assert d.agent_id == "warm" and d.factors["warm"] == 1.0
    assert fleet.get("warm").running_count == 1


def test_one_run_waits_per_busy_warm_slot_and_the_next_loads_cold_at_once():
    fleet = _fleet()
    fleet.upsert(Agent(agent_id="cold-2", team_id=TEAM, status="idle", labels={"comfyui"},
                       last_heartbeat=NOW, gpu_capacity=1))  # fmt: skip
    runs = [_run(NOW - 2.0).model_copy(update={"tie_key": f"run-{i}"}) for i in range(3)]
    # "warm" has one busy slot: the oldest run waits for it; the two others would wait for a
    # second run to end there, so they load cold now, on the two free agents.
    first, second, third = assign(fleet, runs, WAIT, now=NOW)
    assert first.deferred and first.waiting_for == ("warm",)
    assert {second.agent_id, third.agent_id} == {"cold", "cold-2"}
    # Two deferrals per busy slot: the second run waits too; the third loads cold.
    fleet = _fleet()
    two = WAIT.model_copy(update={"deferrals_per_slot": 2})
    first, second, third = assign(fleet, runs, two, now=NOW)
    assert first.deferred and second.deferred and third.agent_id == "cold"


def test_a_run_at_the_bound_is_placed_cold():
    fleet = _fleet()
    # 5 s old with a 5 s wait: now - submitted_at < wait is false, so it is never deferred.
    [d] = assign(fleet, [_run(NOW - 5.0)], WAIT, now=NOW)
    assert not d.deferred and d.agent_id == "cold" and d.factors["warm"] == 0.0


def test_a_freed_slot_goes_to_the_warm_run_before_an_older_cold_one():
    fleet = _fleet()
    fleet.release("warm")  # both agents free, one slot each
    other = DispatchRequest(team_id=TEAM, required_models={"models/other.ckpt"},
                            submitted_at=NOW - 1.0, tie_key="run-0")  # fmt: skip
    # The older run's model is cached nowhere (cold anywhere); the younger one's is on "warm".
    cold_run, warm_run = assign(fleet, [other, _run(NOW)], WAIT, now=NOW)
    assert warm_run.agent_id == "warm"
    assert cold_run.agent_id == "cold"  # placed elsewhere: a slot remained


@pytest.mark.parametrize("bad", [None, 3, "x"])
def test_assign_rejects_what_is_not_a_request(bad):
    with pytest.raises(ValueError):
        assign(_fleet(), [bad], WAIT, now=NOW)


def test_when_every_run_is_cold_they_are_all_placed_in_the_second_pass():
    fleet = _fleet()
    fleet.release("warm")
    # both runs are young and their models are cached nowhere: neither is warm anywhere
    runs = [DispatchRequest(team_id=TEAM, required_models={f"models/new-{i}.ckpt"},
                            submitted_at=NOW, tie_key=f"run-{i}") for i in range(2)]  # fmt: skip
    decisions = assign(fleet, runs, WAIT, now=NOW)
    assert sorted(d.agent_id for d in decisions) == ["cold", "warm"]


# --- grouping by template number ----------------------------------------------------------------


def test_equal_templates_share_a_number_and_different_ones_never_do():
    a = DispatchRequest(team_id=TEAM, required_models={MODEL}, tie_key="a", submitted_at=1.0)
    b = DispatchRequest(team_id=TEAM, required_models={MODEL}, tie_key="b", submitted_at=2.0)
    c = DispatchRequest(team_id=TEAM, required_models={MODEL}, min_vram_gb=8.0)
    assert a.template == b.template and a.template_id == b.template_id
    assert c.template != a.template and c.template_id != a.template_id


@settings(max_examples=50)
@given(queues())
def test_assign_is_a_dispatch_loop_when_equal_templates_get_different_numbers(queue):
    """The template table cleared at every new template (its bound at 1): equal templates are
    grouped apart, which may cost speed but never changes a decision."""
    agents, reqs, policy = queue
    policy = policy.model_copy(update={"locality_wait_s": 0.0})
    reqs = [r.model_copy() for r in reqs]  # fresh records: no number read yet
    fleet, loop = Fleet.from_agents(agents), Fleet.from_agents(agents)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.TEMPLATES, "limit", 1)
        got = assign(fleet, reqs, policy, now=NOW)
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].submitted_at or NOW, i))
    expected = {i: loop.dispatch(reqs[i], policy, now=NOW) for i in order}
    assert got == [expected[i] for i in range(len(reqs))]
    for i, decision in enumerate(got):  # assign keeps factors and counts packed: same values
        want = expected[i]
        assert (decision.factors, decision.rejected, decision.explain(), decision.row) == (
            want.factors, want.rejected, want.explain(), want.row)  # fmt: skip
    assert fleet.agents() == loop.agents()


def test_a_numbering_stays_bounded_and_never_gives_two_values_one_number():
    numbers = models.Numbering(limit=2)
    a, b, c = numbers("a"), numbers("b"), numbers("c")  # "c" clears the table: it was full
    assert len({a, b, c}) == 3 and numbers("c") == c and len(numbers._numbers) == 1
    assert numbers("a") not in (a, b, c)  # "a" again after the clear: a new number, not "b"'s


def test_the_assign_kernel_compiles_once_for_every_shape_of_queue():
    """A queue of one, one in order and one out of order pass the kernel arrays of one layout
    (the tie hashes were a strided read-only view of the entries, or a copy: three compiles)."""
    if not hasattr(A._assign, "signatures"):
        pytest.skip("numba's JIT is off")
    fleet = Fleet.from_agents([Agent(agent_id=f"gpu-{i}", team_id=TEAM, status="idle",
                                     labels={"comfyui"}, last_heartbeat=NOW, gpu_capacity=1)
                               for i in range(3)])  # fmt: skip
    one = [DispatchRequest(team_id=TEAM, tie_key="a", submitted_at=NOW - 5)]
    ordered = [*one, DispatchRequest(team_id=TEAM, tie_key="b", submitted_at=NOW - 1)]
    for queue in (one, ordered, ordered[::-1]):
        placed = assign(fleet, queue, ScoringPolicy(), now=NOW)
        assert all(d.agent_id is not None for d in placed)
        for d in placed:
            fleet.release(d.agent_id)
    assert len(A._assign.signatures) == 1


# --- requests of one kind that exclude different agents (retried tasks) ------------------------


@st.composite
def retried_queues(draw, max_agents: int = 30, max_requests: int = 14):
    """``(agents, requests, policy)``: a queue of a few kinds, each request excluding its own
    few agents (a retried task excludes the agents it failed on), with mixed ages."""
    agents = draw(agent_lists(0, max_agents))
    ids = [a.agent_id for a in agents] or ["nobody"]
    kinds = draw(st.lists(requests(ids), min_size=1, max_size=3))
    queue = []
    for i in range(draw(st.integers(0, max_requests))):
        age = draw(ages)
        excluded = draw(st.sets(st.sampled_from(ids), max_size=4))
        queue.append(draw(st.sampled_from(kinds)).model_copy(update={
            "exclude_agents": excluded, "tie_key": f"task-{i}",
            "submitted_at": None if age is None else NOW - age}))  # fmt: skip
    policy = draw(policies())
    per_slot = draw(st.sampled_from([1, 2, models.MAX_SLOTS]))
    return (
        agents,
        queue,
        policy.model_copy(update={"locality_wait_s": draw(waits), "deferrals_per_slot": per_slot}),
    )


@settings(max_examples=200)
@given(retried_queues())
def test_retried_requests_assign_equals_reference(queue):
    equals_reference(queue)


@settings(max_examples=200)
@given(retried_queues())
def test_retried_requests_without_a_wait_are_a_dispatch_loop(queue):
    """Each request's own exclusions are counted as the pick counts them, though its group's
    heap and counts are shared."""
    is_a_dispatch_loop(queue)


def test_a_deferred_decision_says_when_its_deferral_ends():
    """``deferred_until`` = ``submitted_at + locality_wait_s`` (scoring.assign.deferral_ends),
    per request; at that time the same request is placed instead of deferred."""
    from scoring.assign import deferral_ends

    agents = [
        Agent(agent_id="warm", team_id=TEAM, status="busy", labels={"comfyui"},
              last_heartbeat=NOW, gpu_capacity=1, running_count=1, cached_models={MODEL}),
        Agent(agent_id="cold", team_id=TEAM, status="idle", labels={"comfyui"},
              last_heartbeat=NOW, gpu_capacity=2),
    ]  # fmt: skip
    policy = WAIT.model_copy(update={"deferrals_per_slot": 2})
    runs = [DispatchRequest(team_id=TEAM, required_models={MODEL}, tie_key=f"run-{i}",
                            submitted_at=NOW - i) for i in range(2)]  # fmt: skip
    first, second = assign(Fleet.from_agents(agents), runs, policy, now=NOW)
    assert first.deferred and second.deferred
    assert first.deferred_until == deferral_ends(NOW, WAIT.locality_wait_s) == NOW + 5.0
    assert second.deferred_until == NOW - 1 + 5.0
    late = assign(Fleet.from_agents(agents), runs[1:], policy, now=second.deferred_until)
    assert late[0].agent_id == "cold" and late[0].deferred_until is None
