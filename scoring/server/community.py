"""What a team is shown of another team's agent: an opaque alias, stable and unguessable.

A community run may be served by an agent of another team (DESIGN section 3). Its submitter sees
that some agent ran it, and the same agent under the same name each time, but not the agent's
id: ``community-`` and a keyed hash of the id (HMAC with the server's secret, so nobody without
the secret can test a guessed id against it).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import select

from scoring.server import db
from scoring.server.state import ServerState

PREFIX = "community-"


def alias(state: ServerState, agent_id: str) -> str:
    """The name other teams see for ``agent_id``."""
    return PREFIX + state.auth.digest("agent-alias", agent_id)[:16]


def owner(state: ServerState, agent_id: str) -> str | None:
    """The team of an agent (from the Fleet, else the database), or ``None``."""
    if agent_id in state.fleet:
        return str(state.fleet.get(agent_id).team_id)
    with state.database.read() as conn:
        row = conn.execute(select(db.agents.c.team_id).where(db.agents.c.id == agent_id)).first()
    return None if row is None else str(row[0])


def shown_to(state: ServerState, team_id: UUID, answer: dict[str, Any]) -> dict[str, Any]:
    """A task's answer as ``team_id`` may see it: every other team's agent id replaced by its
    alias, in ``agent_id``, in ``explain`` and in the ``attempts`` list."""
    team = str(team_id)
    ids = {answer.get("agent_id")} | {a.get("agent_id") for a in answer.get("attempts") or ()}
    foreign = {i: alias(state, i) for i in ids if i is not None and owner(state, i) != team}
    if not foreign:
        return answer
    out = dict(answer)
    if out.get("agent_id") in foreign:
        out["agent_id"] = foreign[out["agent_id"]]
    # A placement's explanation starts with its agent (Decision.explain); ids are free-form,
    # so only that position is rewritten, never a substring elsewhere.
    text = str(out.get("explain", ""))
    for agent_id, name in foreign.items():
        if text.startswith(f"{agent_id} "):
            text = name + text[len(agent_id) :]
        # An ended attempt's explanation ends with its agent (tasks._end_attempt).
        for end in ("", ")"):
            if text.endswith(f" on {agent_id}{end}"):
                text = text[: len(text) - len(agent_id) - len(end)] + name + end
    out["explain"] = text
    if out.get("attempts"):
        out["attempts"] = [
            {**a, "agent_id": foreign.get(a.get("agent_id"), a.get("agent_id"))}
            for a in out["attempts"]
        ]
    return out
