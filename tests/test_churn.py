"""Churn never grows the fleet nor ends its life (issue 9, defect 3; DESIGN section 5).

Names no agent uses any more are forgotten and their indices reused, and the label and model
bitsets narrow again, so thousands of hostile upserts and removes leave a fleet exactly as large
as the same sequence of updates without the hostile names; and there is no lifetime limit on the
regions or GPU models a fleet has seen, only on how many are alive at once (32,767 each).

Allocation slack (Fleet._prepare, Fleet._shrink): the columns hold between n and 4n rows (they
double when full and halve to 2n when below a quarter; at least 16), each team's index and the
community index likewise (at least 4 and 16 entries). So after churn that ends with the records it
started with, ``nbytes`` is back to its start up to that factor of 4 in capacity, and exactly
equal to that of a fleet that went through the same row, team and opt-in changes without the
churned names. Pick time as a ratio is measured by the benchmarks, not here.
"""

from __future__ import annotations

import random
import uuid

import pytest

from scoring import Agent, DispatchRequest, Fleet, ScoringPolicy, pick_agent
from scoring import reference as R
from scoring.fleet import UnknownAgentError
from tests.strategies import GPUS, LABELS, MODELS, NOW, REGIONS, check_fleet, fleet_state

# The kernels' bodies run here: `make test-nojit` runs these again as plain Python.
pytestmark = pytest.mark.kernels

TEAMS = [uuid.UUID(int=i + 1) for i in range(4)]
#: Documented allocation slack: capacity at most 4x what is live (see the module docstring).
SLACK = 4


def _base(n: int, seed: int = 0) -> list[Agent]:
    rng = random.Random(seed)
    return [
        Agent(
            agent_id=f"agent-{i:05d}",
            team_id=rng.choice(TEAMS),
            status=rng.choice(["idle", "idle", "busy", "syncing"]),
            labels={"comfyui", *rng.sample(LABELS, 2)},
            last_heartbeat=NOW - rng.choice([0.0, 5.0, 100.0]),
            gpu_capacity=2,
            running_count=rng.randint(0, 2),
            region=rng.choice([None, *REGIONS]),
            community_opt_in=rng.random() < 0.3,
            vram_gb=24.0,
            gpu_model=rng.choice(GPUS),
            cached_models=set(rng.sample(MODELS, 2)),
        )
        for i in range(n)
    ]


def _requests() -> list[DispatchRequest]:
    out = []
    for team in [*TEAMS, uuid.UUID(int=99)]:
        for pool in ("team", "community"):
            out.append(
                DispatchRequest(
                    team_id=team,
                    target_pool=pool,
                    submitter_region="us-east",
                    required_labels={LABELS[team.int % len(LABELS)]},
                    required_models={MODELS[0]},
                    preferred_gpu="a100",
                    tie_key=f"{team}-{pool}",
                )
            )
    return out


def _assert_picks_equal_reference(fleet: Fleet, agents: list[Agent]) -> None:
    policy = ScoringPolicy(tie_band=0.05)
    for request in _requests():
        got = pick_agent(fleet, request, policy, now=NOW)
        expected = R.pick_agent(agents, request, policy, now=NOW)
        assert (got.agent_id, got.score, got.rejected, got.considered, got.missing_labels) == (
            expected.agent_id,
            expected.score,
            expected.rejected,
            expected.considered,
            expected.missing_labels,
        )


class _Twin:
    """A fleet under hostile churn and its control: the same row, team and opt-in changes,
    but every record's names replaced by the base record's (or fixed ones for new agents)."""

    def __init__(self, base: list[Agent]) -> None:
        self.fleet = Fleet.from_agents(base)
        self.control = Fleet.from_agents(base)
        self.model = {a.agent_id: a for a in base}
        self.plain = {a.agent_id: a for a in base}

    def upsert(self, agent: Agent) -> None:
        nameless = {"labels": {"comfyui"}, "cached_models": (), "region": None, "gpu_model": None}
        plain = self.plain.get(agent.agent_id) or agent.model_copy(update=nameless)
        plain = plain.model_copy(
            update={"team_id": agent.team_id, "community_opt_in": agent.community_opt_in}
        )
        self.fleet.upsert(agent)
        self.control.upsert(plain)
        self.model[agent.agent_id] = agent
        self.plain.setdefault(agent.agent_id, plain)

    def remove(self, agent_id: str) -> None:
        self.fleet.remove(agent_id)
        self.control.remove(agent_id)
        del self.model[agent_id]


