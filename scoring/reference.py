"""The same decisions as the engine, in plain Python: the test oracle and the baseline.

Written straight from DESIGN.md sections 3 and 4, one agent record at a time, and sharing no code
with the fleet, the query translation or the kernels (only the validated input records). Function
names match the engine's public API: ``pick_agent`` and ``rank_agents`` take a list of ``Agent``
records instead of a ``Fleet``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from scoring.models import Agent, DispatchRequest, ScoringPolicy

FACTOR_NAMES = ("region", "load", "pool", "warm", "gpu", "reliability")
REASON_NAMES = ("stale", "status", "pool", "labels", "capacity", "vram", "excluded", "failures")
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


@dataclass
class Decision:
    agent_id: str | None
    score: float | None
    factors: dict[str, float]
    eligible: int
    rejected: dict[str, int]
    considered: int
    missing_labels: tuple[str, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)  # every eligible agent's score


def reject_reasons(
    agent: Agent, request: DispatchRequest, policy: ScoringPolicy, now: float
) -> list[str]:
    """Every hard filter ``agent`` fails (DESIGN section 3), in the table's order."""
    reasons = []
    if now - agent.last_heartbeat > policy.heartbeat_timeout_s:
        reasons.append("stale")
    if agent.status.value not in ("idle", "busy"):
        reasons.append("status")
    own = agent.team_id == request.team_id
    if request.target_pool == "team" and not own:
        reasons.append("pool")
    if request.target_pool == "community" and not own and not agent.community_opt_in:
        reasons.append("pool")
    needed = set(request.required_labels) | {request.tool_type}
    if not needed <= agent.labels:
        reasons.append("labels")
    if agent.running_count >= agent.gpu_capacity:
        reasons.append("capacity")
    if request.min_vram_gb is not None:
        if agent.vram_gb is None or agent.vram_gb < request.min_vram_gb:
            reasons.append("vram")
    if agent.agent_id in request.exclude_agents:
        reasons.append("excluded")
    if request.max_failure_rate is not None and agent.failure_rate > request.max_failure_rate:
        reasons.append("failures")
    return reasons


def pool_reasons(
    agent: Agent, request: DispatchRequest, policy: ScoringPolicy, now: float
) -> list[str]:
    """What a decision counts for ``agent`` (DESIGN section 4): every failed filter when it is in
    the request's pool, only ``pool`` when it is not."""
    reasons = reject_reasons(agent, request, policy, now)
    return ["pool"] if "pool" in reasons else reasons


def _tokens(name: str) -> set[str]:
    return set(re.findall(r"[a-z]+|[0-9]+", name.lower()))


def factors(agent: Agent, request: DispatchRequest, policy: ScoringPolicy) -> dict[str, float]:
    """Each factor's value for ``agent`` (DESIGN section 4)."""
    if request.submitter_region is None or agent.region is None:
        region = 0.5
    elif request.submitter_region == agent.region:
        region = 1.0
    else:
        region = 0.0
        for (a, b), affinity in policy.region_affinity:
            if {a, b} == {request.submitter_region, agent.region}:
                region = affinity
    load = max(0.0, 1.0 - agent.running_count / agent.gpu_capacity)
    pool = 1.0 if agent.team_id == request.team_id else 0.0
    if request.required_models:
        hits = len(request.required_models & agent.cached_models)
        warm = hits / len(request.required_models)
    else:
        warm = 0.5
    if request.preferred_gpu is None or agent.gpu_model is None:
        gpu = 0.5
    else:
        gpu = 1.0 if _tokens(request.preferred_gpu) <= _tokens(agent.gpu_model) else 0.0
    reliability = 1.0 - agent.failure_rate
    return {
        "region": region,
        "load": load,
        "pool": pool,
        "warm": warm,
        "gpu": gpu,
        "reliability": reliability,
    }


def score(agent: Agent, request: DispatchRequest, policy: ScoringPolicy) -> float:
    """The weighted mean ``sum(w_f * x_f) / sum(w_f)``, summed in the factor table's order."""
    x = factors(agent, request, policy)
    weights = [policy.weights[name] for name in FACTOR_NAMES]
    total = 0.0
    for w, name in zip(weights, FACTOR_NAMES, strict=True):
        total += w * x[name]
    return total / sum(weights)


def _blake64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _murmur_finish32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    h ^= h >> 16
    return h


def tie_hash(tie_key: str, agent_id: str) -> int:
    """The tie-break rank of ``agent_id`` for ``tie_key``: lower wins (see DESIGN section 4)."""
    x = _blake64(agent_id) ^ _blake64(tie_key)
    low, high = x & MASK32, x >> 32
    hi = _murmur_finish32(high ^ _murmur_finish32(low))
    lo = _murmur_finish32(low ^ hi)
    return ((hi << 32) | lo) & MASK64


