"""Group commit (:mod:`scoring.server.commits`) on a real SQLite file: many works, one
transaction each batch, each answered only after its commit; a refusal or a failure stays with
its own work."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from scoring.server import db
from scoring.server.commits import Done, GroupCommit
from scoring.server.errors import ApiError


@pytest.fixture
def database(tmp_path: Path) -> Iterator[db.Database]:
    database = db.Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.create()
    yield database
    database.dispose()


def _put(key: str, seen: list[str] | None = None):  # type: ignore[no-untyped-def]
    def work(conn: db.Connection) -> Done[str]:
        conn.execute(insert(db.meta).values(key=key, value="v"))
        return Done(key, after=None if seen is None else (lambda: seen.append(key)))

    return work


def _keys(database: db.Database) -> set[str]:
    with database.read() as conn:
        return set(conn.execute(select(db.meta.c.key).where(db.meta.c.key.like("k%"))).scalars())


def test_concurrent_works_share_transactions_and_each_is_answered(database: db.Database) -> None:
    commits = GroupCommit(database)
    commits.start()
    answers: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(50):
            answer = commits.run_sync(_put(f"k{n}-{i}"))
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits.stop()
    assert sorted(answers) == sorted(f"k{n}-{i}" for n in range(16) for i in range(50))
    assert _keys(database) == set(answers)
    assert commits.works == 800
    assert commits.batches < commits.works  # 16 writers: some batches held several works


def test_an_answer_on_the_event_loop_comes_after_its_commit(database: db.Database) -> None:
    commits = GroupCommit(database)
    commits.start()
    after: list[str] = []

    async def submit(key: str) -> tuple[str, bool]:
        answer = await commits.run(_put(key, after))
        # Read on another connection the moment the answer arrives: committed already, and
        # the after-commit step ran before the answer.
        return answer, key in _keys(database) and key in after

    async def main() -> list[tuple[str, bool]]:
        return await asyncio.gather(*(submit(f"k{i}") for i in range(200)))

    results = asyncio.run(main())
    commits.stop()
    assert all(visible for _, visible in results)
    assert [a for a, _ in results] == [f"k{i}" for i in range(200)]


def test_a_refused_work_is_answered_its_refusal_and_the_batch_commits(
    database: db.Database,
) -> None:
    commits = GroupCommit(database)
    commits.start()

    def refused(conn: db.Connection) -> Done[str]:
        raise ApiError(409, "stale_attempt", "no longer current")

    async def main() -> list[object]:
        works = [_put("k1"), refused, _put("k2")]
        return await asyncio.gather(*(commits.run(w) for w in works), return_exceptions=True)

    first, second, third = asyncio.run(main())
    commits.stop()
    assert (first, third) == ("k1", "k2")
    assert isinstance(second, ApiError) and second.status == 409
    assert _keys(database) == {"k1", "k2"}


def test_a_failing_work_fails_alone_the_others_commit_one_by_one(database: db.Database) -> None:
    with database.begin() as conn:
        conn.execute(insert(db.meta).values(key="k-taken", value="v"))
    commits = GroupCommit(database)
    commits.start()

    async def main() -> list[object]:
        works = [_put("k1"), _put("k-taken"), _put("k2")]  # the second breaks the unique key
        return await asyncio.gather(*(commits.run(w) for w in works), return_exceptions=True)

    answers = asyncio.run(main())
    commits.stop()
    assert answers[0] == "k1" and answers[2] == "k2"
    assert isinstance(answers[1], IntegrityError)
    assert _keys(database) == {"k1", "k2", "k-taken"}
    with database.read() as conn:
        assert conn.execute(select(func.count()).select_from(db.meta)).scalar_one() >= 3


def test_without_the_writer_thread_a_work_runs_in_its_own_transaction(
    database: db.Database,
) -> None:
    seen: list[str] = []
    assert GroupCommit(database).run_sync(_put("k1", seen)) == "k1"
    assert _keys(database) == {"k1"} and seen == ["k1"]


def test_a_batch_runs_its_works_in_the_order_of_their_keys(database: db.Database) -> None:
    """Works queued while the writer is busy form one batch, run sorted by ``order`` (agents'
    ids: every batch locks agents' rows in one order), equal keys in their arrival order."""
    commits = GroupCommit(database)
    ran: list[str] = []
    gate, running = threading.Event(), threading.Event()

    def blocker(conn: db.Connection) -> Done[str]:
        running.set()
        gate.wait(5)
        return Done("first")

    def noting(name: str):  # type: ignore[no-untyped-def]
        def work(conn: db.Connection) -> Done[str]:
            ran.append(name)
            return Done(name)

        return work

    commits.start()
    first = threading.Thread(target=commits.run_sync, args=(blocker,))
    first.start()
    assert running.wait(5)  # the writer is in its batch: the works below queue behind it
    arrivals = [("b", "b-1"), ("", "submit"), ("a", "a-1"), ("b", "b-2"), ("a", "a-2")]
    threads = []
    for order, name in arrivals:
        t = threading.Thread(target=commits.run_sync, args=(noting(name), order))
        t.start()
        threads.append(t)
        while commits._queue.qsize() < len(threads):  # queued in this order
            pass
    gate.set()
    for t in [first, *threads]:
        t.join()
    commits.stop()
    assert ran == ["submit", "a-1", "a-2", "b-1", "b-2"]
