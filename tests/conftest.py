"""Shared test configuration: Hypothesis profiles (``dev`` locally, ``ci`` under CI=true)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Every pick through the native entry point verifies its argument types (see scoring._jit).
os.environ["SCORING_CHECK_ENTRY"] = "1"

import pytest
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


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``), compile the kernels once in the controller before the
    workers start (``tests/warm_kernels.py``): otherwise, on a clean clone, every worker and
    every server it starts compiles the same kernels at the same time. A warm cache makes this
    a second or two; with numba off, or without ``-n``, nothing is done."""
    if hasattr(config, "workerinput") or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return
    if not getattr(config.option, "numprocesses", None):
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    steps = [subprocess.Popen([sys.executable, "-m", "tests.warm_kernels", step], cwd=root,
                              env=env) for step in ("parallel", "serial")]  # fmt: skip
    for step in steps:
        if step.wait() != 0:
            raise pytest.UsageError(f"compiling the kernels failed: {step.args}")
