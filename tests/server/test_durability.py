"""Durability under group commit (DESIGN section 12): SIGKILL the server at random moments of
bursts of submissions, over many rounds, and start it again on the same database each time.

A 202 is sent only after the transaction holding its run committed, so every run whose 202 a
client received exists after the restart, and (the crash audit of :func:`load.check`)
completes exactly once, with no agent ever over-filled. Runs whose answers the kill lost may
exist too: those are committed, never answered.
"""

from __future__ import annotations

import random
from pathlib import Path

from .conftest import ServerProcess
from .load import LoadResult, check, run_load
from .test_load import CAPACITY

ROUNDS = 5
RUNS = 200


def test_runs_acknowledged_before_a_kill_at_any_moment_survive_and_complete_once(
    tmp_path: Path,
) -> None:
    draw = random.Random(25)  # fixed kill points: a failure can be replayed
    server = ServerProcess(tmp_path, "--heartbeat-timeout", "10", demo_agents=30)
    server.start()
    total = LoadResult()
    kills = []
    try:
        for _ in range(ROUNDS):
            kill_after = draw.randrange(1, RUNS - 20)
            kills.append(kill_after)
            result = run_load(server, runs=RUNS, clients=16, capacity=CAPACITY,
                              kill_after=kill_after, retry_start=False)  # fmt: skip
            assert len(result.accepted) == RUNS
            total.accepted |= result.accepted
            total.agents += result.agents
    finally:
        server.stop()
    assert len(total.accepted) == ROUNDS * RUNS, kills
    check(server, total, CAPACITY)
