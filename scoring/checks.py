"""Checks of call arguments: one definition of what ``heartbeat``, ``heartbeat_many`` and a pick's
``now`` accept.

The records (:mod:`scoring.models`) validate fields with pydantic; the fleet's and the pick's
calls take plain arguments instead (an agent id, a time, a status, a running count), and arrays of
them for batches. Every checker here raises ``ValueError`` naming the argument (never ``TypeError``,
``OverflowError`` or ``UnicodeError``), so a hostile value produces one kind of error wherever it
arrives, and a single call and its batch form accept exactly the same values:

- a time is seconds since the epoch (an int, a float, a numpy integer or float scalar) or a
  ``datetime`` (naive means UTC); never a bool, NaN, an infinity, or outside ``[0, MAX_TIMESTAMP]``
  (year 9999);
- a status is an :class:`~scoring.models.AgentStatus` or its string value;
- a slot count is an integer (numpy integers too, never a bool) within ``[0, MAX_SLOTS]``;
- a batch argument is one value for every agent or a sequence (or 1-d array) of exactly ``n``;
  a longer or shorter one is an error, not cut or padded.

Batch checks take a vectorised path for numpy arrays and for lists of plain numbers, so checking
a million heartbeats costs milliseconds, not seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from scoring.models import (
    MAX_MODELS,
    MAX_PATH_LEN,
    MAX_SLOTS,
    MAX_TIMESTAMP,
    STATUS_CODES,
    AgentStatus,
    epoch_seconds,
    normalize_names,
    show,
    valid_text,
)

# Both the members and their string values map to the kernel code (a StrEnum member hashes and
# compares as its value, so one dict serves both).
_CODE_OF: dict[str, int] = {status.value: code for status, code in STATUS_CODES.items()}
_STATUSES = ", ".join(s.value for s in AgentStatus)
# Element types whose lists numpy converts exactly and without surprises (bool is not among them:
# numpy would silently read True as 1).
_PLAIN_INTS = frozenset(
    (int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
)
_PLAIN_REALS = _PLAIN_INTS | {float, np.float16, np.float32, np.float64}


# --- single values -----------------------------------------------------------------------------


def timestamp(value: Any, name: str) -> float:
    """Seconds since the epoch from a number or a ``datetime`` (naive means UTC).

    Parameters
    ----------
    value
        int, float, numpy integer or floating scalar, or ``datetime``.
    name
        The argument's name, for the error message.

    Returns
    -------
    float
        Within ``[0, MAX_TIMESTAMP]``.

    Raises
    ------
    ValueError
        A bool, NaN, an infinity, an int too large for a float, a value out of range, or any
        other type.
    """
    return epoch_seconds(value, name)


def status_code(value: Any, name: str) -> int:
    """Kernel code of a status given as an :class:`AgentStatus` or its string value.

    Raises
    ------
    ValueError
        Anything else, naming ``name`` and the allowed statuses.
    """
    code = _CODE_OF.get(value) if isinstance(value, str) else None
    if code is None:
        raise ValueError(f"{name} must be one of {_STATUSES}, got {show(value)}")
    return code


def slot_count(value: Any, name: str) -> int:
    """A task-slot count: an int or numpy integer (never a bool) within ``[0, MAX_SLOTS]``.

    Raises
    ------
    ValueError
        Naming ``name``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {show(value)}")
    if not 0 <= value <= MAX_SLOTS:
        raise ValueError(f"{name} must be within [0, {MAX_SLOTS}], got {show(value)}")
    return int(value)


def agent_id(value: Any, name: str) -> str:
    """An agent id as the fleet looks it up: a non-empty string of valid Unicode.

    An id no agent has is not an error here (the fleet reports it as unknown). Neither is its
    length: the records cap ids at ``MAX_ID_LEN`` characters, so a longer one is merely unknown,
    and looking it up costs no more than reading it; not scanning every length keeps a batch of
    a million ids cheap.

    Raises
    ------
    ValueError
        Naming ``name``.
    """
    text = valid_text(value, name)
    if not text:
        raise ValueError(f"{name} is empty")
    return text


def names(
    value: Any, name: str, limit: int = MAX_MODELS, max_len: int = MAX_PATH_LEN
) -> frozenset[str]:
    """A set of names (such as the cached models of a heartbeat): trimmed, case kept.

    ``None`` is the empty set. Each entry must be a non-empty string of valid Unicode of at most
    ``max_len`` characters after trimming; at most ``limit`` entries are accepted (counted as sent).

    Raises
    ------
    ValueError
        A single string, a non-iterable, a bad entry or too many entries, naming ``name``.
    """
    return normalize_names(value, name, limit, max_len)


# --- batches -----------------------------------------------------------------------------------


