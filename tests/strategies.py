"""Hypothesis strategies for fleets, requests and policies, with physically meaningful bounds.

Values are drawn from small pools so that collisions the rules care about happen often: agents of
the submitting team, shared regions, exact score ties, heartbeats right at the timeout. A separate
"wide" label/model alphabet pushes the fleet's bitsets past one 64-bit word.
"""

from __future__ import annotations

import random
import uuid

from hypothesis import strategies as st

from scoring.models import FACTORS, Agent, AgentStatus, DispatchRequest, ScoringPolicy

NOW = 1_000_000.0
TEAMS = [uuid.UUID(int=i + 1) for i in range(3)]
FOREIGN_TEAM = uuid.UUID(int=99)
REGIONS = ["us-east", "us-west", "eu-west", "ap-south"]
LABELS = ["gpu", "comfyui", "nerfstudio", "sdxl", "gpu-h100", "fp8"]
WIDE_LABELS = [f"feature-{i}" for i in range(80)]  # more than one bitset word
MODELS = [f"models/m{i}.safetensors" for i in range(5)]
WIDE_MODELS = [f"models/wide-{i}.ckpt" for i in range(70)]
GPUS = ["NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "Tesla T4"]
# Requests also ask for labels and models that no agent has, or only agents of a wide fleet have.
REQUIRED_LABELS = [*LABELS, "never-seen", WIDE_LABELS[70]]
REQUIRED_MODELS = [*MODELS, WIDE_MODELS[66], "models/new"]
PREFERRED_GPUS = ["RTX_4090", "a100", "H100", "t4", "RTX 3090"]

regions = st.one_of(st.none(), st.sampled_from(REGIONS), st.just("  US-East "))
heartbeat_ages = st.one_of(
    st.sampled_from([0.0, 29.999, 30.0, 30.001, 31.0, 600.0]),
    st.floats(0, 120, allow_nan=False),
)


@st.composite
def name_sets(draw, pool: list[str], wide_pool: list[str], wide: bool) -> frozenset[str]:
    """A few names from ``pool``; from a wide fleet, also a few of the ``wide_pool``."""
    names = draw(st.sets(st.sampled_from(pool), max_size=len(pool) - 1))
    if wide:
        names |= draw(st.sets(st.sampled_from(wide_pool), max_size=6))
    return frozenset(names)


@st.composite
def agents(draw, agent_id: str, wide: bool = False) -> Agent:
    capacity = draw(st.integers(1, 4))
    return Agent(
        agent_id=agent_id,
        team_id=draw(st.sampled_from(TEAMS)),
        status=draw(st.sampled_from(list(AgentStatus))),
        labels=draw(name_sets(LABELS, WIDE_LABELS, wide)),
        last_heartbeat=NOW - draw(heartbeat_ages),
        gpu_capacity=capacity,
        running_count=draw(st.integers(0, capacity + 1)),
        region=draw(regions),
        community_opt_in=draw(st.booleans()),
        vram_gb=draw(st.sampled_from([None, 8.0, 16.0, 24.0, 24.5, 80.0])),
        gpu_model=draw(st.one_of(st.none(), st.sampled_from(GPUS))),
        cached_models=draw(name_sets(MODELS, WIDE_MODELS, wide)),
        failure_rate=draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0, 1))),
    )


@st.composite
def agent_lists(draw, min_size: int = 0, max_size: int = 60) -> list[Agent]:
    """Agents with unique ids; small pools of every field, so ties and collisions are common."""
    n = draw(st.integers(min_size, max_size))
    wide = draw(st.booleans())
    return [draw(agents(f"agent-{i:03d}", wide)) for i in range(n)]


@st.composite
def seeded_agent_lists(draw, min_size: int = 100, max_size: int = 300) -> list[Agent]:
    """Larger fleets from the same pools, drawn by a seeded generator (a few hundred agents
    exceed what Hypothesis should draw field by field; shrinking then works on seed and size)."""
    n = draw(st.integers(min_size, max_size))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    wide = rng.random() < 0.5
    fleet = []
    for i in range(n):
        capacity = rng.randint(1, 4)
        labels = set(rng.sample(LABELS, rng.randint(0, 5)))
        models = set(rng.sample(MODELS, rng.randint(0, 4)))
        if wide:
            labels |= set(rng.sample(WIDE_LABELS, rng.randint(0, 6)))
            models |= set(rng.sample(WIDE_MODELS, rng.randint(0, 4)))
        fleet.append(
            Agent(
                agent_id=f"agent-{i:03d}",
                team_id=rng.choice(TEAMS),
                status=rng.choice(list(AgentStatus)),
                labels=labels,
                last_heartbeat=NOW - rng.choice([0.0, 5.0, 30.0, 30.5, 100.0]),
                gpu_capacity=capacity,
                running_count=rng.randint(0, capacity + 1),
                region=rng.choice([None, *REGIONS]),
                community_opt_in=rng.random() < 0.3,
                vram_gb=rng.choice([None, 8.0, 16.0, 24.0, 80.0]),
                gpu_model=rng.choice([None, *GPUS]),
                cached_models=models,
                failure_rate=rng.choice([0.0, 0.1, rng.random()]),
            )
        )
    return fleet


@st.composite
def requests(draw, agent_ids: list[str] | None = None) -> DispatchRequest:
    excluded = draw(st.sets(st.sampled_from(agent_ids), max_size=3)) if agent_ids else set()
    if draw(st.booleans()):
        excluded = excluded | {"not-in-fleet"}
    return DispatchRequest(
        team_id=draw(st.sampled_from([*TEAMS, FOREIGN_TEAM])),
        target_pool=draw(st.sampled_from(["team", "community"])),
        submitter_region=draw(regions),
        tool_type=draw(st.sampled_from(["comfyui", "nerfstudio"])),
        required_labels=draw(st.sets(st.sampled_from(REQUIRED_LABELS), max_size=2)),
        min_vram_gb=draw(st.sampled_from([None, None, 16.0, 24.0, 24.25])),
        preferred_gpu=draw(st.one_of(st.none(), st.sampled_from(PREFERRED_GPUS))),
        required_models=draw(st.sets(st.sampled_from(REQUIRED_MODELS), max_size=3)),
        exclude_agents=excluded,
        tie_key=draw(st.text(max_size=12)),
    )


weight_values = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.floats(0, 10))


@st.composite
def policies(draw) -> ScoringPolicy:
    weights = {f: draw(weight_values) for f in FACTORS}
    if not any(weights.values()):
        weights[draw(st.sampled_from(FACTORS))] = 1.0
    pairs = draw(
        st.dictionaries(
            st.tuples(st.sampled_from(REGIONS), st.sampled_from(REGIONS)).filter(
                lambda p: p[0] < p[1]
            ),
            st.floats(0, 1),
            max_size=3,
        )
    )
    return ScoringPolicy(
        weights=weights,
        heartbeat_timeout_s=draw(st.sampled_from([30.0, 10.0, 60.0])),
        region_affinity=pairs,
        tie_band=draw(st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.1])),
    )


@st.composite
def scenarios(draw, min_agents: int = 0, max_agents: int = 60):
    """``(agents, request, policy)``; fleets above 60 agents come from a seeded generator."""
    if max_agents > 60:
        fleet = draw(seeded_agent_lists(min_agents, max_agents))
    else:
        fleet = draw(agent_lists(min_agents, max_agents))
    request = draw(requests([a.agent_id for a in fleet]))
    return fleet, request, draw(policies())
