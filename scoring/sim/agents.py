"""Simulated agents: what each machine is, and the lifecycle it goes through.

An :class:`AgentSpec` is fixed for a run (GPU, slots, team, region, opt-in); a :class:`SimAgent`
is its changing state (connected or not, tasks on it, a least-recently-used model cache). The
lifecycle process connects the agent and syncs it, then, until it disconnects, gives it occasional
unhealthy spells and interactive tunnel sessions; a disconnected agent stops heartbeating (so it
turns stale in the fleet) and later reconnects. Every change reaches the fleet the way a
dispatcher sees it: ``upsert`` on connect, ``heartbeat`` for status and cache changes.
Lifecycle draws come from a per-agent random stream, so every policy sees the same events.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoring import Agent, AgentStatus
from scoring.sim.workload import SIM_REGIONS, Workload
from scoring.synthetic import GPUS, zipf_shares

#: Throughput of each GPU relative to the trace's hardware (speed 1.0 runs a task in its
#: recorded ``exec_time_seconds``); ratios follow public Stable Diffusion benchmarks roughly.
GPU_SPEED = {
    "gpu-rtx4090": 1.7, "gpu-rtx3090": 1.0, "gpu-rtx4080": 1.3, "gpu-a6000": 1.1,
    "gpu-l4": 0.7, "gpu-a10g": 0.8, "gpu-t4": 0.35, "gpu-a100": 1.9, "gpu-h100": 2.6,
}  # fmt: skip
BASE_LABELS = frozenset({"gpu", "comfyui"})


def team_uuid(team: int) -> uuid.UUID:
    """The UUID of simulated team ``team`` (stable across runs)."""
    return uuid.UUID(int=(0x5EED << 64) | (team + 1))


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What a simulated agent is (fixed for a run).

    ``failure_rate`` is both the share of its attempts that fail and what it reports.
    """

    agent_id: str
    team: int
    region: str | None
    gpu_model: str
    vram_gb: float
    speed: float
    capacity: int = 1
    community_opt_in: bool = False
    failure_rate: float = 0.0
    cache_size: int = 3
    initial_models: tuple[str, ...] = ()

    def record(self, now: float, status: AgentStatus, models: Sequence[str]) -> Agent:
        """The fleet record of a freshly (re)connected agent."""
        label = next((g[2] for g in GPUS if g[0] == self.gpu_model), None)
        return Agent(
            agent_id=self.agent_id,
            team_id=team_uuid(self.team),
            status=status,
            labels=BASE_LABELS | ({label} if label else set()),
            last_heartbeat=now,
            gpu_capacity=self.capacity,
            running_count=0,
            region=self.region,
            community_opt_in=self.community_opt_in,
            vram_gb=self.vram_gb,
            gpu_model=self.gpu_model,
            cached_models=frozenset(models),
            failure_rate=self.failure_rate,
        )


@dataclass(frozen=True)
class Lifecycle:
    """Rates and durations of agent events, in seconds (``math.inf`` between events: never).

    Durations are lognormal around the given median; gaps between events are exponential.
    """

    connect_spread_s: float = 60.0
    sync_s: float = 45.0
    unhealthy_every_s: float = 3 * 3600.0
    unhealthy_s: float = 120.0
    tunnel_every_s: float = 4 * 3600.0
    tunnel_s: float = 900.0
    disconnect_every_s: float = 4 * 3600.0
    down_s: float = 300.0
    heartbeat_s: float = 10.0

    @classmethod
    def steady(cls) -> Lifecycle:
        """Agents connect at time 0, ready at once, and nothing ever happens to them."""
        inf = math.inf
        return cls(0.0, 0.0, inf, 0.0, inf, 0.0, inf, 0.0)


@dataclass(eq=False)
class SimAgent:
    """The changing state of one agent during a run."""

    spec: AgentSpec
    index: int
    connected: bool = False
    epoch: int = 0  # bumped on every disconnect, so late events of an old connection are ignored
    attempts: set[Any] = field(default_factory=set)
    cache: OrderedDict[str, None] = field(default_factory=OrderedDict)
    loading: dict[str, float] = field(default_factory=dict)
    busy_slot_s: float = 0.0
    connected_slot_s: float = 0.0
    connected_since: float = 0.0
    disconnected_at: float = -math.inf

    def __post_init__(self) -> None:
        for model in self.spec.initial_models[-self.spec.cache_size :]:
            self.cache[model] = None

    @property
    def agent_id(self) -> str:
        return self.spec.agent_id

    def touch(self, model: str) -> bool:
        """Mark ``model`` as just used; ``False`` when it is not cached."""
        if model in self.cache:
            self.cache.move_to_end(model)
            return True
        return False

    def add_model(self, model: str) -> None:
        """Cache ``model`` as the most recently used, evicting the least recently used."""
        self.cache[model] = None
        self.cache.move_to_end(model)
        while len(self.cache) > self.spec.cache_size:
            self.cache.popitem(last=False)


