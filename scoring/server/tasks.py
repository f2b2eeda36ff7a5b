"""Every change of a task's state, each one database transaction committed before the answer.

Statuses: ``queued`` -> ``dispatched`` (a slot reserved on an agent) -> ``running`` (the agent
started it) -> ``completed`` or ``failed``. A failed attempt goes back to ``queued`` with the
agent excluded until :attr:`ServerState.max_attempts` attempts failed. Each transition is a
conditional UPDATE on the task's current status (and agent), so a repeated or late call changes
nothing twice: a task completes at most once even when an agent retries after a crash.

A reservation is one conditional UPDATE on the agent's row (``running_count < gpu_capacity``)
in the same transaction as the task's move to ``dispatched``; that is what keeps several
dispatchers sharing one database from over-filling an agent (DESIGN section 11).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple
from uuid import UUID

from sqlalchemy import bindparam, case, select, update
from sqlalchemy import text as sql

from scoring import Decision, RunValidationError, validate_run
from scoring.server import db
from scoring.server.auth import Principal
from scoring.server.errors import ApiError, not_found
from scoring.server.ids import uuid7
from scoring.server.state import ServerState

ACTIVE = ("dispatched", "running")


class Lost(NamedTuple):
    """A placement the database refused: the agent was full (``agent_full``: another
    dispatcher reserved its last slot first) or the task was no longer queued."""

    task_id: str
    agent_id: str
    agent_full: bool


def _event(conn: db.Connection, task_id: str, status: str, agent: str | None, at: float,
           detail: str = "") -> None:  # fmt: skip
    conn.execute(
        db.task_events.insert().values(
            task_id=task_id, status=status, agent_id=agent, at=at, detail=detail
        )
    )


# --- clients -----------------------------------------------------------------------------------


def submit(state: ServerState, principal: Principal, workflow_id: str, body: Any) -> str:
    """Validate a run and queue it; returns the new task id.

    Raises
    ------
    ApiError
        404 for a missing or foreign workflow; 400 with every validation error of the body.
    """
    found = state.workflows.by_id(principal.team_id, workflow_id)
    if found is None:
        raise not_found("workflow")
    workflow, version = found
    task_id = str(uuid7())
    try:
        run = validate_run(workflow, body, principal.team_id, state.files, task_id=task_id)
    except RunValidationError as exc:
        errors = [{"code": str(e.code), "key": e.key, "message": e.message} for e in exc.errors]
        raise ApiError.many(400, errors) from None
    now = time.time()
    request = None if run.dispatch_request is None else run.dispatch_request.model_dump(mode="json")
    if request is None:
        explain = "routed to comfy_cloud; this server has no ComfyUI Cloud connection"
    else:
        explain = "queued; waiting for the dispatcher"
    with state.database.begin() as conn:
        conn.execute(
            db.tasks.insert().values(
                id=task_id,
                team_id=str(principal.team_id),
                workflow_id=str(workflow.id),
                workflow_version=version,
                dispatch_target=run.dispatch_target,
                tool_type=run.tool_type,
                status="queued",
                agent_id=None,
                parameters=run.parameters,
                request=request,
                attempts=0,
                excluded=[],
                explain=explain,
                outputs=None,
                created_at=now,
                updated_at=now,
            )
        )
        _event(conn, task_id, "queued", None, now, "submitted")
    state.wake.set()
    return task_id


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


def status(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{taskId}``; another team's task is 404."""
    row = _owned_task(state, principal, task_id)
    return {
        "task_id": row.id,
        "task_status": row.status,
        "agent_id": row.agent_id,
        "dispatch_target": row.dispatch_target,
        "created_at": datetime.fromtimestamp(row.created_at, UTC).isoformat(),
        "explain": row.explain,
    }


