"""Fleet simulation: determinism, conservation, isolation, a hand-checked run, and the parts.

Sizes stay tiny (tens of agents, hundreds of tasks): the suite also runs with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from scoring import AgentStatus, Fleet, ScoringPolicy
from scoring.sim import (
    POLICY_NAMES,
    AgentSpec,
    Lifecycle,
    SimConfig,
    Task,
    Transfer,
    Workload,
    compare,
    jain,
    make_policy,
    prepare,
    simulate,
)
from scoring.sim.agents import SimAgent, team_uuid
from scoring.sim.dispatcher import Dispatcher, TaskState
from scoring.sim.simulation import _Run
from scoring.sim.view import FleetView

#: Agents go through every lifecycle event many times within a few minutes of simulated time.
BUSY_LIFE = Lifecycle(
    connect_spread_s=10.0,
    sync_s=5.0,
    unhealthy_every_s=300.0,
    unhealthy_s=30.0,
    tunnel_every_s=400.0,
    tunnel_s=60.0,
    disconnect_every_s=300.0,
    down_s=20.0,
    heartbeat_s=5.0,
)
#: A waiting budget, so that the scorer and ``delay`` defer runs (and wake up for them).
SMALL = SimConfig(
    n_agents=24, n_tasks=300, n_teams=6, load=0.3, lifecycle=BUSY_LIFE, locality_wait_s=10.0
)
#: The anchors and baselines (the cold-placement experiments of scoring.research run these
#: checks too: tests/test_research_emulate.py).
EVERY = POLICY_NAMES
#: scoring.research's cold-placement experiments, which wait and weigh the pool as the scorer does.
COLD_RULES = ("cold:score", "cold:spare")
#: Metrics that measure the machine rather than the simulation.
WALL_CLOCK = {"wall_s", "tasks_per_wall_s"}


@pytest.fixture(scope="module")
def small_runs():
    return compare(SMALL, EVERY)


def _sim_metrics(result):
    return {k: v for k, v in result.metrics.items() if k not in WALL_CLOCK}


@pytest.mark.parametrize("policy", EVERY)
def test_same_seed_same_metrics(small_runs, policy):
    again = simulate(SMALL, policy)
    got, expected = _sim_metrics(again), _sim_metrics(small_runs[policy])
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == expected[key] or (math.isnan(got[key]) and math.isnan(expected[key]))
    assert again.log.placements == small_runs[policy].log.placements


def test_another_seed_changes_the_run(small_runs):
    other = simulate(replace(SMALL, seed=1), "scorer")
    assert other.log.placements != small_runs["scorer"].log.placements


@pytest.mark.parametrize("policy", EVERY)
def test_every_task_completes_exactly_once_or_is_reported(small_runs, policy):
    result = small_runs[policy]
    log, m = result.log, result.metrics
    assert set(np.unique(log.completions)) <= {0, 1}
    assert m["completed"] + m["waiting"] + m["in_flight"] == m["tasks"] == SMALL.n_tasks
    # The drain is long: everything finishes, despite disconnects and failed attempts.
    assert m["completed"] == SMALL.n_tasks
    assert log.lost_attempts > 0 and log.failed_attempts > 0
    # Every attempt is accounted for: one placement each, and each retry follows a failure.
    assert len(log.placements) == log.attempts.sum()
    assert log.attempts.sum() == m["completed"] + log.lost_attempts + log.failed_attempts
    if policy in ("scorer", "delay", *COLD_RULES):  # the waiting path ran
        assert m["deferrals"] > 0


def test_a_short_drain_reports_waiting_and_running_tasks():
    config = replace(SMALL, load=3.0, drain_s=0.0)  # overloaded, stopped at the last arrival
    m = simulate(config, "scorer").metrics
    assert m["waiting"] > 0 and m["in_flight"] > 0
    assert m["completed"] + m["waiting"] + m["in_flight"] == m["tasks"]


@pytest.mark.parametrize("policy", EVERY)
def test_no_policy_runs_a_task_outside_its_pool(small_runs, policy):
    result = small_runs[policy]
    tasks, agents = result.workload.tasks, result.agents
    pools = {t.pool for t in tasks}
    assert pools == {"team", "community"}
    foreign = 0
    for task_id, agent_index in result.log.placements:
        task, agent = tasks[task_id], agents[agent_index]
        if task.pool == "team":
            assert agent.team == task.team, (task, agent)
        else:
            assert agent.team == task.team or agent.community_opt_in, (task, agent)
            foreign += agent.team != task.team
    if policy not in ("scorer", *COLD_RULES):  # others ignore the pool factor
        assert foreign > 0


# --- a tiny run, checked by hand --------------------------------------------------------------

US_EAST, EU_WEST = "us-east", "eu-west"


def _hand_scenario():
    a = AgentSpec("a", 0, US_EAST, "NVIDIA GeForce RTX 3090", 24.0, speed=1.0,
                  initial_models=("m1",))  # fmt: skip
    b = AgentSpec("b", 0, EU_WEST, "NVIDIA GeForce RTX 4090", 24.0, speed=2.0)
    arrivals = [(0.0, 10.0), (1.0, 10.0), (2.0, 4.0), (3.0, 6.0), (12.0, 10.0)]
    tasks = tuple(
        Task(i, at, team=0, region=US_EAST, model="m1", service_s=s)
        for i, (at, s) in enumerate(arrivals)
    )
    workload = Workload(tasks, 1, (US_EAST,), ("m1",), name="hand")
    config = SimConfig(
        lifecycle=Lifecycle.steady(),
        load_delay_s=10.0,
        transfer=Transfer(same=0.0, near=1.5, far=5.0, unknown=2.5),
        warmup_s=0.0,
        locality_wait_s=0.0,  # worked without waiting; the delay scenario below waits
    )
    return config, workload, [a, b]


def test_tiny_scenario_by_hand():
    # Agent a: us-east, speed 1, one slot, m1 cached. Agent b: eu-west, speed 2, one slot, empty.
    # Every task: team 0, us-east, model m1. Loads take 10 s; us-east -> eu-west transfer 5 s.
    #
    # task arrive service  placed   why                              starts run at   ends
    # T0   0      10       0 on a   a scores higher on region, warm   0 (warm)        0+10/1 = 10
    # T1   1      10       1 on b   a is full                         max(1+5, 1+10)  11+10/2 = 16
    # T2   2       4      10 on a   waits; a frees at 10              10              10+4 = 14
    # T3   3       6      14 on a   waits; a frees at 14 (before b)   14              14+6 = 20
    # T4  12      10      16 on b   waits; b frees at 16, m1 warm     16+5 = 21       21+10/2 = 26
    config, workload, agents = _hand_scenario()
    result = simulate(config, "scorer", workload, agents)
    log, m = result.log, result.metrics
    assert [agents[i].agent_id for _, i in log.placements] == ["a", "b", "a", "a", "b"]
    np.testing.assert_allclose(log.start, [0, 1, 10, 14, 16])
    np.testing.assert_allclose(log.end, [10, 16, 14, 20, 26])
    # waits 0, 0, 8, 11, 4 -> sorted 0 0 4 8 11: median 4, mean 23/5 = 4.6
    assert m["wait_p50_s"] == pytest.approx(4.0)
    assert m["wait_mean_s"] == pytest.approx(4.6)
    # latencies 10, 15, 12, 17, 14 -> median 14, mean 68/5 = 13.6
    assert m["latency_p50_s"] == pytest.approx(14.0)
    assert m["latency_mean_s"] == pytest.approx(13.6)
    # one cold load (T1 on b) out of five attempts that need a model
    assert m["cold_load_rate"] == pytest.approx(1 / 5)
    # T0, T2, T3 ran in us-east; T1 and T4 in eu-west: 3 / 5
    assert m["region_match_rate"] == pytest.approx(3 / 5)
    # busy slot-seconds: a 10 + 4 + 6 = 20, b 15 + 10 = 25; both connected 0..26: 45 / 52
    assert m["utilisation"] == pytest.approx(45 / 52)
    # one team, so fairness is perfect; slowdowns 1, 1.5, 3, 17/6, 1.4
    assert m["fairness_jain"] == 1.0
    assert m["slowdown_mean"] == pytest.approx((1 + 1.5 + 3 + 17 / 6 + 1.4) / 5)
    assert m["sim_hours"] == pytest.approx(26 / 3600)
    assert m["waiting"] == m["in_flight"] == m["retries"] == 0


def test_a_task_on_an_agent_that_disconnects_is_retried_elsewhere():
    # T0 (100 s of work) starts on a at 0. a goes silent at 5; its last heartbeat was at 0, so it
    # turns stale just after 30, when T0 is lost and retried with a excluded: b takes it.
    config, workload, agents = _hand_scenario()
    workload = replace(workload, tasks=(replace(workload.tasks[0], service_s=100.0),))
    run = _Run(config, workload, agents, make_policy("scorer", config.scoring_policy()), False)

    def outage():
        yield run.env.timeout(5.0)
        run.disconnect(run.by_id["a"])

    run.env.process(outage())
    log = run.run()
    assert [agents[i].agent_id for _, i in log.placements] == ["a", "b"]
    assert log.lost_attempts == 1 and log.completions[0] == 1
    assert log.start[0] == pytest.approx(30.0, abs=1e-3)
    # on b: transfer 5 s and a 10 s cold load overlap, then 100 s at speed 2
    assert log.end[0] == pytest.approx(30.0 + 10.0 + 50.0, abs=1e-3)


@pytest.mark.parametrize(
    ("wait_s", "start", "end", "agent"),
    [
        # T1 (needs m1, 4 s of work) arrives at 1 while a, the only agent with m1, runs T0
        # until 10. Budget 20 s: held back, it starts warm on a at 10 and ends 10 + 4 = 14.
        (20.0, 10.0, 14.0, "a"),
        # Budget 5 s: held back until 1 + 5 = 6, then cold on b (eu-west, speed 2): the 10 s
        # load and the 5 s transfer overlap, so it runs from 16 to 16 + 4 / 2 = 18.
        (5.0, 6.0, 18.0, "b"),
        # Budget 0: never held back, cold on b at once: ready at 1 + 10 = 11, ends 13.
        (0.0, 1.0, 13.0, "b"),
    ],
    ids=["waits-for-warm", "bound-expires", "no-waiting"],
)
def test_delay_scheduling_by_hand(wait_s, start, end, agent):
    config, workload, agents = _hand_scenario()
    workload = replace(
        workload, tasks=(workload.tasks[0], replace(workload.tasks[1], service_s=4.0))
    )
    config = replace(config, locality_wait_s=wait_s)
    result = simulate(config, "delay", workload, agents)
    log = result.log
    assert [agents[i].agent_id for _, i in log.placements] == ["a", agent]
    assert log.start[1] == pytest.approx(start) and log.end[1] == pytest.approx(end)
    assert result.metrics["deferrals"] == (0 if wait_s == 0 else 1)
    assert result.metrics["cold_load_rate"] == (0.0 if agent == "a" else 0.5)
    # overhead: T1's latency minus its own 4 s (a, speed 1) or 2 s (b, speed 2) run
    own = 4.0 if agent == "a" else 2.0
    assert result.metrics["overhead_p99_s"] == pytest.approx(max(end - 1.0 - own, 0.0), abs=0.3)


def test_anchor_rules_by_hand():
    from scoring.sim.policies import GatewayInference, Multiplex, Startup
    from scoring.sim.view import LOAD_ESTIMATE_S, FleetView

    view = FleetView()
    # id: (slots, running, region, cache size, cached, loading)
    layout = {
        "a": (4, 3, "us-east", 2, {"m1"}, {}),
        "b": (4, 0, "eu-west", 2, {"m2", "m3"}, {}),
        "c": (2, 1, "us-east", 2, {"m2"}, {"m1": 1000.0 + 6.0}),
        "d": (2, 0, "us-west", 3, set(), {}),
    }
    for agent_id, (slots, running, region, size, cached, loading) in layout.items():
        view.connect(agent_id, slots, region, size, 0, False, cached)
        view.agents[agent_id].running = running
        view.agents[agent_id].loading = dict(loading)
    request = _request_for("m1", "us-east")
    ids = sorted(layout)
    policy = ScoringPolicy()

    def bound(cls):
        p = cls(policy, seed=0)
        p.bind(view, Transfer().delay)
        return p

    # multiplex: only a has m1, so a (the two choices collapse to one candidate)
    assert bound(Multiplex).pick(ids, request, 1000.0) == "a"
    # without a: fewest models loaded is d (none)
    assert bound(Multiplex).pick(["b", "c", "d"], request, 1000.0) == "d"
    # gie: queue (max 3 - q) / 3, utilisation 1 - r/s, affinity 1 / 0.8 / 0.6 / 0
    #   a: 2 x 0   + 2 x 0.25 + 3 x 1.0 = 3.5
    #   b: 2 x 1   + 2 x 1.0  + 3 x 0   = 4.0   (cache full, m1 not loading)
    #   c: 2 x 2/3 + 2 x 0.5  + 3 x 0.6 = 4.13  (cache full: 1 cached + 1 loading; m1 loading)
    #   d: 2 x 1   + 2 x 1.0  + 3 x 0.8 = 6.4   (room for a model)
    assert bound(GatewayInference).pick(ids, request, 1000.0) == "d"
    assert bound(GatewayInference).pick(["a", "b", "c"], request, 1000.0) == "c"
    # startup: a 0 + 0; b 5 + 22.7; c 0 + 6 left of its load; d 1.5 (same continent) + 22.7
    assert bound(Startup).pick(ids, request, 1000.0) == "a"
    assert bound(Startup).pick(["b", "c", "d"], request, 1000.0) == "c"
    assert bound(Startup).pick(["b", "d"], request, 1000.0) == "d"
    assert LOAD_ESTIMATE_S == 22.7


def _request_for(model, region):
    from scoring import DispatchRequest

    return DispatchRequest(
        team_id=team_uuid(0), submitter_region=region, required_models={model}, tie_key="t"
    )


# --- the dispatcher -----------------------------------------------------------------------------


class _Recorder:
    """A fleet with one agent of team 0 (one slot) and a dispatcher that records starts."""

    def __init__(self):
        spec = AgentSpec("only", 0, US_EAST, "NVIDIA L4", 24.0, speed=1.0)
        self.fleet = Fleet()
        self.fleet.upsert(spec.record(1000.0, AgentStatus.IDLE, []))
        self.started: list[tuple[int, str]] = []
        policy = make_policy("scorer", ScoringPolicy())
        self.view = FleetView()
        self.view.connect("only", 1, US_EAST, 3, 0, False, ())
        self.view.set_ready("only", True)
        policy.bind(self.view, Transfer().delay)
        self.dispatcher = Dispatcher(
            self.fleet, policy, lambda: 1000.0, self.start, free_slots=self.view.free_slots
        )

    def start(self, state, agent_id):
        self.started.append((state.task.task_id, agent_id))

    def free(self):
        self.fleet.release("only")
        self.view.release("only")
        self.dispatcher.kick(0, False)


def test_waiting_tasks_start_in_arrival_order():
    r = _Recorder()
    for i in range(4):
        r.dispatcher.submit(TaskState(Task(i, float(i), team=0)))
    assert r.started == [(0, "only")]
    assert [s.seq for s in r.dispatcher.waiting] == [1, 2, 3]
    # a retried task (say it failed elsewhere) keeps its arrival rank in the queue
    late = TaskState(Task(9, 9.0, team=0))
    r.dispatcher.submit(late)
    r.free()
    r.free()
    assert r.started == [(0, "only"), (1, "only"), (2, "only")]
    assert [s.seq for s in r.dispatcher.waiting] == [3, 9]


def test_an_exclusion_that_would_block_for_ever_is_dropped():
    r = _Recorder()
    state = TaskState(Task(0, 0.0, team=0))
    r.dispatcher.requeue(state, "only")  # failed on the team's only agent
    assert state.request.exclude_agents == {"only"}
    assert r.started == [(0, "only")]


class _Deferring:
    """A policy that holds every request back for 5 s, then places it (a test double)."""

    name, wait_s = "deferring", 5.0

    def __init__(self, fleet):
        self.fleet, self.calls = fleet, []

    def assign(self, fleet, requests, keys, submitted, now):
        self.calls.append((now, len(requests)))
        out = []
        for request, at in zip(requests, submitted, strict=True):
            if now - at < self.wait_s:
                out.append((None, at + self.wait_s))
            else:
                out.append((fleet.dispatch(request, now=now).agent_id, None))
        return out


def test_the_dispatcher_wakes_when_a_deferral_expires():
    spec = AgentSpec("only", 0, US_EAST, "NVIDIA L4", 24.0, speed=1.0, capacity=4)
    fleet = Fleet()
    fleet.upsert(spec.record(1000.0, AgentStatus.IDLE, []))
    clock = [1000.0]
    wakes, started = [], []
    policy = _Deferring(fleet)
    d = Dispatcher(fleet, policy, lambda: clock[0], lambda s, a: started.append(s.seq),
                   wakes.append)  # fmt: skip
    d.submit(TaskState(Task(0, 0.0, team=0), submitted=1000.0))
    clock[0] = 1002.0
    d.submit(TaskState(Task(1, 2.0, team=0), submitted=1002.0))
    assert started == [] and d.deferrals == 2
    # one wake for the earliest deferral (just past 1000 + 5), none for the later one yet
    assert wakes == [pytest.approx(1005.0)]
    clock[0] = wakes[0]
    d.expire()
    assert started == [0]
    assert wakes[1:] == [pytest.approx(1007.0)]  # the next deferral's end
    clock[0] = wakes[1]
    d.expire()
    assert started == [0, 1] and d.waiting == []


def test_tasks_of_other_teams_wait_without_blocking():
    r = _Recorder()
    r.dispatcher.submit(TaskState(Task(0, 0.0, team=1)))  # no agent of team 1: waits
    r.dispatcher.submit(TaskState(Task(1, 1.0, team=0)))
    assert r.started == [(1, "only")]
    assert [s.seq for s in r.dispatcher.waiting] == [0]


# --- parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 1.0, 1.0], 1.0),  # equal: perfectly fair
        ([1.0, 0.0, 0.0, 0.0], 0.25),  # one of four gets it all: 1 / n
        ([1.0, 3.0], 16 / 20),  # (1 + 3)^2 / (2 * (1 + 9))
        ([], 1.0),
    ],
    ids=["equal", "one-takes-all", "one-three", "empty"],
)
def test_jain(values, expected):
    assert jain(values) == pytest.approx(expected)


def test_agent_lru_cache_evicts_the_least_recently_used():
    spec = AgentSpec("x", 0, None, "NVIDIA T4", 16.0, speed=0.35, cache_size=2,
                     initial_models=("m1", "m2"))  # fmt: skip
    agent = SimAgent(spec, 0)
    assert agent.touch("m1")  # m1 is now the most recent
    agent.add_model("m3")  # evicts m2
    assert list(agent.cache) == ["m1", "m3"]
    assert not agent.touch("m2")


def test_fleet_follows_each_teams_demand():
    workload, agents = prepare(SimConfig(n_agents=40, n_tasks=400, n_teams=5))
    assert {a.team for a in agents} == set(range(5))
    power = np.zeros(5)
    for a in agents:
        power[a.team] += a.capacity * a.speed
    share = power / power.sum()
    assert np.abs(share - workload.team_demand).max() < 0.1
    for team in range(5):  # every team can run its 24 GB tasks
        assert any(a.vram_gb >= 24 for a in agents if a.team == team)
    assert team_uuid(0) != team_uuid(1)


def test_compression_reaches_the_offered_load():
    config = SimConfig(n_agents=30, n_tasks=500, n_teams=5, load=0.4)
    workload, agents = prepare(config)
    capacity = sum(a.capacity * a.speed for a in agents)
    assert workload.work_s / workload.span_s / capacity == pytest.approx(0.4)
    assert workload.tasks[0].arrival == config.warmup_s


def test_the_views_free_slots_are_kept_as_agents_change(monkeypatch):
    """The count kept at each change equals the sum over the agents, at every offer of a busy
    run (connects, spells, disconnects, retries)."""
    seen = []
    kept = FleetView.free_slots

    def checked(view):
        got = kept(view)
        assert got == sum(a.free for a in view.agents.values())
        seen.append(got)
        return got

    monkeypatch.setattr(FleetView, "free_slots", checked)
    simulate(SMALL, "scorer")
    assert len(seen) > 100 and max(seen) > 0
