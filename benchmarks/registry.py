"""One registry of pick implementations, used by the benchmarks and by tests/test_peers.py.

Each entry builds, from a fleet (and its agent records, for the plain-Python reference), a picker
``(request, policy, now) -> agent_id | None``. Building is never timed; a call is one pick. The
workload (seeded fleet, requests that check agreement, requests that are timed) lives here too, so
that tests and benchmarks check the same cases.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numba
import numpy as np

from benchmarks.peers.duckdb_peer import DuckDBPeer
from benchmarks.peers.memory_limit import MemoryLimit
from benchmarks.peers.numpy_peer import NumpyPeer
from benchmarks.peers.polars_peer import PolarsPeer
from scoring import _kernels as K
from scoring import reference
from scoring.fleet import Fleet
from scoring.layout import PER_CALL
from scoring.models import DEFAULT_POLICY, Agent, DispatchRequest, ScoringPolicy
from scoring.pick import CHUNKS_PER_THREAD, pick_agent
from scoring.query import build_query
from scoring.synthetic import NOW, synthetic_agents, synthetic_requests, team_ids

Picker = Callable[[DispatchRequest, ScoringPolicy, float], object]

#: The benchmarks' size ladder (agents per fleet); the largest is marked slow.
SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class Implementation:
    name: str
    # "engine" (the library), "peer" (what a user would write) or "limit" (no pick)
    kind: str
    make: Callable[[Fleet, list[Agent] | None], Picker]
    max_size: int | None = None  # larger fleets take too long per pick to time
    description: str = ""

    def fits(self, n: int) -> bool:
        return self.max_size is None or n <= self.max_size


def _engine(fleet: Fleet, agents: list[Agent] | None) -> Picker:
    return lambda request, policy, now: pick_agent(fleet, request, policy, now).agent_id


class _Kernel:
    """Calls a kernel with a query translated on first use (the kernel's time alone)."""

    def __init__(self, fleet: Fleet, parallel: bool) -> None:
        self.fleet, self.parallel = fleet, parallel
        self.chunks = numba.get_num_threads() * CHUNKS_PER_THREAD
        self.queries: dict[tuple, tuple] = {}

    def __call__(self, request, policy, now) -> str | None:
        key = (id(request), id(policy), now)
        found = self.queries.get(key)
        if found is None:
            with self.fleet.lock:
                q = build_query(self.fleet, request, policy, now)
            found = self.queries[key] = (request, policy, q, K.Query(*q))  # keeps ids alive
        c = self.fleet.columns
        if self.parallel:
            row = K._pick_parallel(c, found[3], self.chunks)[0]
        else:
            with self.fleet.lock:  # the fleet's scratch is used under its lock
                q = found[2]
                row = K._pick_records(c, *self.fleet.scratch(), q[:-PER_CALL], *q[-PER_CALL:])[0]
        return None if row < 0 else self.fleet.agent_id_at(row)


def _reference(fleet: Fleet, agents: list[Agent] | None) -> Picker:
    if agents is None:
        raise ValueError("the reference needs the agent records")
    return lambda request, policy, now: reference.pick_agent(agents, request, policy, now).agent_id


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("engine", "engine", _engine, description="pick_agent(), end to end"),
        Implementation("engine-kernel", "engine", lambda f, a: _Kernel(f, parallel=False),
                       description="_pick_records alone, serial, query prebuilt (lock included)"),
        Implementation("engine-parallel", "engine", lambda f, a: _Kernel(f, parallel=True),
                       description="_pick_parallel alone, all numba threads, query prebuilt"),
        Implementation("memory-limit", "limit", lambda f, a: MemoryLimit(f),
                       description="one read-only pass over the candidate rows' columns, serial"),
        Implementation("reference", "peer", _reference, max_size=100_000,
                       description="scoring.reference, plain Python over Agent records"),
        Implementation("numpy", "peer", lambda f, a: NumpyPeer(f),
                       description="vectorised numpy over the whole fleet as a table"),
        Implementation("polars", "peer", lambda f, a: PolarsPeer(f),
                       description="polars lazy query over a DataFrame copy"),
        Implementation("duckdb", "peer", lambda f, a: DuckDBPeer(f),
                       description="DuckDB SQL, ORDER BY score DESC, tiebreak LIMIT 1"),
    )
}  # fmt: skip
PICKERS = [impl for impl in IMPLEMENTATIONS.values() if impl.kind != "limit"]