def result(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """``GET /r/tasks/{taskId}/result``: the outputs once completed, else 409."""
    row = _owned_task(state, principal, task_id)
    if row.status == "failed":
        raise ApiError(409, "task_failed", f"the task failed after {row.attempts} attempts")
    if row.status != "completed":
        raise ApiError(409, "not_ready", f"the task is {row.status}")
    return {"task_id": row.id, "outputs": row.outputs or {}}


# --- agents ------------------------------------------------------------------------------------


def dispatched_to(state: ServerState, agent_id: str) -> list[dict[str, Any]]:
    """The tasks dispatched to an agent and not yet started, oldest first."""
    t = db.tasks
    with state.database.read() as conn:
        rows = conn.execute(
            select(t.c.id, t.c.workflow_id, t.c.parameters, t.c.tool_type)
            .where(t.c.agent_id == agent_id, t.c.status == "dispatched")
            .order_by(t.c.id)
        ).all()
    return [
        {"task_id": r.id, "workflow_id": r.workflow_id, "parameters": r.parameters,
         "tool_type": r.tool_type}
        for r in rows
    ]  # fmt: skip


def _agent_task(conn: db.Connection, principal: Principal, task_id: str) -> Any:
    try:
        tid = str(UUID(task_id))
    except ValueError:
        raise not_found("task") from None
    row = conn.execute(
        select(db.tasks.c.id, db.tasks.c.status, db.tasks.c.agent_id, db.tasks.c.attempts,
               db.tasks.c.excluded).where(db.tasks.c.id == tid)
    ).first()  # fmt: skip
    if row is None or row.agent_id != principal.agent_id:
        raise not_found("task")  # never dispatched to this agent (or requeued elsewhere)
    return row


def start(state: ServerState, principal: Principal, task_id: str) -> dict[str, Any]:
    """The agent started the task; repeating the call is harmless."""
    now = time.time()
    with state.database.begin() as conn:
        row = _agent_task(conn, principal, task_id)
        if row.status == "dispatched":
            conn.execute(
                update(db.tasks)
                .where(db.tasks.c.id == row.id, db.tasks.c.status == "dispatched")
                .values(status="running", updated_at=now)
            )
            _event(conn, row.id, "running", principal.agent_id, now)
        elif row.status != "running":
            raise ApiError(409, "conflict", f"the task is {row.status}")
    return {"task_id": row.id, "task_status": "running"}


def complete(
    state: ServerState, principal: Principal, task_id: str, ok: bool, outputs: dict[str, Any] | None
) -> dict[str, Any]:
    """The agent finished the task: completed, or failed (retried elsewhere up to the limit).

    A repeated ``completed`` for a completed task answers as the first did; nothing is counted
    twice.
    """
    now = time.time()
    agent = principal.agent_id
    assert agent is not None
    with state.database.begin() as conn:
        row = _agent_task(conn, principal, task_id)
        if row.status not in ACTIVE:
            if ok and row.status == "completed":
                return {"task_id": row.id, "task_status": "completed"}
            raise ApiError(409, "conflict", f"the task is {row.status}")
        if ok:
            new: dict[str, Any] = {"status": "completed", "outputs": outputs or {}}
            detail = ""
        else:
            attempts = row.attempts + 1
            excluded = sorted({*row.excluded, agent})
            final = attempts >= state.max_attempts
            new = {
                "status": "failed" if final else "queued",
                "attempts": attempts,
                "excluded": excluded,
                "agent_id": agent if final else None,
                "outputs": outputs if final else None,
            }
            detail = f"attempt {attempts} failed on {agent}"
        changed = conn.execute(
            update(db.tasks)
            .where(db.tasks.c.id == row.id, db.tasks.c.status.in_(ACTIVE),
                   db.tasks.c.agent_id == agent)
            .values(updated_at=now, **new)
        ).rowcount  # fmt: skip
        if changed != 1:
            raise ApiError(409, "conflict", "the task changed meanwhile")
        _free_slot(conn, agent, 1)
        _event(conn, row.id, new["status"], agent, now, detail)
    state.released(agent)
    state.metrics.requeued("failure", int(new["status"] == "queued"))
    state.wake.set()
    return {"task_id": row.id, "task_status": new["status"]}


def _free_slot(conn: db.Connection, agent_id: str, n: int) -> None:
    a = db.agents
    left = case((a.c.running_count >= n, a.c.running_count - n), else_=0)
    conn.execute(update(a).where(a.c.id == agent_id).values(running_count=left))


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
        return _commit_claimed(conn, task_ids, decisions, explains)
    now = time.time()
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
                    updated_at=now)
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
) -> list[Lost]:
    """:func:`commit_placements` on PostgreSQL, where the caller's transaction has claimed the
    tasks (``FOR UPDATE``): they are still queued, so only the agents' slots can be refused.

    One conditional UPDATE per agent reserves as many of its placements as it has free slots
    (the others are lost races, picked again), then one batch moves the tasks and one
    writes their events: a few round trips per round instead of three per placement, which keeps
    the agents' rows locked for as short a time as possible.
    """
    now = time.time()
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
                    updated_at=now),
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


def requeue_unstarted(state: ServerState, agent_id: str, cutoff: float) -> int:
    """Queue again the tasks dispatched to an agent silent since before ``cutoff``.

    The agent's row is checked in the same transaction, so an agent that reported meanwhile
    keeps its tasks. Returns how many tasks went back to the queue.
    """
    now = time.time()
    a, t = db.agents, db.tasks
    with state.database.begin() as conn:
        row = conn.execute(select(a.c.last_heartbeat).where(a.c.id == agent_id)).first()
        if row is None or row.last_heartbeat is None or row.last_heartbeat >= cutoff:
            return 0
        ids = (
            conn.execute(select(t.c.id).where(t.c.agent_id == agent_id, t.c.status == "dispatched"))
            .scalars()
            .all()
        )
        moved = 0
        for task_id in ids:
            one = conn.execute(
                update(t)
                .where(t.c.id == task_id, t.c.status == "dispatched", t.c.agent_id == agent_id)
                .values(status="queued", agent_id=None, updated_at=now,
                        explain=f"queued again: {agent_id} stopped sending heartbeats")
            ).rowcount  # fmt: skip
            if one:  # another replica may have queued it again first
                moved += one
                _event(conn, task_id, "queued", agent_id, now, "agent heartbeats stopped")
        if moved:
            _free_slot(conn, agent_id, moved)
    if moved:
        state.released(agent_id, moved)
    return moved
