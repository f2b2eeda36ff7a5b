"""The task lifecycle as a Hypothesis state machine (DESIGN section 10.1).

Random interleavings of submits, dispatch rounds, heartbeats (listing the held tasks, or not),
starts, completions, failures, agents killed and coming back, late calls of old attempts,
cancels and the passing of time (heartbeat and start timeouts), against the server's own
functions over a real SQLite file, with the server's clock replaced by the test's. The agents'
side is a plain model: what each agent process holds (task -> attempt), lost when it is killed.

After every step: every slot reserved in the database is held by exactly one active task
(none leaked, none freed twice) and the Fleet never counts fewer; no task completed twice;
a completed task's outputs are those of the attempt that completed it; attempt numbers only
grow. At the end, with every agent alive and diligent, every task ends: none is lost.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import func, select

from scoring import ParameterDef, ScoringPolicy, Workflow
from scoring.server import db, heartbeats, tasks, workflows
from scoring.server.auth import Authenticator, Principal
from scoring.server.dispatch import Dispatcher
from scoring.server.errors import ApiError
from scoring.server.state import ServerState
from scoring.server.storage import LocalFileStore

AGENTS = ("a0", "a1")
CAPACITY = {"a0": 1, "a1": 2}
HEARTBEAT_TIMEOUT = 5.0
START_TIMEOUT = 4.0
TERMINAL = {"completed", "failed", "cancelled"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="lifecycle-"))
        database = db.Database(f"sqlite:///{self.tmp / 'db.sqlite'}")
        database.create()
        self.clock = Clock()
        self.team = uuid.uuid4()
        policy = ScoringPolicy(heartbeat_timeout_s=HEARTBEAT_TIMEOUT)
        self.state = ServerState(
            database, Authenticator(database, "secret"), LocalFileStore(self.tmp, database),
            policy, max_attempts=3, max_lost_attempts=3, start_timeout_s=START_TIMEOUT,
            clock=self.clock,
        )  # fmt: skip
        self.workflow = Workflow(
            id=uuid.uuid4(), slug="w", team_id=self.team, required_labels={"gpu"},
            parameters=[ParameterDef(key="prompt", type="string", label="Prompt")],
        )  # fmt: skip
        with database.begin() as conn:
            conn.execute(db.teams.insert().values(id=str(self.team), name="t", created_at=0.0))
            workflows.save(conn, self.workflow)
            for agent in AGENTS:
                conn.execute(db.agents.insert().values(id=agent, team_id=str(self.team)))
        self.dispatcher = Dispatcher(self.state)
        self.client = Principal(kind="team_key", team_id=self.team)
        self.alive = dict.fromkeys(AGENTS, True)
        #: What each agent process holds: task -> (attempt, started).
        self.held: dict[str, dict[str, tuple[int, bool]]] = {a: {} for a in AGENTS}
        #: Attempts each agent ever held (for late calls after a restart).
        self.old: dict[str, list[tuple[str, int]]] = {a: [] for a in AGENTS}
        self.submitted: list[str] = []
        self.completed_by: dict[str, tuple[str, int]] = {}
        self.last_attempt: dict[str, int] = {}

    def teardown(self) -> None:
        self.state.database.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def principal(self, agent: str) -> Principal:
        return Principal(kind="agent", team_id=self.team, agent_id=agent)

    # --- rules ----------------------------------------------------------------------------

    @rule()
    def submit(self) -> None:
        body = {"parameters": {"prompt": "a cat"}, "dispatch_target": "agent"}
        task_id = tasks.submit(self.state, self.client, str(self.workflow.id), body)
        self.submitted.append(task_id)
        self.dispatch()  # a submit wakes the dispatcher

    @rule(seconds=st.sampled_from([0.3, 1.0, 2.5, 4.5, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def dispatch(self) -> None:
        self.dispatcher.run_once(self.clock.now)

    @rule(agent=st.sampled_from(AGENTS), lists=st.booleans(), diligent=st.booleans())
    def heartbeat(self, agent: str, lists: bool, diligent: bool = False) -> None:
        """A heartbeat (then a dispatch round: a report wakes the dispatcher); a ``diligent``
        agent starts what it was handed at once."""
        if not self.alive[agent]:
            return
        held = self.held[agent]
        started = sum(1 for _, s in held.values() if s)
        body: dict[str, Any] = {"status": "idle", "gpu_capacity": CAPACITY[agent],
                                "labels": ["gpu", "comfyui"], "running_count": started}  # fmt: skip
        if lists:
            body["running"] = sorted(held)
        view = heartbeats.heartbeat(self.state, self.principal(agent), body)
        for task_id in view.cancel:
            held.pop(task_id, None)
        for task in view.tasks:
            task_id, attempt = task["task_id"], task["attempt"]
            if held.get(task_id, (None,))[0] != attempt:
                held[task_id] = (attempt, False)
                self.old[agent].append((task_id, attempt))
                if diligent:
                    self._start(agent, task_id)
        self.dispatch()

    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def start(self, agent: str, data: st.DataObject) -> None:
        waiting = sorted(t for t, (_, s) in self.held[agent].items() if not s)
        if not self.alive[agent] or not waiting:
            return
        self._start(agent, data.draw(st.sampled_from(waiting)))

    def _start(self, agent: str, task_id: str) -> None:
        attempt = self.held[agent][task_id][0]
        before = self._current(task_id)
        current = before[:2] == (agent, attempt) and before[2] in tasks.ACTIVE
        try:
            tasks.start(self.state, self.principal(agent), task_id, attempt)
        except ApiError as exc:
            assert exc.status == 409 and exc.errors[0]["code"] == "stale_attempt"
            assert not current, before
            del self.held[agent][task_id]
            return
        assert current, ("a stale attempt started", before, agent, attempt)
        self.held[agent][task_id] = (attempt, True)

    @rule(agent=st.sampled_from(AGENTS), ok=st.booleans(), data=st.data())
    def finish(self, agent: str, ok: bool, data: st.DataObject) -> None:
        running = sorted(self.held[agent])
        if not self.alive[agent] or not running:
            return
        task_id = data.draw(st.sampled_from(running))  # (a dispatched one may end unstarted)
        attempt = self.held[agent].pop(task_id)[0]
        self._complete(agent, task_id, attempt, ok)

    def _current(self, task_id: str) -> tuple[str | None, int, str]:
        t = db.tasks
        with self.state.database.read() as conn:
            row = conn.execute(
                select(t.c.agent_id, t.c.attempt, t.c.status).where(t.c.id == task_id)
            ).one()
        return row.agent_id, row.attempt, row.status

    def _complete(self, agent: str, task_id: str, attempt: int, ok: bool) -> None:
        outputs = {"agent": agent, "attempt": attempt}
        before = self._current(task_id)
        current = before[:2] == (agent, attempt) and before[2] in tasks.ACTIVE
        repeat = before == (agent, attempt, "completed") and ok
        try:
            answer = tasks.complete(self.state, self.principal(agent), task_id, ok, outputs,
                                    attempt)  # fmt: skip
        except ApiError as exc:
            assert exc.status == 409 and exc.errors[0]["code"] == "stale_attempt", exc.errors
            assert not current and not repeat, (before, agent, attempt)
            return
        assert current or repeat, ("a stale attempt was accepted", before, agent, attempt)
        if answer["task_status"] == "completed" and ok:
            first = self.completed_by.setdefault(task_id, (agent, attempt))
            assert first == (agent, attempt), "completed by two attempts"

    @rule(agent=st.sampled_from(AGENTS), ok=st.booleans(), data=st.data())
    def late_call(self, agent: str, ok: bool, data: st.DataObject) -> None:
        """An old attempt reported by an agent that lost track of it (killed, or told to drop
        it): answered as the current attempt only if it still is."""
        if not self.old[agent]:
            return
        task_id, attempt = data.draw(st.sampled_from(self.old[agent]))
        if self.held[agent].get(task_id, (None,))[0] == attempt:
            return  # still held: its own rules cover it
        self._complete(agent, task_id, attempt, ok)

    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def forget(self, agent: str, data: st.DataObject) -> None:
        """The agent drops a task silently (its worker crashed, a start's answer was lost)."""
        if self.held[agent]:
            del self.held[agent][data.draw(st.sampled_from(sorted(self.held[agent])))]

    @rule(agent=st.sampled_from(AGENTS))
    def kill(self, agent: str) -> None:
        self.alive[agent] = False
        self.held[agent] = {}

    @rule(agent=st.sampled_from(AGENTS))
    def revive(self, agent: str) -> None:
        self.alive[agent] = True

    @precondition(lambda self: bool(self.submitted))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.submitted))
        try:
            tasks.cancel(self.state, self.client, task_id)
        except ApiError as exc:
            assert exc.status == 409 and exc.errors[0]["code"] == "not_cancellable"
            assert self._statuses()[task_id] in ("completed", "failed")

    # --- invariants -----------------------------------------------------------------------

    def _statuses(self) -> dict[str, str]:
        with self.state.database.read() as conn:
            return dict(conn.execute(select(db.tasks.c.id, db.tasks.c.status)).all())

    @invariant()
    def slots_are_held_by_active_tasks(self) -> None:
        t = db.tasks
        with self.state.database.read() as conn:
            reserved = dict(conn.execute(select(db.agents.c.id, db.agents.c.running_count)).all())
            held = dict(
                conn.execute(
                    select(t.c.agent_id, func.count())
                    .where(t.c.status.in_(tasks.ACTIVE))
                    .group_by(t.c.agent_id)
                ).all()
            )
        for agent in AGENTS:
            assert reserved[agent] == held.get(agent, 0), (agent, reserved, held)
            assert reserved[agent] <= CAPACITY[agent]
            if agent in self.state.fleet:
                assert self.state.fleet.get(agent).running_count >= reserved[agent]

    @invariant()
    def completed_once_by_its_attempt(self) -> None:
        with self.state.database.read() as conn:
            events = Counter(
                conn.execute(
                    select(db.task_events.c.task_id).where(db.task_events.c.status == "completed")
                ).scalars()
            )
            rows = conn.execute(
                select(db.tasks.c.id, db.tasks.c.status, db.tasks.c.outputs, db.tasks.c.attempt)
            ).all()
        assert all(n == 1 for n in events.values()), events
        assert set(self.submitted) == {r.id for r in rows}  # nothing lost
        for r in rows:
            assert r.attempt >= self.last_attempt.get(r.id, 0)
            self.last_attempt[r.id] = r.attempt
            if r.status == "completed":
                agent, attempt = self.completed_by[r.id]
                assert r.outputs == {"agent": agent, "attempt": attempt}
                assert events[r.id] == 1

    def drain(self) -> None:
        """Every agent alive and diligent: every task must end."""
        for agent in AGENTS:
            self.alive[agent] = True
        for _ in range(60):
            self.clock.now += 1.0
            self.dispatch()
            for agent in AGENTS:
                self.heartbeat(agent, lists=True)
                for task_id, (attempt, started) in sorted(self.held[agent].items()):
                    if not started:
                        try:
                            tasks.start(self.state, self.principal(agent), task_id, attempt)
                        except ApiError:
                            del self.held[agent][task_id]
                            continue
                    self.held[agent].pop(task_id)
                    self._complete(agent, task_id, attempt, ok=True)
            statuses = self._statuses()
            if all(s in TERMINAL for s in statuses.values()):
                return
        stuck = {k: v for k, v in self._statuses().items() if v not in TERMINAL}
        raise AssertionError(f"tasks never ended: {stuck}")


