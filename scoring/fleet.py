"""The fleet: a struct-of-arrays snapshot of every connected agent, updated in O(1) by agent id.

One numpy column per field of :data:`scoring.layout.COLUMNS`; teams, regions and GPU models are
interned to small integers, labels and cached models to bit positions of a bitset that widens (one
uint64 word at a time) as names arrive and narrows again when they go. Rows are dense: removing an
agent moves the last row into its place.

Rows are laid out by (opted in to the community pool, team): each team's rows are consecutive (in
two runs: the agents not opted in, then those opted in), and so is the whole community index. The
kernels read a consecutive block of rows as a range, which vectorises: 0.6 ns a row against 3.6
for rows gathered from all over the fleet (measured). Updates do not keep that order (an insert
goes at the end, a removal moves the last row, a team change stays where it is); they count the
rows they put out of place, and once those are more than a 32nd of the fleet the update that
crossed the line lays every row out again (:meth:`Fleet._reorder`, O(n log n): amortised, some
row moves per update). The kernels read 64 candidates at a time, and only a chunk with a stray
row by row, so a fleet between two re-lays reads nearly as fast as a fresh one.

Two indexes let a pick read only the rows a request may use: each team's rows, and the rows of
agents opted in to the community pool. Each row knows its place in both (``team_pos``,
``opt_pos``), so every update keeps them in O(1).

Every update is all or nothing: it takes its names and memory first (which may fail, and then
gives back what it took) and only then writes, with nothing left that can fail.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any, NamedTuple
from uuid import UUID

import numpy as np

from scoring import checks
from scoring._kernels import _remap_bits, _scratch
from scoring.hashing import stable_hash64
from scoring.intern import Interner, TeamShares
from scoring.layout import (
    BITSETS,
    COLUMNS,
    FAILURE_STEPS,
    VRAM_STEPS_PER_GB,
    VRAM_UNKNOWN,
    Columns,
)
from scoring.models import (
    MAX_LABELS,
    MAX_MODELS,
    STATUS_CODES,
    Agent,
    AgentStatus,
    show,
)

_STATUSES = tuple(AgentStatus)
_SMALL_INDEX_LIMIT = int(np.iinfo(np.int16).max)  # live regions and GPU models per fleet
#: Distinct names one team's agents may use at once, per table (:class:`TeamShares`): four
#: times what one agent may carry for labels and models (a team's agents need not be alike),
#: 64 regions and GPU models. So one team widens every row's bitsets by at most 4 + 16 words
#: (160 bytes; 100 agents of one team took 8,000 before), and filling the region or GPU-model
#: table takes 512 teams, not one. A bound per team, not per fleet: many teams that each use
#: their whole share still widen every row (the cost of one bit per name per row).
TEAM_SHARES = {"region": 64, "gpu_model": 64, "labels": 4 * MAX_LABELS,
               "cached_models": 4 * MAX_MODELS}  # fmt: skip
_NAMES = {"region": "regions", "gpu_model": "GPU models", "labels": "labels",
          "cached_models": "cached models"}  # fmt: skip
_MIN_ROWS = 16
_IDLE, _BUSY = STATUS_CODES[AgentStatus.IDLE], STATUS_CODES[AgentStatus.BUSY]


class UnknownAgentError(KeyError, ValueError):
    """An update named an agent the fleet does not hold (a ``KeyError`` and a ``ValueError``)."""


class Fleet:
    """Struct-of-arrays snapshot of a fleet of agents.

    Build it with :meth:`from_agents` (or ``Fleet()`` and :meth:`upsert`), keep it current with
    :meth:`heartbeat` / :meth:`heartbeat_many`, and pick with :func:`scoring.pick_agent` or
    reserve with :meth:`dispatch`. Every method is thread-safe; picks and updates are serialised
    by one re-entrant lock, so a pick always reads a consistent fleet.
    """

    #: Set by :mod:`scoring.pick`, which sits above the fleet: pick and reserve under the lock.
    _dispatcher: Callable[..., Any] | None = None

    def __init__(self) -> None:
        #: The re-entrant lock that serialises picks and updates (hold it to read several
        #: columns at once; fleet calls inside it are fine). An attribute, not a property: a
        #: pick over 100 agents reads it on a 2.5 us budget (a property costs 38 ns more).
        self.lock = self._lock = threading.RLock()
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self._teams = Interner()
        self._regions = Interner(first=1, limit=_SMALL_INDEX_LIMIT)  # 0 = unknown
        self._gpus = Interner(first=1, limit=_SMALL_INDEX_LIMIT)  # 0 = unknown
        self._labels = Interner()
        self._models = Interner()
        self._shares = {column: TeamShares(limit, _NAMES[column])
                        for column, limit in TEAM_SHARES.items()}  # fmt: skip
        self._n = 0
        self._data = _allocate({}, 0, _MIN_ROWS, dict.fromkeys(BITSETS, 1))
        self._team_rows: list[np.ndarray] = []  # by interned team: its rows, then free space
        self._team_len: list[int] = []
        self._shared = np.empty(_MIN_ROWS, np.int32)  # rows of opted-in agents
        self._shared_len = 0
        self._view: Columns | None = None
        # Translations of request parts into kernel arrays (scoring.query), valid while the
        # interned names stay as they are (see names_version).
        self.query_cache: dict[Any, Any] = {}
        # Each request template's prebuilt pick arguments (scoring.pick), by template: valid
        # while self.version stays, so emptied whenever it moves (_changed).
        self.pick_cache: dict[int, Any] = {}
        self._scratch: tuple[np.ndarray, ...] = ()
        self._version = 0  # see the version property
        self._strays = 0  # rows put out of layout order since the last _reorder

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_agents(cls, agents: Iterable[Agent]) -> Fleet:
        """Build a fleet; raises ``ValueError`` on a duplicate ``agent_id``."""
        if isinstance(agents, (str, bytes)) or not isinstance(agents, Iterable):
            raise ValueError(f"agents must be an iterable of Agent, got {type(agents).__name__}")
        fleet = cls()
        agents = list(agents)
        seen: set[str] = set()
        for agent in agents:
            _check_agent(agent)
            if agent.agent_id in seen:
                raise ValueError(f"duplicate agent_id {agent.agent_id!r}")
            seen.add(agent.agent_id)
        with fleet._lock:
            fleet._insert(agents)
            fleet._settle()
        return fleet

    def upsert(self, agent: Agent) -> None:
        """Insert ``agent``, or replace the record of the agent with its id."""
        _check_agent(agent)
        with self._lock:
            self._changed()
            row = self._rows.get(agent.agent_id)
            if row is None:
                self._insert([agent])
                self._settle()
                return
            names = self._acquire([agent], replacing=row)
            try:
                staged = self._prepare(0, names, [agent], row)
                old = self._names_at(row)
            except BaseException:
                self._release(names)
                raise
            # Nothing below can fail until the record is whole again.
            opted = self._data["opt_pos"][row] >= 0
            self._commit(staged)
            self._unlink(row)
            self._write(staged)
            self._link(row)
            team = int(self._data["team"][row])
            self._strays += team != old["team"][0] or opted != (self._data["opt_pos"][row] >= 0)
            self._release(old)
            self._shrink(old["team"][0])
            self._settle()

    def remove(self, agent_id: str) -> None:
        """Drop an agent (O(1): the last row moves into its place)."""
        with self._lock:
            row = self._row(agent_id)
            self._changed()
            old = self._names_at(row)
            team = old["team"][0]
            self._unlink(row)
            last = self._n - 1
            if row != last:
                for column in self._data.values():
                    column[row] = column[last]
                self._relink(row)
                moved = self._ids[last]
                self._ids[row] = moved
                self._rows[moved] = row
                self._strays += 1
            self._ids.pop()
            del self._rows[agent_id]
            self._n = last
            self._view = None
            self._release(old)
            self._shrink(team)
            self._settle()

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
        at = checks.timestamp(at, "at")
        code = None if status is None else checks.status_code(status, "status")
        if running_count is not None:
            running_count = checks.slot_count(running_count, "running_count")
        models = None if cached_models is None else checks.names(cached_models, "cached_models")
        with self._lock:
            row = self._row(agent_id)
            old: dict[str, list[int]] = {}
            team = int(self._data["team"][row])
            if models is not None:
                self._changed()
                taken = {"cached_models": self._models.acquire(models)}
                going = self._share_names("cached_models", row)
                try:
                    owner = self._teams.name(team)
                    self._shares["cached_models"].add(owner, list(models), going.get(owner, ()))
                except BaseException:
                    self._release_names(taken)
                    raise
                try:
                    staged = self._prepare(0, taken)
                    width = staged.data["cached_models"].shape[1]
                    bits = _bitset_rows([taken["cached_models"]], width)
                    old = {"cached_models": _bits(self._data["cached_models"][row])}
                except BaseException:
                    self._release(taken, team)
                    raise
                # Nothing below can fail.
                self._commit(staged)
                self._data["cached_models"][row] = bits[0]
            d = self._data
            d["last_heartbeat"][row] = at
            if code is not None:
                d["status"][row] = code
            if running_count is not None:
                d["running_count"][row] = running_count
            self._release(old, team)

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
        ids = checks.agent_ids(agent_ids, "agent_ids")
        n = len(ids)
        at_arr = checks.timestamps(at, n, "at")
        codes = None if status is None else checks.status_codes(status, n, "status")
        counts = None
        if running_count is not None:
            counts = checks.slot_counts(running_count, n, "running_count")
        with self._lock:
            rows_of = self._rows
            try:
                rows = np.fromiter((rows_of[a] for a in ids), np.int64, n)
            except KeyError as e:
                raise UnknownAgentError(f"unknown agent_id {show(e.args[0])}") from None
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
            if running[row] == 0 and self._data["status"][row] == _BUSY:
                self._data["status"][row] = _IDLE

    def dispatch(self, request: Any, policy: Any = None, now: Any = None) -> Any:
        """Pick an agent and reserve one of its slots, atomically (see :func:`scoring.pick_agent`).

        The chosen agent's ``running_count`` goes up by one and an ``idle`` agent turns ``busy``;
        the returned ``Decision`` describes the fleet as it was just before the reservation.
        """
        assert Fleet._dispatcher is not None, "scoring.pick registers the dispatcher on import"
        return Fleet._dispatcher(self, request, policy, now)

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
        if status[row] == _IDLE:
            status[row] = _BUSY

    # --- reading ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __contains__(self, agent_id: object) -> bool:
        try:
            return agent_id in self._rows
        except TypeError:  # unhashable: no agent has that id
            return False

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._ids))

    def get(self, agent_id: str) -> Agent:
        """The agent's current record, rebuilt from the columns."""
        with self._lock:
            return self._agent_at(self._row(agent_id))

    def cached_models(self, agent_id: str) -> frozenset[str]:
        """The agent's ``cached_models``, as :meth:`get` gives them, without the whole record."""
        with self._lock:
            return frozenset(
                self._models.names_of_bits(self._data["cached_models"][self._row(agent_id)])
            )

    def agents(self) -> list[Agent]:
        """Every agent's current record, in row order."""
        with self._lock:
            return [self._agent_at(row) for row in range(self._n)]

    @property
    def columns(self) -> Columns:
        """The live columns (views of ``len(self)`` rows). Read them under :attr:`lock`."""
        if self._view is None:
            n = self._n
            self._view = Columns(*(self._data[c.name][:n] for c in COLUMNS))
        return self._view

    def team_rows(self, team: int) -> np.ndarray:
        """Rows of the agents of interned ``team`` (int32; empty for -1). Under :attr:`lock`."""
        if team < 0 or team >= len(self._team_len):
            return _NO_ROWS
        return self._team_rows[team][: self._team_len[team]]

    def shared_rows(self) -> np.ndarray:
        """Rows of the agents opted in to the community pool (int32). Under :attr:`lock`."""
        return self._shared[: self._shared_len]

    def scratch(self) -> tuple[np.ndarray, ...]:
        """The serial pick's working memory (see ``_kernels._scratch``). Use under :attr:`lock`."""
        words = self._data["labels"].shape[1]
        if not self._scratch or self._scratch[1].shape[0] != 2 * words:
            self._scratch = _scratch(words)
        return self._scratch

    @property
    def nbytes(self) -> int:
        """Bytes held by the fleet's columns and pool indexes (allocated, free space included)."""
        columns = sum(col.nbytes for col in self._data.values())
        teams = sum(rows.nbytes for rows in self._team_rows)
        return columns + teams + self._shared.nbytes

    def nbytes_per_agent(self) -> float:
        """:attr:`nbytes` per agent."""
        return self.nbytes / max(self._n, 1)

    @property
    def version(self) -> int:
        """Changes whenever rows, pool indexes, column arrays or interned names may have changed
        (an insert, upsert, removal, or heartbeat with cached models); values written in place
        (heartbeats, slots) leave it. A pick's prebuilt arguments are valid while it stays."""
        return self._version

    def _changed(self) -> None:
        """Move :attr:`version` on and forget every template's prebuilt pick arguments (they
        hold the arrays and rows of the version they were built for)."""
        self._version += 1
        self.pick_cache.clear()

    @property
    def names_version(self) -> tuple[int, ...]:
        """Changes whenever a label, model, region or GPU model gains or loses its index."""
        return (self._labels.version, self._models.version, self._regions.version,
                self._gpus.version)  # fmt: skip

    def agent_id_at(self, row: int) -> str:
        return self._ids[row]

    def agent_ids_at(self, rows: Sequence[int]) -> list[str]:
        """The agent ids at ``rows``, in order (one call for a batch's placements)."""
        if not rows:
            return []
        found = itemgetter(*rows)(self._ids)
        return [found] if len(rows) == 1 else list(found)

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

    # --- writing records: take names and memory, then write -----------------------------------

    def _insert(self, agents: list[Agent]) -> None:
        self._changed()
        names = self._acquire(agents)
        try:
            staged = self._prepare(len(agents), names, agents)
        except BaseException:
            self._release(names)
            raise
        # Nothing below can fail: the new rows are written and linked, then become visible.
        self._commit(staged)
        self._write(staged)
        self._link_new(staged)
        for agent in agents:
            self._rows[agent.agent_id] = len(self._ids)
            self._ids.append(agent.agent_id)
        self._n += len(agents)
        self._strays += len(agents)
        self._view = None

    def _acquire(self, agents: list[Agent], replacing: int = -1) -> dict[str, list[Any]]:
        """Take every name the records use (all or nothing); ``replacing``: the row the one
        record replaces (its names count as given back for its team's share)."""
        taken: dict[str, list[Any]] = {}
        steps: list[tuple[str, Interner, Callable[[Agent], Iterable[Any]]]] = [
            ("team", self._teams, lambda a: (a.team_id.int,)),
            ("region", self._regions, lambda a: () if a.region is None else (a.region,)),
            ("gpu_model", self._gpus, lambda a: () if a.gpu_model is None else (a.gpu_model,)),
            ("labels", self._labels, lambda a: a.labels),
            ("cached_models", self._models, lambda a: a.cached_models),
        ]
        shared: list[tuple[TeamShares, int, list[Any]]] = []  # what the teams' shares took
        try:
            for column, interner, names_of in steps:
                per_agent = [list(names_of(a)) for a in agents]
                flat = interner.acquire(n for names in per_agent for n in names)
                it = iter(flat)
                taken[column] = [[next(it) for _ in names] for names in per_agent]
                shares = self._shares.get(column)
                if shares is not None:
                    by_team: dict[int, list[Any]] = {}
                    for agent, names in zip(agents, per_agent, strict=True):
                        by_team.setdefault(agent.team_id.int, []).extend(names)
                    going = self._share_names(column, replacing)
                    for team, names in by_team.items():
                        shares.add(team, names, going.get(team, ()))
                        shared.append((shares, team, names))
        except BaseException:
            for shares, team, names in shared:
                shares.remove(team, names)
            self._release_names({k: [i for ids in v for i in ids] for k, v in taken.items()})
            raise
        return taken

    def _prepare(
        self,
        extra: int,
        names: dict[str, list[Any]],
        agents: Sequence[Agent] = (),
        row: int = -1,
    ) -> _Staged:
        """Everything an update needs, built without changing the fleet (so it may fail).

        Room for ``extra`` more rows, wider bitsets and the indexes of ``agents``; their records
        encoded as column values, for ``row`` (an update) or for new rows at the end; and, for
        new rows, their places in the pool indexes. :meth:`_commit` swaps the new arrays in.
        """
        capacity = self._data["team"].shape[0]
        need = self._n + extra
        widths = {c: max(self._data[c].shape[1], _words(self._interner(c))) for c in BITSETS}
        grow_rows = need > capacity
        grow_bits = any(widths[c] > self._data[c].shape[1] for c in BITSETS)
        data = self._data
        if grow_rows or grow_bits:
            rows = max(need, 2 * capacity) if grow_rows else capacity
            data = _allocate(self._data, self._n, rows, widths)
        teams = len(self._teams)
        team_rows = self._team_rows + [_NO_ROWS] * (teams - len(self._team_rows))
        team_len = self._team_len + [0] * (teams - len(self._team_len))
        grown = {}
        for team, adds in Counter(ids[0] for ids in names.get("team", [])).items():
            if team_len[team] + adds > team_rows[team].shape[0]:
                grown[team] = _grown(team_rows[team], team_len[team], team_len[team] + adds)
        shared = self._shared
        opting = sum(1 for a in agents if a.community_opt_in)
        if self._shared_len + opting > shared.shape[0]:
            shared = _grown(shared, self._shared_len, self._shared_len + opting)
        for team, rows in grown.items():
            team_rows[team] = rows
        if not agents:
            return _Staged(data, team_rows, team_len, shared, _NO_ROWS64, {}, [], _NO_ROWS)
        values = _encode(agents, names, {c: data[c].shape[1] for c in BITSETS})
        if row >= 0:
            return _Staged(data, team_rows, team_len, shared, np.array([row]), values, [], _NO_ROWS)
        rows64 = np.arange(self._n, self._n + len(agents))
        groups, opted = self._plan_links(rows64, values, team_len)
        return _Staged(data, team_rows, team_len, shared, rows64, values, groups, opted)

    def _plan_links(
        self, rows: np.ndarray, values: dict[str, np.ndarray], team_len: list[int]
    ) -> tuple[list[tuple[int, int, np.ndarray]], np.ndarray]:
        """Places of new ``rows`` in the pool indexes: sets ``values["team_pos"]`` and
        ``values["opt_pos"]``; returns ``(team, start, rows)`` per team and the opted-in rows."""
        teams = values["team"]
        order = np.argsort(teams, kind="stable")
        sorted_teams = teams[order]
        bounds = np.flatnonzero(np.diff(sorted_teams)) + 1
        team_pos = np.empty(len(rows), np.int32)
        groups = []
        for chunk in np.split(order, bounds):
            if not len(chunk):
                continue
            team = int(teams[chunk[0]])
            start = team_len[team]
            team_pos[chunk] = np.arange(start, start + len(chunk))
            groups.append((team, start, rows[chunk].astype(np.int32)))
        opt = values["opt_pos"] >= 0
        opt_pos = np.full(len(rows), -1, np.int32)
        opt_pos[opt] = np.arange(self._shared_len, self._shared_len + int(opt.sum()))
        values["team_pos"], values["opt_pos"] = team_pos, opt_pos
        return groups, rows[opt].astype(np.int32)

    def _commit(self, staged: _Staged) -> None:
        """Swap in what :meth:`_prepare` allocated (allocates nothing)."""
        self._data, self._team_rows, self._team_len, self._shared = (
            staged.data,
            staged.team_rows,
            staged.team_len,
            staged.shared,
        )
        self._view = None

    def _write(self, staged: _Staged) -> None:
        """Write the staged records into their rows (every value already has its column's
        dtype and width, so no assignment converts or allocates)."""
        d = self._data
        for column, values in staged.values.items():
            d[column][staged.rows] = values
        self._view = None

    def _link_new(self, staged: _Staged) -> None:
        """Enter new rows into the pool indexes at the places :meth:`_plan_links` gave them."""
        for team, start, members in staged.groups:
            self._team_rows[team][start : start + len(members)] = members
            self._team_len[team] = start + len(members)
        opted = staged.opted
        self._shared[self._shared_len : self._shared_len + len(opted)] = opted
        self._shared_len += len(opted)

    def _names_at(self, row: int) -> dict[str, list[Any]]:
        d = self._data
        region, gpu = int(d["region"][row]), int(d["gpu_model"][row])
        return {
            "team": [int(d["team"][row])],
            "region": [region] if region else [],
            "gpu_model": [gpu] if gpu else [],
            "labels": _bits(d["labels"][row]),
            "cached_models": _bits(d["cached_models"][row]),
        }

    def _share_names(self, column: str, row: int) -> dict[Any, list[Any]]:
        """``{team: names}`` of ``column`` held by ``row`` (none for -1), as the teams' shares
        count them."""
        if row < 0:
            return {}
        held = self._names_at(row)
        interner = self._interner(column)
        team = self._teams.name(held["team"][0])
        return {team: [interner.name(i) for i in held[column]]}

    def _release(self, names: dict[str, list[Any]], team: int = -1) -> None:
        """Give back names (flat index lists or per-agent lists, as :meth:`_names_at` and
        :meth:`_acquire` give them) and narrow what they widened. The teams' shares are read
        from ``names["team"]``, else ``team`` (an interned team) when not -1."""
        teams = names.get("team") or []
        if teams or team >= 0:
            per_agent = isinstance(teams[0], list) if teams else False
            owners = [t[0] for t in teams] if per_agent else [teams[0] if teams else team]
            for column, shares in self._shares.items():
                ids = names.get(column)
                if not ids:
                    continue
                interner = self._interner(column)
                for owner, own in zip(owners, ids if per_agent else [ids], strict=True):
                    shares.remove(self._teams.name(owner), [interner.name(i) for i in own])
        self._release_names(names)

    def _release_names(self, names: dict[str, list[Any]]) -> None:
        """:meth:`_release` without the teams' shares (names no share counted yet)."""
        for column, ids in names.items():
            flat = [i for x in ids for i in (x if isinstance(x, list) else [x])]
            self._interner(column).release(flat)
        for column in BITSETS:
            if column in names:
                self._narrow(column)

    def _narrow(self, column: str) -> None:
        """Drop bitset words no live name needs; renumber names that churn left scattered.

        Called after an update has been written (or a failed one given its names back), so it
        must not fail: giving memory back is best effort. Without memory for the narrower copy
        the column stays as wide as it is (still consistent: a later release narrows it), and
        the names are renumbered only once the copy they go into exists.
        """
        interner = self._interner(column)
        words = self._data[column].shape[1]
        needed = max(1, -(-interner.live // 64))
        if needed >= words:
            return
        try:
            if _words(interner) == needed:  # the live names already fit: cut the words off
                narrow = np.ascontiguousarray(self._data[column][:, :needed])
                self._data[column] = narrow
            else:  # also when cutting would leave more words than the live names need
                out = np.zeros((self._data[column].shape[0], needed), np.uint64)
                old_to_new = interner.renumber()  # builds first, changes the table last
                _remap_bits(self._data[column][: self._n], old_to_new, out[: self._n])
                self._data[column] = out
        except MemoryError:
            return
        self._view = None
        self._scratch = ()

    def _interner(self, column: str) -> Interner:
        return {"team": self._teams, "region": self._regions, "gpu_model": self._gpus,
                "labels": self._labels, "cached_models": self._models}[column]  # fmt: skip

    # --- the pool indexes -------------------------------------------------------------------

    def _link(self, row: int) -> None:
        """Add ``row`` to its team's index and, when opted in, to the community index."""
        d = self._data
        team = int(d["team"][row])
        length = self._team_len[team]
        rows = self._team_rows[team]
        rows[length] = row  # _prepare made room
        d["team_pos"][row] = length
        self._team_len[team] = length + 1
        if d["opt_pos"][row] >= 0:
            d["opt_pos"][row] = self._shared_len
            self._shared[self._shared_len] = row
            self._shared_len += 1

    def _unlink(self, row: int) -> None:
        """Take ``row`` out of both indexes (the last entry of each moves into its place)."""
        d = self._data
        team, pos = int(d["team"][row]), int(d["team_pos"][row])
        last = self._team_len[team] - 1
        rows = self._team_rows[team]
        moved = rows[last]
        rows[pos] = moved
        d["team_pos"][moved] = pos
        self._team_len[team] = last
        opt = int(d["opt_pos"][row])
        if opt >= 0:
            last = self._shared_len - 1
            moved = self._shared[last]
            self._shared[opt] = moved
            d["opt_pos"][moved] = opt
            self._shared_len = last

    def _relink(self, row: int) -> None:
        """The record now in ``row`` moved there: point its index entries at ``row``."""
        d = self._data
        self._team_rows[int(d["team"][row])][int(d["team_pos"][row])] = row
        opt = int(d["opt_pos"][row])
        if opt >= 0:
            self._shared[opt] = row

    def _shrink(self, team: int) -> None:
        """Give memory back after many removals (columns, the community index, ``team``'s).

        Called after an update has been written, so it must not fail: without memory for a
        smaller copy, the larger array stays (capacity is slack, never content).
        """
        capacity = self._data["team"].shape[0]
        teams = len(self._teams)
        del self._team_rows[teams:], self._team_len[teams:]
        try:
            if capacity > _MIN_ROWS and self._n < capacity // 4:
                widths = {c: self._data[c].shape[1] for c in BITSETS}
                self._data = _allocate(self._data, self._n, max(_MIN_ROWS, 2 * self._n), widths)
                self._view = None
            shared = self._shared
            if shared.shape[0] > _MIN_ROWS and self._shared_len < shared.shape[0] // 4:
                size = max(_MIN_ROWS, 2 * self._shared_len)
                self._shared = _grown(shared, self._shared_len, size)
            if team < teams:
                rows, length = self._team_rows[team], self._team_len[team]
                if rows.shape[0] > 4 and length < rows.shape[0] // 4:
                    smaller = _grown(rows, length, 2 * length) if length else _NO_ROWS
                    self._team_rows[team] = smaller
        except MemoryError:
            pass

    # --- the row layout ---------------------------------------------------------------------

    def _settle(self) -> None:
        """Lay the rows out again once more than a 32nd of them are out of place."""
        if self._strays > self._n // 32:
            self._reorder()

    def _reorder(self) -> None:
        """Lay every row out by (opted in, team) and rebuild both indexes to match.

        Called after an update has been written, so it must not fail: the permuted copies are
        built first, and without memory for them nothing changes (a later update tries again).
        """
        n, d = self._n, self._data
        try:
            opted = d["opt_pos"][:n] >= 0
            order = np.lexsort((d["team"][:n], opted))  # the last key sorts first
            moved = {name: column[:n][order] for name, column in d.items()}
            ids = [self._ids[k] for k in order.tolist()]
            rows = dict(zip(ids, range(n), strict=True))
            teams = moved["team"]
            by_team = np.argsort(teams, kind="stable").astype(np.int32)
            starts = np.zeros(len(self._team_len) + 1, np.int64)
            np.cumsum(np.bincount(teams, minlength=len(self._team_len)), out=starts[1:])
            moved["team_pos"][by_team] = np.arange(n) - starts[teams[by_team]]
            n_opted = int(np.count_nonzero(opted))
            moved["opt_pos"][n - n_opted :] = np.arange(n_opted)
            shared = np.arange(n - n_opted, n, dtype=np.int32)
        except MemoryError:
            return
        # Nothing below allocates: every array keeps its size.
        for name, column in d.items():
            column[:n] = moved[name]
        for team, team_rows in enumerate(self._team_rows):
            team_rows[: self._team_len[team]] = by_team[starts[team] : starts[team + 1]]
        self._shared[:n_opted] = shared
        self._ids, self._rows = ids, rows
        self._strays = 0
        self._changed()
        self._view = None

    # --- internals --------------------------------------------------------------------------

    def _row(self, agent_id: str) -> int:
        try:
            return self._rows[agent_id]
        except (KeyError, TypeError):
            raise UnknownAgentError(f"unknown agent_id {show(agent_id)}") from None

    def _agent_at(self, row: int) -> Agent:
        d = self._data
        vram = int(d["vram_gb"][row])
        return Agent.model_construct(
            agent_id=self._ids[row],
            team_id=UUID(int=self._teams.name(int(d["team"][row]))),
            status=_STATUSES[int(d["status"][row])],
            labels=frozenset(self._labels.names_of_bits(d["labels"][row])),
            last_heartbeat=float(d["last_heartbeat"][row]),
            gpu_capacity=int(d["gpu_capacity"][row]),
            running_count=int(d["running_count"][row]),
            region=self._regions.name(int(d["region"][row])),
            community_opt_in=bool(d["opt_pos"][row] >= 0),
            vram_gb=None if vram == VRAM_UNKNOWN else vram / VRAM_STEPS_PER_GB,
            gpu_model=self._gpus.name(int(d["gpu_model"][row])),
            cached_models=frozenset(self._models.names_of_bits(d["cached_models"][row])),
            failure_rate=int(d["failure_rate"][row]) / FAILURE_STEPS,
        )


_NO_ROWS = np.zeros(0, np.int32)
_NO_ROWS64 = np.zeros(0, np.int64)
_DTYPES = {c.name: c.dtype for c in COLUMNS}


class _Staged(NamedTuple):
    """An update's new arrays and encoded records, built before anything is written."""

    data: dict[str, np.ndarray]
    team_rows: list[np.ndarray]
    team_len: list[int]
    shared: np.ndarray
    rows: np.ndarray  # int64: the rows the values go to
    values: dict[str, np.ndarray]  # column -> one value per row, in the column's dtype
    groups: list[tuple[int, int, np.ndarray]]  # new rows: (team, start, rows) per team
    opted: np.ndarray  # new rows opted in to the community pool


def _encode(
    agents: Sequence[Agent], names: dict[str, list[Any]], widths: dict[str, int]
) -> dict[str, np.ndarray]:
    """The records as column values (bitsets in ``widths`` words); ``opt_pos`` is 0 for an
    opted-in agent and -1 otherwise, until the indexes give it its place."""

    def column(name: str, values: Iterable[Any]) -> np.ndarray:
        return np.array(list(values), _DTYPES[name])

    return {
        "labels": _bitset_rows(names["labels"], widths["labels"]),
        "cached_models": _bitset_rows(names["cached_models"], widths["cached_models"]),
        "team": column("team", (ids[0] for ids in names["team"])),
        "status": column("status", (STATUS_CODES[a.status] for a in agents)),
        "opt_pos": column("opt_pos", (0 if a.community_opt_in else -1 for a in agents)),
        "region": column("region", (ids[0] if ids else 0 for ids in names["region"])),
        "gpu_model": column("gpu_model", (ids[0] if ids else 0 for ids in names["gpu_model"])),
        "last_heartbeat": column("last_heartbeat", (a.last_heartbeat for a in agents)),
        "gpu_capacity": column("gpu_capacity", (a.gpu_capacity for a in agents)),
        "running_count": column("running_count", (a.running_count for a in agents)),
        "vram_gb": column("vram_gb", (_vram_code(a.vram_gb) for a in agents)),
        "failure_rate": column(
            "failure_rate", (round(a.failure_rate * FAILURE_STEPS) for a in agents)
        ),
        "id_hash": column("id_hash", (stable_hash64(a.agent_id) for a in agents)),
    }


def _bitset_rows(bits: list[list[int]], width: int) -> np.ndarray:
    """One bitset row of ``width`` words per list of bit positions."""
    out = np.zeros((len(bits), width), np.uint64)
    owner = np.repeat(np.arange(len(bits)), [len(b) for b in bits])
    flat = np.array([b for bs in bits for b in bs], np.int64)
    np.bitwise_or.at(out, (owner, flat >> 6), np.left_shift(1, flat & 63).astype(np.uint64))
    return out


def _allocate(
    old: dict[str, np.ndarray], n: int, capacity: int, widths: dict[str, int]
) -> dict[str, np.ndarray]:
    """New columns of ``capacity`` rows holding the first ``n`` rows of ``old``."""
    data = {}
    for c in COLUMNS:
        shape: tuple[int, ...] = (capacity, widths[c.name]) if c.bitset else (capacity,)
        col = np.zeros(shape, c.dtype)
        if c.name in old:
            src = old[c.name][:n]
            if c.bitset:
                keep = min(src.shape[1], shape[1])
                col[:n, :keep] = src[:, :keep]
            else:
                col[:n] = src
        data[c.name] = col
    return data


def _grown(rows: np.ndarray, length: int, need: int) -> np.ndarray:
    """A copy of ``rows[:length]`` with room for ``need`` entries (at least double, or exact
    when shrinking)."""
    size = max(need, 2 * rows.shape[0], 4) if need > rows.shape[0] else need
    out = np.empty(size, np.int32)
    out[:length] = rows[:length]
    return out


def _vram_code(vram_gb: float | None) -> int:
    return VRAM_UNKNOWN if vram_gb is None else round(vram_gb * VRAM_STEPS_PER_GB)


def _words(interner: Interner) -> int:
    return max(1, -(-len(interner) // 64))


def _bits(words: np.ndarray) -> list[int]:
    out = []
    for w, word in enumerate(words.tolist()):
        while word:
            low = word & -word
            out.append(w * 64 + low.bit_length() - 1)
            word ^= low
    return out


def _check_agent(agent: Any) -> None:
    if not isinstance(agent, Agent):
        raise ValueError(f"expected an Agent, got {type(agent).__name__}")