POOL_LABELS = [f"pool-label-{j}" for j in range(100)]
POOL_MODELS = [f"pool-model-{j}" for j in range(300)]
POOL_REGIONS = [f"pool-region-{j}" for j in range(20)]


def test_hostile_churn_gives_back_every_byte_and_word():
    rng = random.Random(9)
    base = _base(800)
    twin = _Twin(base)
    fleet = twin.fleet
    start = fleet.nbytes
    counter = iter(range(10**9))

    def fresh(prefix: str, k: int) -> set[str]:
        return {f"{prefix}-{next(counter)}" for _ in range(k)}

    for step in range(1000):
        kind = step % 4
        if kind == 0:  # a hostile newcomer: 64 fresh labels, 256 fresh models, new names
            agent = base[0].model_copy(
                update={
                    "agent_id": f"hostile-{step}",
                    "team_id": rng.choice([*TEAMS, uuid.UUID(int=1000 + step)]),
                    "labels": fresh("label", 63) | {"comfyui"},
                    "cached_models": fresh("model", 256),
                    "region": fresh("region", 1).pop(),
                    "gpu_model": fresh("gpu", 1).pop(),
                    "community_opt_in": rng.random() < 0.5,
                }
            )
            twin.upsert(agent)
        elif kind == 1:  # an existing agent changes team, opt-in and all of its names
            victim = rng.choice(base)
            team = rng.choice([*TEAMS, uuid.UUID(int=5000 + step)])
            # fresh names in a fresh team; in a lasting one, names of a bounded variety (a
            # team holds at most its share of the names at once: test_engine_defects)
            new_team = team not in TEAMS
            twin.upsert(
                victim.model_copy(
                    update={
                        "team_id": team,
                        "community_opt_in": not victim.community_opt_in,
                        "labels": (fresh("label", 20) if new_team
                                   else set(rng.sample(POOL_LABELS, 20))) | {"comfyui"},
                        "cached_models": fresh("model", 30) if new_team
                                         else set(rng.sample(POOL_MODELS, 30)),
                        "region": fresh("region", 1).pop() if new_team
                                  else rng.choice(POOL_REGIONS),
                    }
                )
            )  # fmt: skip
        elif kind == 2:  # a reconnect reports new cached models (every tenth a fresh one)
            victim = rng.choice(base)
            models = set(victim.cached_models) | (fresh("model", 1) if step % 10 == 2 else set())
            fleet.heartbeat(victim.agent_id, NOW, cached_models=models)
            plain_models = twin.plain[victim.agent_id].cached_models
            twin.control.heartbeat(victim.agent_id, NOW, cached_models=plain_models)
            twin.model[victim.agent_id] = twin.model[victim.agent_id].model_copy(
                update={"cached_models": models, "last_heartbeat": NOW}
            )
            twin.plain[victim.agent_id] = twin.plain[victim.agent_id].model_copy(
                update={"last_heartbeat": NOW}
            )
        else:  # the newcomers go; sometimes a base agent goes and comes back as it was
            for agent_id in [a for a in twin.model if a.startswith("hostile-")]:
                twin.remove(agent_id)
            victim = rng.choice(base)
            twin.remove(victim.agent_id)
            twin.upsert(victim)
        if step in (400, 401):  # mid-churn (bitsets several words wide), picks still agree
            assert fleet.columns.cached_models.shape[1] > 1 or step == 401
            _assert_picks_equal_reference(fleet, list(twin.model.values()))

    # back to the base records, each as it started
    for agent in base:
        twin.upsert(agent)
    for agent_id in [a for a in twin.model if a not in {b.agent_id for b in base}]:
        twin.remove(agent_id)
    final = sorted(fleet.agents(), key=lambda a: a.agent_id)
    assert final == sorted(base, key=lambda a: a.agent_id)
    check_fleet(fleet, {a.agent_id: a for a in base})  # names counted exactly, widths minimal
    assert fleet.columns.labels.shape[1] == 1 and fleet.columns.cached_models.shape[1] == 1
    # only the base's names are left (check_fleet counted them), and no table kept its peak
    assert len(fleet.labels) <= 64 and len(fleet.models) <= 64
    assert len(fleet.regions) <= 1 + len(REGIONS) and len(fleet.gpus) <= 1 + len(GPUS)
    assert len(fleet.teams) == len(TEAMS)  # the teams that came and went are forgotten
    # Memory: exactly what the same updates without the hostile names leave, and within the
    # documented slack of the start.
    assert fleet.nbytes == twin.control.nbytes
    assert start <= fleet.nbytes <= SLACK * start
    _assert_picks_equal_reference(fleet, base)


