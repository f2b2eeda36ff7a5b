"""Long-polled heartbeats: ``POST /agents/heartbeat?wait=S`` waits for work (DESIGN section 12).

An agent with nothing to start may ask its heartbeat to wait up to ``S`` seconds: the answer is
sent as soon as the dispatcher hands the agent a task (or a cancel is asked of a task it runs),
so work reaches it within a dispatch round instead of at its next heartbeat. A waiting heartbeat
is an ``asyncio.Event`` on the event loop: it holds no worker thread and no database connection.

The dispatcher (a thread) wakes the agents it placed tasks on once per round, in one hop to the
loop. :meth:`Waiters.close` (the server shutting down) ends every wait at once and refuses new
ones, so a shutdown never waits for long polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

#: Longest wait a heartbeat may ask for, in seconds.
MAX_WAIT_S = 30.0


class Waiters:
    """The waiting heartbeats of one process, by agent id.

    Each agent has a generation, moved by every :meth:`wake` that names it. A heartbeat takes
    the generation (:meth:`mark`) before it reads the agent's tasks, and its wait ends at once
    if the generation moved since: a task handed out between the read and the wait is not
    missed.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._generation: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def mark(self, agent_id: str) -> int:
        """The agent's generation (on the loop, before reading its tasks)."""
        self._loop = asyncio.get_running_loop()
        return self._generation.get(agent_id, 0)

    async def wait(self, agent_id: str, seconds: float, since: int) -> bool:
        """Wait (on the loop) until :meth:`wake` names ``agent_id`` (or named it since
        generation ``since``), the server closes, or ``seconds`` pass; returns whether it was
        woken (``False``: timed out or closing)."""
        if self._closed or seconds <= 0:
            return False
        if self._generation.get(agent_id, 0) != since:
            return True
        event = asyncio.Event()
        self._waiting.setdefault(agent_id, set()).add(event)
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        finally:
            events = self._waiting.get(agent_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[agent_id]
        return not self._closed

    def wake(self, agent_ids: Iterable[str]) -> None:
        """Wake the heartbeats waiting for these agents (from any thread, one hop to the loop)."""
        ids = list(set(agent_ids))
        if ids:
            self._call(ids)

    def close(self) -> None:
        """End every wait now and refuse new ones (from any thread): the server is stopping."""
        self._closed = True
        self._call(None)

    def _call(self, ids: list[str] | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._set, ids)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _set(self, ids: list[str] | None) -> None:
        if ids is None:  # closing: everyone
            ids = list(self._waiting)
        else:
            for agent_id in ids:
                self._generation[agent_id] = self._generation.get(agent_id, 0) + 1
        for agent_id in ids:
            for event in self._waiting.get(agent_id, ()):
                event.set()
