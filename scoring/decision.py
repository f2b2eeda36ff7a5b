"""What a pick returns: the chosen agent, its factors, and why the others were not eligible."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scoring.models import FACTORS, REASONS


class Decision:
    """The answer to one dispatch request: a snapshot, never changed after it is returned.

    Attributes
    ----------
    agent_id : str or None
        The chosen agent; ``None`` when no agent is eligible (the task waits) or when the request
        was deferred.
    score : float or None
        The chosen agent's weighted score in [0, 1].
    factors : dict[str, float]
        Each factor's value (in [0, 1]) for the chosen agent; empty when none was chosen.
    eligible : int
        Number of agents of the request's pool that passed every hard filter.
    rejected : dict[str, int]
        For each reason code, the number of agents failing that filter. An agent failing several
        filters counts once under each, so the counts can add up to more than the rejected agents.
    considered : int
        Number of agents in the request's pool (DESIGN section 4).
    missing_labels : tuple[str, ...]
        Required labels that at least one label-rejected agent lacks, sorted.
    row : int
        The chosen agent's row in the fleet when the decision was made (-1 when none).
    deferred : bool
        ``assign`` held the request back for an agent that has its models cached.
    waiting_for : tuple[str, ...]
        When deferred: the warm agents it waits for (all in its pool), sorted.
    deferred_until : float or None
        When deferred: when the deferral ends (seconds since the epoch; ``submitted_at`` plus
        ``locality_wait_s``, :func:`scoring.assign.deferral_ends`): from then on the request is
        never deferred again, so a dispatcher offers it again by then at the latest.
    """

    __slots__ = ("_factors", "_rejected", "agent_id", "considered", "deferred",
                 "deferred_until", "eligible", "missing_labels", "row", "score",
                 "waiting_for")  # fmt: skip
    _factors: tuple[float, ...] | bytes  # packed: see decided
    _rejected: tuple[int, ...] | bytes

    def __init__(
        self,
        agent_id: str | None,
        score: float | None,
        factors: Sequence[float],
        eligible: int,
        rejected: Sequence[int],
        considered: int,
        missing_labels: Iterable[str] = (),
        row: int = -1,
        deferred: bool = False,
        waiting_for: Iterable[str] = (),
        deferred_until: float | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.score = score
        self._factors = tuple(factors)
        self.eligible = eligible
        self._rejected = tuple(rejected)
        self.considered = considered
        self.missing_labels = tuple(missing_labels)
        self.row = row
        self.deferred = deferred
        self.waiting_for = tuple(waiting_for)
        self.deferred_until = deferred_until

    @property
    def total(self) -> int:
        """Former name of :attr:`considered`."""
        return self.considered

    @property
    def factors(self) -> dict[str, float]:
        if self.agent_id is None:
            return {}
        return dict(zip(FACTORS, _unpacked(self._factors, FACTOR_BYTES), strict=True))

    @property
    def rejected(self) -> dict[str, int]:
        return dict(zip(REASONS, _unpacked(self._rejected, COUNT_BYTES), strict=True))

    def explain(self) -> str:
        """One line, e.g. ``0/12 agents eligible: 10 labels (missing gpu-h100), 2 capacity``.

        It speaks only of the request's pool, so it can be shown to the submitting team.
        """
        reasons = []
        for reason, count in zip(REASONS, _unpacked(self._rejected, COUNT_BYTES), strict=True):
            # ``pool`` counts only agents outside the pool: never shown
            if count and reason != "pool":
                detail = ""
                if reason == "labels" and self.missing_labels:
                    detail = f" (missing {', '.join(self.missing_labels)})"
                reasons.append(f"{count} {reason}{detail}")
        head = f"{self.eligible}/{self.considered} agents eligible"
        if self.considered == 0:
            head += " (no agent in the pool)"
        if reasons:
            head += ": " + ", ".join(reasons)
        if self.deferred:
            return f"deferred for a warm agent ({', '.join(self.waiting_for)}); {head}"
        if self.agent_id is None:
            return head
        return f"{self.agent_id} (score {self.score:.3f}); {head}"

    def __repr__(self) -> str:
        return f"Decision({self.explain()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (
            self.agent_id == other.agent_id
            and _same(self.score, other.score)
            and self.eligible == other.eligible
            and _unpacked(self._rejected, COUNT_BYTES) == _unpacked(other._rejected, COUNT_BYTES)
            and self.considered == other.considered
            and self.missing_labels == other.missing_labels
            and self.deferred == other.deferred
            and self.waiting_for == other.waiting_for
            and self.deferred_until == other.deferred_until
        )

    __hash__ = None  # type: ignore[assignment]


_new = object.__new__
#: A Decision's factors or rejected counts may be kept packed, as the bytes of native float64 or
#: int64 values in FACTORS or REASONS order (see :func:`decided`).
FACTOR_BYTES = struct.Struct(f"={len(FACTORS)}d")
COUNT_BYTES = struct.Struct(f"={len(REASONS)}q")


def _unpacked(values: Any, packing: struct.Struct) -> tuple[Any, ...]:
    return packing.unpack(values) if type(values) is bytes else values


def decided(
    agent_id: str | None,
    score: float | None,
    factors: tuple[float, ...] | bytes,
    eligible: int,
    rejected: tuple[int, ...] | bytes,
    considered: int,
    missing_labels: tuple[str, ...],
    row: int,
) -> Decision:
    """``Decision(agent_id, score, factors, eligible, rejected, considered, missing_labels,
    row)`` from values already in the form a Decision keeps, for the hot paths: without
    ``__init__``'s conversions a Decision is built in 0.17 us instead of 0.28 (measured).

    ``factors`` and ``rejected`` are tuples, or packed (:data:`FACTOR_BYTES`,
    :data:`COUNT_BYTES`) as ``assign`` gives them: one bytes object a Decision, cut from the
    kernel's arrays, instead of a tuple and its numbers; bytes are immutable like tuples and,
    unlike them, never tracked by the cyclic garbage collector (an ``assign`` of 10,000 requests
    took 7.4-7.6 ms with tuples, 6.2-7.1 ms packed, measured).
    """
    d = _new(Decision)
    d.agent_id, d.score, d._factors, d.eligible = agent_id, score, factors, eligible
    d._rejected, d.considered, d.missing_labels, d.row = rejected, considered, missing_labels, row
    d.deferred, d.waiting_for, d.deferred_until = False, (), None
    return d


def missing_label_names(
    label_bits: Iterable[tuple[str, int, int]], labels_and: Sequence[int]
) -> tuple[str, ...]:
    """Names of the required labels some label-rejected agent lacks, in the order given.

    ``label_bits`` holds each required label as ``(name, word, bit)``, its bit in the fleet's
    label bitsets, with word -1 for a label the fleet does not know (every agent lacks it);
    ``labels_and`` is the AND of the label words of the label-rejected agents (the kernels'), so
    a known label is lacked by one of them exactly when its bit is clear there.
    """
    return tuple(name for name, word, bit in label_bits if word < 0 or not labels_and[word] & bit)


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


@dataclass(frozen=True, slots=True)
class RankedAgent:
    """One entry of :func:`scoring.rank_agents`: an eligible agent, its score and its factors."""

    agent_id: str
    score: float
    factors: dict[str, float]
