"""Agent heartbeats: the untrusted report validated as an ``Agent`` record, stored, mirrored.

The agent's id and team come from its key, never from the body. The record is written to the
Fleet at once and committed to the database in the next group commit, with a running count no
lower than the slots this server has reserved on the agent (committed or being committed): an
agent's report lags the tasks just dispatched to it, and trusting it would let the dispatcher
over-fill the agent. Until a larger capacity is committed (an agent's first report, or one
that grew), the Fleet counts as free only the slots the database would grant: a reservation is
checked against the committed capacity, and a placement on a slot it does not have yet would
only be refused (a lost race in one process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update

from scoring import Agent
from scoring.server import db, tasks
from scoring.server.auth import Principal
from scoring.server.commits import Done, Work
from scoring.server.errors import ApiError, validation_errors
from scoring.server.schemas import MAX_HELD, HeartbeatBody
from scoring.server.state import ServerState

#: The task ids the agent holds (DESIGN section 10.1): not part of its Agent record.
HELD = "running"
REPORTED = frozenset(HeartbeatBody.model_fields) - {HELD}
#: An unchanged report is written to the database at most this often (the Fleet gets every
#: one). The database's heartbeat time only decides when a silent agent's tasks are queued
#: again, which waits for a whole heartbeat timeout anyway.
PERSIST_EVERY_S = 1.0
_SERVER_SET = ("agent_id", "team_id", "last_heartbeat")


def heartbeat(state: ServerState, principal: Principal, body: Any) -> tasks.AgentView:
    """:func:`receive` and its work in one transaction: the tasks dispatched to the agent and
    not yet started, and those of its listed tasks it must drop."""
    return state.commits.run_sync(receive(state, principal, body))


def receive(state: ServerState, principal: Principal, body: Any) -> Work[tasks.AgentView]:
    """Take a heartbeat into the Fleet; returns the group-commit work that stores it (when
    due) and reconciles the agent's tasks (:func:`scoring.server.tasks.reconciling`).

    Raises
    ------
    ApiError
        400 with every problem of the body (unknown keys, each invalid field).
    """
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    unknown = [
        {"code": "unknown_key", "key": key, "message": "set by the server from the agent key"
         if key in _SERVER_SET else "not a heartbeat field"}
        for key in body if key not in REPORTED and key != HELD
    ]  # fmt: skip
    held = _held(body.get(HELD), unknown)
    now = state.clock()
    agent_id = principal.agent_id
    assert agent_id is not None
    fields = {k: v for k, v in body.items() if k in REPORTED}
    try:
        agent = Agent(agent_id=agent_id, team_id=principal.team_id, last_heartbeat=now, **fields)
    except ValidationError as exc:
        raise ApiError.many(400, unknown + validation_errors(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. an unhashable label that pydantic passed on
        raise ApiError(400, "invalid_value", str(exc)[:200]) from None
    if unknown:
        raise ApiError.many(400, unknown)
    record = agent.model_dump(mode="json", exclude={"agent_id", "team_id", "last_heartbeat"})
    with state.sync:
        # Read under ``sync``: a placement is either still counted in ``pending`` or already in
        # the database, never neither (dispatch.py commits first, then clears ``pending``).
        reserved, stored = state.slots(agent_id)
        report = agent.running_count
        running = max(report, reserved)
        # slots the committed capacity does not grant yet count as taken until it is committed
        guarded = max(running, agent.gpu_capacity - max(0, stored - reserved))
        if guarded != agent.running_count:
            agent = agent.model_copy(update={"running_count": guarded})
        try:  # first, so that a report the Fleet refuses is never stored
            state.fleet.upsert(agent)
        except ValueError as exc:  # e.g. over its team's share of names (scoring.fleet)
            raise ApiError(400, "invalid_value", str(exc)[:200]) from None
        state.heard[agent_id] = now
        last = state.persisted.get(agent_id)
        changed = last is None or last[0] != record
        if changed:
            state.capacity_epoch += 1
        due = last is None or changed or now - last[1] >= PERSIST_EVERY_S
        if due:
            state.persisted[agent_id] = (record, now)
    reconcile = tasks.reconciling(state, agent_id, held)
    values = {"record": record, "gpu_capacity": agent.gpu_capacity, "last_heartbeat": now}
    free = running < agent.gpu_capacity

    def unguard() -> None:  # committed (under sync): the Fleet gets the whole capacity
        if agent_id in state.fleet and state.heard.get(agent_id) == now:  # no newer report
            count = max(report, state.reserved(agent_id))
            state.fleet.heartbeat(agent_id, now, running_count=count)
            state.capacity_epoch += 1  # groups skipped as unplaceable are tried again

    def work(conn: db.Connection) -> Done[tasks.AgentView]:
        if due:
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(**values))
        done = reconcile(conn)
        if guarded > running:
            done.after = _both(done.after, unguard)
        if free:  # once the report is stored: a reservation reads its capacity
            done.after = _both(done.after, state.wake.set)
        return done

    return work


def _both(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    if first is None:
        return then

    def both() -> None:
        first()
        then()

    return both


def _held(value: Any, problems: list[dict[str, Any]]) -> list[str] | None:
    """The heartbeat's ``running`` list (``None`` when absent: an older agent); a problem is
    added to ``problems`` when it is not a list of at most :data:`MAX_HELD` strings."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_HELD
        or not all(isinstance(v, str) and len(v) <= 64 for v in value)
    ):
        problems.append({"code": "invalid_value", "key": HELD,
                         "message": f"a list of at most {MAX_HELD} task ids"})  # fmt: skip
        return None
    return value
