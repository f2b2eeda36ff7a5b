"""The fleet as a state machine against a plain model (a dict of Agent records), with failures.

Every rule runs a public call on the fleet and on the model; some run it with one failure
injected (tests.strategies.Fault: a numpy allocation of the fleet or its name tables raising
MemoryError, a name table refusing, one failing part way, the region/GPU limit reached). After
every step the fleet must equal the model (records, indexes, name counts, bitset widths) and
pick as the reference does over the model's records; a call that raised must have left the
fleet exactly as it was (DESIGN section 5: every update is all or nothing).
"""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scoring import Agent, AgentStatus, DispatchRequest, Fleet, ScoringPolicy, assign, pick_agent
from scoring import reference as R
from scoring.fleet import UnknownAgentError
from scoring.pick import rank_agents
from tests.strategies import (
    GPUS,
    LABELS,
    MODELS,
    NOW,
    REGIONS,
    TEAMS,
    Fault,
    check_fleet,
    fleet_state,
    policies,
    requests,
)

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

IDS = [f"agent-{i:02d}" for i in range(8)]
BANDED = ScoringPolicy(tie_band=0.1)
GHOST = "ghost"
#: Teams beyond the usual three come and go (their index and name are reclaimed).
team_ids = st.one_of(st.sampled_from(TEAMS), st.integers(100, 110).map(lambda i: uuid.UUID(int=i)))
fresh = st.integers(0, 10**6)
labels = st.one_of(
    st.sets(st.sampled_from(LABELS), max_size=4),
    # many fresh labels: past one bitset word together with the others' (64 at most per agent)
    st.builds(
        lambda base, extra: frozenset(base) | {f"label-{n}" for n in extra},
        st.sets(st.sampled_from(LABELS), max_size=3),
        st.sets(fresh, max_size=60),
    ),
)
models = st.one_of(
    st.sets(st.sampled_from(MODELS), max_size=3),
    st.builds(
        lambda base, extra: frozenset(base) | {f"models/fresh-{n}" for n in extra},
        st.sets(st.sampled_from(MODELS), max_size=3),
        st.sets(fresh, max_size=80),
    ),
)
regions = st.one_of(st.none(), st.sampled_from(REGIONS), fresh.map(lambda n: f"region-{n}"))
gpus = st.one_of(st.none(), st.sampled_from(GPUS), fresh.map(lambda n: f"GPU model {n}"))
statuses = st.sampled_from(list(AgentStatus))
times = st.floats(NOW - 100, NOW + 100, allow_nan=False)
faults = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(Fault.KINDS), st.integers(1, 50)),
)


@st.composite
def records(draw, agent_id: str) -> Agent:
    capacity = draw(st.integers(1, 3))
    return Agent(
        agent_id=agent_id,
        team_id=draw(team_ids),
        status=draw(statuses),
        labels=draw(labels) | {draw(st.sampled_from(["comfyui", "nerfstudio"]))},
        last_heartbeat=draw(times),
        gpu_capacity=capacity,
        running_count=draw(st.integers(0, capacity)),
        region=draw(regions),
        community_opt_in=draw(st.booleans()),
        vram_gb=draw(st.sampled_from([None, 16.0, 24.0, 80.0])),
        gpu_model=draw(gpus),
        cached_models=draw(models),
        failure_rate=draw(st.sampled_from([0.0, 0.25, 0.5])),
    )


