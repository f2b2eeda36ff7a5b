"""One simulated run: a fleet, a workload and a policy, wired together on a simpy clock.

:func:`simulate` runs one policy; :func:`compare` runs several on the identical workload, fleet,
agent lifecycle and random draws (common random numbers), so that their metrics differ only
because of the policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import simpy
from tqdm import tqdm

from scoring import AgentStatus, Fleet, ScoringPolicy
from scoring.sim import trace as trace_mod
from scoring.sim.agents import AgentSpec, Lifecycle, SimAgent, build_agents, lifecycle
from scoring.sim.catalog import make_policy
from scoring.sim.dispatcher import Dispatcher, TaskState
from scoring.sim.metrics import TaskLog, summarize
from scoring.sim.policies import POLICY_NAMES, Policy
from scoring.sim.view import FleetView
from scoring.sim.workload import Workload, continent, same_continent_affinity, synthetic_workload
from scoring.synthetic import NOW

#: Simulated time 0 in seconds since the epoch (a fixed date, so runs are reproducible).
EPOCH = NOW
#: Random draws kept per task for successive attempts (load delay, failure, failure point).
_DRAWS = 8


@dataclass(frozen=True)
class Transfer:
    """Delay before a run can start on an agent, by where it is from the submitter (seconds):
    inputs go up and the first outputs come back across that distance."""

    same: float = 0.0
    near: float = 1.5  # same continent
    far: float = 5.0
    unknown: float = 2.5

    def delay(self, submitter: str | None, agent: str | None) -> float:
        if submitter is None or agent is None:
            return self.unknown
        if submitter == agent:
            return self.same
        return self.near if continent(submitter) == continent(agent) else self.far


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines a run except the policy.

    ``compress`` divides the gaps between arrivals; ``None`` picks the factor that makes the
    offered load (work over the arrival span, divided by the fleet's slot-speed) equal ``load``.
    With ``trace`` the tasks are the trace's (``n_tasks`` rows after ``trace_skip``), else the
    synthetic workload. Model loads take ``load_delay_s`` when given, else a draw from the
    ``latencies`` archive (default: the one beside the trace), else a lognormal with the trace's
    median. ``weights`` (``None``: the engine's defaults) feed the scorer's ``ScoringPolicy``;
    so does ``locality_wait_s`` (``None``: the engine's default), which is also the waiting budget
    of the ``delay`` anchor (:meth:`wait_budget`).
    """

    n_agents: int = 120
    n_tasks: int | None = 20_000  # None: every finished request of the trace
    seed: int = 0
    n_teams: int = 16
    load: float = 0.3
    compress: float | None = None
    trace: str | Path | None = None
    trace_skip: int = 0
    latencies: str | Path | None = None
    load_delay_s: float | None = None
    community_share: float = 0.3
    opt_in_share: float = 0.3
    cache_size: int = 3
    weights: Mapping[str, float] | None = None
    locality_wait_s: float | None = None
    affinity: float = 0.6
    tie_band: float = 0.0
    heartbeat_timeout_s: float = 30.0
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    transfer: Transfer = field(default_factory=Transfer)
    warmup_s: float = 120.0
    drain_s: float = 6 * 3600.0

    def scoring_policy(self) -> ScoringPolicy:
        kwargs: dict[str, Any] = {} if self.weights is None else {"weights": dict(self.weights)}
        if self.locality_wait_s is not None:
            kwargs["locality_wait_s"] = self.locality_wait_s
        return ScoringPolicy(
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            region_affinity=same_continent_affinity(value=self.affinity),
            tie_band=self.tie_band,
            **kwargs,
        )

    def wait_budget(self) -> float:
        """Seconds a task may be held back for a warm agent: ``locality_wait_s``, else the
        engine's default."""
        return self.scoring_policy().locality_wait_s

    def make_policy(self, name: str) -> Policy:
        """The policy ``name`` configured for this run."""
        return make_policy(name, self.scoring_policy(), self.seed, self.wait_budget())


@dataclass
class SimResult:
    """One policy's run: its metrics and the raw log they came from."""

    policy: str
    metrics: dict[str, float]
    log: TaskLog
    workload: Workload
    agents: list[AgentSpec]