class LifecycleDrained(Lifecycle):
    def teardown(self) -> None:
        try:
            self.drain()
            self.slots_are_held_by_active_tasks()
            self.completed_once_by_its_attempt()
        finally:
            super().teardown()


LifecycleDrained.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_lifecycle_state_machine = LifecycleDrained.TestCase


def test_an_old_attempt_of_a_task_back_on_the_same_agent_is_stale() -> None:
    """Worked example: attempt 1 on a0 is lost (a0 stops listing it), attempt 2 goes to a0
    again; a0's late completion of attempt 1 is refused and attempt 2's counts."""
    m = Lifecycle()
    try:
        m.kill("a1")  # only a0 reports, so only a0 takes work
        m.heartbeat("a0", lists=True)
        m.submit()
        task_id = m.submitted[0]
        m.heartbeat("a0", lists=True, diligent=True)
        assert m.held["a0"] == {task_id: (1, True)}
        m.held["a0"].clear()  # the worker crashed: a0 stops listing the task
        m.heartbeat("a0", lists=True)  # grace
        m.heartbeat("a0", lists=True, diligent=True)  # attempt 1 ended; attempt 2 started
        m.heartbeat("a0", lists=True, diligent=True)
        assert m.held["a0"] == {task_id: (2, True)}
        with pytest.raises(ApiError) as stale:
            tasks.complete(m.state, m.principal("a0"), task_id, True, {"attempt": 1}, 1)
        assert stale.value.errors[0]["code"] == "stale_attempt"
        m.held["a0"].clear()
        m._complete("a0", task_id, 2, ok=True)
        assert m._current(task_id) == ("a0", 2, "completed")
        m.slots_are_held_by_active_tasks()
        m.completed_once_by_its_attempt()
    finally:
        m.teardown()


