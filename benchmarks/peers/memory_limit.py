"""The machine's limit for a pick: one pass that only reads, once, every column the pick reads.

No filter, no score, no branch: each value goes into an integer checksum (float columns are read
through uint64 views, so it vectorises; a float sum could not vectorise without fastmath and would
time the adder's latency, not memory). The checksum is returned so the
compiler cannot drop the reads. A pick that reads the same bytes cannot beat this pass; the
benchmark reports the engine's time over this one at every size.
"""

from __future__ import annotations

import numpy as np

from scoring._jit import jit
from scoring.fleet import Fleet


@jit
def _read_columns(team, status, opt_in, region, gpu, heartbeat, capacity, running, vram, failure,
                  id_hash, labels, models):  # fmt: skip
    """XOR of every value of the 13 columns (bitsets as flat ``(n * words,)``), as uint64.

    XOR rather than a sum: it vectorises as well and never overflows (numpy would warn when the
    kernel runs as Python, under NUMBA_DISABLE_JIT=1).
    """
    s = np.uint64(0)
    for i in range(team.shape[0]):
        small = team[i] + status[i] + opt_in[i] + region[i] + gpu[i] + capacity[i] + running[i]
        s ^= np.uint64(small) ^ heartbeat[i] ^ vram[i] ^ failure[i] ^ id_hash[i]
    for i in range(labels.shape[0]):
        s ^= labels[i]
    for i in range(models.shape[0]):
        s ^= models[i]
    return s


def column_views(fleet: Fleet) -> tuple[np.ndarray, ...]:
    """The fleet's columns as the integer views that :func:`_read_columns` takes (no copies)."""
    c = fleet.columns
    return (
        c.team, c.status, c.community_opt_in.view(np.uint8), c.region, c.gpu_model,
        c.last_heartbeat.view(np.uint64), c.gpu_capacity, c.running_count,
        c.vram_gb.view(np.uint64), c.failure_rate.view(np.uint64), c.id_hash,
        c.labels.reshape(-1), c.cached_models.reshape(-1),
    )  # fmt: skip


class MemoryLimit:
    """Times the read-only pass; answers no agent (it is not a pick).

    The views are taken once, so a call is the kernel and nothing else (the fleet must not
    change meanwhile: benchmark fleets never do).
    """

    def __init__(self, fleet: Fleet) -> None:
        with fleet.lock:
            self.views = column_views(fleet)

    def __call__(self, request, policy, now) -> int:
        return int(_read_columns(*self.views))
