"""Interning: the fleet stores small integers (or bit positions) in place of repeated strings."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import numpy as np


class Interner:
    """Append-only mapping between names and consecutive indices.

    Indices below ``first`` are reserved (the fleet keeps 0 for "unknown"); ``len()`` counts them,
    so ``len()`` is the size a lookup table indexed by these indices needs. Names are never
    forgotten, so an index, once given, means the same name for the life of the fleet.
    """

    def __init__(self, first: int = 0, limit: int | None = None) -> None:
        self._index: dict[Hashable, int] = {}
        self._names: list[Any] = [None] * first
        self._limit = limit

    def add(self, name: Hashable) -> int:
        index = self._index.get(name)
        if index is None:
            index = len(self._names)
            if self._limit is not None and index > self._limit:
                raise ValueError(f"a fleet holds at most {self._limit} distinct values here")
            self._index[name] = index
            self._names.append(name)
        return index

    def get(self, name: Hashable, default: int = -1) -> int:
        return self._index.get(name, default)

    def name(self, index: int) -> Any:
        """The name at ``index`` (``None`` for a reserved index)."""
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """``(index, name)`` of every interned name."""
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
