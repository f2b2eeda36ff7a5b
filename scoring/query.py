"""Translate a validated request, against one fleet and one policy, into the kernels' numbers.

The translated parts (label mask, model mask, region and GPU tables) depend only on a few fields
of the request, the policy and the fleet's interned names. So they are memoised in
``fleet.query_cache``, which is dropped whenever a name gains or loses its index; a dispatcher sees
a small variety of (labels, models, region, GPU) combinations, so nearly every pick is a cache hit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scoring.decision import missing_label_names
from scoring.fleet import Fleet
from scoring.layout import Query, vram_floor
from scoring.models import DispatchRequest, ScoringPolicy, gpu_tokens
from scoring.rules import failure_ceiling

_NO_ROWS = np.zeros(0, np.int64)
_NO_SHARED = np.zeros(0, np.int32)
_CACHE_LIMIT = 4096  # entries; a long-lived fleet sees a bounded variety of requests in practice
_MISSING_LIMIT = 64  # label ANDs remembered per translation


def build_query(
    fleet: Fleet,
    request: DispatchRequest,
    policy: ScoringPolicy,
    now: float,
    full_scan: bool = False,
) -> Query:
    """The request as the kernels read it. Call with ``fleet.lock`` held.

    The candidates are the request's pool (its team's rows, plus the community index for a
    community request); with ``full_scan`` every row of the fleet (the reference path).
    """
    return assemble(fleet, request, translation(fleet, request, policy), now, full_scan)


def translation(fleet: Fleet, request: DispatchRequest, policy: ScoringPolicy) -> Parts:
    """The request's translated parts, from ``fleet.query_cache`` when it can. Under the lock."""
    cache = fleet.query_cache
    version = fleet.names_version
    if cache.get("version") != version:
        cache.clear()
        cache["version"] = version
    key = (request.translation_id, id(policy))
    parts = cache.get(key)
    if parts is None or parts.policy is not policy:  # holding the policy keeps its id unique
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
            cache["version"] = version
        parts = cache[key] = _translate(fleet, request, policy)
    return parts


def assemble(
    fleet: Fleet, request: DispatchRequest, parts: Parts, now: float, full_scan: bool = False
) -> Query:
    """:func:`build_query` from the request's translated parts (see :func:`translation`)."""
    team = fleet.teams.get(request.team_id.int, -1)
    if full_scan:
        rows, shared = np.arange(len(fleet), dtype=np.int32), _NO_SHARED
    else:
        rows = fleet.team_rows(team)
        shared = fleet.shared_rows() if request.target_pool == "community" else _NO_SHARED
    policy = parts.policy
    return Query(
        policy.heartbeat_timeout_s,
        team,
        request.target_pool == "community",
        parts.labels,
        parts.labels_unknown,
        vram_floor(request.min_vram_gb),
        failure_ceiling(request.max_failure_rate),
        fleet.rows_of(request.exclude_agents) if request.exclude_agents else _NO_ROWS,
        parts.models,
        len(request.required_models),
        parts.region_table,
        parts.gpu_table,
        policy.weights.array,
        policy.tie_band,
        rows,
        shared,
        not full_scan,
        len(fleet),
        now,
        request.tie_key_hash,
    )


class Parts(NamedTuple):
    """What a request translates to, apart from its pool, exclusions, tie key and the time."""

    policy: ScoringPolicy
    labels: np.ndarray
    labels_unknown: bool
    models: np.ndarray
    region_table: np.ndarray
    gpu_table: np.ndarray
    #: ``(name, word, bit)`` of each required label, sorted by name; word -1: unknown to the
    #: fleet (see :func:`scoring.decision.missing_label_names`)
    label_bits: tuple[tuple[str, int, int], ...]
    #: :meth:`missing`'s answers by the bytes of its argument
    missing_memo: dict[bytes, tuple[str, ...]]

    def missing(self, labels_and: np.ndarray) -> tuple[str, ...]:
        """The required labels some label-rejected agent lacks, from the kernel's AND of their
        label words (:func:`~scoring.decision.missing_label_names`), remembered: a pick that
        rejects on labels would otherwise spend 0.6 us of its 3 us naming them (measured)."""
        key = labels_and.tobytes()
        found = self.missing_memo.get(key)
        if found is None:
            if len(self.missing_memo) >= _MISSING_LIMIT:
                self.missing_memo.clear()
            found = missing_label_names(self.label_bits, labels_and.tolist())
            self.missing_memo[key] = found
        return found


def _translate(fleet: Fleet, request: DispatchRequest, policy: ScoringPolicy) -> Parts:
    labels, labels_unknown = _bitset(fleet, "labels", request.labels_needed)
    models, _ = _bitset(fleet, "cached_models", request.required_models)
    label_bits = []
    for name in sorted(request.labels_needed):
        bit = fleet.labels.get(name)
        label_bits.append((name, -1, 0) if bit < 0 else (name, bit >> 6, 1 << (bit & 63)))
    return Parts(
        policy,
        labels,
        labels_unknown,
        models,
        _region_table(fleet, policy, request),
        _gpu_table(fleet, request.preferred_gpu),
        tuple(label_bits),
        {},
    )


def _bitset(fleet: Fleet, column: str, names: frozenset[str]) -> tuple[np.ndarray, bool]:
    """The bitset of ``names`` in the fleet's ``column`` width, and whether any name is unknown."""
    interner = fleet.labels if column == "labels" else fleet.models
    words = np.zeros(getattr(fleet.columns, column).shape[1], np.uint64)
    unknown = False
    for name in names:
        bit = interner.get(name)
        if bit < 0:
            unknown = True
        else:
            words[bit >> 6] |= np.uint64(1) << np.uint64(bit & 63)
    return words, unknown


def _region_table(fleet: Fleet, policy: ScoringPolicy, request: DispatchRequest) -> np.ndarray:
    """Region factor by interned agent region; index 0 (unknown region) is the neutral 0.5."""
    table = np.full(len(fleet.regions), 0.5)
    submitter = request.submitter_region
    if submitter is not None:
        for index, region in fleet.regions:
            table[index] = policy.affinity(submitter, region)
    return table


def _gpu_table(fleet: Fleet, preferred: str | None) -> np.ndarray:
    """GPU factor by interned agent gpu_model; index 0 (unknown model) is the neutral 0.5."""
    table = np.full(len(fleet.gpus), 0.5)
    if preferred is not None:
        wanted = gpu_tokens(preferred)
        for index, model in fleet.gpus:
            table[index] = 1.0 if wanted <= gpu_tokens(model) else 0.0
    return table