def agent_ids(values: Any, name: str) -> list[str]:
    """The agent ids of a batch call: a sequence or 1-d array of strings, each as
    :func:`agent_id` requires. Duplicates are allowed (they are the fleet's to resolve). The
    result may be the very list given (not copied, for speed).

    Raises
    ------
    ValueError
        A single string, a non-sequence or a bad entry, naming ``name`` (and the entry's index).
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{name} must be a sequence of agent ids, got shape {values.shape}")
        values = values.tolist()  # numpy strings become str; anything else is checked below
    elif isinstance(values, (str, bytes, bytearray)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of agent ids, got {type(values).__name__}")
    ids = values if isinstance(values, list) else list(values)
    # Fast path, C-level scans only: join fails on a non-string, encode on a lone surrogate. An
    # entry is checked one by one only to name the bad one.
    try:
        "".join(ids).encode("utf-8")
    except (TypeError, UnicodeEncodeError):
        pass
    else:
        if "" not in ids:
            return ids
    return [agent_id(v, f"{name}[{i}]") for i, v in enumerate(ids)]


def timestamps(values: Any, n: int, name: str) -> np.ndarray:
    """Times of a batch: one time for all ``n`` agents, or exactly ``n`` of them.

    Parameters
    ----------
    values
        One value as :func:`timestamp` accepts, or a sequence or 1-d array of ``n`` such values.
    n
        Number of agents in the batch.
    name
        The argument's name, for the error message.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(n,)``; may share memory with a float64 ``values``.

    Raises
    ------
    ValueError
        A bad value (naming ``name`` and its index) or a length other than ``n``.
    """
    n = _batch_size(n)
    items = _batch(values, n, name)
    if items is None:  # one value for everyone
        return np.full(n, timestamp(values[()] if _is_0d(values) else values, name))
    if isinstance(items, np.ndarray) and items.size == 0:
        return np.empty(0, np.float64)  # an empty batch, whatever its dtype
    if isinstance(items, np.ndarray):
        if items.dtype.kind not in "iuf":
            if items.dtype.kind != "O":
                raise ValueError(f"{name} must hold numbers or datetimes, not {items.dtype}")
            items = items.tolist()
    elif set(map(type, items)) <= _PLAIN_REALS:
        try:
            items = np.asarray(items, dtype=np.float64)
        except OverflowError:  # an int beyond float range: named one by one below
            pass
    if not isinstance(items, np.ndarray):
        return np.array([timestamp(v, f"{name}[{i}]") for i, v in enumerate(items)], np.float64)
    seconds = items.astype(np.float64, copy=False)
    ok = (seconds >= 0.0) & (seconds <= MAX_TIMESTAMP)  # NaN fails both comparisons
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        timestamp(items[i], f"{name}[{i}]")  # raises with the value's own message
    return seconds


def status_codes(values: Any, n: int, name: str) -> np.ndarray:
    """Statuses of a batch: one status for all ``n`` agents, or exactly ``n`` of them.

    Returns
    -------
    numpy.ndarray
        uint8 kernel codes, shape ``(n,)``.

    Raises
    ------
    ValueError
        A bad status (naming ``name`` and its index) or a length other than ``n``.
    """
    n = _batch_size(n)
    if isinstance(values, str):  # a string is one status, not a sequence of characters
        return np.full(n, status_code(values, name), np.uint8)
    items = _batch(values, n, name)
    if items is None:
        return np.full(n, status_code(values[()] if _is_0d(values) else values, name), np.uint8)
    if isinstance(items, np.ndarray):
        items = items.tolist()
    codes = [_CODE_OF.get(v) if isinstance(v, str) else None for v in items]
    if None in codes:
        i = codes.index(None)
        status_code(items[i], f"{name}[{i}]")  # raises
    return np.array(codes, dtype=np.uint8)


def slot_counts(values: Any, n: int, name: str) -> np.ndarray:
    """Slot counts of a batch: one count for all ``n`` agents, or exactly ``n`` of them.

    Returns
    -------
    numpy.ndarray
        uint16, shape ``(n,)``.

    Raises
    ------
    ValueError
        A bad count (naming ``name`` and its index) or a length other than ``n``.
    """
    n = _batch_size(n)
    items = _batch(values, n, name)
    if items is None:
        return np.full(n, slot_count(values[()] if _is_0d(values) else values, name), np.uint16)
    if isinstance(items, np.ndarray) and items.size == 0:
        return np.empty(0, np.uint16)
    if isinstance(items, np.ndarray):
        if items.dtype.kind not in "iu":
            if items.dtype.kind != "O":
                raise ValueError(f"{name} must hold integers, not {items.dtype}")
            items = items.tolist()
    elif set(map(type, items)) <= _PLAIN_INTS:
        try:
            items = np.asarray(items, dtype=np.int64)
        except OverflowError:
            pass
    if not isinstance(items, np.ndarray):
        return np.array([slot_count(v, f"{name}[{i}]") for i, v in enumerate(items)], np.uint16)
    ok = (items >= 0) & (items <= MAX_SLOTS)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        slot_count(items[i], f"{name}[{i}]")  # raises
    return items.astype(np.uint16)


# --- helpers -----------------------------------------------------------------------------------


def _batch_size(n: Any) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the batch size must be a non-negative integer, got {show(n)}")
    return int(n)


def _is_0d(values: Any) -> bool:
    return isinstance(values, np.ndarray) and values.ndim == 0


def _batch(values: Any, n: int, name: str) -> np.ndarray | list[Any] | None:
    """``None`` when ``values`` is one value for everyone; else its ``n`` items (a 1-d array or a
    list), after checking the shape."""
    if isinstance(values, np.ndarray):
        if values.ndim == 0:
            return None
        if values.shape != (n,):
            raise ValueError(f"{name} must be one value or {n} values, got shape {values.shape}")
        return values
    if isinstance(values, (str, bytes, bytearray, datetime)) or not isinstance(values, Sequence):
        return None
    try:
        size = len(values)
    except OverflowError:  # len(range(10**20))
        raise ValueError(f"{name} must be one value or {n} values, got too many") from None
    if size != n:
        raise ValueError(f"{name} must be one value or {n} values, got {size}")
    return list(values)
