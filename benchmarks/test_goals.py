"""DESIGN section 7 goals that are not a pick ladder: a small pick end to end (with where its time
goes), a queue placed by ``assign()`` against a loop of ``Fleet.dispatch``, and picks and memory
after hostile churn (issue 9). Derived figures go to ``extra_info`` for the report."""

from __future__ import annotations

import itertools
import os
import statistics
import time
import uuid

import numpy as np

from benchmarks import profile_pick
from benchmarks.registry import MIXES, build_workload, cached_workload
from benchmarks.test_fleet import QUICK_PICK_FLEET
from scoring import Agent, AgentStatus, DispatchRequest, Fleet, ScoringPolicy, assign, pick_agent
from scoring.synthetic import MODELS, team_ids

# --- a pick over 100 agents, end to end --------------------------------------------------------


def test_small_pick(benchmark, quick):
    """``pick_agent`` over 100 agents, timeit-style (best and median of 7 repeats), each step
    of it alone, and a cProfile split by function (``benchmarks.profile_pick``)."""
    w = cached_workload(100)
    requests = [r for mix in ("mixed", *MIXES) for r in w.requests(mix)]
    number = 20 if quick else 2_000
    result = benchmark.pedantic(
        profile_pick.breakdown, args=(w.fleet, requests, w.policy, w.now),
        kwargs={"number": number, "repeat": 2 if quick else 7}, rounds=1, iterations=1,
    )  # fmt: skip
    benchmark.group = "small pick"
    benchmark.extra_info.update(
        size=len(w.fleet), picks=len(requests), best_s=result["total"]["best"],
        median_s=result["total"]["median"],
        steps={k: v["best"] for k, v in result["steps"].items()},
        steps_median={k: v["median"] for k, v in result["steps"].items()},
        profile=result["profile"], load_avg=os.getloadavg()[0],
    )  # fmt: skip


# --- assign(): a queue onto free slots ----------------------------------------------------------


