"""Validated, immutable records: agents, dispatch requests and the scoring policy.

Everything that reaches a kernel passes through here first, so the kernels never see a bad value.
Strings that the platform compares loosely (regions, labels) are normalised once, on the way in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal
from uuid import UUID

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from scoring.hashing import stable_hash64

#: Scoring factors, in the order the kernels store them.
FACTORS: tuple[str, ...] = ("region", "load", "pool", "warm", "gpu", "reliability")
#: Hard-filter reason codes, in the order of their bits in the reject mask (bit i = REASONS[i]).
REASONS: tuple[str, ...] = ("stale", "status", "pool", "labels", "capacity", "vram", "excluded")

MAX_NAME_LEN = 64  # regions and labels
MAX_SLOTS = 2**16 - 1


class AgentStatus(StrEnum):
    """Lifecycle state an agent reports; only ``idle`` and ``busy`` agents can take a task."""

    IDLE = "idle"
    BUSY = "busy"
    SYNCING = "syncing"
    TUNNEL = "tunnel"
    UNHEALTHY = "unhealthy"


#: Kernel code of each status (the fleet's ``status`` column holds these).
STATUS_CODES: dict[AgentStatus, int] = {s: i for i, s in enumerate(AgentStatus)}
#: Statuses whose code is at most this are eligible (``idle`` and ``busy``).
LAST_ELIGIBLE_STATUS = STATUS_CODES[AgentStatus.BUSY]


# --- normalisers -------------------------------------------------------------------------------


def normalize_region(value: Any) -> str | None:
    """Trim and lower-case a region; empty or ``None`` means unknown (``None``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("region must be a string")
    region = value.strip().lower()
    if len(region) > MAX_NAME_LEN:
        raise ValueError(f"region is longer than {MAX_NAME_LEN} characters")
    return region or None


def _normalize_label(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("label must be a string")
    label = value.strip().lower()
    if not label:
        raise ValueError("label is empty")
    if len(label) > MAX_NAME_LEN:
        raise ValueError(f"label {label[:16]!r}... is longer than {MAX_NAME_LEN} characters")
    return label


def _normalize_labels(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError("labels must be a set of strings")
    return frozenset(_normalize_label(v) for v in value)


def normalize_names(value: Any) -> frozenset[str]:
    """Model paths and agent ids: trimmed, case kept, never empty."""
    if value is None:
        return frozenset()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError("must be a set of strings")
    names = set()
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise ValueError("every entry must be a non-empty string")
        names.add(v.strip())
    return frozenset(names)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value.strip() or None


_GPU_TOKEN = re.compile(r"[a-z]+|[0-9]+")


def gpu_tokens(name: str) -> frozenset[str]:
    """Normalised tokens of a GPU name: runs of letters or of digits, lower-cased.

    ``"RTX_4090"`` gives ``{"rtx", "4090"}``, a subset of the tokens of
    ``"NVIDIA GeForce RTX 4090"``; a preference matches a GPU when its tokens are such a subset.
    """
    return frozenset(_GPU_TOKEN.findall(name.lower()))


def _preferred_gpu(value: Any) -> str | None:
    text = _optional_text(value)
    if text is not None and not gpu_tokens(text):
        raise ValueError("preferred_gpu must contain a letter or a digit")
    return text


def to_epoch_seconds(value: Any) -> Any:
    """Accept a ``datetime`` (naive means UTC) wherever seconds since the epoch are expected."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return value


Region = Annotated[str | None, BeforeValidator(normalize_region)]
Labels = Annotated[frozenset[str], BeforeValidator(_normalize_labels)]
Names = Annotated[frozenset[str], BeforeValidator(normalize_names)]
OptionalText = Annotated[str | None, BeforeValidator(_optional_text)]
Timestamp = Annotated[float, BeforeValidator(to_epoch_seconds), Field(allow_inf_nan=False)]


class _Record(BaseModel):
    """Frozen, validated record whose copies are validated too.

    Records cache derived values (``cached_property``) in the instance. Pydantic's own
    ``model_copy(update=...)`` copies those caches and skips validation, so a copy could carry
    a stale derived value or an invalid field; here a copy is a new, validated record instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**fields, **(update or {})})


class Agent(_Record):
    """What the platform knows about one connected agent.

    ``gpu_capacity`` and ``running_count`` are at most 65,535 (the fleet stores them as uint16 to
    stay within 64 bytes per agent).
    """

    agent_id: Annotated[str, Field(min_length=1, max_length=256)]
    team_id: UUID
    status: AgentStatus
    labels: Labels = frozenset()
    last_heartbeat: Timestamp
    gpu_capacity: Annotated[int, Field(ge=1, le=MAX_SLOTS)]
    running_count: Annotated[int, Field(ge=0, le=MAX_SLOTS)] = 0
    region: Region = None
    community_opt_in: bool = False
    vram_gb: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    gpu_model: OptionalText = None
    cached_models: Names = frozenset()
    failure_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0

    @field_validator("agent_id")
    @classmethod
    def _agent_id_trimmed(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("agent_id must not start or end with whitespace")
        return value


class DispatchRequest(_Record):
    """One task asking for an agent: who submits it, from where, and what it needs."""

    team_id: UUID
    target_pool: Literal["team", "community"] = "team"
    submitter_region: Region = None
    tool_type: Literal["comfyui", "nerfstudio"] = "comfyui"
    required_labels: Labels = frozenset()
    min_vram_gb: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    preferred_gpu: Annotated[str | None, BeforeValidator(_preferred_gpu)] = None
    required_models: Names = frozenset()
    exclude_agents: Names = frozenset()
    tie_key: str = ""
    #: When the run was submitted (seconds since the epoch); ``None``: now. ``assign`` places
    #: the oldest first and never defers a request older than the policy's ``locality_wait_s``.
    submitted_at: Timestamp | None = None

    @cached_property
    def labels_needed(self) -> frozenset[str]:
        """Required labels plus the tool type, which is itself a required label."""
        return self.required_labels | {self.tool_type}

    @cached_property
    def tie_key_hash(self) -> np.uint64:
        """Stable 64-bit hash of ``tie_key`` (:mod:`scoring.hashing`), as the kernels take it."""
        return np.uint64(stable_hash64(self.tie_key))


class Weights(_Record):
    """Non-negative weight of each scoring factor; reads like a mapping (``weights["load"]``)."""

    # Defaults chosen by replaying a production Stable Diffusion trace through the fleet
    # simulation (evidence: notebooks/WEIGHTS.md): warm models matter twice as much as the rest;
    # preferring the team's own agent costs latency, so it stays small but positive.
    region: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    load: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    pool: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.5
    warm: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 2.0
    gpu: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    reliability: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0

    @model_validator(mode="after")
    def _not_all_zero(self) -> Weights:
        if not any(getattr(self, f) > 0 for f in FACTORS):
            raise ValueError("at least one weight must be positive")
        return self

    def __getitem__(self, factor: str) -> float:
        if factor not in FACTORS:
            raise KeyError(factor)
        return float(getattr(self, factor))

    def keys(self) -> tuple[str, ...]:
        return FACTORS

    def items(self) -> list[tuple[str, float]]:
        return [(f, self[f]) for f in FACTORS]

    @cached_property
    def array(self) -> np.ndarray:
        """float64[7]: the six weights in ``FACTORS`` order, then their sum (read-only)."""
        values = [self[f] for f in FACTORS]
        a = np.array([*values, sum(values)], dtype=np.float64)
        a.flags.writeable = False
        return a


AffinityPairs = tuple[tuple[tuple[str, str], float], ...]


def _affinity_pairs(value: Any) -> Any:
    """Accept ``{("us-east", "us-west"): 0.6}`` (or its pairs) and store it canonically."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    canonical: dict[tuple[str, str], float] = {}
    for item in items:
        try:
            (a, b), affinity = item
        except (TypeError, ValueError):
            raise ValueError("each entry must be ((region_a, region_b), affinity)") from None
        ra, rb = normalize_region(a), normalize_region(b)
        if ra is None or rb is None:
            raise ValueError("affinity regions must be non-empty")
        if ra == rb:
            raise ValueError(f"pair ({ra!r}, {rb!r}) names one region; same region is always 1.0")
        if not isinstance(affinity, (int, float)) or isinstance(affinity, bool):
            raise ValueError(f"affinity of ({ra!r}, {rb!r}) must be a number")
        if not (0.0 <= affinity <= 1.0):  # also rejects NaN
            raise ValueError(f"affinity of ({ra!r}, {rb!r}) must be within [0, 1]")
        key = (min(ra, rb), max(ra, rb))
        if key in canonical and canonical[key] != affinity:
            raise ValueError(f"pair {key} is given twice with different affinities")
        canonical[key] = float(affinity)
    return tuple(sorted(canonical.items()))


class ScoringPolicy(_Record):
    """Weights, staleness timeout, region affinities and tie band: validated once, then immutable.

    ``region_affinity`` is stored as sorted ``((a, b), affinity)`` pairs with ``a < b``; read it
    with :meth:`affinity`.
    """

    weights: Weights = Weights()
    heartbeat_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    region_affinity: Annotated[AffinityPairs, BeforeValidator(_affinity_pairs)] = ()
    tie_band: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    #: How long ``assign`` may hold a request back for an agent with its models cached
    #: (delay scheduling); 0 never defers.
    locality_wait_s: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)] = 0.0

    @cached_property
    def affinity_map(self) -> Mapping[tuple[str, str], float]:
        """Both orders of every configured pair."""
        table: dict[tuple[str, str], float] = {}
        for (a, b), value in self.region_affinity:
            table[(a, b)] = table[(b, a)] = value
        return table

    def affinity(self, a: str, b: str) -> float:
        """Region factor of two known, normalised regions: 1 if equal, else the pair's, else 0."""
        if a == b:
            return 1.0
        return self.affinity_map.get((a, b), 0.0)


DEFAULT_POLICY = ScoringPolicy()
