"""Compile the engine's kernels before the first real call, and say so while it takes a while.

Numba compiles a kernel on its first call and keeps the machine code in its on-disk cache:
``scoring/__pycache__/numba-<hash of the kernels' sources>/`` beside the package (see
:mod:`scoring._jit`), or ``NUMBA_CACHE_DIR`` when that is set. Without the cache, the first pick
and the first ``assign`` of a process compile for about a minute (longer on a busy machine); with
it they load in well under a second. A program that would otherwise go quiet that long (the
simulation's first policy) calls :func:`compile_kernels` first: on a first run it prints that the
kernels are compiling, each step as it ends, and the time it took; on later runs nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from numba import config

from scoring.assign import assign
from scoring.fleet import Fleet
from scoring.models import Agent, DispatchRequest, ScoringPolicy
from scoring.pick import eligible_agents, evaluate, pick_agent, rank_agents

#: A warm run prints nothing unless compiling took at least this long (a cache that lacked some
#: kernels: it was written by a program that called fewer of them).
QUIET_S = 2.0

_TEAM = uuid.UUID(int=1)
_AGENT = Agent(agent_id="warm-up", team_id=_TEAM, status="idle", labels={"comfyui"},
               last_heartbeat=0.0, gpu_capacity=1, cached_models={"m"})  # fmt: skip
_REQUEST = DispatchRequest(team_id=_TEAM, required_models={"m"}, submitted_at=0.0)


def _assign(wait_s: float) -> Callable[[], object]:
    policy = ScoringPolicy(locality_wait_s=wait_s)
    return lambda: assign(Fleet.from_agents([_AGENT]), [_REQUEST, _REQUEST], policy, 1.0)


#: The calls that compile the kernels, each on a throwaway one-agent fleet (name, call).
STEPS: tuple[tuple[str, Callable[[], object]], ...] = (
    ("pick", lambda: pick_agent(Fleet.from_agents([_AGENT]), _REQUEST, now=1.0).explain()),
    ("rank", lambda: rank_agents(Fleet.from_agents([_AGENT]), _REQUEST, k=2, now=1.0)),
    ("eligibility", lambda: (eligible_agents(Fleet.from_agents([_AGENT]), _REQUEST, now=1.0),
                             evaluate(Fleet.from_agents([_AGENT]), _REQUEST, now=1.0))),
    ("assign", _assign(0.0)),
    ("assign with a locality wait", _assign(60.0)),
)  # fmt: skip


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels (``NUMBA_CACHE_DIR`` when set)."""
    return Path(config.CACHE_DIR)  # type: ignore[attr-defined]


def is_cached() -> bool:
    """Whether the cache holds compiled kernels of the current sources (an index file)."""
    directory = cache_dir()
    return directory.is_dir() and any(directory.rglob("*.nbi"))


def compile_kernels(report: Callable[[str], None] | None = None) -> float:
    """Compile (or load from the cache) every kernel the public calls use; returns the seconds.

    Parameters
    ----------
    report : callable, optional
        Called with each line to show: without the cache, a first line saying that the kernels
        are compiling and where they are cached, one line per step as it ends (``[2/5] rank:
        4.1 s``) and the total; with it, nothing unless compiling still took ``QUIET_S`` or more.
        With ``NUMBA_DISABLE_JIT=1`` nothing compiles and nothing is reported.
    """
    if config.DISABLE_JIT:  # type: ignore[attr-defined]
        return 0.0
    say = report or (lambda line: None)
    cold = not is_cached()
    if cold:
        say(f"Compiling the engine's kernels (first run only, about a minute; cached in "
            f"{cache_dir()}) ...")  # fmt: skip
    began = time.perf_counter()
    for i, (name, step) in enumerate(STEPS, 1):
        start = time.perf_counter()
        step()
        if cold:
            say(f"  [{i}/{len(STEPS)}] {name}: {time.perf_counter() - start:.1f} s")
    took = time.perf_counter() - began
    if cold or took >= QUIET_S:
        say(f"Kernels compiled in {took:.1f} s.")
    return took
