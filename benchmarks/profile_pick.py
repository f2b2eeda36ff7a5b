"""Where the time of a small pick goes, end to end from Python.

``pick_agent`` is timed the way ``timeit`` times a statement (many calls per repeat, the best and
the median repeat), then each step of it alone, over the same requests: the lock, the argument
checks, finding the template's prebuilt kernel arguments (``scoring.pick.Bound``, built on a
template's first pick against a fleet's state), the kernel through its entry point, and the
tally and ``Decision`` built from the kernel's output. Whatever the sum of the steps leaves
of the total is the calls between them. A cProfile run gives the same split by function.

    python -m benchmarks.profile_pick [--agents 100]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import timeit
from collections.abc import Callable

from scoring import pick
from scoring.pick import pick_agent


def per_call(fn: Callable[[], object], calls: int, number: int, repeat: int) -> dict[str, float]:
    """Seconds per call of ``fn`` (which makes ``calls`` calls): best and median of ``repeat``
    repeats of ``number`` runs each (timeit's method; the best is the least disturbed)."""
    times = [t / number / calls for t in timeit.repeat(fn, number=number, repeat=repeat)]
    return {"best": min(times), "median": statistics.median(times)}


def breakdown(fleet, requests, policy, now, number: int = 2_000, repeat: int = 7) -> dict:
    """``{"total": {...}, "steps": {step: {...}}, "profile": text}``, seconds per pick."""
    lock = fleet.lock
    with lock:
        for r in requests:  # binds each template's arguments (pick.Bound), as a dispatcher would
            pick.decide(fleet, r, policy, now)
        bounds = [fleet.pick_cache[r.template_id] for r in requests]
        calls = [(b.pick, r.tie_key_hash) for b, r in zip(bounds, requests, strict=True)]
        snapshots = []  # each request's kernel output and label AND (copied from the scratch)
        for b, (call, tie) in zip(bounds, calls, strict=True):
            snapshots.append((b, call(now, tie), b.labels_and.copy()))
    k = len(requests)

    def total():
        for r in requests:
            pick_agent(fleet, r, policy, now)

    def locking():
        for _ in requests:
            with lock:
                pass

    def checks():
        for r in requests:
            pick._check(r, policy, now)

    def arguments():  # what decide does to find a template's prebuilt arguments
        cache = fleet.pick_cache
        for r in requests:
            b = cache.get(r.template_id)
            if b is None or b.policy is not policy:
                raise AssertionError("a template's arguments were not kept")

    def kernel():
        for call, tie in calls:
            call(now, tie)

    def decision():
        for b, out, labels_and in snapshots:
            pick.tally(fleet, b.parts, out, labels_and)

    with lock:  # RLock: the steps inside take it again as pick_agent does, uncontended
        total()
        steps = {name: per_call(fn, k, number, repeat) for name, fn in (
            ("lock", locking), ("checks", checks), ("prebuilt arguments", arguments),
            ("kernel (native entry)", kernel), ("tally and Decision", decision))}  # fmt: skip
    whole = per_call(total, k, number, repeat)
    steps["calls between steps (rest)"] = {
        key: max(0.0, whole[key] - sum(s[key] for s in steps.values())) for key in whole
    }
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(number):
        total()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    return {"total": whole, "steps": steps, "profile": _trim(text.getvalue())}


def _trim(text: str) -> str:
    """pstats output from its column header on, paths shortened to the file name."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    out = []
    for line in lines[start:]:
        if "/" in line:
            head, _, tail = line.rpartition(" ")
            line = f"{head} {tail.rsplit('/', 1)[-1]}"
        if line.strip():
            out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.registry import build_workload

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    args = parser.parse_args(argv)
    w = build_workload(args.agents, keep_agents=False)
    result = breakdown(w.fleet, w.timed, w.policy, w.now)
    print(f"pick_agent: best {result['total']['best'] * 1e6:.2f} us, "
          f"median {result['total']['median'] * 1e6:.2f} us per pick")  # fmt: skip
    for name, t in result["steps"].items():
        print(f"  {name:<28} {t['best'] * 1e6:6.2f} us (median {t['median'] * 1e6:.2f})")
    print(result["profile"])


if __name__ == "__main__":
    main()