def test_a_run_that_failed_on_every_agent_is_tried_again_on_one_of_them() -> None:
    """Worked example (found by the state machine): the team has two agents, a0 and a1. The run
    fails on a1 (attempt 1, a1 excluded), then on a0 (attempt 2, a0 excluded too): no agent is
    left that the run does not exclude, so it would stay queued for ever. Its exclusions are
    lifted instead: attempt 3 (of max_attempts=3) goes to one of them and completes."""
    m = Lifecycle()
    try:
        m.kill("a0")  # only a1 reports: attempt 1 goes to a1
        m.heartbeat("a1", lists=True)
        m.submit()
        task_id = m.submitted[0]
        m.heartbeat("a1", lists=True, diligent=True)
        assert m.held["a1"] == {task_id: (1, True)}
        m.finish("a1", ok=False, data=_Draw(task_id))  # attempt 1 failed: a1 excluded
        m.revive("a0")
        m.kill("a1")
        m.heartbeat("a0", lists=True)  # a0 joins the fleet; the round places attempt 2 on it
        m.heartbeat("a0", lists=True, diligent=True)
        assert m.held["a0"] == {task_id: (2, True)}
        m.finish("a0", ok=False, data=_Draw(task_id))  # attempt 2 failed: a0 excluded too
        with m.state.database.read() as conn:
            row = conn.execute(select(db.tasks).where(db.tasks.c.id == task_id)).one()
        assert (row.status, row.attempts, sorted(row.excluded)) == ("queued", 2, ["a0", "a1"])
        m.advance(HEARTBEAT_TIMEOUT + 1)  # a1 (killed) is lost; a0 reports on
        m.heartbeat("a0", lists=True)  # the round: only a0 fits, and it is excluded: lifted
        m.heartbeat("a0", lists=True, diligent=True)
        assert m.held["a0"] == {task_id: (3, True)}
        m.finish("a0", ok=True, data=_Draw(task_id))
        assert m._current(task_id) == ("a0", 3, "completed")
        m.slots_are_held_by_active_tasks()
        m.completed_once_by_its_attempt()
    finally:
        m.teardown()


