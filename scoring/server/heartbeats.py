"""Agent heartbeats: the untrusted report validated as an ``Agent`` record, stored, mirrored.

The agent's id and team come from its key, never from the body. The record is committed to the
database, then written to the Fleet with a running count no lower than the slots this server
has reserved on the agent (committed or being committed): an agent's report lags the tasks just
dispatched to it, and trusting it would let the dispatcher over-fill the agent.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update

from scoring import Agent
from scoring.models import running_count
from scoring.server import db, tasks
from scoring.server.auth import Principal
from scoring.server.errors import ApiError, validation_errors
from scoring.server.schemas import HeartbeatBody
from scoring.server.state import ServerState

REPORTED = frozenset(HeartbeatBody.model_fields)
#: An unchanged report is written to the database at most this often (the Fleet gets every
#: one). The database's heartbeat time only decides when a silent agent's tasks are queued
#: again, which waits for a whole heartbeat timeout anyway.
PERSIST_EVERY_S = 1.0
_SERVER_SET = ("agent_id", "team_id", "last_heartbeat")


def heartbeat(state: ServerState, principal: Principal, body: Any) -> list[dict[str, Any]]:
    """Record a heartbeat; returns the tasks dispatched to the agent and not yet started.

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
        for key in body if key not in REPORTED
    ]  # fmt: skip
    now = time.time()
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
        last = state.persisted.get(agent_id)
        due = last is None or last[0] != record or now - last[1] >= PERSIST_EVERY_S
        if due:
            state.persisted[agent_id] = (record, now)
    if due:
        with state.database.begin() as conn:
            conn.execute(
                update(db.agents)
                .where(db.agents.c.id == agent_id)
                .values(record=record, gpu_capacity=agent.gpu_capacity, last_heartbeat=now)
            )
    with state.sync:
        # Read under ``sync``: a placement is either still counted in ``pending`` or already in
        # the database, never neither (dispatch.py commits first, then clears ``pending``).
        reserved = running_count(state.reserved_in_db(agent_id), state.pending.get(agent_id, 0))
        running = max(agent.running_count, reserved)
        if running != agent.running_count:
            agent = agent.model_copy(update={"running_count": running})
        state.fleet.upsert(agent)
    if running < agent.gpu_capacity:
        state.wake.set()
    return tasks.dispatched_to(state, agent_id)
