"""The README's quick start as a new user follows it: a clean clone, then the README's own first
command (``make demo``), from creating ``.venv`` to the printed comparison.

It installs the ``sim`` extra into a fresh virtual environment (from pip's cache when warm) and
compiles the kernels from nothing, so it also checks that the demo installs only its own extra
and that a first run says it is compiling. The simulation is shortened through the Makefile's
``DEMO_ARGS`` (a few hundred tasks, no plots): its output has the same shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scoring.sim.policies import POLICY_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHORT = "--tasks 300 --agents 40 --no-plots --no-progress"


def quick_start() -> list[str]:
    """The commands of the README's first ``bash`` block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n") + len("```bash\n")
    block = text[start : text.index("```", start)]
    return [c for line in block.splitlines() if (c := line.split("#")[0].strip())]


def test_the_quick_start_begins_with_the_demo_and_the_tests():
    assert quick_start() == ["make demo", "make test"]


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None,
                    reason="needs git and make")  # fmt: skip
def test_make_demo_from_a_clean_clone(tmp_path):
    clone = tmp_path / "scoring"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # A reader's shell: not this run's make (its level and flags make a nested make print
    # "make[1]: Entering directory" lines into the output read below), nor its environment.
    unset = ("PYTHONPATH", "NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT", "VIRTUAL_ENV", "MAKELEVEL",
             "MAKEFLAGS", "MFLAGS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["DEMO_ARGS"] = SHORT
    demo = quick_start()[0]
    done = subprocess.run(demo, shell=True, cwd=clone, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    venv = clone / ".venv"
    assert (venv / ".installed-sim").exists() and not (venv / ".installed-dev").exists()
    err, out = done.stderr, done.stdout
    assert "Compiling the engine's kernels (first run only" in err  # a clean clone compiles
    assert "[5/5] assign with a locality wait: " in err and "Kernels compiled in " in err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    assert lines[at].split()[:3] == ["policy", "wait", "p50"]
    assert lines[at].split()[-1] == "tasks/s"
    rows = [line.split()[0] for line in lines[at + 1 :] if line.split()]
    assert rows[1:] == list(POLICY_NAMES)  # after the rule under the header
    metrics = json.loads((clone / "out" / "demo" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == set(POLICY_NAMES)
    assert all(m["completed"] == 300 for m in metrics["metrics"].values())
