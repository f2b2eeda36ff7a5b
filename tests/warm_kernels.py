"""Fill numba's on-disk cache before parallel test workers start (``tests/conftest.py``).

``python -m tests.warm_kernels serial`` compiles what the public calls use (the server's and the
simulation's start-up step, :func:`scoring.warmup.compile_kernels`); ``parallel`` compiles the
parallel pick kernel, which only the differential and peer tests call and which alone costs
minutes of CPU to compile. The two run at once in separate processes, one per core; without
this, both pytest-xdist workers would compile the same kernels at the same time on a clean
clone, and a server started meanwhile would compile them a third time.
"""

from __future__ import annotations

import sys


def serial() -> None:
    from scoring.warmup import compile_kernels

    compile_kernels()


def parallel() -> None:
    from scoring import _kernels as K
    from scoring.fleet import Fleet
    from scoring.models import ScoringPolicy
    from scoring.query import build_query
    from scoring.warmup import _AGENT, _REQUEST

    fleet = Fleet.from_agents([_AGENT])
    with fleet.lock:
        for full_scan in (False, True):  # the two query layouts the tests pass
            q = build_query(fleet, _REQUEST, ScoringPolicy(), 1.0, full_scan)
            K._pick_parallel(fleet.columns, q, 2)


if __name__ == "__main__":
    {"serial": serial, "parallel": parallel}[sys.argv[1]]()