@dataclass
class Workload:
    """A seeded fleet, its records (small fleets only) and the requests made against it."""

    fleet: Fleet
    agents: list[Agent] | None
    checks: dict[str, DispatchRequest]  # every implementation must agree on these
    timed: list[DispatchRequest]  # picks are timed over this cycle (team and community mixed)
    now: float = NOW
    policy: ScoringPolicy = DEFAULT_POLICY
    #: More timed cycles by kind (see :data:`MIXES`); every implementation must agree on them too.
    mixes: dict[str, list[DispatchRequest]] = field(default_factory=dict)

    def requests(self, mix: str = "mixed") -> list[DispatchRequest]:
        return self.timed if mix == "mixed" else self.mixes[mix]

    def cases(self) -> list[tuple[str, DispatchRequest]]:
        timed = [("mixed", self.timed), *self.mixes.items()]
        return [*self.checks.items(),
                *((f"{mix}-{i}", r) for mix, rs in timed for i, r in enumerate(rs))]  # fmt: skip

    @cached_property
    def expected(self) -> dict[str, str | None]:
        """The engine's answer to every case (``pick_agent``: the one the others must match)."""
        return {
            name: pick_agent(self.fleet, r, self.policy, self.now).agent_id
            for name, r in self.cases()
        }

    def disagreements(self, picker: Picker) -> dict[str, tuple[object, object]]:
        """``{case: (engine's agent, picker's agent)}`` for every case where they differ."""
        expected = self.expected
        got = {name: picker(r, self.policy, self.now) for name, r in self.cases()}
        return {k: (expected[k], got[k]) for k in expected if got[k] != expected[k]}

    def pool_sizes(self, mix: str) -> list[int]:
        """``Decision.considered`` of each request of a timed cycle."""
        return [pick_agent(self.fleet, r, self.policy, self.now).considered
                for r in self.requests(mix)]  # fmt: skip


#: Timed cycles besides "mixed" (8 requests each): "team", team-pool requests of teams drawn
#: uniformly (every team as likely to submit: the typical team); "team-busy", teams drawn in
#: proportion to their size (busy teams submit more: most picks read a large team);
#: "community", community-pool requests of teams drawn uniformly.
MIXES = ("team", "team-busy", "community")
#: Agents per team on average (1,000,000 agents in 10,000 teams, DESIGN section 7) and the share
#: of agents opted in to the community pool (30%, DESIGN section 7), at every size.
AGENTS_PER_TEAM = 100
COMMUNITY_SHARE = 0.3


def build_workload(n: int, seed: int = 0, keep_agents: bool = True) -> Workload:
    """The synthetic fleet of ``n`` agents and its requests (``scoring.synthetic`` shapes), with
    ``n / 100`` teams of Zipf-distributed sizes and 30% of agents opted in."""
    n_teams = max(4, n // AGENTS_PER_TEAM)
    agents = synthetic_agents(
        n, seed=seed, n_teams=n_teams, community_share=COMMUNITY_SHARE, validate=False
    )
    fleet = Fleet.from_agents(agents)
    teams = team_ids(n_teams, seed)  # synthetic_agents' teams, largest first
    timed = synthetic_requests(8, seed=seed, teams=teams[:8])
    rng = np.random.default_rng([seed, 3])
    sizes = np.array([len(fleet.team_rows(fleet.teams.get(t.int))) for t in teams], float)
    uniform = [teams[k] for k in rng.choice(n_teams, 8)]
    busy = [teams[k] for k in rng.choice(n_teams, 8, p=sizes / sizes.sum())]
    mixes = {
        "team": synthetic_requests(8, seed=seed + 1, teams=uniform, community_share=0.0),
        "team-busy": synthetic_requests(8, seed=seed + 2, teams=busy, community_share=0.0),
        "community": synthetic_requests(8, seed=seed + 3, teams=uniform, community_share=1.0),
    }
    return Workload(fleet, agents if keep_agents else None, check_requests(fleet, teams), timed,
                    mixes=mixes)  # fmt: skip


_CACHE: dict[int, Workload] = {}


def cached_workload(n: int) -> Workload:
    """:func:`build_workload` once per process and size (agent records kept up to 100,000).

    Shared by every benchmark of the session, so nothing may modify its fleet.
    """
    if n not in _CACHE:
        _CACHE[n] = build_workload(n, keep_agents=n <= 100_000)
    return _CACHE[n]


def check_requests(fleet: Fleet, teams: list[uuid.UUID]) -> dict[str, DispatchRequest]:
    """Named requests covering each kind of answer; ``teams`` largest first."""
    big, small = teams[0], teams[-1]
    key = "019abc12-9012-7890-abcd-ef1234567896"
    team = DispatchRequest(team_id=big, submitter_region="us-east", required_labels={"gpu"},
                           tie_key=key)  # fmt: skip
    winner = pick_agent(fleet, team, now=NOW).agent_id
    return {
        "team-pool": team,
        "community-pool": DispatchRequest(
            team_id=small, target_pool="community", submitter_region="eu-west",
            required_models={"checkpoints/model-00.safetensors"}, preferred_gpu="RTX_4090",
            tie_key=key + "c",
        ),
        "unknown-region": DispatchRequest(team_id=teams[1 % len(teams)], min_vram_gb=24.0,
                                          tie_key=key + "u"),
        "nerfstudio": DispatchRequest(team_id=big, target_pool="community",
                                      tool_type="nerfstudio", tie_key=key + "n"),
        "excluded-winner": DispatchRequest(
            **{**team.model_dump(), "exclude_agents": {winner} if winner else set()}
        ),
        "nobody-eligible": DispatchRequest(team_id=uuid.UUID(int=7), tie_key=key + "x"),
        "unknown-label": DispatchRequest(team_id=big, target_pool="community",
                                         required_labels={"gpu-b200"}, tie_key=key + "l"),
    }  # fmt: skip
