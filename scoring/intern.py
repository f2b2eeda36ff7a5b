"""Interning: the fleet stores small integers (or bit positions) in place of repeated strings.

Names are counted: every agent that uses a name holds one reference, and a name whose last user
goes away is forgotten and its index reused (lowest first), so churn never grows the tables and
there is no lifetime limit on how many names a fleet has seen, only on how many are alive at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import numpy as np


class Interner:
    """Counted mapping between names and small indices.

    Indices below ``first`` are reserved (the fleet keeps 0 for "unknown"). ``len()`` is one past
    the highest index in use, so it is the size a lookup table indexed by these indices needs.
    ``limit`` bounds the number of live names (indices up to ``limit``).
    """

    def __init__(self, first: int = 0, limit: int | None = None) -> None:
        self._first = first
        self._index: dict[Hashable, int] = {}
        self._names: list[Any] = [None] * first
        self._counts: list[int] = [0] * first
        self._free: list[int] = []  # a heap of released indices
        self._limit = limit
        #: Bumped whenever a name gains or loses its index (translations cached on it go stale).
        self.version = 0

    # --- counting ------------------------------------------------------------------------------

    def acquire(self, names: Iterable[Hashable]) -> list[int]:
        """Indices of ``names`` (one reference each), all or nothing.

        Raises ``ValueError`` (taking nothing) when new names would exceed ``limit``; any other
        failure part way (memory) gives back what the call had taken before it propagates.
        """
        names = list(names)
        new = {n for n in names if n not in self._index}
        if self._limit is not None and new:
            # Every index in [first, len) is live or free, so the free ones need no counting.
            free_slots = self._limit + 1 - self._first - len(self._index)
            if len(new) > free_slots:
                raise ValueError(f"a fleet holds at most {self._limit - self._first + 1} "
                                 "distinct values here at once")  # fmt: skip
        out = [0] * len(names)  # allocated up front: filling it cannot fail
        taken = 0
        pending = -1  # a new index whose name is not yet counted
        try:
            for name in names:
                index = self._index.get(name)
                if index is None:
                    index = pending = self._new_index()
                    self._names[index] = name
                    self._index[name] = index
                    self.version += 1
                self._counts[index] += 1
                pending = -1
                out[taken] = index
                taken += 1
        except BaseException:
            if pending >= 0:
                self._forget(pending)
            del out[taken:]
            self.release(out)
            raise
        return out

    def release(self, indices: Iterable[int]) -> None:
        """Drop one reference per index; a name with none left is forgotten."""
        for index in indices:
            self._counts[index] -= 1
            if self._counts[index] == 0:
                self._forget(index)
        self._drop_trailing()

    def _forget(self, index: int) -> None:
        name = self._names[index]
        if self._index.get(name) == index:
            del self._index[name]
        self._names[index] = None
        self._counts[index] = 0
        heapq.heappush(self._free, index)
        self.version += 1

    def _drop_trailing(self) -> None:
        """Cut free indices off the end, so ``len()`` stays one past the highest in use.

        The heap keeps the dropped indices (removing each from it would cost O(free) per index:
        quadratic when many names go at once); :meth:`_new_index` discards them, and the heap is
        rebuilt when they outnumber the real free indices.
        """
        names = self._names
        end = len(names)
        while end > self._first and names[end - 1] is None:
            end -= 1
        if end == len(names):
            return
        del names[end:], self._counts[end:]
        holes = end - self._first - len(self._index)
        if len(self._free) > 2 * holes + 64:
            self._free = [i for i in self._free if i < end]
            heapq.heapify(self._free)

    def _new_index(self) -> int:
        if self._free:
            index = heapq.heappop(self._free)
            if index < len(self._names):
                return index
            # The smallest entry is past the end, so every entry is (dropped indices).
            self._free = []
        self._names.append(None)
        try:
            self._counts.append(0)
        except BaseException:
            self._names.pop()
            raise
        return len(self._names) - 1

    # --- reading -------------------------------------------------------------------------------

    def get(self, name: Hashable, default: int = -1) -> int:
        return self._index.get(name, default)

    def name(self, index: int) -> Any:
        """The name at ``index`` (``None`` for a reserved or free index)."""
        return self._names[index]

    def count(self, index: int) -> int:
        return self._counts[index]

    @property
    def live(self) -> int:
        """Number of names in use."""
        return len(self._index)

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """``(index, name)`` of every live name."""
        return ((i, n) for i, n in enumerate(self._names) if n is not None)

    def names_of_bits(self, words: np.ndarray) -> list[Any]:
        """Names whose bit is set in a bitset row (uint64 words, bit ``i`` of word ``i // 64``)."""
        names = []
        for w, word in enumerate(words.tolist()):
            while word:
                low = word & -word
                names.append(self._names[w * 64 + low.bit_length() - 1])
                word ^= low
        return names

    def renumber(self) -> np.ndarray:
        """Give the live names the indices ``first, first + 1, ...`` in their current order.

        Returns ``old_to_new`` (int64, -1 for indices that were free); used to compact bitsets
        after churn left a few live names at high bit positions.
        """
        old_to_new = np.full(len(self._names), -1, np.int64)
        live = [(i, n) for i, n in enumerate(self._names) if n is not None]
        names: list[Any] = [None] * self._first
        counts = [0] * self._first
        for new, (old, name) in enumerate(live, start=self._first):
            old_to_new[old] = new
            names.append(name)
            counts.append(self._counts[old])
        # Everything is built; only now change the table (updating existing keys allocates
        # nothing, so a failure above leaves the table as it was).
        for new, (_, name) in enumerate(live, start=self._first):
            self._index[name] = new
        self._names, self._counts, self._free = names, counts, []
        self.version += 1
        return old_to_new


class TeamShares:
    """How many distinct names of one table each team uses at once, bounded per team.

    The fleet's name tables are shared by every team: label and model names widen every row's
    bitsets, and the region and GPU-model tables hold at most 32,767 names. Without a share, one
    team's agents (each within its own limits) could widen another team's fleet a hundredfold
    or fill a table so that no other team's new name fits. Names are counted by reference, as
    in :class:`Interner`; a name several teams use counts once for each of them.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._held: dict[Hashable, dict[Hashable, int]] = {}  # team -> name -> references

    def add(
        self, team: Hashable, names: Iterable[Hashable], replacing: Iterable[Hashable] = ()
    ) -> None:
        """Count one reference of ``team`` to each of ``names``, all or nothing.

        ``replacing``: names of ``team`` the same update gives back just after (an agent's
        record replaced); the limit applies to what the team uses once they are gone.

        Raises ``ValueError`` (counting nothing) when the team would then use more than
        ``limit`` distinct names.
        """
        names = list(names)
        if not names:
            return
        held = self._held.get(team, {})
        going: dict[Hashable, int] = {}
        for name in replacing:
            going[name] = going.get(name, 0) + 1
        kept = sum(1 for name, refs in held.items() if refs > going.get(name, 0))
        new = {n for n in names if held.get(n, 0) <= going.get(n, 0)}
        if kept + len(new) > self.limit:
            raise ValueError(f"a team's agents use at most {self.limit} distinct {self.what} "
                             "at once")  # fmt: skip
        counts = self._held.setdefault(team, held)
        done = 0
        try:
            for name in names:
                counts[name] = counts.get(name, 0) + 1
                done += 1
        except BaseException:  # memory: give back what was counted
            self.remove(team, names[:done])
            raise

    def remove(self, team: Hashable, names: Iterable[Hashable]) -> None:
        """Drop one reference of ``team`` to each of ``names`` (counted before). Cannot fail."""
        held = self._held.get(team)
        if held is None:
            return
        for name in names:
            left = held[name] - 1
            if left:
                held[name] = left
            else:
                del held[name]
        if not held:
            del self._held[team]

    def used(self, team: Hashable) -> int:
        """The number of distinct names ``team`` uses."""
        return len(self._held.get(team, ()))
