"""The first start: compiling the engine's kernels, said out loud.

Without numba's on-disk cache the warm-up (:func:`scoring.server.dispatch.warm_up`) compiles
the kernels for about a minute before the server answers. :func:`compile_kernels` runs it and,
when the cache does not hold them (or loading takes longer than :data:`QUIET_S`), logs that they
are compiling, each kernel as it is done (n of N), and the time it took. Log lines are warnings
so that the default log level shows them. The cache is :func:`cache_dir` (``NUMBA_CACHE_DIR``
when set, else ``scoring/__pycache__/numba-<hash of the kernel sources>``).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from numba import config

from scoring import ScoringPolicy
from scoring.server.dispatch import warm_up

log = logging.getLogger("scoring.server.startup")

#: The kernels the warm-up compiles, by module and name; the inlined helpers compile within
#: them. ``tests/server/test_startup.py`` checks this list against a warm-up.
KERNELS = (
    "scoring._kernels._scratch",
    "scoring._kernels._pick_records",
    "scoring._kernels._scores",
    "scoring._assign_kernels._init_groups",
    "scoring._assign_kernels._assign",
)
#: A warm-up from the cache takes about a second; one still running after this is compiling.
QUIET_S = 3.0
#: With no kernel finished for this long, say that it is still going.
STILL_S = 15.0


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels."""
    import scoring._jit  # noqa: F401  (sets numba's cache directory)

    return Path(config.CACHE_DIR)  # type: ignore[attr-defined]


def kernels() -> dict[str, Any]:
    """The numba dispatchers of :data:`KERNELS`, by name."""
    found = {}
    for name in KERNELS:
        module, _, attr = name.rpartition(".")
        found[name] = getattr(importlib.import_module(module), attr)
    return found


def is_cached(directory: Path, names: tuple[str, ...] = KERNELS) -> bool:
    """Whether ``directory`` holds numba's index of every kernel of ``names``."""
    # numba names an index <module>.<function>-<line>.<python>.nbi
    return all(any(directory.rglob(f"{'.'.join(n.split('.')[-2:])}-*.nbi")) for n in names)


def compile_kernels(
    policy: ScoringPolicy,
    warm: Callable[[ScoringPolicy], None] = warm_up,
    compiled: Mapping[str, Any] | None = None,
    cached: bool | None = None,
) -> float:
    """Run ``warm`` (default: the dispatcher's warm-up) and tell the log about compiling;
    returns the seconds it took. ``compiled`` maps each kernel's name to its dispatcher (whose
    ``signatures`` fill as it compiles), ``cached`` says whether the cache holds them (default:
    :func:`kernels` and :func:`is_cached`)."""
    watched = kernels() if compiled is None else compiled
    where = cache_dir()
    if cached is None:
        cached = is_cached(where, tuple(watched))
    done = threading.Event()
    said: list[bool] = [False]
    start = time.perf_counter()
    watcher = threading.Thread(
        target=_progress, args=(done, said, watched, start, 0.0 if not cached else QUIET_S, where),
        name="compile-progress", daemon=True,
    )  # fmt: skip
    watcher.start()
    try:
        warm(policy)
    finally:
        done.set()
        watcher.join()
    took = time.perf_counter() - start
    if said[0]:
        log.warning("kernels compiled in %.0f s; later starts load them from %s", took, where)
    else:
        log.info("kernels loaded from numba's cache in %.1f s", took)
    return took


def _progress(
    done: threading.Event,
    said: list[bool],
    watched: Mapping[str, Any],
    start: float,
    quiet: float,
    where: Path,
) -> None:
    """Until ``done``: after ``quiet`` seconds, say that the kernels compile, then each one
    finished (n of N), and every :data:`STILL_S` without news that it goes on."""
    if done.wait(quiet):
        return
    said[0] = True
    total = len(watched)
    log.warning("compiling the engine's %d kernels (first start only: a minute or more; "
                "numba caches them in %s) ...", total, where)  # fmt: skip
    finished: set[str] = set()
    last_news = time.perf_counter()
    while True:
        ended = done.wait(0.25)  # and a last look once it has: the last kernel is news too
        now = time.perf_counter()
        for name, dispatcher in watched.items():
            if name not in finished and dispatcher.signatures:
                finished.add(name)
                last_news = now
                log.warning("kernel %d of %d compiled: %s (%.0f s)", len(finished), total,
                            name.rpartition(".")[2], now - start)  # fmt: skip
        if ended:
            return
        if now - last_news >= STILL_S:
            last_news = now
            log.warning("still compiling: %d of %d kernels done (%.0f s)", len(finished), total,
                        now - start)  # fmt: skip
