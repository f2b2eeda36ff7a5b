"""The first start says that the kernels compile, with progress and the time it took."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from scoring import ScoringPolicy
from scoring.server import startup

from .conftest import ROOT, ServerProcess

COMPILED = """
import sys
from numba.core.registry import CPUDispatcher
from scoring import ScoringPolicy
from scoring.server.dispatch import warm_up
warm_up(ScoringPolicy())
names = {f"{v.py_func.__module__}.{v.py_func.__name__}" for name, m in list(sys.modules.items())
         if name.startswith("scoring") for v in vars(m).values()
         if isinstance(v, CPUDispatcher) and v.signatures}
print("\\n".join(sorted(names)))
"""


def test_the_listed_kernels_are_those_the_warm_up_compiles() -> None:
    out = subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
                         check=True).stdout  # fmt: skip
    assert set(out.split()) == set(startup.KERNELS)


class Kernel:
    """A stand-in for a numba dispatcher: ``signatures`` fills when it is compiled."""

    def __init__(self) -> None:
        self.signatures: list[Any] = []


def test_a_cold_start_reports_each_kernel_and_the_time(caplog: pytest.LogCaptureFixture) -> None:
    kernels = {f"m._k{i}": Kernel() for i in range(3)}

    def warm(policy: ScoringPolicy) -> None:
        for k in kernels.values():
            time.sleep(0.3)
            k.signatures.append("compiled")

    with caplog.at_level(logging.INFO, logger="scoring.server.startup"):
        took = startup.compile_kernels(ScoringPolicy(), warm, kernels, cached=False)
    lines = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in caplog.records)  # shown by default
    assert lines[0].startswith("compiling the engine's 3 kernels (first start only")
    assert str(startup.cache_dir()) in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "kernel 1 of 3 compiled", "kernel 2 of 3 compiled", "kernel 3 of 3 compiled"
    ]  # fmt: skip
    assert lines[1].split(": ")[1].startswith("_k0 (")
    assert lines[-1] == f"kernels compiled in {took:.0f} s; later starts load them from " + str(
        startup.cache_dir()
    )
    assert took >= 0.9


def test_a_warm_start_is_quiet_unless_slow(caplog: pytest.LogCaptureFixture) -> None:
    kernels = {"m._k": Kernel()}
    with caplog.at_level(logging.INFO, logger="scoring.server.startup"):
        startup.compile_kernels(ScoringPolicy(), lambda p: None, kernels, cached=True)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert caplog.records[0].getMessage().startswith("kernels loaded from numba's cache in")


def test_the_cache_is_recognised(tmp_path: Path) -> None:
    names = ("scoring._kernels._pick", "scoring._assign_kernels._assign")
    assert not startup.is_cached(tmp_path, names)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "_kernels._pick_flat-40.py311.nbi").write_bytes(b"")  # another
    assert not startup.is_cached(tmp_path, names)
    (tmp_path / "sub" / "_kernels._pick-40.py311.nbi").write_bytes(b"")
    assert not startup.is_cached(tmp_path, names)
    (tmp_path / "sub" / "_assign_kernels._assign-9.py311.nbi").write_bytes(b"")
    assert startup.is_cached(tmp_path, names)
    assert startup.is_cached(startup.cache_dir())  # this worktree's kernels were compiled


@pytest.mark.slow
def test_a_real_first_start_with_an_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    first = ServerProcess(tmp_path / "a")
    (tmp_path / "a").mkdir()
    first.start(timeout=600)
    first.stop()
    log = first.log.read_text()
    assert "compiling the engine's 5 kernels" in log and str(tmp_path / "numba") in log
    assert "kernel 5 of 5 compiled" in log and "kernels compiled in" in log
    second = ServerProcess(tmp_path / "b")
    (tmp_path / "b").mkdir()
    second.start(timeout=120)
    second.stop()
    assert "compiling" not in second.log.read_text()
