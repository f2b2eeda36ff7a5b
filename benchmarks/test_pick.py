"""Time per pick over the size ladder, every implementation side by side (one group per size).

Before an implementation is timed on a fleet, its answers to every check and timed request must
equal the engine's. A benchmark call makes one pick of each of the workload's 8 timed requests
(``extra_info["picks_per_call"]``), so every implementation is timed on the same mix.
"""

from __future__ import annotations

import time

import pytest

from benchmarks.registry import IMPLEMENTATIONS

TARGET_ROUND_S = 0.02  # calls per round are chosen so that a round lasts about this long
BUDGET_S = 1.5  # rough time spent timing one implementation on one fleet


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_pick(benchmark, impl, size, workload, quick):
    implementation = IMPLEMENTATIONS[impl]
    if not implementation.fits(size):
        pytest.skip(f"{impl} is not timed above {implementation.max_size:,} agents")
    picker = implementation.make(workload.fleet, workload.agents)  # also warms up the JIT
    if implementation.kind != "limit":
        assert workload.disagreements(picker) == {}
    else:
        picker(None, None, None)  # compile before timing
    requests, policy, now = workload.timed, workload.policy, workload.now

    def one_call():
        for request in requests:
            picker(request, policy, now)

    benchmark.group = f"pick {size:>9,} agents"
    benchmark.extra_info.update(
        size=size, impl=impl, kind=implementation.kind, picks_per_call=len(requests)
    )
    iterations, rounds = _calibrate(one_call, quick)
    benchmark.pedantic(one_call, iterations=iterations, rounds=rounds, warmup_rounds=1)


def _calibrate(call, quick: bool) -> tuple[int, int]:
    """Iterations per round and rounds, from the time of one call (itself a warm-up)."""
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    if quick:
        return 1, 1
    iterations = max(1, round(TARGET_ROUND_S / once))
    rounds = int(min(50, max(5, BUDGET_S / (iterations * once))))
    return iterations, rounds