def test_exclusions_stay_while_another_agent_could_take_the_run() -> None:
    """The counterpart: the run X failed on a0, and a1 fits it but is busy with Y and Z. X waits
    for a1 (its exclusion stands) although a0 is free, and goes to a1 once a1 frees a slot."""
    m = Lifecycle()
    try:
        m.kill("a1")
        m.heartbeat("a0", lists=True)
        m.submit()  # X -> a0, the only agent
        x = m.submitted[0]
        m.revive("a1")
        m.heartbeat("a1", lists=True)
        m.submit()
        m.submit()  # Y and Z -> a1 (a0's one slot is X's)
        y, z = m.submitted[1:]
        m.heartbeat("a1", lists=True, diligent=True)
        assert set(m.held["a1"]) == {y, z}
        m.heartbeat("a0", lists=True, diligent=True)
        m.finish("a0", ok=False, data=_Draw(x))  # X's attempt 1 failed: a0 excluded
        m.heartbeat("a0", lists=True, diligent=True)
        assert m.held["a0"] == {} and m._current(x) == (None, 1, "queued")
        m.finish("a1", ok=True, data=_Draw(y))
        m.dispatch()  # the completion wakes the dispatcher: X -> a1's free slot
        m.heartbeat("a1", lists=True, diligent=True)
        assert m.held["a1"] == {z: (1, True), x: (2, True)}
        m.slots_are_held_by_active_tasks()
    finally:
        m.teardown()


