"""Seeded synthetic fleets and dispatch requests shared by tests, benchmarks and notebooks.

The shapes follow what a BYOC GPU platform sees: many teams of skewed size, a minority of agents
opted in to the community pool, a dozen regions, a few dozen labels and cached models, mixed
statuses and loads, and a few agents whose heartbeats have stopped.
"""

from __future__ import annotations

import uuid

import numpy as np

from scoring.models import Agent, AgentStatus, DispatchRequest

REGIONS = (
    "us-east", "us-west", "us-central", "ca-central", "sa-east", "eu-west",
    "eu-central", "eu-north", "ap-south", "ap-northeast", "ap-southeast", "af-south",
)  # fmt: skip
#: (gpu_model, vram_gb, label)
GPUS = (
    ("NVIDIA GeForce RTX 4090", 24.0, "gpu-rtx4090"),
    ("NVIDIA GeForce RTX 3090", 24.0, "gpu-rtx3090"),
    ("NVIDIA GeForce RTX 4080", 16.0, "gpu-rtx4080"),
    ("NVIDIA RTX A6000", 48.0, "gpu-a6000"),
    ("NVIDIA L4", 24.0, "gpu-l4"),
    ("NVIDIA A10G", 24.0, "gpu-a10g"),
    ("NVIDIA T4", 16.0, "gpu-t4"),
    ("NVIDIA A100-SXM4-80GB", 80.0, "gpu-a100"),
    ("NVIDIA H100 80GB HBM3", 80.0, "gpu-h100"),
)
FEATURE_LABELS = (
    "sdxl", "sd15", "flux", "video", "controlnet", "lora", "upscale", "inpaint", "fp8", "bf16",
    "cuda12", "cuda11", "linux", "windows", "nvme", "high-mem", "spot", "on-prem",
)  # fmt: skip
MODELS = tuple(f"checkpoints/model-{i:02d}.safetensors" for i in range(40))
STATUS_SHARES = {
    AgentStatus.IDLE: 0.55,
    AgentStatus.BUSY: 0.30,
    AgentStatus.SYNCING: 0.05,
    AgentStatus.TUNNEL: 0.05,
    AgentStatus.UNHEALTHY: 0.05,
}
NOW = 1_750_000_000.0  # a fixed "now" so that seeded fleets are fully reproducible


def team_ids(n_teams: int, seed: int = 0) -> list[uuid.UUID]:
    """``n_teams`` reproducible team UUIDs."""
    rng = np.random.default_rng([seed, 1])
    return [uuid.UUID(bytes=rng.bytes(16), version=4) for _ in range(n_teams)]


def zipf_shares(n: int, exponent: float = 1.1) -> np.ndarray:
    """Probabilities ``~ 1 / rank**exponent`` over ``n`` items (skewed sizes, popularity)."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def synthetic_agents(
    n: int,
    seed: int = 0,
    n_teams: int | None = None,
    community_share: float = 0.2,
    stale_share: float = 0.03,
    now: float = NOW,
    validate: bool = True,
) -> list[Agent]:
    """A seeded fleet of ``n`` agents (see the module docstring for its shape).

    ``validate=False`` builds the records with ``Agent.model_construct`` (every value here is
    already normalised), which is what makes million-agent benchmark fleets quick to build.
    """
    rng = np.random.default_rng(seed)
    teams = team_ids(n_teams or max(4, n // 40), seed)
    team = rng.choice(len(teams), n, p=zipf_shares(len(teams)))
    statuses = list(STATUS_SHARES)
    status = rng.choice(len(statuses), n, p=list(STATUS_SHARES.values()))
    gpu = rng.choice(len(GPUS), n, p=zipf_shares(len(GPUS), 0.7))
    capacity = rng.choice([1, 1, 2, 4, 8], n)
    running = np.minimum((rng.random(n) * (capacity + 1)).astype(int), capacity)
    region = rng.integers(-1, len(REGIONS), n)  # -1: unknown region
    age = np.where(rng.random(n) < stale_share, rng.uniform(31, 600, n), rng.uniform(0, 25, n))
    opt_in = rng.random(n) < community_share
    failure = np.round(rng.beta(1, 30, n), 4)
    nerfstudio = rng.random(n) < 0.15
    unknown_vram = rng.random(n) < 0.02
    unknown_model = rng.random(n) < 0.02
    features = rng.random((n, len(FEATURE_LABELS))) < 2 / len(FEATURE_LABELS)
    cached = rng.random((n, len(MODELS))) < 2.5 * zipf_shares(len(MODELS), 0.8)
    make = Agent if validate else Agent.model_construct
    agents = []
    for i in range(n):
        model, vram, gpu_label = GPUS[gpu[i]]
        labels = {"gpu", gpu_label, "comfyui"}
        if nerfstudio[i]:
            labels.add("nerfstudio")
        labels.update(FEATURE_LABELS[f] for f in np.flatnonzero(features[i]))
        agents.append(
            make(
                agent_id=f"gpu-node-{i:07d}",
                team_id=teams[team[i]],
                status=statuses[status[i]],
                labels=frozenset(labels),
                last_heartbeat=float(now - age[i]),
                gpu_capacity=int(capacity[i]),
                running_count=int(running[i]),
                region=None if region[i] < 0 else REGIONS[region[i]],
                community_opt_in=bool(opt_in[i]),
                vram_gb=None if unknown_vram[i] else vram,
                gpu_model=None if unknown_model[i] else model,
                cached_models=frozenset(MODELS[m] for m in np.flatnonzero(cached[i])),
                failure_rate=float(failure[i]),
            )
        )
    return agents


def synthetic_requests(
    n: int,
    seed: int = 0,
    teams: list[uuid.UUID] | None = None,
    community_share: float = 0.3,
) -> list[DispatchRequest]:
    """``n`` seeded requests: team and community pools, known and unknown regions, some labels,
    VRAM minimums, GPU preferences and required models (Zipf-popular)."""
    rng = np.random.default_rng([seed, 2])
    teams = teams or team_ids(8, seed)
    model_p = zipf_shares(len(MODELS))
    requests = []
    for _ in range(n):
        labels = {"gpu"}
        if rng.random() < 0.3:
            labels.add(str(rng.choice(FEATURE_LABELS)))
        gpu = GPUS[rng.integers(len(GPUS))]
        requests.append(
            DispatchRequest(
                team_id=teams[rng.integers(len(teams))],
                target_pool="community" if rng.random() < community_share else "team",
                submitter_region=None if rng.random() < 0.1 else str(rng.choice(REGIONS)),
                tool_type="nerfstudio" if rng.random() < 0.1 else "comfyui",
                required_labels=labels,
                min_vram_gb=float(rng.choice([16.0, 24.0, 48.0])) if rng.random() < 0.2 else None,
                preferred_gpu=gpu[0].split()[-1] if rng.random() < 0.25 else None,
                required_models={MODELS[m] for m in rng.choice(len(MODELS), 1, p=model_p)}
                if rng.random() < 0.6
                else set(),
                tie_key=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            )
        )
    return requests
