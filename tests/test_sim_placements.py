"""The simulation's decisions do not move when only its speed should: every policy's placements
(task, agent, in order) and start and end times on small busy workloads, against digests recorded
before the dispatcher learnt to skip work (``tests/data/sim_placements.json``).

A change that is meant to change decisions (a new rule in the engine, a new workload) records
them again: ``python -m tests.test_sim_placements --write``, and says so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scoring.sim import SimConfig, compare
from tests.test_sim_core import EVERY, SMALL

DIGESTS = Path(__file__).parent / "data" / "sim_placements.json"
SEEDS = (0, 1)


def digests(seed: int) -> dict[str, str]:
    """Each policy's decisions on ``SMALL`` with ``seed``, as one hash."""
    config: SimConfig = replace(SMALL, seed=seed)
    out = {}
    for name, result in compare(config, EVERY).items():
        log = result.log
        # Times to the millisecond: a wake's float rounding moves them by under a microsecond.
        times = np.round(np.concatenate([log.start, log.end]), 3)
        h = hashlib.sha256(json.dumps(log.placements).encode())
        h.update(np.nan_to_num(times, nan=-1.0).tobytes())
        out[name] = h.hexdigest()[:16]
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_decisions_are_those_recorded(seed):
    expected = json.loads(DIGESTS.read_text())[str(seed)]
    assert digests(seed) == expected


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    DIGESTS.write_text(json.dumps({str(s): digests(s) for s in SEEDS}, indent=1) + "\n")
