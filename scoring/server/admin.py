"""``python -m scoring.server.admin --database URL COMMAND ...``: administration without touching
the database by hand (DESIGN section 10.4). Every command prints one JSON document.

Commands: ``create-team NAME``, ``create-user --team TEAM_ID [--email EMAIL]``, ``session --user
USER_ID`` (a session JWT), ``issue-key --team TEAM_ID --kind sk|dk [--agent AGENT_ID]``,
``revoke-key PREFIX`` (a running server refuses the key within a second), ``add-workflow --team
TEAM_ID --file WORKFLOW.json`` (the ``Workflow`` fields; the same slug again is a new version),
``set-cloud-key --team TEAM_ID`` (the team's ComfyUI Cloud API key, read from standard input
unless ``--key`` gives it), ``list-agents [--team TEAM_ID]``, ``list-tasks [--team TEAM_ID]
[--status STATUS]``.

``--database`` defaults to the server's setting (``SCORING_DATABASE``, else
``sqlite:///scoring.db``); sessions are signed with the server's secret (``SCORING_SECRET`` or
``SCORING_SERVER_SECRET``, else the one kept in the database).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from sqlalchemy import Select, select

from scoring import Workflow
from scoring.server import accounts, cloud, db, workflows
from scoring.server.auth import PREFIX_CHARS, Authenticator, load_secret
from scoring.server.config import Settings
from scoring.server.schemas import TaskStatusName

Command = Callable[[db.Database, argparse.Namespace], Any]


def create_team(database: db.Database, a: argparse.Namespace) -> dict[str, str]:
    with database.begin() as conn:
        return {"team_id": accounts.create_team(conn, a.name), "name": a.name}


def create_user(database: db.Database, a: argparse.Namespace) -> dict[str, str]:
    with database.begin() as conn:
        return accounts.create_user(conn, a.team, a.email)


def session(database: db.Database, a: argparse.Namespace) -> dict[str, str]:
    with database.read() as conn:
        if not accounts.user_exists(conn, a.user):
            raise accounts.AccountError(f"no user {a.user}")
    secret = load_secret(database, Settings(database=database.url).jwt_secret_from_env())
    token = Authenticator(database, secret).issue_session(a.user)
    return {"user_id": a.user, "token": token}


def issue_key(database: db.Database, a: argparse.Namespace) -> dict[str, Any]:
    with database.begin() as conn:
        key = accounts.issue_key(conn, a.team, a.kind, a.agent)
    return {"key": key, "prefix": key[:PREFIX_CHARS], "kind": a.kind, "team_id": a.team,
            "agent_id": a.agent}  # fmt: skip


def revoke_key(database: db.Database, a: argparse.Namespace) -> dict[str, Any]:
    with database.begin() as conn:
        return {"revoked": accounts.revoke_key(conn, a.prefix)}


def add_workflow(database: db.Database, a: argparse.Namespace) -> dict[str, Any]:
    fields = json.loads(Path(a.file).read_text())
    if not isinstance(fields, dict):
        raise accounts.AccountError(f"{a.file} must hold one JSON object")
    w = db.workflows
    with database.begin() as conn:
        accounts.require_team(conn, a.team)
        known = conn.execute(
            select(w.c.id).where(w.c.team_id == a.team, w.c.slug == fields.get("slug"))
        ).scalar_one_or_none()
        # the same slug again is the next version of that workflow
        fields = {"id": known or str(uuid.uuid4()), **fields, "team_id": a.team}
        workflow = Workflow.model_validate(fields)
        if known is not None and str(workflow.id) != known:
            raise accounts.AccountError(f"slug {workflow.slug!r} is workflow {known}")
        version = workflows.save(conn, workflow)
    return {**workflows.to_json(workflow, version), "workflow_id": str(workflow.id)}


def set_cloud_key(database: db.Database, a: argparse.Namespace) -> dict[str, Any]:
    key = a.key if a.key is not None else sys.stdin.readline().strip()
    cloud.set_key(database, a.team, key)
    return {"team_id": a.team, "cloud_key": "set"}


def list_agents(database: db.Database, a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = _rows(database, select(db.agents).order_by(db.agents.c.id), team_id=a.team)
    return [
        {
            "agent_id": r.id,
            "team_id": r.team_id,
            "status": (r.record or {}).get("status"),
            "gpu_capacity": r.gpu_capacity,
            "running_count": r.running_count,
            "last_heartbeat": _iso(r.last_heartbeat),
        }
        for r in rows
    ]


def list_tasks(database: db.Database, a: argparse.Namespace) -> list[dict[str, Any]]:
    query = select(db.tasks).order_by(db.tasks.c.id.desc()).limit(a.limit)
    rows = _rows(database, query, team_id=a.team, status=a.status)
    return [
        {
            "task_id": r.id,
            "team_id": r.team_id,
            "workflow_id": r.workflow_id,
            "status": r.status,
            "agent_id": r.agent_id,
            "dispatch_target": r.dispatch_target,
            "attempts": r.attempts,
            "created_at": _iso(r.created_at),
            "explain": r.explain,
        }
        for r in rows
    ]


def _rows(database: db.Database, query: Select[Any], **equal: str | None) -> list[Any]:
    """The rows of ``query`` whose columns equal the values of ``equal`` that are not None."""
    table = query.get_final_froms()[0]
    for column, value in equal.items():
        if value is not None:
            query = query.where(table.c[column] == value)
    with database.read() as conn:
        return list(conn.execute(query).all())


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scoring.server.admin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--database", help="SQLAlchemy URL (default: the server's setting)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(run=run)
        return c

    command("create-team", create_team, "create a team").add_argument("name")
    c = command("create-user", create_user, "create a user, member of a team")
    c.add_argument("--team", required=True)
    c.add_argument("--email", help="default: made up from the user's id")
    command("session", session, "print a session JWT for a user").add_argument(
        "--user", required=True
    )
    c = command("issue-key", issue_key, "issue a team key (sk) or an agent key (dk)")
    c.add_argument("--team", required=True)
    c.add_argument("--kind", required=True, choices=["sk", "dk"])
    c.add_argument("--agent", help="the agent of a dk key (registered to the team if new)")
    c = command("revoke-key", revoke_key, "revoke the key with this prefix (or the whole key)")
    c.add_argument("prefix")
    c = command("add-workflow", add_workflow, "add a workflow (or a new version of its slug)")
    c.add_argument("--team", required=True)
    c.add_argument("--file", required=True, help="a JSON object of the Workflow fields")
    c = command("set-cloud-key", set_cloud_key, "set a team's ComfyUI Cloud API key")
    c.add_argument("--team", required=True)
    c.add_argument("--key", help="the key (default: one line of standard input)")
    command("list-agents", list_agents, "list agents").add_argument("--team")
    c = command("list-tasks", list_tasks, "list tasks, newest first")
    c.add_argument("--team")
    c.add_argument("--status", choices=get_args(TaskStatusName))
    c.add_argument("--limit", type=int, default=100)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; prints its JSON, or ``{"error": ...}`` on standard error (exit 1)."""
    a = _parser().parse_args(argv)
    database = db.Database(a.database or Settings().database)
    try:
        database.create()
        result = a.run(database, a)
    except (accounts.AccountError, ValidationError, OSError, ValueError) as exc:
        json.dump({"error": str(exc)}, sys.stderr)
        sys.stderr.write("\n")
        return 1
    finally:
        database.dispose()
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
