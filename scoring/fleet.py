"""The fleet: a struct-of-arrays snapshot of every connected agent, updated in O(1) by agent id.

One numpy column per ``Agent`` field; teams, regions and GPU models are interned to small integers,
labels and cached models to bit positions of a bitset that widens (one uint64 word at a time) when
the fleet meets its 65th distinct label or model. Rows are dense: removing an agent moves the last
row into its place, so a pick always scans exactly ``len(fleet)`` rows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from uuid import UUID

import numpy as np

from scoring._kernels import Columns, _scratch
from scoring.hashing import stable_hash64
from scoring.intern import Interner
from scoring.models import (
    MAX_SLOTS,
    STATUS_CODES,
    Agent,
    AgentStatus,
    normalize_names,
    to_epoch_seconds,
)

_STATUSES = tuple(AgentStatus)
_SMALL_INDEX_LIMIT = int(np.iinfo(np.int16).max)  # regions and GPU models per fleet

#: dtype of each scalar column (``labels`` and ``cached_models`` are uint64 bitsets).
COLUMN_DTYPES: dict[str, Any] = {
    "team": np.int32,
    "status": np.uint8,
    "community_opt_in": np.bool_,
    "region": np.int16,
    "gpu_model": np.int16,
    "last_heartbeat": np.float64,
    "gpu_capacity": np.uint16,
    "running_count": np.uint16,
    "vram_gb": np.float64,
    "failure_rate": np.float64,
    "id_hash": np.uint64,
}
_BITSETS = ("labels", "cached_models")


class Fleet:
    """Struct-of-arrays snapshot of a fleet of agents.

    Build it with :meth:`from_agents` (or ``Fleet()`` and :meth:`upsert`), keep it current with
    :meth:`heartbeat` / :meth:`heartbeat_many`, and pick with :func:`scoring.pick_agent` or
    reserve with :meth:`dispatch`. Every method is thread-safe; picks and updates are serialised
    by one lock, so a pick always reads a consistent fleet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self._teams = Interner()
        self._regions = Interner(first=1, limit=_SMALL_INDEX_LIMIT)  # 0 = unknown
        self._gpus = Interner(first=1, limit=_SMALL_INDEX_LIMIT)  # 0 = unknown
        self._labels = Interner()
        self._models = Interner()
        self._data: dict[str, np.ndarray] = {}
        self._allocate(16, label_words=1, model_words=1)
        self._n = 0
        self._view: Columns | None = None
        # Translations of request parts into kernel arrays, valid until the interners grow.
        self.query_cache: dict[Any, Any] = {}
        self._scratch: tuple[np.ndarray, ...] = ()

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_agents(cls, agents: Iterable[Agent]) -> Fleet:
        """Build a fleet; raises ``ValueError`` on a duplicate ``agent_id``."""
        fleet = cls()
        agents = list(agents)
        seen: set[str] = set()
        for agent in agents:
            if not isinstance(agent, Agent):
                raise TypeError(f"expected Agent, got {type(agent).__name__}")
            if agent.agent_id in seen:
                raise ValueError(f"duplicate agent_id {agent.agent_id!r}")
            seen.add(agent.agent_id)
        with fleet._lock:
            fleet._reserve(len(agents))
            rows = [fleet._append(agent.agent_id) for agent in agents]
            fleet._write(rows, agents)
        return fleet

    def upsert(self, agent: Agent) -> None:
        """Insert ``agent``, or replace the record of the agent with its id."""
        if not isinstance(agent, Agent):
            raise TypeError(f"expected Agent, got {type(agent).__name__}")
        with self._lock:
            row = self._rows.get(agent.agent_id)
            self._write([self._append(agent.agent_id) if row is None else row], [agent])

    def remove(self, agent_id: str) -> None:
        """Drop an agent (O(1): the last row moves into its place)."""
        with self._lock:
            row = self._row(agent_id)
            last = self._n - 1
            if row != last:
                for column in self._data.values():
                    column[row] = column[last]
                moved = self._ids[last]
                self._ids[row] = moved
                self._rows[moved] = row
            self._ids.pop()
            del self._rows[agent_id]
            self._n = last
            self._view = None

    # --- updates ----------------------------------------------------------------------------

    def heartbeat(
        self,
        agent_id: str,
        at: float | Any,
        status: AgentStatus | str | None = None,
        running_count: int | None = None,
        cached_models: Iterable[str] | None = None,
    ) -> None:
        """Record a heartbeat at ``at`` (seconds or datetime), maybe with a new status, running
        count or set of cached models (agents report what they have on disk)."""
        at = _timestamp(at)
        code = None if status is None else STATUS_CODES[_status(status)]
        if running_count is not None:
            running_count = _slot_count(running_count, "running_count")
        models = None if cached_models is None else normalize_names(cached_models)
        with self._lock:
            row = self._row(agent_id)
            self._data["last_heartbeat"][row] = at
            if code is not None:
                self._data["status"][row] = code
            if running_count is not None:
                self._data["running_count"][row] = running_count
            if models is not None:
                words = self._bitsets(self._models, [models], "cached_models")
                self._data["cached_models"][row] = words[0]  # after any widening

    def heartbeat_many(
        self,
        agent_ids: Sequence[str],
        at: float | Sequence[float] | np.ndarray,
        status: AgentStatus | str | Sequence[AgentStatus | str] | None = None,
        running_count: int | Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Batch form of :meth:`heartbeat`: one lock, vectorised writes.

        ``at``, ``status`` and ``running_count`` are each one value for every agent or one per
        agent. Everything is validated before anything is written, so a bad batch changes nothing.
        """
        ids = list(agent_ids)
        n = len(ids)
        at_arr = np.broadcast_to(np.asarray(at, dtype=np.float64), (n,))
        if not np.isfinite(at_arr).all():
            raise ValueError("heartbeat times must be finite")
        codes = None
        if status is not None:
            if isinstance(status, (str, AgentStatus)):
                codes = np.full(n, STATUS_CODES[_status(status)], np.uint8)
            else:
                codes = np.fromiter((STATUS_CODES[_status(s)] for s in status), np.uint8, n)
        counts = None
        if running_count is not None:
            raw = np.broadcast_to(np.asarray(running_count), (n,))
            if raw.dtype.kind not in "iu" or (n and (raw.min() < 0 or raw.max() > MAX_SLOTS)):
                raise ValueError(f"running_count must be integers in [0, {MAX_SLOTS}]")
            counts = raw.astype(np.uint16)
        with self._lock:
            rows_of = self._rows
            try:
                rows = np.fromiter((rows_of[a] for a in ids), np.int64, n)
            except KeyError as e:
                raise KeyError(f"unknown agent_id {e.args[0]!r}") from None
            self._data["last_heartbeat"][rows] = at_arr
            if codes is not None:
                self._data["status"][rows] = codes
            if counts is not None:
                self._data["running_count"][rows] = counts

    def release(self, agent_id: str) -> None:
        """Give back one slot of ``agent_id`` (a task ended); a ``busy`` agent left empty idles."""
        with self._lock:
            row = self._row(agent_id)
            running = self._data["running_count"]
            if running[row] > 0:
                running[row] -= 1
            if running[row] == 0 and self._data["status"][row] == STATUS_CODES[AgentStatus.BUSY]:
                self._data["status"][row] = STATUS_CODES[AgentStatus.IDLE]

    def dispatch(self, request: Any, policy: Any = None, now: Any = None) -> Any:
        """Pick an agent and reserve one of its slots, atomically (see :func:`scoring.pick_agent`).

        The chosen agent's ``running_count`` goes up by one and an ``idle`` agent turns ``busy``;
        the returned ``Decision`` describes the fleet as it was just before the reservation.
        """
        from scoring.pick import decide  # pick.py builds on this module

        with self._lock:
            decision = decide(self, request, policy, now)
            if decision.row >= 0:
                self.take_slot(decision.row)  # eligible, so it has a free slot
        return decision

    def reserve(self, agent_id: str) -> None:
        """Take one slot of an agent the caller chose, as :meth:`dispatch` does for its pick.

        ``running_count`` goes up by one and an ``idle`` agent turns ``busy``; raises
        ``ValueError`` (changing nothing) when every slot is taken.
        """
        with self._lock:
            row = self._row(agent_id)
            if self._data["running_count"][row] >= self._data["gpu_capacity"][row]:
                raise ValueError(f"agent {agent_id!r} has no free slot")
            self.take_slot(row)

    def take_slot(self, row: int) -> None:
        """Take one slot of the agent in ``row`` (the caller holds :attr:`lock` and has checked
        that a slot is free)."""
        self._data["running_count"][row] += 1
        status = self._data["status"]
        if status[row] == STATUS_CODES[AgentStatus.IDLE]:
            status[row] = STATUS_CODES[AgentStatus.BUSY]

    # --- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def get(self, agent_id: str) -> Agent:
        """The agent's current record, rebuilt from the columns."""
        with self._lock:
            return self._agent_at(self._row(agent_id))

    def agents(self) -> list[Agent]:
        """Every agent's current record, in row order."""
        with self._lock:
            return [self._agent_at(row) for row in range(self._n)]

    @property
    def lock(self) -> threading.Lock:
        """The lock that serialises picks and updates (hold it to read several columns at once)."""
        return self._lock

    @property
    def columns(self) -> Columns:
        """The live columns (views of ``len(self)`` rows). Read them under :attr:`lock`."""
        if self._view is None:
            n = self._n
            self._view = Columns(**{name: col[:n] for name, col in self._data.items()})
        return self._view

    def scratch(self) -> tuple[np.ndarray, ...]:
        """The serial pick's working memory (see ``_kernels._scratch``). Use under :attr:`lock`."""
        words = self._data["labels"].shape[1]
        if not self._scratch or self._scratch[2].shape[0] != 2 * words:
            self._scratch = _scratch(words)
        return self._scratch

    def nbytes_per_agent(self) -> float:
        """Bytes of column data per agent (live rows only)."""
        return sum(col[: self._n].nbytes for col in self._data.values()) / max(self._n, 1)

    def agent_id_at(self, row: int) -> str:
        return self._ids[row]

    # Interned names, for translating requests (see scoring.query).
    @property
    def teams(self) -> Interner:
        return self._teams

    @property
    def regions(self) -> Interner:
        return self._regions

    @property
    def gpus(self) -> Interner:
        return self._gpus

    @property
    def labels(self) -> Interner:
        return self._labels

    @property
    def models(self) -> Interner:
        return self._models

    def rows_of(self, agent_ids: Iterable[str]) -> np.ndarray:
        """Sorted rows of those ``agent_ids`` that are in the fleet (others are ignored)."""
        rows = self._rows
        return np.array(sorted(rows[a] for a in agent_ids if a in rows), dtype=np.int64)

    # --- internals --------------------------------------------------------------------------

    def _row(self, agent_id: str) -> int:
        try:
            return self._rows[agent_id]
        except KeyError:
            raise KeyError(f"unknown agent_id {agent_id!r}") from None

    def _allocate(self, capacity: int, label_words: int, model_words: int) -> None:
        old, n = self._data, getattr(self, "_n", 0)
        shapes: dict[str, tuple[int, ...]] = {name: (capacity,) for name in COLUMN_DTYPES}
        shapes["labels"] = (capacity, label_words)
        shapes["cached_models"] = (capacity, model_words)
        data = {}
        for name, shape in shapes.items():
            col = np.zeros(shape, COLUMN_DTYPES.get(name, np.uint64))
            if name in old:
                src = old[name][:n]
                if col.ndim == 2:
                    col[:n, : src.shape[1]] = src
                else:
                    col[:n] = src
            data[name] = col
        self._data = data
        self._view = None

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        capacity = self._data["team"].shape[0]
        if need > capacity:
            self._allocate(
                max(need, 2 * capacity),
                self._data["labels"].shape[1],
                self._data["cached_models"].shape[1],
            )

    def _append(self, agent_id: str) -> int:
        self._reserve(1)
        row = self._n
        self._rows[agent_id] = row
        self._ids.append(agent_id)
        self._n += 1
        self._view = None
        return row

    def _intern_all(self, interner: Interner, names: Iterable[Any]) -> list[int]:
        before = len(interner)
        indices = [interner.add(name) for name in names]
        if len(interner) != before:
            self.query_cache.clear()  # translations hold tables sized to the old names
        return indices

    def _optional_indices(self, interner: Interner, names: list[str | None]) -> list[int]:
        """Interned indices, with 0 (the reserved "unknown") for ``None``."""
        known = self._intern_all(interner, (n for n in names if n is not None))
        it = iter(known)
        return [0 if n is None else next(it) for n in names]

    def _bitsets(self, interner: Interner, sets: list[frozenset[str]], column: str) -> np.ndarray:
        """One bitset row per set (``len(sets)`` x words), widening the column when needed."""
        counts = [len(names) for names in sets]
        bits = np.array(self._intern_all(interner, (n for names in sets for n in names)), np.int64)
        words = max(1, (len(interner) + 63) // 64)
        if words > self._data[column].shape[1]:
            widths = {c: self._data[c].shape[1] for c in _BITSETS}
            widths[column] = words
            self._allocate(self._data["team"].shape[0], widths["labels"], widths["cached_models"])
        out = np.zeros((len(sets), self._data[column].shape[1]), np.uint64)
        owner = np.repeat(np.arange(len(sets)), counts)
        np.bitwise_or.at(out, (owner, bits >> 6), np.left_shift(1, bits & 63).astype(np.uint64))
        return out

    def _write(self, rows: list[int], agents: list[Agent]) -> None:
        """Write whole records into ``rows`` (one vectorised assignment per column)."""
        d, idx = self._data, np.array(rows, np.int64)
        labels = self._bitsets(self._labels, [a.labels for a in agents], "labels")
        models = self._bitsets(self._models, [a.cached_models for a in agents], "cached_models")
        d = self._data  # _bitsets may have reallocated the columns
        d["labels"][idx] = labels
        d["cached_models"][idx] = models
        d["team"][idx] = self._intern_all(self._teams, (a.team_id.int for a in agents))
        d["status"][idx] = [STATUS_CODES[a.status] for a in agents]
        d["community_opt_in"][idx] = [a.community_opt_in for a in agents]
        d["region"][idx] = self._optional_indices(self._regions, [a.region for a in agents])
        d["gpu_model"][idx] = self._optional_indices(self._gpus, [a.gpu_model for a in agents])
        d["last_heartbeat"][idx] = [a.last_heartbeat for a in agents]
        d["gpu_capacity"][idx] = [a.gpu_capacity for a in agents]
        d["running_count"][idx] = [a.running_count for a in agents]
        d["vram_gb"][idx] = [math.nan if a.vram_gb is None else a.vram_gb for a in agents]
        d["failure_rate"][idx] = [a.failure_rate for a in agents]
        d["id_hash"][idx] = np.array([stable_hash64(a.agent_id) for a in agents], np.uint64)
        self._view = None

    def _agent_at(self, row: int) -> Agent:
        d = self._data
        vram = float(d["vram_gb"][row])
        return Agent.model_construct(
            agent_id=self._ids[row],
            team_id=UUID(int=self._teams.name(int(d["team"][row]))),
            status=_STATUSES[int(d["status"][row])],
            labels=frozenset(self._labels.names_of_bits(d["labels"][row])),
            last_heartbeat=float(d["last_heartbeat"][row]),
            gpu_capacity=int(d["gpu_capacity"][row]),
            running_count=int(d["running_count"][row]),
            region=self._regions.name(int(d["region"][row])),
            community_opt_in=bool(d["community_opt_in"][row]),
            vram_gb=None if math.isnan(vram) else vram,
            gpu_model=self._gpus.name(int(d["gpu_model"][row])),
            cached_models=frozenset(self._models.names_of_bits(d["cached_models"][row])),
            failure_rate=float(d["failure_rate"][row]),
        )


def _timestamp(at: Any) -> float:
    value = to_epoch_seconds(at)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"heartbeat time must be seconds since the epoch or a datetime, got {at!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError("heartbeat time must be finite")
    return value


def _status(status: AgentStatus | str) -> AgentStatus:
    try:
        return AgentStatus(status)
    except ValueError:
        allowed = ", ".join(s.value for s in AgentStatus)
        raise ValueError(f"unknown status {status!r} (expected one of {allowed})") from None


def _slot_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer")
    if not 0 <= value <= MAX_SLOTS:
        raise ValueError(f"{name} must be within [0, {MAX_SLOTS}]")
    return int(value)