def queue(fleet: Fleet, n: int, seed: int = 0) -> list[DispatchRequest]:
    """``n`` queued requests as a real queue has them: a few templates (pool, team, labels,
    models, region, GPU), each request with its own tie key (its task id)."""
    teams = team_ids(max(4, len(fleet) // 100), seed)[:3]
    templates = [
        {"team_id": teams[0], "target_pool": "community", "submitter_region": "us-east",
         "required_models": {MODELS[0]}},
        {"team_id": teams[1], "target_pool": "community", "submitter_region": "eu-west",
         "required_labels": {"sdxl"}},
        {"team_id": teams[2], "target_pool": "community", "preferred_gpu": "RTX_4090",
         "required_models": {MODELS[1]}},
        {"team_id": teams[0], "target_pool": "team", "submitter_region": "us-west"},
        {"team_id": teams[1], "target_pool": "team", "min_vram_gb": 24.0},
        {"team_id": teams[0], "target_pool": "community", "tool_type": "nerfstudio"},
    ]  # fmt: skip
    rng = np.random.default_rng(seed)
    shares = np.array([0.3, 0.2, 0.15, 0.15, 0.1, 0.1])
    picks = rng.choice(len(templates), n, p=shares)
    return [
        DispatchRequest(**templates[t], tie_key=str(uuid.UUID(bytes=rng.bytes(16), version=4)))
        for t in picks
    ]


class _Restore:
    """Puts back the slots a placement took (``running_count`` and ``status``), not timed."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        c = fleet.columns
        self.ids = list(fleet)
        self.at = c.last_heartbeat.copy()
        statuses = tuple(AgentStatus)
        self.status = [statuses[s] for s in c.status.tolist()]
        self.running = c.running_count.copy()

    def __call__(self) -> None:
        self.fleet.heartbeat_many(self.ids, self.at, status=self.status,
                                  running_count=self.running)  # fmt: skip


def test_assign(benchmark, quick):
    """``assign()`` of 10,000 queued requests onto 10,000 agents against the same requests in a
    loop of ``Fleet.dispatch``, timed in turns on one fleet (its slots put back in between).

    Without a locality wait (``locality_wait_s == 0``) both must place every request on the same
    agent. Delay scheduling (``locality_wait_s`` 30 s, every request young) is timed too.
    """
    n = QUICK_PICK_FLEET if quick else 10_000
    w = build_workload(n, seed=4, keep_agents=False)
    fleet, now = w.fleet, w.now
    requests = queue(fleet, n)
    restore = _Restore(fleet)
    waiting = ScoringPolicy(locality_wait_s=30.0)
    fifo = ScoringPolicy(locality_wait_s=0.0)

    def by_assign():
        return assign(fleet, requests, fifo, now)

    def by_dispatch():
        return [fleet.dispatch(r, fifo, now) for r in requests]

    def by_assign_waiting():
        return assign(fleet, requests, waiting, now)

    got, expected = by_assign(), (restore(), by_dispatch())[1]
    restore()
    assert [d.agent_id for d in got] == [d.agent_id for d in expected]
    placed = sum(d.agent_id is not None for d in got)
    times: dict[str, list[float]] = {"assign": [], "dispatch": [], "assign-wait": []}
    calls = {"assign": by_assign, "dispatch": by_dispatch, "assign-wait": by_assign_waiting}
    placed_wait = 0
    for _ in range(1 if quick else 5):
        for name, call in calls.items():
            out = None  # the last call's Decisions are freed before the clock starts, not within
            start = time.perf_counter()
            out = call()
            times[name].append(time.perf_counter() - start)
            restore()
            if name == "assign-wait":
                placed_wait = sum(d.agent_id is not None for d in out)
    benchmark.pedantic(lambda: (by_assign(), restore()), rounds=1, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(
        d / a for a, d in zip(times["assign"], times["dispatch"], strict=True)
    )
    benchmark.group = "assign"
    benchmark.extra_info.update(
        agents=len(fleet), requests=n, placed=placed, seconds=med,
        placements_per_s=placed / med["assign"], requests_per_s=n / med["assign"],
        dispatch_loop_over_assign=ratio, placed_waiting=placed_wait,
        load_avg=os.getloadavg()[0],
    )  # fmt: skip


# --- churn (issue 9) ----------------------------------------------------------------------------


def _hostile(k: int, team: uuid.UUID, now: float) -> Agent:
    """An agent with the most fresh names an agent may carry: 64 labels, 256 cached models."""
    return Agent(
        agent_id=f"hostile-{k}", team_id=team, status="idle", last_heartbeat=now,
        gpu_capacity=1, community_opt_in=k % 2 == 0, region=f"region-{k}",
        gpu_model=f"gpu-{k}", labels={f"h{k}-label-{i}" for i in range(64)},
        cached_models={f"h{k}/model-{i}.safetensors" for i in range(256)},
    )  # fmt: skip


def churn(fleet: Fleet, agents: list[Agent], now: float, hostile: int, reconnects: int,
          seed: int = 0) -> dict[str, int]:  # fmt: skip
    """Hostile and ordinary churn that ends with the fleet holding ``agents`` again.

    - ``hostile`` agents with 64 fresh labels and 256 fresh models, upserted 4 at a time, then
      removed (each name they brought is new to the fleet);
    - ``reconnects`` ordinary reconnects: the agent is removed and upserted again, every tenth
      time with a label it never had (its new session's tag);
    - as many team changes (the agent moves to another team) and opt-in changes (flipped);
    - finally every touched agent is upserted with its original record.

    Returns the peak ``nbytes`` and the operations made.
    """
    rng = np.random.default_rng(seed)
    teams = sorted({a.team_id for a in agents[:200]})
    peak = fleet.nbytes
    ops = 0
    for start in range(0, hostile, 4):
        batch = [_hostile(k, teams[k % len(teams)], now) for k in range(start, start + 4)]
        for agent in batch:
            fleet.upsert(agent)
        peak = max(peak, fleet.nbytes)
        for agent in batch:
            fleet.remove(agent.agent_id)
        ops += 2 * len(batch)
    touched = rng.choice(len(agents), reconnects, replace=True)
    for k, i in enumerate(touched.tolist()):
        agent = agents[i]
        fleet.remove(agent.agent_id)
        if k % 10 == 0:
            agent = agent.model_copy(update={"labels": agent.labels | {f"session-{k}"}})
        fleet.upsert(agent)
        moved = agent.model_copy(update={"team_id": teams[k % len(teams)]})
        fleet.upsert(moved)
        flipped = moved.model_copy(update={"community_opt_in": not moved.community_opt_in})
        fleet.upsert(flipped)
        ops += 4
        peak = max(peak, fleet.nbytes)
    for i in sorted(set(touched.tolist())):
        fleet.upsert(agents[i])
        ops += 1
    return {"peak_nbytes": peak, "operations": ops}


def live_nbytes(fleet: Fleet) -> int:
    """Bytes the fleet's agents need: its columns' live rows and its indexes' live entries
    (``Fleet.nbytes`` also counts allocated room for more)."""
    with fleet.lock:
        columns = sum(column.nbytes for column in fleet.columns)
        teams = sum(fleet.team_rows(t).nbytes for t in range(len(fleet.teams)))
        return columns + teams + fleet.shared_rows().nbytes


def _state(fleet: Fleet) -> dict[str, int]:
    return {"nbytes": fleet.nbytes, "live_nbytes": live_nbytes(fleet),
            "label_words": fleet.columns.labels.shape[1],
            "model_words": fleet.columns.cached_models.shape[1]}  # fmt: skip


def test_churn(benchmark, quick):
    """A 100,000-agent fleet after thousands of hostile upserts and removes and ordinary churn,
    against an identical fleet that saw none: the same answers, pick time in turns (ratio of the
    churned fleet's to the fresh one's) and ``nbytes`` against its own before churn.

    The churn runs in two equal halves, so that memory kept after the first half (room the
    fleet allocated) can be told from memory that grows with churn.
    """
    base = cached_workload(QUICK_PICK_FLEET if quick else 100_000)
    assert base.agents is not None
    churned = Fleet.from_agents(base.agents)
    before = _state(churned)
    hostile, reconnects = (8, 50) if quick else (2_000, 5_000)

    def both_halves():
        first = churn(churned, base.agents, base.now, hostile // 2, reconnects // 2, seed=1)
        half = _state(churned)
        second = churn(churned, base.agents, base.now, hostile // 2, reconnects // 2, seed=2)
        ops = first["operations"] + second["operations"]
        return half, max(first["peak_nbytes"], second["peak_nbytes"]), ops

    start = time.perf_counter()
    half, peak, ops = benchmark.pedantic(both_halves, rounds=1, iterations=1)
    churn_s = time.perf_counter() - start
    after = _state(churned)
    for name, request in base.cases():
        got = pick_agent(churned, request, base.policy, base.now)
        assert got == pick_agent(base.fleet, request, base.policy, base.now), name
    requests = [r for mix in ("mixed", *MIXES) for r in base.requests(mix)]
    fleets = {"fresh": base.fleet, "churned": churned}
    times: dict[str, list[float]] = {k: [] for k in fleets}
    number = 1 if quick else 20
    for _ in range(1 if quick else 15):
        for name, fleet in fleets.items():
            t0 = time.perf_counter()
            for _, request in itertools.product(range(number), requests):
                pick_agent(fleet, request, base.policy, base.now)
            times[name].append((time.perf_counter() - t0) / number / len(requests))
    ratio = statistics.median(c / f for f, c in zip(times["fresh"], times["churned"], strict=True))
    benchmark.group = "churn"
    benchmark.extra_info.update(
        agents=len(churned), hostile=hostile, reconnects=reconnects, churn_s=churn_s,
        before=before, half=half, after=after, peak_nbytes=peak, operations=ops,
        nbytes_ratio=after["nbytes"] / before["nbytes"], pick_ratio=ratio,
        fresh_pick_s=statistics.median(times["fresh"]),
        churned_pick_s=statistics.median(times["churned"]), load_avg=os.getloadavg()[0],
    )  # fmt: skip