def test_regions_and_gpu_models_churn_past_32767_over_the_fleets_life():
    """Defect 3: after 32,767 distinct regions or GPU models had ever been seen, no new one was
    accepted, even by an empty fleet. Now only the live ones count."""
    base = _base(40, seed=1)
    fleet = Fleet.from_agents(base)
    roamer = base[0].model_copy(update={"agent_id": "roamer"})
    for i in range(33_000):  # one agent reconnecting from a new place with a new GPU each time
        fleet.upsert(
            Agent.model_construct(**{**dict(roamer), "region": f"r-{i}", "gpu_model": f"g-{i}"})
        )
        if i % 5000 == 0:
            fleet.remove("roamer")
    final = Agent.model_construct(**{**dict(roamer), "region": "r-32999", "gpu_model": "g-32999"})
    check_fleet(fleet, {**{a.agent_id: a for a in base}, "roamer": final})
    live = {a.region for a in base} - {None}
    # 0 = unknown, the base's, and the roamer's (its new region is taken before its old one
    # is given back, so the table is one longer at most)
    assert len(fleet.regions) <= len(live) + 3 and len(fleet.gpus) <= len(GPUS) + 3
    for agent in [*base, final]:
        fleet.remove(agent.agent_id)
    assert len(fleet) == 0 and len(fleet.regions) == 1 and len(fleet.gpus) == 1
    fleet.upsert(roamer.model_copy(update={"region": "brand-new", "gpu_model": "Brand New"}))
    assert fleet.get("roamer").region == "brand-new"
    _assert_picks_equal_reference(fleet, [fleet.get("roamer")])


def test_the_live_limit_is_32767_regions_and_a_freed_one_is_reused():
    """At most 32,767 regions alive at once (the column is int16): the next one is refused,
    changing nothing, and accepted as soon as one is freed. (Filling the table takes many
    teams: one team's agents use at most 64 regions, test_engine_defects.)"""
    agent = _base(1)[0]
    fields = dict(agent)
    agents = [
        Agent.model_construct(**{**fields, "agent_id": f"a{i}", "region": f"r-{i}",
                                 "team_id": uuid.UUID(int=10_000 + i // 64)})
        for i in range(32_767)
    ]  # fmt: skip
    fleet = Fleet.from_agents(agents)
    assert fleet.regions.live == 32_767
    before = fleet_state(fleet)
    newcomer = agent.model_copy(update={"agent_id": "new", "region": "one-too-many"})
    with pytest.raises(ValueError, match="at most 32767"):
        fleet.upsert(newcomer)
    with pytest.raises(ValueError, match="at most 32767"):
        fleet.upsert(newcomer.model_copy(update={"agent_id": "a5"}))  # an update as well
    assert fleet_state(fleet) == before
    with pytest.raises(UnknownAgentError):
        fleet.get("new")
    fleet.remove("a123")
    fleet.upsert(newcomer)
    assert fleet.regions.get("one-too-many") >= 1 and fleet.get("new") == newcomer