def prepare(config: SimConfig) -> tuple[Workload, list[AgentSpec]]:
    """The workload (arrivals compressed and shifted past the warm-up) and the fleet's agents."""
    if config.trace is not None:
        workload = trace_mod.load_trace(
            config.trace,
            n_teams=config.n_teams,
            limit=config.n_tasks,
            skip=config.trace_skip,
            seed=config.seed,
            community_share=config.community_share,
        )
    elif config.n_tasks is None:
        raise ValueError("n_tasks=None (the whole trace) needs a trace")
    else:
        workload = synthetic_workload(
            config.n_tasks, config.seed, config.n_teams, community_share=config.community_share
        )
    agents = build_agents(
        config.n_agents, workload, config.seed, config.opt_in_share, config.cache_size
    )
    factor = config.compress
    if factor is None:
        capacity = sum(a.capacity * a.speed for a in agents)
        span, work = workload.span_s, workload.work_s
        factor = config.load * span * capacity / work if span > 0 and work > 0 else 1.0
    workload = workload.compressed(factor)
    if workload.tasks:
        shift = config.warmup_s - workload.tasks[0].arrival
        workload = replace(
            workload, tasks=tuple(replace(t, arrival=t.arrival + shift) for t in workload.tasks)
        )
    return workload, agents


def simulate(
    config: SimConfig,
    policy: str | Policy = "scorer",
    workload: Workload | None = None,
    agents: list[AgentSpec] | None = None,
    progress: bool = False,
) -> SimResult:
    """Run ``policy`` (a name from ``POLICY_NAMES`` or a policy object) and measure it.

    ``workload`` and ``agents`` default to :func:`prepare`'s; pass them to compare policies or
    weights on exactly the same input.
    """
    if workload is None or agents is None:
        w, a = prepare(config)
        workload, agents = workload or w, agents or a
    chosen = config.make_policy(policy) if isinstance(policy, str) else policy
    run = _Run(config, workload, agents, chosen, progress)
    log = run.run()
    tasks = workload.tasks
    arrival = np.array([t.arrival for t in tasks])
    service = np.array([t.service_s for t in tasks])
    team = np.array([t.team for t in tasks], dtype=np.int64)
    metrics = summarize(log, arrival, service, team, workload.n_teams)
    return SimResult(chosen.name, metrics, log, workload, agents)


def compare(
    config: SimConfig,
    policies: Iterable[str | Policy] = POLICY_NAMES,
    progress: bool = False,
) -> dict[str, SimResult]:
    """Run every policy on the same workload and fleet; results keyed by policy name."""
    workload, agents = prepare(config)
    results = {}
    for policy in policies:
        result = simulate(config, policy, workload, agents, progress)
        results[result.policy] = result
    return results