def _same(got, expected) -> None:
    """The engine's decision equals the reference's (scores exactly: see test_differential)."""
    assert got.agent_id == expected.agent_id
    assert got.score == expected.score
    assert got.eligible == expected.eligible
    assert got.rejected == expected.rejected
    assert got.considered == expected.considered
    assert got.missing_labels == expected.missing_labels


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fleet = Fleet()
        self.model: dict[str, Agent] = {}
        self.loose = False  # a narrowing failed (allowed): the bitsets may be wider than needed

    # --- running a call, with or without a fault -----------------------------------------------

    def run(self, call, fault, expected_error: type[BaseException] | None = None):
        """Run ``call()``; return ``(True, result)`` or ``(False, error)``.

        A call that raises must raise the injected error or ``expected_error`` and leave the
        fleet exactly as before; one that should have raised, or raised without cause, fails.
        """
        before, nbytes = fleet_state(self.fleet), self.fleet.nbytes
        injected = Fault(*fault, fleet=self.fleet) if fault else contextlib.nullcontext()
        try:
            with injected:
                result = call()
        except (MemoryError, ValueError) as error:
            fired = fault is not None and injected.failed
            if expected_error is not None and isinstance(error, expected_error):
                pass  # the call's own error (an unknown id, no free slot, the region limit)
            else:
                assert fired, f"{error!r} without an injected failure"
                assert "injected" in str(error) or "at most" in str(error), repr(error)
            assert fleet_state(self.fleet) == before, "a failed call changed the fleet"
            assert self.fleet.nbytes <= nbytes  # failed calls never keep memory
            return False, error
        assert expected_error is None, f"expected {expected_error.__name__}"
        if fault is not None and injected.failed:
            self.loose = True  # only a narrowing afterwards may fail without failing the call
        return True, result

    # --- rules ---------------------------------------------------------------------------------

    @rule(data=st.data(), agent_id=st.sampled_from(IDS), fault=faults)
    def upsert(self, data, agent_id, fault):
        old = self.model.get(agent_id)
        agent = data.draw(records(agent_id))
        if old is not None and data.draw(st.booleans()):
            # an update that changes only some fields: team, opt-in, names
            agent = old.model_copy(
                update=data.draw(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "team_id": team_ids,
                            "community_opt_in": st.booleans(),
                            "labels": labels,
                            "cached_models": models,
                            "region": regions,
                            "gpu_model": gpus,
                        },
                    )
                )
            )
        limited = fault is not None and fault[0] == "limit" and self._new_small_name(agent)
        ok, _ = self.run(lambda: self.fleet.upsert(agent), fault, ValueError if limited else None)
        if ok:
            self.model[agent_id] = agent

    def _new_small_name(self, agent: Agent) -> bool:
        known_regions = {a.region for a in self.model.values()}
        known_gpus = {a.gpu_model for a in self.model.values()}
        return (agent.region is not None and agent.region not in known_regions) or (
            agent.gpu_model is not None and agent.gpu_model not in known_gpus
        )

    @rule(agent_id=st.sampled_from([*IDS, GHOST]), fault=faults)
    def remove(self, agent_id, fault):
        known = agent_id in self.model
        ok, error = self.run(
            lambda: self.fleet.remove(agent_id), fault, None if known else UnknownAgentError
        )
        if ok:
            del self.model[agent_id]
        elif not known:
            assert isinstance(error, UnknownAgentError)

    @rule(
        agent_id=st.sampled_from([*IDS, GHOST]),
        at=times,
        status=st.none() | statuses,
        running=st.none() | st.integers(0, 4),
        cached=st.none() | models,
        fault=faults,
    )
    def heartbeat(self, agent_id, at, status, running, cached, fault):
        known = agent_id in self.model
        call = lambda: self.fleet.heartbeat(agent_id, at, status, running, cached)  # noqa: E731
        ok, _ = self.run(call, fault, None if known else UnknownAgentError)
        if ok:
            update: dict = {"last_heartbeat": at}
            if status is not None:
                update["status"] = status
            if running is not None:
                update["running_count"] = running
            if cached is not None:
                update["cached_models"] = cached
            self.model[agent_id] = self.model[agent_id].model_copy(update=update)

    @rule(
        ids=st.lists(st.sampled_from([*IDS, GHOST]), max_size=6),
        data=st.data(),
        fault=faults,
    )
    def heartbeat_many(self, ids, data, fault):
        n = len(ids)
        at = data.draw(st.one_of(times, st.lists(times, min_size=n, max_size=n)))
        status = data.draw(st.none() | statuses | st.lists(statuses, min_size=n, max_size=n))
        running = data.draw(
            st.none() | st.integers(0, 3) | st.lists(st.integers(0, 3), min_size=n, max_size=n)
        )
        known = all(i in self.model for i in ids)
        call = lambda: self.fleet.heartbeat_many(ids, at, status, running)  # noqa: E731
        ok, _ = self.run(call, fault, None if known else UnknownAgentError)
        if ok:
            for k, agent_id in enumerate(ids):  # in order: a repeated id's last values win
                update: dict = {"last_heartbeat": at[k] if isinstance(at, list) else at}
                if status is not None:
                    update["status"] = status[k] if isinstance(status, list) else status
                if running is not None:
                    update["running_count"] = running[k] if isinstance(running, list) else running
                self.model[agent_id] = self.model[agent_id].model_copy(update=update)

    @rule(agent_id=st.sampled_from([*IDS, GHOST]), fault=faults)
    def reserve(self, agent_id, fault):
        agent = self.model.get(agent_id)
        full = agent is not None and agent.running_count >= agent.gpu_capacity
        expected = UnknownAgentError if agent is None else ValueError if full else None
        ok, _ = self.run(lambda: self.fleet.reserve(agent_id), fault, expected)
        if ok:
            self.model[agent_id] = _take_slot(agent)

    @rule(agent_id=st.sampled_from([*IDS, GHOST]), fault=faults)
    def release(self, agent_id, fault):
        agent = self.model.get(agent_id)
        expected = UnknownAgentError if agent is None else None
        ok, _ = self.run(lambda: self.fleet.release(agent_id), fault, expected)
        if ok:
            running = max(0, agent.running_count - 1)
            status = agent.status
            if running == 0 and status is AgentStatus.BUSY:
                status = AgentStatus.IDLE
            self.model[agent_id] = agent.model_copy(
                update={"running_count": running, "status": status}
            )

    @rule(data=st.data(), fault=faults)
    def dispatch(self, data, fault):
        request = data.draw(requests([*IDS, GHOST]))
        policy = data.draw(policies())
        expected = R.pick_agent(list(self.model.values()), request, policy, now=NOW)
        ok, decision = self.run(lambda: self.fleet.dispatch(request, policy, now=NOW), fault)
        if ok:
            _same(decision, expected)
            if expected.agent_id is not None:
                self.model[expected.agent_id] = _take_slot(self.model[expected.agent_id])

    @rule(data=st.data(), fault=faults)
    def assign(self, data, fault):
        queue = data.draw(st.lists(requests([*IDS, GHOST]), max_size=4))
        queue = [
            r.model_copy(update={"submitted_at": NOW - data.draw(st.sampled_from([0.0, 10.0]))})
            for r in queue
        ]
        policy = data.draw(policies()).model_copy(
            update={"locality_wait_s": data.draw(st.sampled_from([0.0, 5.0]))}
        )
        expected, after = R.assign(list(self.model.values()), queue, policy, now=NOW)
        ok, decisions = self.run(lambda: assign(self.fleet, queue, policy, now=NOW), fault)
        if ok:
            got = [(d.agent_id, d.deferred, d.waiting_for) for d in decisions]
            assert got == [(a.agent_id, a.deferred, a.waiting_for) for a in expected]
            self.model = {a.agent_id: a for a in after}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pick_and_rank(self, data):
        """Any request and policy (tie band, affinities): pick and rank as the reference."""
        request = data.draw(requests([*IDS, GHOST]))
        policy = data.draw(policies())
        agents = list(self.model.values())
        _same(
            pick_agent(self.fleet, request, policy, now=NOW),
            R.pick_agent(agents, request, policy, now=NOW),
        )
        k = data.draw(st.integers(0, 10))
        got = rank_agents(self.fleet, request, policy, now=NOW, k=k)
        expected = R.rank_agents(agents, request, policy, now=NOW, k=k)
        assert [(r.agent_id, r.score) for r in got] == expected

    # --- after every step ----------------------------------------------------------------------

    @invariant()
    def fleet_equals_model(self):
        check_fleet(self.fleet, self.model, exact_width=not self.loose)
        if self.loose:
            with self.fleet.lock:
                columns = self.fleet.columns
                tables = (("labels", self.fleet.labels), ("cached_models", self.fleet.models))
                self.loose = any(
                    getattr(columns, c).shape[1] != max(1, -(-t.live // 64)) for c, t in tables
                )

    @invariant()
    def picks_equal_reference(self):
        """Each team's pool and the community pool, as the reference decides over the model.

        The same requests and the same policy object every time, so each pick after the first
        uses the arguments its template kept (``scoring.pick.Bound``) unless the last rule
        changed the fleet's version: a change that forgot to bump it shows here."""
        agents = list(self.model.values())
        policy = BANDED
        for team in [*TEAMS, uuid.UUID(int=100)]:
            for pool in ("team", "community"):
                required = {"gpu"} if team == TEAMS[1] else set()
                request = DispatchRequest(
                    team_id=team,
                    target_pool=pool,
                    required_labels=required,
                    tie_key=f"{team.int}-{pool}",
                    submitter_region="us-east",
                )
                _same(
                    pick_agent(self.fleet, request, policy, now=NOW),
                    R.pick_agent(agents, request, policy, now=NOW),
                )


def _take_slot(agent: Agent) -> Agent:
    status = AgentStatus.BUSY if agent.status is AgentStatus.IDLE else agent.status
    return agent.model_copy(update={"running_count": agent.running_count + 1, "status": status})


# A third of the profile's examples (20 locally, 50 under CI), 25 steps each: a few seconds.
FleetMachine.TestCase.settings = settings(
    max_examples=max(10, settings().max_examples // 3), stateful_step_count=25
)
test_fleet_state_machine = FleetMachine.TestCase


@pytest.mark.parametrize("kind", Fault.KINDS)
def test_every_kind_of_fault_fires_somewhere(kind):
    """The injectors are live (a fault that never fires would make the machine's checks empty):
    each kind makes some update fail, and the fleet is unchanged after it."""
    agent = Agent(agent_id="a", team_id=TEAMS[0], status="idle", last_heartbeat=NOW,
                  gpu_capacity=1, labels={f"l{i}" for i in range(64)}, region="r-1",
                  gpu_model="g-1", cached_models={f"m{i}" for i in range(70)})  # fmt: skip
    other = {"agent_id": "b", "region": "r-0", "gpu_model": "g-0", "labels": {"x"},
             "cached_models": {"y"}}  # fmt: skip
    fleet = Fleet.from_agents([agent.model_copy(update=other)])
    before = fleet_state(fleet)
    fault = Fault(kind, 2, fleet=fleet)
    with pytest.raises((MemoryError, ValueError)), fault:
        fleet.upsert(agent)
    assert fault.failed and fleet_state(fleet) == before