def build_agents(
    n_agents: int,
    workload: Workload,
    seed: int = 0,
    opt_in_share: float = 0.3,
    cache_size: int = 3,
) -> list[AgentSpec]:
    """A seeded fleet for ``workload``: each team's slot-speed follows its share of the work.

    Every team gets at least one agent (so none of its team-pool tasks waits for ever), and each
    team's first agent has 24 GB or more (so its large-batch tasks can run). The other agents go,
    fastest first, to the team furthest below its share of the fleet's slot-speed, so that no
    team is overloaded by construction. 75% of a team's agents sit in its home region.
    Capacities are 1, 2 or 4 slots; one agent in ten is flaky (fails 10-30% of its attempts).
    Caches start with a few of the most popular models.
    """
    n_teams = workload.n_teams
    if n_agents < n_teams:
        raise ValueError(f"need at least one agent per team ({n_teams})")
    rng = np.random.default_rng([seed, 29])
    big = [i for i, g in enumerate(GPUS) if g[1] >= 24]
    gpu = rng.choice(len(GPUS), n_agents, p=zipf_shares(len(GPUS), 0.7))
    gpu[:n_teams] = rng.choice(big, n_teams)
    capacity = rng.choice([1, 1, 2, 2, 4], n_agents)
    power = capacity * np.array([GPU_SPEED[GPUS[g][2]] for g in gpu])
    demand = np.asarray(workload.team_demand, dtype=float)
    if not demand.sum() > 0:
        demand = np.ones(n_teams)
    target = demand / demand.sum() * power.sum()
    team = np.empty(n_agents, np.int64)
    team[:n_teams] = np.arange(n_teams)
    held = np.zeros(n_teams)
    np.add.at(held, team[:n_teams], power[:n_teams])
    rest = n_teams + np.argsort(-power[n_teams:], kind="stable")
    for i in rest:
        t = int(np.argmax(target - held))
        team[i], held[t] = t, held[t] + power[i]
    popular = workload.models[:8]
    specs = []
    for t in range(n_teams):
        for k, i in enumerate(np.flatnonzero(team == t)):
            g = GPUS[gpu[i]]
            home = rng.random() < 0.75
            region = workload.team_regions[t] if home else SIM_REGIONS[rng.integers(8)]
            flaky = rng.random() < 0.1
            failure = rng.uniform(0.1, 0.3) if flaky else rng.beta(1, 100)
            n_cached = min(int(rng.integers(0, cache_size + 1)), len(popular))
            cached = rng.choice(len(popular), n_cached, replace=False)
            specs.append(
                AgentSpec(
                    agent_id=f"t{t:02d}-gpu-{k:03d}",
                    team=t,
                    region=region,
                    gpu_model=g[0],
                    vram_gb=g[1],
                    speed=GPU_SPEED[g[2]],
                    capacity=int(capacity[i]),
                    community_opt_in=bool(rng.random() < opt_in_share),
                    failure_rate=round(float(failure), 4),
                    cache_size=cache_size,
                    initial_models=tuple(popular[j] for j in sorted(cached)),
                )
            )
    return specs


def lifecycle(env: Any, agent: SimAgent, sim: Any, life: Lifecycle, rng: np.random.Generator
              ) -> Generator[Any, Any, None]:  # fmt: skip
    """The simpy process of one agent: connect, sync, spells, disconnect, reconnect, forever.

    ``sim`` provides ``connect(agent)``, ``set_status(agent, status)`` (``None``: ready again)
    and ``disconnect(agent)``.
    """

    def lognormal(median: float) -> float:
        return float(median * rng.lognormal(0.0, 0.5)) if median > 0 else 0.0

    def gap(mean: float) -> float:
        return float(rng.exponential(mean)) if math.isfinite(mean) else math.inf

    if life.connect_spread_s > 0:
        yield env.timeout(float(rng.uniform(0, life.connect_spread_s)))
    while True:
        sim.connect(agent)
        sync = lognormal(life.sync_s)
        if sync > 0:
            yield env.timeout(sync)
        sim.set_status(agent, None)
        up_until = env.now + gap(life.disconnect_every_s)
        while True:
            unhealthy, tunnel = gap(life.unhealthy_every_s), gap(life.tunnel_every_s)
            wait = min(unhealthy, tunnel)
            if env.now + wait >= up_until:
                break
            yield env.timeout(wait)
            if unhealthy < tunnel:
                sim.set_status(agent, AgentStatus.UNHEALTHY)
                yield env.timeout(lognormal(life.unhealthy_s))
            else:
                sim.set_status(agent, AgentStatus.TUNNEL)
                yield env.timeout(lognormal(life.tunnel_s))
            sim.set_status(agent, None)
        if not math.isfinite(up_until):
            return  # never disconnects: nothing more happens to this agent
        yield env.timeout(max(up_until - env.now, 0.0))
        sim.disconnect(agent)
        yield env.timeout(lognormal(life.down_s))
