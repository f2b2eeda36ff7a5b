"""Time-ordered task ids (UUID version 7, RFC 9562).

Python 3.11 has no ``uuid.uuid7``. Ids sort by creation time, so ``ORDER BY id`` is submission
order for the dispatcher's queue, and an index on the id is also an index on time.
"""

from __future__ import annotations

import os
import random
import threading
import time
from uuid import UUID

_lock = threading.Lock()
#: The ids' random bits: seeded from the OS once, then drawn without a system call each (they
#: make ids of different processes distinct; they are not secrets: a task is found by its id
#: only by its own team).
_random = random.Random(os.urandom(32))
_last_ms = 0
_counter = 0


def uuid7() -> UUID:
    """A new UUIDv7: 48-bit Unix milliseconds, a 12-bit counter, 62 random bits.

    Within one process ids are strictly increasing: ids made in the same millisecond take the
    next counter value (RFC 9562 section 6.2, method 1), and a full counter borrows the next
    millisecond rather than going back in order.
    """
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
        rand = _random.getrandbits(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return UUID(int=value)
