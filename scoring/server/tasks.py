"""Every change of a task's state, each one database transaction committed before the answer.

Statuses (DESIGN section 10.1): ``queued`` -> ``dispatched`` (a slot reserved on an agent, a new
attempt number) -> ``running`` (the agent started it) -> ``completed`` or ``failed``; also
``cancelled``. Every dispatch is an *attempt*: ``start`` and ``complete`` name it, and a call for
an attempt that is no longer current answers 409 ``stale_attempt`` and changes nothing
(fencing), so a task completes exactly once even when a presumed-dead agent comes back.

An attempt ends in one of the :class:`Outcome` values, always through :func:`_end_attempt`: one
conditional UPDATE on the task's current status, agent and attempt, which frees the agent's slot
in the same transaction, so a slot is released exactly once however many paths race (a
completion, a heartbeat that no longer lists the task, the lost-agent sweep, another replica).

- ``failed`` (reported by the agent) and ``start_timeout`` (dispatched, never started) count
  against ``max_attempts`` and exclude that agent from the task's next attempts, while another
  agent could take it (when only excluded agents could, the dispatcher lifts the exclusions:
  :func:`scoring.server.dispatch.lift_exclusions`);
- ``agent_lost`` (no heartbeat for the timeout) and ``not_listed`` (the agent's heartbeats stopped
  listing a running task) are the machine's fault, not the task's: the task is queued again
  without counting, up to ``max_lost_attempts`` such losses (a task that takes its agents down
  every time still ends), and the agent is not excluded (it may be the team's only one);
- ``cancelled``: a cancel asked while the attempt ran, carried out at the agent's next heartbeat.

A reservation is one conditional UPDATE on the agent's row (``running_count < gpu_capacity``)
in the same transaction as the task's move to ``dispatched``; that is what keeps several
dispatchers sharing one database from over-filling an agent (DESIGN section 11).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import bindparam, case, select, update
from sqlalchemy import text as sql
from sqlalchemy.exc import IntegrityError

from scoring import Decision, FileStore, RunValidationError, validate_run
from scoring.server import db
from scoring.server.auth import Principal
from scoring.server.commits import Done, Work
from scoring.server.errors import ApiError, not_found
from scoring.server.ids import uuid7
from scoring.server.metrics import Cause
from scoring.server.state import ServerState

ACTIVE = ("dispatched", "running")
#: How long an ``Idempotency-Key`` answers with its first run (DESIGN section 10.3).
IDEMPOTENCY_SECONDS = 24 * 3600.0
#: Heartbeats a running task may be missing from its agent's list before it is queued again (the
#: first may have been written before the agent's start was answered).
UNLISTED_GRACE = 1


class Outcome(StrEnum):
    """How an attempt ended (``attempts`` of ``GET /r/tasks/{taskId}``)."""

    COMPLETED = "completed"
    FAILED = "failed"
    START_TIMEOUT = "start_timeout"
    AGENT_LOST = "agent_lost"
    NOT_LISTED = "not_listed"
    CANCELLED = "cancelled"


#: Outcomes that count against ``max_attempts`` and exclude the agent from the next attempts.
COUNTED = frozenset({Outcome.FAILED, Outcome.START_TIMEOUT})
#: Outcomes of a lost machine: counted against ``max_lost_attempts`` only.
LOST = frozenset({Outcome.AGENT_LOST, Outcome.NOT_LISTED})
#: The ``scoring_requeues_total`` cause of each outcome that can queue a task again.
REQUEUE_CAUSE: dict[Outcome, Cause] = {
    Outcome.FAILED: "failure",
    Outcome.START_TIMEOUT: "start_timeout",
    Outcome.AGENT_LOST: "agent_lost",
    Outcome.NOT_LISTED: "not_listed",
}


class Lost(NamedTuple):
    """A placement the database refused: the agent was full (``agent_full``: another
    dispatcher reserved its last slot first) or the task was no longer queued."""

    task_id: str
    agent_id: str
    agent_full: bool


#: Statements built once: SQLAlchemy then reuses their compiled form.
_INSERT_TASK = db.tasks.insert()
_INSERT_EVENT = db.task_events.insert()


def _event(conn: db.Connection, task_id: str, status: str, agent: str | None, at: float,
           detail: str = "") -> None:  # fmt: skip
    conn.execute(_INSERT_EVENT, {"task_id": task_id, "status": status, "agent_id": agent,
                                 "at": at, "detail": detail})  # fmt: skip


# --- clients -----------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """A validated run, ready to be queued (:func:`prepare`)."""

    task_id: str
    team: str
    workflow_id: str
    version: int
    dispatch_target: str
    tool_type: str
    parameters: dict[str, Any]
    #: The dispatch request as JSON; ``None`` for a ``comfy_cloud`` run.
    request: dict[str, Any] | None


def prepare(
    state: ServerState,
    principal: Principal,
    workflow_id: str,
    body: Any,
    files: FileStore | None = None,
) -> Prepared:
    """Validate a run against its workflow (the file store: ``files``, default the server's,
    with the files it knows kept in memory).

    Raises
    ------
    ApiError
        404 for a missing or foreign workflow; 400 with every validation error of the body;
        400 ``comfy_cloud_not_configured`` for a Cloud run of a team without a Cloud key.
    scoring.server.storage.NotCached
        From a ``files`` that answers only what it knows (the caller asks the store then).
    """
    found = state.workflows.by_id(principal.team_id, workflow_id)
    if found is None:
        raise not_found("workflow")
    workflow, version = found
    team = str(principal.team_id)
    task_id = str(uuid7())
    try:
        run = validate_run(workflow, body, principal.team_id, files or state.known_files,
                           task_id=task_id)  # fmt: skip
    except RunValidationError as exc:
        errors = [{"code": str(e.code), "key": e.key, "message": e.message} for e in exc.errors]
        raise ApiError.many(400, errors) from None
    request = None if run.dispatch_request is None else run.dispatch_request.model_dump(mode="json")
    if request is None and not state.cloud_configured(team):
        raise ApiError(400, "comfy_cloud_not_configured",
                       "this team has no ComfyUI Cloud API key configured",
                       "dispatch_target")  # fmt: skip
    return Prepared(task_id, team, str(workflow.id), version, run.dispatch_target, run.tool_type,
                    run.parameters, request)  # fmt: skip


def queue(state: ServerState, run: Prepared) -> Work[str]:
    """The group-commit work (:mod:`scoring.server.commits`) that queues a prepared run; its
    answer is the task id, once committed."""

    def work(conn: db.Connection) -> Done[str]:
        # the rows are inserted with the batch's other runs, in one executemany each
        return Done(run.task_id, after=_waker(state, run), inserts=_rows(run, state.clock()))

    return work


def submit(
    state: ServerState,
    principal: Principal,
    workflow_id: str,
    body: Any,
    idempotency_key: str | None = None,
) -> str:
    """Validate a run and queue it in its own transaction; returns the new task id (or, for a
    repeated ``Idempotency-Key`` with the same body, the first run's).

    Raises
    ------
    ApiError
        As :func:`prepare`; 422 ``idempotency_key_reused`` for a known key with another body.
    """
    if state.workflows.by_id(principal.team_id, workflow_id) is None:
        raise not_found("workflow")
    team = str(principal.team_id)
    digest = None
    if idempotency_key is not None:
        digest = _body_digest(workflow_id, body)
        earlier = _idempotent(state, team, idempotency_key, digest)
        if earlier is not None:
            return earlier
    run = prepare(state, principal, workflow_id, body)
    now = state.clock()
    try:
        with state.database.begin() as conn:
            if idempotency_key is not None:
                _expire_key(conn, team, idempotency_key, now)
            _insert(conn, run, now, idempotency_key, digest)
    except IntegrityError:
        # The same key from a concurrent request committed first: answer as it does.
        assert idempotency_key is not None and digest is not None
        earlier = _idempotent(state, team, idempotency_key, digest)
        if earlier is None:
            raise
        return earlier
    _waker(state, run)()
    return run.task_id


def _insert(conn: db.Connection, run: Prepared, now: float,
            key: str | None = None, digest: str | None = None) -> None:  # fmt: skip
    for statement, params in _rows(run, now, key, digest):
        conn.execute(statement, params)


def _rows(run: Prepared, now: float, key: str | None = None,
          digest: str | None = None) -> tuple[tuple[Any, dict[str, Any]], ...]:  # fmt: skip
    """The rows that queue ``run``: the task and its first event."""
    explain = (
        "queued for ComfyUI Cloud" if run.request is None else "queued; waiting for the dispatcher"
    )
    task = {
        "id": run.task_id, "team_id": run.team, "workflow_id": run.workflow_id,
        "workflow_version": run.version, "dispatch_target": run.dispatch_target,
        "tool_type": run.tool_type, "status": "queued", "agent_id": None,
        "parameters": run.parameters, "request": run.request, "attempts": 0,
        "excluded": [], "explain": explain, "outputs": None, "created_at": now,
        "updated_at": now, "attempt": 0, "lost": 0, "unlisted": 0, "cancel_requested": 0,
        "history": [], "idempotency_key": key, "request_hash": digest,
    }  # fmt: skip
    event = {"task_id": run.task_id, "status": "queued", "agent_id": None, "at": now,
             "detail": "submitted"}  # fmt: skip
    return ((_INSERT_TASK, task), (_INSERT_EVENT, event))


def _waker(state: ServerState, run: Prepared) -> Callable[[], None]:
    """Wake the loop that takes the run (the dispatcher, or the Cloud runner)."""
    return (state.cloud_wake if run.request is None else state.wake).set


def _body_digest(workflow_id: str, body: Any) -> str:
    """The SHA-256 of a run's workflow and body, independent of the body's key order."""
    canonical = json.dumps([workflow_id, body], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True)  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def _idempotent(state: ServerState, team: str, key: str, digest: str) -> str | None:
    """The task id of an earlier run with this key (within the window), or ``None``."""
    t = db.tasks
    with state.database.read() as conn:
        row = conn.execute(
            select(t.c.id, t.c.request_hash, t.c.created_at)
            .where(t.c.team_id == team, t.c.idempotency_key == key)
        ).first()  # fmt: skip
    if row is None or row.created_at < state.clock() - IDEMPOTENCY_SECONDS:
        return None
    if row.request_hash != digest:
        message = "this Idempotency-Key was used for a different run"
        raise ApiError(422, "idempotency_key_reused", message, "Idempotency-Key")
    return str(row.id)


def _expire_key(conn: db.Connection, team: str, key: str, now: float) -> None:
    """Free a key whose window ended, so that it can name a new run."""
    t = db.tasks
    conn.execute(
        update(t)
        .where(t.c.team_id == team, t.c.idempotency_key == key,
               t.c.created_at < now - IDEMPOTENCY_SECONDS)
        .values(idempotency_key=None)
    )  # fmt: skip


def _owned_task(state: ServerState, principal: Principal, task_id: str) -> Any:
    try:
        tid = str(UUID(task_id))
    except ValueError:
        raise not_found("task") from None
    with state.database.read() as conn:
        row = conn.execute(select(db.tasks).where(db.tasks.c.id == tid)).first()
    if row is None or row.team_id != str(principal.team_id):
        raise not_found("task")
    return row


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def status(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{taskId}``; another team's task is 404.

    ``attempts`` lists every attempt: those that ended with their outcome, then the current
    one (``dispatched`` or ``running``).
    """
    row = _owned_task(state, principal, task_id)
    attempts = [
        {"attempt": h["attempt"], "agent_id": h["agent_id"], "outcome": h["outcome"],
         "at": _iso(h["at"])}
        for h in row.history or ()
    ]  # fmt: skip
    if row.status in ACTIVE:
        at = _iso(row.dispatched_at or row.updated_at)
        attempts.append(
            {"attempt": row.attempt, "agent_id": row.agent_id, "outcome": row.status, "at": at}
        )
    return {
        "task_id": row.id,
        "task_status": row.status,
        "agent_id": row.agent_id,
        "dispatch_target": row.dispatch_target,
        "created_at": _iso(row.created_at),
        "explain": row.explain,
        "attempts": attempts,
        "cancel_requested": bool(row.cancel_requested) and row.status in ACTIVE,
    }


def result(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{taskId}/result``: the outputs once completed, else 409."""
    row = _owned_task(state, principal, task_id)
    if row.status == "failed":
        raise ApiError(409, "task_failed", f"the task failed: {row.explain}")
    if row.status == "cancelled":
        raise ApiError(409, "task_cancelled", "the task was cancelled")
    if row.status != "completed":
        raise ApiError(409, "not_ready", f"the task is {row.status}")
    return {"task_id": row.id, "outputs": row.outputs or {}}


def cancel(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """``POST /r/tasks/{taskId}/cancel``.

    A queued or dispatched task is cancelled at once (a dispatched one's slot is freed; its
    agent is told at its next heartbeat if it already holds it); a running one is marked and
    cancelled at its agent's next heartbeat. Repeating the call is harmless.

    Raises
    ------
    ApiError
        409 ``not_cancellable`` once the task completed or failed.
    """
    owned = _owned_task(state, principal, task_id)
    answer, agent_id = state.commits.run_sync(_cancelling(state, owned.id))
    if agent_id is not None:  # a long-polling agent hears of it now (waiting.py)
        state.waiters.wake([agent_id])
    return answer


def _cancelling(state: ServerState, task_id: str) -> Work[tuple[dict[str, Any], str | None]]:
    """The group-commit work of :func:`cancel`: its answer and the task's agent; a freed slot
    is given back to the Fleet once committed (under ``sync``, as every freed slot is)."""

    def work(conn: db.Connection) -> Done[tuple[dict[str, Any], str | None]]:
        now = state.clock()
        freed: str | None = None
        row = conn.execute(select(db.tasks).where(db.tasks.c.id == task_id)).one()
        if row.status in ("completed", "failed"):
            raise ApiError(409, "not_cancellable", f"the task is {row.status}")
        if row.status == "queued":
            done = conn.execute(
                update(db.tasks).where(db.tasks.c.id == row.id, db.tasks.c.status == "queued")
                .values(status="cancelled", updated_at=now, explain="cancelled by the client")
            ).rowcount  # fmt: skip
            if done:
                _event(conn, row.id, "cancelled", None, now, "cancelled while queued")
        elif row.status == "dispatched":
            if _end_attempt(conn, state, row, Outcome.CANCELLED, now) is not None:
                freed = row.agent_id
        elif row.status == "running" and not row.cancel_requested:
            conn.execute(
                update(db.tasks).where(db.tasks.c.id == row.id, db.tasks.c.status == "running")
                .values(cancel_requested=1, updated_at=now)
            )  # fmt: skip
            _event(conn, row.id, "running", row.agent_id, now, "cancel requested")
        current = conn.execute(select(db.tasks.c.status).where(db.tasks.c.id == row.id)).scalar()
        answer = {"task_id": row.id, "task_status": current}
        return Done(
            (answer, row.agent_id), after=None if freed is None else _freeing(state, {freed: 1})
        )

    return work


def _freeing(state: ServerState, freed: dict[str, int]) -> Callable[[], None]:
    """The after step of a work that freed slots: give them back to the Fleet, wake the
    dispatcher."""

    def after() -> None:
        for agent, n in freed.items():
            state.released(agent, n)
        state.wake.set()

    return after


# --- agents ------------------------------------------------------------------------------------


class AgentView(NamedTuple):
    """What a heartbeat answers: the tasks to start and those to drop."""

    tasks: list[dict[str, Any]]
    cancel: list[str]


def reconcile(state: ServerState, agent_id: str, listed: Iterable[str] | None) -> AgentView:
    """:func:`reconciling` in its own transaction."""
    return state.commits.run_sync(reconciling(state, agent_id, listed))


def reconciling(state: ServerState, agent_id: str, listed: Iterable[str] | None) -> Work[AgentView]:
    """The group-commit work of an agent's heartbeat against its tasks in the database (DESIGN
    section 10.1).

    ``listed`` is the heartbeat's ``running``: the task ids the agent holds (``None``: an older
    agent that does not list them, reconciled by the timeouts only). A running task missing
    from the list for more than :data:`UNLISTED_GRACE` heartbeats is queued again
    (``not_listed``); a listed task that is not this agent's current attempt, and a running
    task whose cancel was asked, are answered in ``cancel`` (not a task this agent completed: it
    reports that until it reads the answer). Answers the dispatched tasks not yet started (with
    their attempt numbers), oldest first.
    """
    held = None if listed is None else set(listed)

    def work(conn: db.Connection) -> Done[AgentView]:
        t = db.tasks
        rows = conn.execute(
            select(t).where(t.c.agent_id == agent_id, t.c.status.in_(ACTIVE)).order_by(t.c.id)
        ).all()
        stray = set() if held is None else held - {r.id for r in rows}
        cancel = sorted(stray - _completed(conn, agent_id, stray))
        ending: list[tuple[Any, Outcome]] = []
        for r in rows:
            if r.cancel_requested:
                ending.append((r, Outcome.CANCELLED))
                cancel.append(r.id)
            elif held is None or r.status != "running":
                continue
            elif r.id in held:
                if r.unlisted:
                    _mark_unlisted(conn, agent_id, r.id, 0)
            elif r.unlisted >= UNLISTED_GRACE:
                ending.append((r, Outcome.NOT_LISTED))
            else:
                _mark_unlisted(conn, agent_id, r.id, r.unlisted + 1)
        now = state.clock()
        freed = sum(_end_attempt(conn, state, r, outcome, now) is not None for r, outcome in ending)
        ended = {r.id for r, _ in ending}
        to_start = [
            {"task_id": r.id, "workflow_id": r.workflow_id, "parameters": r.parameters,
             "tool_type": r.tool_type, "attempt": r.attempt}
            for r in rows if r.status == "dispatched" and r.id not in ended
        ]  # fmt: skip

        after = _freeing(state, {agent_id: freed}) if freed else None
        return Done(AgentView(to_start, cancel), after=after)

    return work


def _mark_unlisted(conn: db.Connection, agent_id: str, task_id: str, n: int) -> None:
    """Count the heartbeats a running task was missing from (0: listed again)."""
    t = db.tasks
    conn.execute(
        update(t).where(t.c.id == task_id, t.c.agent_id == agent_id, t.c.status == "running")
        .values(unlisted=n)
    )  # fmt: skip


def _completed(conn: db.Connection, agent_id: str, ids: set[str]) -> set[str]:
    """Those of ``ids`` whose last attempt ``agent_id`` completed: an agent still lists a task
    whose completion it reported until it reads the answer, and must then hear it again (a
    repeated ``complete`` answers 200), not be told to drop it."""
    if not ids:
        return set()
    t = db.tasks
    found = conn.execute(
        select(t.c.id).where(t.c.id.in_(sorted(ids)), t.c.agent_id == agent_id,
                             t.c.status == "completed")
    ).scalars()  # fmt: skip
    return set(found)


def _agent_task(conn: db.Connection, principal: Principal, task_id: str) -> Any:
    """The task, if this agent holds or ever held an attempt of it; else 404 (nothing leaks)."""
    try:
        tid = str(UUID(task_id))
    except ValueError:
        raise not_found("task") from None
    row = conn.execute(select(db.tasks).where(db.tasks.c.id == tid)).first()
    agent = principal.agent_id
    if row is None or (
        row.agent_id != agent and all(h["agent_id"] != agent for h in row.history or ())
    ):
        raise not_found("task")
    return row


def _current(row: Any, agent: str | None, attempt: int | None) -> bool:
    """Whether ``agent``'s call names the task's current attempt (no number: the current)."""
    return row.status in ACTIVE and row.agent_id == agent and attempt in (None, row.attempt)


def _stale(row: Any, attempt: int | None) -> ApiError:
    named = "the current attempt" if attempt is None else f"attempt {attempt}"
    return ApiError(409, "stale_attempt",
                    f"{named} is no longer current (task {row.status}, attempt {row.attempt})",
                    "attempt")  # fmt: skip


def start(
    state: ServerState, principal: Principal, task_id: str, attempt: int | None = None
) -> dict[str, Any]:
    """The agent started its attempt; repeating the call is harmless (:func:`starting`, in
    its own transaction)."""
    return state.commits.run_sync(starting(state, principal, task_id, attempt))


def starting(
    state: ServerState, principal: Principal, task_id: str, attempt: int | None = None
) -> Work[dict[str, Any]]:
    """The group-commit work of an agent's start of its attempt.

    Raises
    ------
    ApiError
        404 for a task never dispatched to this agent; 409 ``stale_attempt`` for an attempt
        that is not current.
    """

    def work(conn: db.Connection) -> Done[dict[str, Any]]:
        now = state.clock()
        row = _agent_task(conn, principal, task_id)
        if not _current(row, principal.agent_id, attempt):
            raise _stale(row, attempt)
        if row.status == "dispatched":
            conn.execute(
                update(db.tasks)
                .where(db.tasks.c.id == row.id, db.tasks.c.status == "dispatched",
                       db.tasks.c.attempt == row.attempt)
                .values(status="running", updated_at=now, unlisted=0)
            )  # fmt: skip
            _event(conn, row.id, "running", principal.agent_id, now, f"attempt {row.attempt}")
        return Done({"task_id": row.id, "task_status": "running"})

    return work


def complete(
    state: ServerState,
    principal: Principal,
    task_id: str,
    ok: bool,
    outputs: dict[str, Any] | None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """:func:`completing` in its own transaction."""
    return state.commits.run_sync(completing(state, principal, task_id, ok, outputs, attempt))


def completing(
    state: ServerState,
    principal: Principal,
    task_id: str,
    ok: bool,
    outputs: dict[str, Any] | None,
    attempt: int | None = None,
) -> Work[dict[str, Any]]:
    """The group-commit work of an agent's end of its attempt: completed, or failed (retried
    elsewhere up to the limit); the slot is given back to the Fleet once committed.

    A repeated ``completed`` of the attempt that completed the task answers as the first did;
    nothing is counted twice.

    Raises
    ------
    ApiError
        404 for a task never dispatched to this agent; 409 ``stale_attempt`` for an attempt
        that is not current.
    """
    agent = principal.agent_id
    assert agent is not None

    freed = _freeing(state, {agent: 1})

    def work(conn: db.Connection) -> Done[dict[str, Any]]:
        now = state.clock()
        row = _agent_task(conn, principal, task_id)
        if not _current(row, agent, attempt):
            repeat = (ok and row.status == "completed" and row.agent_id == agent
                      and attempt in (None, row.attempt))  # fmt: skip
            if repeat:
                return Done({"task_id": row.id, "task_status": "completed"})
            raise _stale(row, attempt)
        outcome = Outcome.COMPLETED if ok else Outcome.FAILED
        new = _end_attempt(conn, state, row, outcome, now, outputs)
        if new is None:  # nothing written: another path ended the attempt first
            raise _stale(row, attempt)
        return Done({"task_id": row.id, "task_status": new}, after=freed)

    return work


def _end_attempt(
    conn: db.Connection,
    state: ServerState,
    row: Any,
    outcome: Outcome,
    now: float,
    outputs: dict[str, Any] | None = None,
) -> str | None:
    """End the task's current attempt (``row`` as read) with ``outcome`` and free its slot, in
    the caller's transaction; returns the task's new status, or ``None`` when the attempt was
    no longer current (another path ended it first: nothing changed)."""
    agent = row.agent_id
    again = f"queued again: attempt {row.attempt} {outcome} on {agent}"
    ended = {"attempt": row.attempt, "agent_id": agent, "outcome": str(outcome), "at": now}
    values: dict[str, Any] = {"history": [*(row.history or ()), ended], "updated_at": now,
                              "unlisted": 0, "dispatched_at": None}  # fmt: skip
    if outcome is Outcome.COMPLETED:
        values.update(status="completed", outputs=outputs or {})
    elif outcome is Outcome.CANCELLED or row.cancel_requested:
        values.update(status="cancelled", explain="cancelled by the client")
    elif outcome in COUNTED:
        attempts = row.attempts + 1
        final = attempts >= state.max_attempts
        values.update(attempts=attempts, excluded=sorted({*row.excluded, agent}))
        if final:
            explain = f"failed: {attempts} attempts failed (last: {outcome} on {agent})"
            values.update(status="failed", outputs=outputs, explain=explain)
        else:
            values.update(status="queued", agent_id=None, explain=again)
    else:
        lost = row.lost + 1
        if lost > state.max_lost_attempts:
            explain = f"failed: lost with its agent {lost} times (last: {outcome} on {agent})"
            values.update(lost=lost, status="failed", explain=explain)
        else:
            values.update(lost=lost, status="queued", agent_id=None, explain=again)
    t = db.tasks
    changed = conn.execute(
        update(t)
        .where(t.c.id == row.id, t.c.status.in_(ACTIVE), t.c.agent_id == agent,
               t.c.attempt == row.attempt)
        .values(**values)
    ).rowcount  # fmt: skip
    if changed != 1:
        return None
    _free_slot(conn, agent, 1)
    _event(conn, row.id, values["status"], agent, now, f"attempt {row.attempt}: {outcome}")
    if values["status"] == "queued":
        state.metrics.requeued(REQUEUE_CAUSE[outcome])
    return str(values["status"])


def _free_slot(conn: db.Connection, agent_id: str, n: int) -> None:
    a = db.agents
    left = case((a.c.running_count >= n, a.c.running_count - n), else_=0)
    conn.execute(update(a).where(a.c.id == agent_id).values(running_count=left))


def end_attempts(state: ServerState, agent_id: str | None, outcome: Outcome,
                 where: Any) -> int:  # fmt: skip
    """End with ``outcome`` the current attempts of the active tasks matching ``where`` (a
    condition on the tasks table), in one transaction; returns how many ended. Their agents'
    slots are freed in the database and the Fleet."""
    t = db.tasks

    def work(conn: db.Connection) -> Done[int]:
        now = state.clock()
        freed: dict[str, int] = {}
        rows = conn.execute(select(t).where(t.c.status.in_(ACTIVE), where)).all()
        for r in rows:
            if _end_attempt(conn, state, r, outcome, now) is not None:
                freed[r.agent_id] = freed.get(r.agent_id, 0) + 1
        return Done(sum(freed.values()), after=_freeing(state, freed) if freed else None)

    return state.commits.run_sync(work, agent_id or "")


# --- the dispatcher ------------------------------------------------------------------------------


def commit_placements(
    state: ServerState,
    task_ids: Sequence[str],
    decisions: Sequence[Decision],
    explains: dict[str, str],
    conn: db.Connection | None = None,
) -> list[Lost]:
    """Commit the placed decisions (and changed explanations) in one transaction.

    Each placement reserves a slot by a conditional UPDATE of the agent's row and moves the
    task from ``queued`` by another; a placement whose agent is full in the database (another
    dispatcher won the slot) or whose task is no longer queued is dropped and returned as a
    :class:`Lost`, so the caller gives the slot back to its Fleet (and may pick again).
    ``explains`` holds the new explanations of tasks left queued. With ``conn`` the writes join
    that transaction (the caller commits); without, they are committed here.

    Agents' rows are updated in the order of their ids, whatever the order of the decisions:
    two dispatchers committing at once then lock the rows they share in the same order and
    never deadlock.
    """
    if conn is None:
        with state.database.begin() as own:
            return commit_placements(state, task_ids, decisions, explains, own)
    if not state.database.is_sqlite:
        return _commit_claimed(conn, task_ids, decisions, explains, state.clock())
    now = state.clock()
    lost: list[Lost] = []
    a, t = db.agents, db.tasks
    placed = sorted(
        ((d.agent_id, task_id, d) for task_id, d in zip(task_ids, decisions, strict=True)
         if d.agent_id is not None),
        key=lambda p: (p[0], p[1]),
    )  # fmt: skip
    # Explanations first: they touch only this round's own tasks, and the agents' rows below
    # are then locked for the shortest time (until the caller's commit).
    for task_id, text in explains.items():
        conn.execute(
            update(t).where(t.c.id == task_id, t.c.status == "queued").values(explain=text)
        )
    for agent, task_id, decision in placed:
        reserved = conn.execute(
            update(a)
            .where(a.c.id == agent, a.c.running_count < a.c.gpu_capacity)
            .values(running_count=a.c.running_count + 1)
        ).rowcount
        if reserved != 1:
            lost.append(Lost(task_id, agent, agent_full=True))
            continue
        moved = conn.execute(
            update(t)
            .where(t.c.id == task_id, t.c.status == "queued")
            .values(status="dispatched", agent_id=agent, explain=decision.explain(),
                    updated_at=now, dispatched_at=now, attempt=t.c.attempt + 1, unlisted=0)
        ).rowcount  # fmt: skip
        if moved != 1:
            _free_slot(conn, agent, 1)
            lost.append(Lost(task_id, agent, agent_full=False))
            continue
        _event(conn, task_id, "dispatched", agent, now)
    return lost


#: Reserve up to ``k`` slots of agent ``id``; returns how many were granted (no row: none).
_GRANT = sql(
    "UPDATE agents SET running_count = LEAST(agents.gpu_capacity, old.running_count + :k) "
    "FROM (SELECT id, running_count FROM agents WHERE id = :id FOR UPDATE) AS old "
    "WHERE agents.id = old.id AND old.running_count < agents.gpu_capacity "
    "RETURNING agents.running_count - old.running_count"
)


def _commit_claimed(
    conn: db.Connection,
    task_ids: Sequence[str],
    decisions: Sequence[Decision],
    explains: dict[str, str],
    now: float,
) -> list[Lost]:
    """:func:`commit_placements` on PostgreSQL, where the caller's transaction has claimed the
    tasks (``FOR UPDATE``): they are still queued, so only the agents' slots can be refused.

    One conditional UPDATE per agent reserves as many of its placements as it has free slots
    (the others are lost races, picked again), then one batch moves the tasks and one
    writes their events: a few round trips per round instead of three per placement, which keeps
    the agents' rows locked for as short a time as possible.
    """
    t = db.tasks
    if explains:
        conn.execute(
            update(t).where(t.c.id == bindparam("tid")).values(explain=bindparam("text")),
            [{"tid": k, "text": v} for k, v in explains.items()],
        )
    by_agent: dict[str, list[tuple[str, Decision]]] = {}
    for task_id, d in zip(task_ids, decisions, strict=True):
        if d.agent_id is not None:
            by_agent.setdefault(d.agent_id, []).append((task_id, d))
    lost: list[Lost] = []
    moves: list[dict[str, Any]] = []
    for agent in sorted(by_agent):  # one lock order for every replica: no deadlock
        placed = by_agent[agent]
        # As many of the agent's placements as it has free slots, in the order picked: the
        # row is locked and read, then raised by the slots granted, in one statement.
        granted = conn.execute(_GRANT, {"id": agent, "k": len(placed)}).scalar() or 0
        lost.extend(Lost(task_id, agent, agent_full=True) for task_id, _ in placed[granted:])
        moves.extend(
            {"tid": task_id, "agent": agent, "text": d.explain()} for task_id, d in placed[:granted]
        )
    if moves:
        moved = conn.execute(
            update(t)
            .where(t.c.id == bindparam("tid"), t.c.status == "queued")
            .values(status="dispatched", agent_id=bindparam("agent"), explain=bindparam("text"),
                    updated_at=now, dispatched_at=now, attempt=t.c.attempt + 1, unlisted=0),
            moves,
        ).rowcount  # fmt: skip
        if moved != len(moves):  # a claimed task changed: roll the whole attempt back
            raise RuntimeError(f"{len(moves) - moved} claimed tasks were no longer queued")
        conn.execute(
            db.task_events.insert(),
            [{"task_id": m["tid"], "status": "dispatched", "agent_id": m["agent"], "at": now,
              "detail": ""} for m in moves],
        )  # fmt: skip
    return lost