def rank_agents(
    agents: list[Agent],
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | None = None,
    k: int = 10,
) -> list[tuple[str, float]]:
    """``(agent_id, score)`` of the best ``k``: repeated picks, removing each chosen agent."""
    policy = policy or ScoringPolicy()
    now = time.time() if now is None else now
    remaining = {
        a.agent_id: score(a, request, policy)
        for a in agents
        if not reject_reasons(a, request, policy, now)
    }
    ranked: list[tuple[str, float]] = []
    while remaining and len(ranked) < k:
        chosen = _choose(remaining, request, policy)
        ranked.append((chosen, remaining.pop(chosen)))
    return ranked


def _choose(scores: dict[str, float], request: DispatchRequest, policy: ScoringPolicy) -> str:
    """Among agents within ``tie_band`` of the best score, the one with the lowest tie hash."""
    best = max(scores.values())
    band = [aid for aid, s in scores.items() if s >= best - policy.tie_band]
    return min(band, key=lambda aid: (tie_hash(request.tie_key, aid), aid))


def pick_agent(
    agents: list[Agent],
    request: DispatchRequest,
    policy: ScoringPolicy | None = None,
    now: float | None = None,
) -> Decision:
    """The engine's ``pick_agent`` over a plain list of agent records."""
    policy = policy or ScoringPolicy()
    now = time.time() if now is None else now
    rejected = dict.fromkeys(REASON_NAMES, 0)
    missing: set[str] = set()
    needed = set(request.required_labels) | {request.tool_type}
    scores = {}
    by_id = {}
    considered = 0
    for agent in agents:
        reasons = pool_reasons(agent, request, policy, now)
        considered += reasons != ["pool"]
        for reason in reasons:
            rejected[reason] += 1
        if "labels" in reasons:
            missing |= needed - agent.labels
        if not reasons:
            scores[agent.agent_id] = score(agent, request, policy)
            by_id[agent.agent_id] = agent
    if not scores:
        return Decision(None, None, {}, 0, rejected, considered, tuple(sorted(missing)))
    chosen = _choose(scores, request, policy)
    return Decision(
        chosen,
        scores[chosen],
        factors(by_id[chosen], request, policy),
        len(scores),
        rejected,
        considered,
        tuple(sorted(missing)),
        scores,
    )


@dataclass
class Assignment:
    """The reference's answer for one request of a queue."""

    agent_id: str | None
    deferred: bool = False
    waiting_for: tuple[str, ...] = ()


def assign(
    agents: list[Agent],
    requests: list[DispatchRequest],
    policy: ScoringPolicy | None = None,
    now: float | None = None,
) -> tuple[list[Assignment], list[Agent]]:
    """The engine's ``assign`` over agent records (DESIGN section 9), written from the rules.

    Returns one :class:`Assignment` per request (in the order given) and the agents afterwards
    (each placement takes a slot: one more running, an idle agent turns busy).
    """
    policy = policy or ScoringPolicy()
    now = time.time() if now is None else now
    fleet = {a.agent_id: a for a in agents}

    def submitted(r: DispatchRequest) -> float:
        return now if r.submitted_at is None else r.submitted_at

    def place(r: DispatchRequest, candidates: list[Agent]) -> Assignment:
        chosen = pick_agent(candidates, r, policy, now).agent_id
        if chosen is not None:
            a = fleet[chosen]
            status = "busy" if a.status.value == "idle" else a.status
            fleet[chosen] = a.model_copy(
                update={"running_count": a.running_count + 1, "status": status}
            )
        return Assignment(chosen)

    order = sorted(range(len(requests)), key=lambda i: (submitted(requests[i]), i))
    out: list[Assignment | None] = [None] * len(requests)
    cold = []
    deferred: dict[tuple, int] = {}  # requests deferred so far, by kind (template but exclusions)
    for i in order:
        r = requests[i]
        # a request stamped after ``now`` (a skewed clock) is no younger than zero: never
        # deferred, so a far-future stamp cannot buy an endless wait
        young = 0.0 <= now - submitted(r) < policy.locality_wait_s
        if not (young and r.required_models):
            out[i] = place(r, list(fleet.values()))
            continue
        warm = [a for a in fleet.values() if r.required_models <= a.cached_models]
        free = [a for a in warm if not reject_reasons(a, r, policy, now)]
        full = [a for a in warm if reject_reasons(a, r, policy, now) == ["capacity"]]
        busy_slots = sum(a.running_count for a in full)  # each frees when its run ends
        if free:
            out[i] = place(r, free)
        elif deferred.get(r.kind, 0) < policy.deferrals_per_slot * busy_slots:
            deferred[r.kind] = deferred.get(r.kind, 0) + 1
            waiting_for = tuple(sorted(a.agent_id for a in full))
            out[i] = Assignment(None, deferred=True, waiting_for=waiting_for)
        else:
            cold.append(i)
    for i in cold:
        out[i] = place(requests[i], list(fleet.values()))
    return [a for a in out if a is not None], list(fleet.values())
