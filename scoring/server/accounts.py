"""Teams, users, agents and their keys in the database: what ``--demo`` and the admin CLI create.

Each function runs inside the caller's transaction (``database.begin()``), so several of them
commit together or not at all.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from sqlalchemy import delete, insert, select

from scoring.server import db
from scoring.server.auth import PREFIX_CHARS, hash_key, new_key, store_key


class AccountError(ValueError):
    """A request the database cannot satisfy: an unknown team, an agent of another team, ..."""


def create_team(conn: db.Connection, name: str) -> str:
    """A new team named ``name``; returns its id."""
    team_id = str(uuid.uuid4())
    conn.execute(insert(db.teams).values(id=team_id, name=name, created_at=time.time()))
    return team_id


def create_user(conn: db.Connection, team_id: str, email: str | None = None) -> dict[str, str]:
    """A new user, member of ``team_id`` (an email is made up when none is given)."""
    require_team(conn, team_id)
    user = uuid.uuid4()
    email = email or f"user-{user.hex[:8]}@example.com"
    conn.execute(insert(db.users).values(id=str(user), email=email, created_at=time.time()))
    conn.execute(insert(db.memberships).values(user_id=str(user), team_id=team_id))
    return {"user_id": str(user), "email": email, "team_id": team_id}


def user_exists(conn: db.Connection, user_id: str) -> bool:
    """Whether ``user_id`` is a user."""
    found = conn.execute(select(db.users.c.id).where(db.users.c.id == user_id)).first()
    return found is not None


def issue_key(
    conn: db.Connection, team_id: str, kind: Literal["sk", "dk"], agent_id: str | None = None
) -> str:
    """A new team key (``sk``) or agent key (``dk``, for ``agent_id``, registered to the team
    if it is new); returns the key, which the database keeps only hashed.

    Raises
    ------
    AccountError
        An unknown team, an agent key without an agent (or a team key with one), or an agent
        of another team.
    """
    require_team(conn, team_id)
    if (kind == "dk") != (agent_id is not None):
        raise AccountError("an agent key needs --agent; a team key takes none")
    if agent_id is not None:
        owner = conn.execute(
            select(db.agents.c.team_id).where(db.agents.c.id == agent_id)
        ).scalar_one_or_none()
        if owner is None:
            conn.execute(insert(db.agents).values(id=agent_id, team_id=team_id, gpu_capacity=0,
                                                  running_count=0))  # fmt: skip
        elif owner != team_id:
            raise AccountError(f"agent {agent_id} belongs to another team")
    key = new_key(kind)
    store_key(conn, key, team_id, agent_id)
    return key


def revoke_key(conn: db.Connection, prefix: str) -> dict[str, Any]:
    """Delete the one key whose first :data:`~scoring.server.auth.PREFIX_CHARS` characters are
    ``prefix``, or the key ``prefix`` itself if it is longer; returns what it was.

    Raises
    ------
    AccountError
        If no key or more than one has that prefix.
    """
    k, p = db.api_keys, db.key_prefixes
    query = select(k.c.key_hash, k.c.kind, k.c.team_id, k.c.agent_id)
    if len(prefix) > PREFIX_CHARS:  # a whole key: found by its hash (keys older than prefixes)
        query = query.where(k.c.key_hash == hash_key(prefix))
    else:
        query = query.join(p, p.c.key_hash == k.c.key_hash).where(p.c.prefix == prefix)
    rows = conn.execute(query).all()
    prefix = prefix[:PREFIX_CHARS]
    if len(rows) != 1:
        raise AccountError(f"{len(rows)} keys have the prefix {prefix!r}; revoke needs one")
    row = rows[0]
    conn.execute(delete(p).where(p.c.key_hash == row.key_hash))
    conn.execute(delete(k).where(k.c.key_hash == row.key_hash))
    return {"prefix": prefix, "kind": row.kind, "team_id": row.team_id, "agent_id": row.agent_id}


def require_team(conn: db.Connection, team_id: str) -> None:
    """Raise :class:`AccountError` unless ``team_id`` is a team."""
    found = conn.execute(select(db.teams.c.id).where(db.teams.c.id == team_id)).first()
    if found is None:
        raise AccountError(f"no team {team_id}")
