"""Shared test configuration: Hypothesis profiles (``dev`` locally, ``ci`` under CI=true)."""

from __future__ import annotations

import os

# Every pick through the native entry point verifies its argument types (see scoring._jit).
os.environ["SCORING_CHECK_ENTRY"] = "1"

from hypothesis import HealthCheck, settings

# No deadline: the first example of a test may include numba's compilation (or, with
# NUMBA_DISABLE_JIT=1, pure-Python kernels), and the machine is shared and noisy.
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
