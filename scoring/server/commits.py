"""Group commit: many requests' writes in one transaction, each answered after its commit.

A submission or an agent's call hands its write to :class:`GroupCommit` as a *work*: a function
of an open connection that does the request's reads and writes and returns its answer. One
writer thread takes every work waiting, runs them in one transaction, commits, runs each
work's *after* step (e.g. giving a freed slot back to the Fleet), and only then answers them
all: a request is never answered before the transaction that holds its write committed, so a
process killed at any moment loses no acknowledged write (DESIGN section 12). One commit (one
WAL sync on SQLite, one round trip and flush on PostgreSQL) then serves a whole batch instead
of one request.

A work may refuse its request by raising :class:`~scoring.server.errors.ApiError` *before it
writes anything*: the refusal is answered and the batch goes on. Any other exception rolls the
batch back, and its works are run again one transaction each, so one bad request (or a busy
database) fails only itself.

Answers reach the event loop in one hop per batch (``call_soon_threadsafe``), not one per
request; a caller on a worker thread waits on a :class:`concurrent.futures.Future` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Executable

from scoring.server.db import Database
from scoring.server.errors import ApiError

log = logging.getLogger("scoring.server.commits")

T = TypeVar("T")
#: Most works in one transaction.
MAX_BATCH = 512


@dataclass
class Done(Generic[T]):
    """A work's answer and what to do once its transaction committed (in the writer thread,
    before the request is answered).

    ``inserts`` are rows the work's transaction must insert, as (statement, parameters): the
    writer inserts a batch's rows of one statement in one ``executemany``, after its works ran
    (for rows nothing else in the batch reads, such as a new run's).
    """

    answer: T
    after: Callable[[], None] | None = None
    inserts: tuple[tuple[Executable, dict[str, Any]], ...] = ()


Work = Callable[[Connection], "Done[T]"]


@dataclass
class _Item:
    work: Work[Any]
    #: Exactly one of these is set: an event loop's future, or a thread's.
    future: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    sync: concurrent.futures.Future[Any] | None = None
    outcome: tuple[bool, Any] = (False, None)  # (ok, answer or exception)
    order: str = ""


class GroupCommit:
    """The writer thread (:meth:`start`, :meth:`stop`) and the two ways to hand it a work.

    ``lock``, when given, is held from just before a batch with after steps commits until its
    after steps ran, so that whoever reads the database and the memory the after steps update
    under the same lock sees both before or both after (the server's ``sync``: a heartbeat that
    sets an agent's running count from the database between the commit of a freed slot and
    that slot's release in the Fleet would otherwise leave the count one low).
    """

    def __init__(
        self,
        database: Database,
        max_batch: int = MAX_BATCH,
        lock: threading.RLock | None = None,
    ) -> None:
        self.database = database
        self.max_batch = max_batch
        self.lock = lock
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Transactions committed and works they held (for the benchmark and the metrics).
        self.batches = 0
        self.works = 0

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is waiting, then stop the writer thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def run(self, work: Work[T], order: str = "") -> T:
        """Run ``work`` in the next batch; its answer once committed (its refusal raised).

        A batch runs its works sorted by ``order`` (then as they came): an agent's calls pass
        the agent's id, so every batch, of every replica, locks agents' rows in the order of
        their ids, as the dispatcher's reservations do (:func:`scoring.server.tasks.
        commit_placements`), and two transactions never wait for each other in a cycle (on
        PostgreSQL a deadlock costs a second, then one of them fails).
        """
        if self._thread is None:  # not started (a test's bare state): one transaction
            return self._alone(work)
        loop = asyncio.get_running_loop()
        item = _Item(work, future=loop.create_future(), loop=loop, order=order)
        self._queue.put(item)
        assert item.future is not None
        answer: T = await item.future
        return answer

    def run_sync(self, work: Work[T], order: str = "") -> T:
        """:meth:`run` for a caller on a worker thread: blocks until committed."""
        if self._thread is None:
            return self._alone(work)
        item = _Item(work, sync=concurrent.futures.Future(), order=order)
        self._queue.put(item)
        assert item.sync is not None
        answer: T = item.sync.result()
        return answer

    def _alone(self, work: Work[T]) -> T:
        with self._locked() as hold:
            with self.database.begin() as conn:
                done = work(conn)
                _insert(conn, [done])
                if done.after is not None:
                    hold()
            if done.after is not None:
                done.after()
        return done.answer

    @contextmanager
    def _locked(self) -> Iterator[Callable[[], None]]:
        """A block in which calling the given function takes :attr:`lock` (once), held to the
        block's end: around a commit and the after steps that follow it."""
        held: list[bool] = []

        def hold() -> None:
            if self.lock is not None and not held:
                self.lock.acquire()
                held.append(True)

        try:
            yield hold
        finally:
            if held and self.lock is not None:
                self.lock.release()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            batch.sort(key=_by_order)  # stable: one agent's calls keep their order
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        afters: list[Callable[[], None]] = []
        dones: list[Done[Any]] = []
        with self._locked() as hold:
            try:
                with self.database.begin() as conn:
                    for item in batch:
                        try:
                            done = item.work(conn)
                        except ApiError as exc:  # refused before writing: answer it, go on
                            item.outcome = (False, exc)
                            continue
                        item.outcome = (True, done.answer)
                        dones.append(done)
                        if done.after is not None:
                            afters.append(done.after)
                    _insert(conn, dones)
                    if afters:
                        hold()  # until the after steps ran (see the class)
            except Exception as exc:
                if len(batch) > 1:  # one transaction each: only the failing work fails
                    log.debug("group of %d rolled back; committing one by one", len(batch))
                    failed = True
                else:
                    batch[0].outcome = (False, exc)
                    failed = False
            else:
                failed = False
                self.batches += 1
                self.works += len(batch)
                for after in afters:
                    try:
                        after()
                    except Exception:  # committed: the answer stands; the Fleet resyncs later
                        log.exception("after-commit step failed")
        if failed:
            for item in batch:
                self._commit([item])
            return
        self._answer(batch)

    def _answer(self, batch: list[_Item]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for item in batch:
            if item.sync is not None:
                ok, value = item.outcome
                if ok:
                    item.sync.set_result(value)
                else:
                    item.sync.set_exception(value)
            else:
                assert item.loop is not None
                by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop closed (shutdown): nobody is waiting any more
                pass


def _by_order(item: _Item) -> str:
    return item.order


def _settle(items: list[_Item]) -> None:
    """Answer the event loop's waiting requests (on the loop)."""
    for item in items:
        future = item.future
        assert future is not None
        if future.cancelled():  # the client went away
            continue
        ok, value = item.outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _insert(conn: Connection, dones: list[Done[Any]]) -> None:
    """The works' ``inserts``: one ``executemany`` per statement, in the works' order."""
    rows: dict[Executable, list[dict[str, Any]]] = {}
    for done in dones:
        for statement, params in done.inserts:
            rows.setdefault(statement, []).append(params)
    for statement, params_list in rows.items():
        conn.execute(statement, params_list)