class _Draw:
    """A stand-in for Hypothesis's ``data`` that always draws ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any) -> Any:
        return self.value


@pytest.mark.parametrize("writer", [False, True], ids=["alone", "writer-thread"])
def test_a_heartbeat_between_a_release_commit_and_its_fleet_release_leaves_the_count_right(
    writer: bool,
) -> None:
    """Worked example of a race (two lost races in one process in CI): a1 (2 slots) runs A and
    B, so 2 reserved. A's completion commits (the database says 1), and before its after step
    gives the slot back in the Fleet, a heartbeat sets a1's count from the database: 1. The
    after step then released again: 0 in the Fleet against 1 in the database, and the next
    round would place two runs where one slot is free. The group commit holds ``sync`` from
    the commit to the after steps, so the heartbeat reads either before (2, then 1) or after
    (1): the Fleet ends at 1 either way."""
    import threading
    import time

    m = Lifecycle()
    try:
        m.kill("a0")
        m.heartbeat("a1", lists=True)
        m.submit()
        m.submit()
        a, b = m.submitted
        m.heartbeat("a1", lists=True, diligent=True)
        assert m.held["a1"] == {a: (1, True), b: (1, True)}
        if writer:  # as in the server: works committed by the group commit's thread
            m.state.commits.start()
        released, entered = m.state.released, threading.Event()

        def slow_release(agent_id: str, n: int = 1) -> None:
            entered.set()
            time.sleep(0.3)  # the after step, late: the heartbeat below arrives meanwhile
            released(agent_id, n)

        m.state.released = slow_release  # type: ignore[method-assign]
        done = threading.Thread(
            target=tasks.complete, args=(m.state, m.principal("a1"), a, True, {}, 1)
        )
        done.start()
        assert entered.wait(5)
        body = {"status": "busy", "gpu_capacity": 2, "labels": ["gpu", "comfyui"],
                "running_count": 1, "running": [b]}  # fmt: skip
        heartbeats.heartbeat(m.state, m.principal("a1"), body)
        done.join()
        assert m._current(a)[2] == "completed"
        with m.state.database.read() as conn:
            in_db = conn.execute(
                select(db.agents.c.running_count).where(db.agents.c.id == "a1")
            ).scalar_one()
        assert (in_db, m.state.fleet.get("a1").running_count) == (1, 1)
    finally:
        m.state.commits.stop()
        m.teardown()


def test_a_round_between_a_first_report_and_its_commit_places_nothing_it_would_lose() -> None:
    """Worked example of a race (two lost races in one process, in CI): a1's first heartbeat
    says 2 slots; the Fleet has it at once, the database's row (capacity 0, which reservations
    are checked against) only at the next group commit. A dispatch round in between placed two
    runs on a1 and the database refused both. Now, until the capacity is committed, the Fleet
    counts as free only what the database would grant (2 - (0 - 0) = 2 slots taken: none free);
    after the commit, both runs go to a1, and no race was lost."""
    m = Lifecycle()
    try:
        m.kill("a0")
        m.submit()
        m.submit()  # no agent yet: both queued
        body = {"status": "idle", "gpu_capacity": 2, "labels": ["gpu", "comfyui"],
                "running_count": 0, "running": []}  # fmt: skip
        work = heartbeats.receive(m.state, m.principal("a1"), body)  # in the Fleet, not stored
        assert m.state.fleet.get("a1").running_count == 2  # 2 - (0 committed - 0 reserved)
        m.dispatch()  # a round before the report's commit
        assert m.dispatcher.stats["lost_races"] == 0
        assert set(m._statuses().values()) == {"queued"}
        m.state.commits.run_sync(work)  # committed: the whole capacity is free in the Fleet
        assert m.state.fleet.get("a1").running_count == 0
        m.dispatch()
        assert m.dispatcher.stats["lost_races"] == 0
        assert [m._current(t)[:2] for t in m.submitted] == [("a1", 1), ("a1", 1)]
        m.slots_are_held_by_active_tasks()
    finally:
        m.teardown()
