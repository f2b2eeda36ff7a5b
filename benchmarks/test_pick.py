"""Time per pick over the size ladder, every implementation side by side (one group per size).

Before an implementation is timed on a fleet, its answers to every check and timed request must
equal the engine's. A benchmark call makes one pick of each of the workload's 8 timed requests
(``extra_info["picks_per_call"]``), so every implementation is timed on the same mix.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from benchmarks.registry import IMPLEMENTATIONS, MIXES

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
    requests, policy, now = workload.timed, workload.policy, workload.now

    def one_call():
        for request in requests:
            picker(request, policy, now)

    benchmark.group = f"pick {size:>9,} agents"
    benchmark.extra_info.update(
        size=size, impl=impl, kind=implementation.kind, picks_per_call=len(requests),
        load_avg=os.getloadavg()[0],
    )  # fmt: skip
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


#: Timed in turns by test_interleaved (the reference is too slow to take turns at 100,000).
INTERLEAVED = ("engine", "engine-kernel", "memory-limit", "numpy", "polars",
               "duckdb")  # fmt: skip
INTERLEAVED_BUDGET_S = 8.0


@pytest.mark.parametrize("mix", MIXES)
def test_interleaved(benchmark, mix, size, workload, quick):
    """The implementations timed in turns, round after round, on the same fleet and requests.

    Separate benchmarks run seconds apart, and on a shared machine the load changes in between;
    a ratio of two times from the same round sees the same load. The report takes the median,
    over rounds, of each round's ratio (``extra_info["ratios"]``). ``mix`` is the kind of
    request timed (see ``benchmarks.registry.MIXES``).
    """
    policy, now, requests = workload.policy, workload.now, workload.requests(mix)
    calls = {}
    for name in INTERLEAVED:
        implementation = IMPLEMENTATIONS[name]
        picker = implementation.make(workload.fleet, workload.agents)
        if implementation.kind != "limit":
            assert workload.disagreements(picker) == {}, name

        def one_call(picker=picker):
            for request in requests:
                picker(request, policy, now)

        one_call()
        calls[name] = (one_call, _calibrate(one_call, quick)[0])

    def rounds() -> dict[str, list[float]]:
        per_pick: dict[str, list[float]] = {name: [] for name in calls}
        started = time.perf_counter()
        while True:
            for name, (call, iterations) in calls.items():
                start = time.perf_counter()
                for _ in range(iterations):
                    call()
                per_pick[name].append((time.perf_counter() - start) / iterations / len(requests))
            spent = time.perf_counter() - started
            done = len(per_pick["engine"])
            if quick or done >= 30 or (done >= 5 and spent > INTERLEAVED_BUDGET_S):
                return per_pick

    per_pick = benchmark.pedantic(rounds, rounds=1, iterations=1)
    pairs = {f"{name}/engine": (name, "engine") for name in calls if name != "engine"}
    pairs["engine-kernel/memory-limit"] = ("engine-kernel", "memory-limit")
    pairs["engine/memory-limit"] = ("engine", "memory-limit")
    pairs["numpy/engine-kernel"] = ("numpy", "engine-kernel")
    pairs["numpy/memory-limit"] = ("numpy", "memory-limit")  # the most any pick could gain
    ratios = {
        key: statistics.median(a / b for a, b in zip(per_pick[x], per_pick[y], strict=True))
        for key, (x, y) in pairs.items()
    }
    pools = workload.pool_sizes(mix)
    benchmark.group = f"interleaved {mix}"
    benchmark.extra_info.update(
        size=size, mix=mix, rounds=len(per_pick["engine"]), ratios=ratios,
        median_s={name: statistics.median(t) for name, t in per_pick.items()},
        pool_mean=statistics.mean(pools), pool_max=max(pools),
        bytes_per_agent=workload.fleet.nbytes_per_agent(), load_avg=os.getloadavg()[0],
    )  # fmt: skip