class _Run:
    """The simpy wiring of one run (see the module docstrings of ``agents`` and ``dispatcher``)."""

    def __init__(
        self,
        config: SimConfig,
        workload: Workload,
        specs: list[AgentSpec],
        policy: Policy,
        progress: bool,
    ) -> None:
        self.config, self.workload, self.policy = config, workload, policy
        self.env = simpy.Environment()
        self.fleet = Fleet()
        self.agents = [SimAgent(spec, i) for i, spec in enumerate(specs)]
        self.by_id = {a.agent_id: a for a in self.agents}
        self.live: dict[str, None] = {}  # connected agents, which heartbeat
        n = len(workload.tasks)
        self.log = TaskLog(n)
        self.view = FleetView()
        policy.bind(self.view, config.transfer.delay)
        self.dispatcher = Dispatcher(
            self.fleet, policy, self.clock, self.start, self._wake, self.view.free_slots
        )
        self._draw(n)
        self.remaining = n
        self.done = self.env.event()
        self.bar = tqdm(total=n, desc=policy.name, disable=not progress, leave=True)

    def _draw(self, n: int) -> None:
        c = self.config
        rng = np.random.default_rng([c.seed, 31])
        self.fail_u = rng.random((n, _DRAWS))
        self.fail_at = rng.uniform(0.1, 1.0, (n, _DRAWS))
        if c.load_delay_s is not None:
            self.load_s = np.full((n, _DRAWS), float(c.load_delay_s))
            return
        path = c.latencies
        if path is None and c.trace is not None:
            path = trace_mod.latency_file(c.trace)
        if path is not None:
            self.load_s = rng.choice(trace_mod.load_latencies(path), (n, _DRAWS))
        else:
            median, sigma = trace_mod.LOAD_MEDIAN_S, trace_mod.LOAD_SIGMA
            self.load_s = rng.lognormal(math.log(median), sigma, (n, _DRAWS))

    def clock(self) -> float:
        return EPOCH + self.env.now

    def _wake(self, at: float) -> None:
        """Call the dispatcher's ``expire`` at ``at`` (seconds since the epoch)."""
        delay = max(at - self.clock(), 0.0)
        self.env.timeout(delay).callbacks.append(lambda _: self.dispatcher.expire(at))

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> TaskLog:
        env, c = self.env, self.config
        for agent in self.agents:
            rng = np.random.default_rng([c.seed, 23, agent.index])
            env.process(lifecycle(env, agent, self, c.lifecycle, rng))
        env.process(self._heartbeats())
        env.process(self._arrivals())
        tasks = self.workload.tasks
        horizon = (tasks[-1].arrival if tasks else 0.0) + c.drain_s
        if self.remaining == 0:
            self.done.succeed()
        began = time.perf_counter()
        env.run(until=self.done | env.timeout(horizon))
        self.log.wall_s = time.perf_counter() - began
        self.bar.close()
        self._close_books()
        return self.log

    def _arrivals(self) -> Any:
        env = self.env
        for task in self.workload.tasks:
            if task.arrival > env.now:
                yield env.timeout(task.arrival - env.now)
            self.dispatcher.submit(TaskState(task, submitted=self.clock()))

    def _heartbeats(self) -> Any:
        period = self.config.lifecycle.heartbeat_s
        while True:
            if self.live:
                self.fleet.heartbeat_many(list(self.live), self.clock())
            yield self.env.timeout(period)

    def _close_books(self) -> None:
        log, now = self.log, self.env.now
        log.sim_end_s = now
        log.picks = self.dispatcher.picks
        log.deferrals = self.dispatcher.deferrals
        for agent in self.agents:
            if agent.connected:
                agent.connected_slot_s += (now - agent.connected_since) * agent.spec.capacity
            # still running: count their time so far, in a fixed order (a set of attempts
            # iterates by address, and the sum's last bit moved between identical runs)
            for attempt in sorted(agent.attempts, key=_by_task):
                if attempt.alive:
                    agent.busy_slot_s += now - attempt.dispatched
            log.busy_slot_s += agent.busy_slot_s
            log.connected_slot_s += agent.connected_slot_s

    # --- the agent side (called by agents.lifecycle) -----------------------------------------

    def connect(self, agent: SimAgent) -> None:
        self._lose_attempts(agent)  # the agent restarted: whatever it was running is gone
        agent.connected, agent.connected_since = True, self.env.now
        spec = agent.spec
        self.fleet.upsert(spec.record(self.clock(), AgentStatus.SYNCING, list(agent.cache)))
        self.view.connect(
            spec.agent_id, spec.capacity, spec.region, spec.cache_size, spec.team,
            spec.community_opt_in, agent.cache,
        )  # fmt: skip
        self.live[agent.agent_id] = None

    def set_status(self, agent: SimAgent, status: AgentStatus | None) -> None:
        """Report a status; ``None`` means ready again (busy when it holds tasks, else idle)."""
        if status is None:
            status = AgentStatus.BUSY if agent.attempts else AgentStatus.IDLE
        self.fleet.heartbeat(agent.agent_id, self.clock(), status=status)
        ready = status in (AgentStatus.IDLE, AgentStatus.BUSY)
        self.view.set_ready(agent.agent_id, ready)
        if ready:
            self.dispatcher.kick(agent.spec.team, agent.spec.community_opt_in)

    def disconnect(self, agent: SimAgent) -> None:
        """Heartbeats stop; the platform notices once the record turns stale."""
        env = self.env
        agent.connected = False
        agent.epoch += 1
        agent.connected_slot_s += (env.now - agent.connected_since) * agent.spec.capacity
        agent.loading.clear()
        del self.live[agent.agent_id]
        for attempt in sorted(agent.attempts, key=_by_task):  # a fixed order of the sum
            attempt.alive = False  # it will never finish
            agent.busy_slot_s += env.now - attempt.dispatched
        last = self.fleet.get(agent.agent_id).last_heartbeat - EPOCH
        stale_at = last + self.config.heartbeat_timeout_s + 1e-6
        epoch = agent.epoch
        env.timeout(max(stale_at - env.now, 0.0)).callbacks.append(
            lambda _: self._stale(agent, epoch)
        )

    def _stale(self, agent: SimAgent, epoch: int) -> None:
        if agent.epoch == epoch and not agent.connected:
            self._lose_attempts(agent)

    def _lose_attempts(self, agent: SimAgent) -> None:
        lost = sorted(agent.attempts, key=_by_task)
        agent.attempts.clear()
        for attempt in lost:
            attempt.alive = False
            self.log.lost_attempts += 1
            self.dispatcher.requeue(attempt.state, agent.agent_id)

    # --- running tasks -----------------------------------------------------------------------

    def start(self, state: TaskState, agent_id: str) -> None:
        """Run ``state`` on ``agent_id``, whose slot the policy has just reserved."""
        env, task, log = self.env, state.task, self.log
        agent = self.by_id[agent_id]
        k = state.attempts % _DRAWS
        state.attempts += 1
        log.attempts[task.task_id] = state.attempts
        log.placements.append((task.task_id, agent.index))
        attempt = _Attempt(state, agent, env.now)
        agent.attempts.add(attempt)
        if not agent.connected:
            return  # a silent agent still looks alive: the task is lost when it turns stale
        ready = env.now
        if task.model is not None:
            log.attempts_with_model += 1
            if not agent.touch(task.model):
                attempt.cold = True
                log.cold_attempts += 1
                ready = agent.loading.get(task.model, math.nan)
                if math.isnan(ready):  # not already being loaded by another task
                    ready = env.now + float(self.load_s[task.task_id, k])
                    agent.loading[task.model] = ready
                    env.timeout(ready - env.now).callbacks.append(
                        partial(self._loaded, agent, task.model, agent.epoch)
                    )
        transfer = self.config.transfer.delay(task.region, agent.spec.region)
        run_s = task.service_s / agent.spec.speed
        attempt.failed = bool(self.fail_u[task.task_id, k] < agent.spec.failure_rate)
        if attempt.failed:
            run_s *= float(self.fail_at[task.task_id, k])
        attempt.end = max(env.now + transfer, ready) + run_s
        env.timeout(attempt.end - env.now).callbacks.append(partial(self._finish, attempt))

    def _loaded(self, agent: SimAgent, model: str, epoch: int, _: Any) -> None:
        if agent.epoch != epoch:
            return  # the agent disconnected while loading
        agent.loading.pop(model, None)
        agent.add_model(model)
        # The agent reports its new cache; its last heartbeat time stays as it was.
        last = self.fleet.get(agent.agent_id).last_heartbeat
        self.fleet.heartbeat(agent.agent_id, last, cached_models=agent.cache)
        self.view.report_cache(agent.agent_id, agent.cache)
        if self.policy.wait_s > 0:  # a task held back for this model may start here now
            self.dispatcher.kick(agent.spec.team, agent.spec.community_opt_in)

    def _finish(self, attempt: _Attempt, _: Any) -> None:
        if not attempt.alive:
            return
        agent, state, log = attempt.agent, attempt.state, self.log
        agent.attempts.discard(attempt)
        agent.busy_slot_s += attempt.end - attempt.dispatched
        self.fleet.release(agent.agent_id)
        self.view.release(agent.agent_id)
        if attempt.failed:
            log.failed_attempts += 1
            self.dispatcher.requeue(state, agent.agent_id)
        else:
            self._complete(attempt)
        self.dispatcher.kick(agent.spec.team, agent.spec.community_opt_in)

    def _complete(self, attempt: _Attempt) -> None:
        task, agent, log = attempt.state.task, attempt.agent, self.log
        i = task.task_id
        log.completions[i] += 1
        log.start[i] = attempt.dispatched
        log.end[i] = attempt.end
        log.agent[i] = agent.index
        log.run_s[i] = task.service_s / agent.spec.speed
        log.cold[i] = attempt.cold
        if task.region is not None and agent.spec.region is not None:
            log.region_match[i] = task.region == agent.spec.region
        self.bar.update()
        self.remaining -= 1
        if self.remaining == 0:
            self.done.succeed()


@dataclass(eq=False, slots=True)
class _Attempt:
    state: TaskState
    agent: SimAgent
    dispatched: float
    end: float = math.nan
    alive: bool = True
    cold: bool = False
    failed: bool = False


def _by_task(attempt: _Attempt) -> int:
    return attempt.state.seq
