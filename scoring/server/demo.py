"""``--demo PATH``: a ready team, workflow, user and keys, written to PATH as JSON.

Created once: a second start with the same database and PATH reuses both (keys are stored
hashed, so a PATH that was lost gets fresh keys for the same team). The workflow is the
platform's example: ``text-to-image`` with ``prompt``, ``width``, ``sampler`` and
``input_image`` (DESIGN section 10).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from scoring import ParameterDef, Workflow
from scoring.server import accounts, db, workflows
from scoring.server.auth import Authenticator

META_KEY = "demo"


def demo_workflow(team_id: uuid.UUID, workflow_id: uuid.UUID) -> Workflow:
    """The platform's example workflow."""
    return Workflow(
        id=workflow_id,
        slug="text-to-image",
        team_id=team_id,
        tool_type="comfyui",
        required_labels={"gpu"},
        parameters=[
            ParameterDef(key="prompt", type="string", label="Prompt", required=True,
                         node_id="6", field="text"),
            ParameterDef(key="width", type="number", label="Width", min=64, max=2048,
                         default=512, node_id="5", field="width"),
            ParameterDef(key="sampler", type="select", label="Sampler",
                         options=["euler", "euler_ancestral", "dpmpp_2m"], default="euler",
                         node_id="3", field="sampler_name"),
            ParameterDef(key="input_image", type="file", label="Input image", required=True,
                         accept=["image/*"], node_id="10", field="image"),
        ],
    )  # fmt: skip


def agent_ids(n: int) -> list[str]:
    """``gpu-node-01``, ``gpu-node-02``, ..."""
    return [f"gpu-node-{i:02d}" for i in range(1, n + 1)]


def ensure_demo(database: db.Database, auth: Authenticator, path: str | Path, base_url: str,
                n_agents: int = 2) -> dict[str, Any]:  # fmt: skip
    """Create the demo (or reuse it) and write ``path``; returns what was written."""
    path = Path(path)
    stored = database.get_meta(META_KEY)
    ids = agent_ids(n_agents)
    if stored is None:
        ids_json = _create(database)
    else:
        ids_json = json.loads(stored)
    team_id = ids_json["team_id"]
    existing = _read(path)
    if (
        existing is not None
        and existing.get("team_id") == team_id
        and set(ids) <= set(existing.get("agent_keys", {}))
    ):
        demo = {**existing, "base_url": base_url}
    else:
        demo = _issue_keys(database, auth, ids_json, ids, base_url)
    _write(path, demo)
    return demo


def _create(database: db.Database) -> dict[str, str]:
    with database.begin() as conn:
        team_id = accounts.create_team(conn, "demo")
        user = accounts.create_user(conn, team_id)
        workflow_id = uuid.uuid4()
        workflows.save(conn, demo_workflow(uuid.UUID(team_id), workflow_id))
        ids = {"team_id": team_id, "user_id": user["user_id"], "workflow_id": str(workflow_id)}
        conn.execute(insert(db.meta).values(key=META_KEY, value=json.dumps(ids)))
    return ids


def _issue_keys(database: db.Database, auth: Authenticator, ids: dict[str, str],
                agents: list[str], base_url: str) -> dict[str, Any]:  # fmt: skip
    team = ids["team_id"]
    with database.begin() as conn:
        agent_keys = {agent: accounts.issue_key(conn, team, "dk", agent) for agent in agents}
        api_key = accounts.issue_key(conn, team, "sk")
    return {
        "base_url": base_url,
        "team_id": team,
        "workflow_id": ids["workflow_id"],
        "workflow_slug": "text-to-image",
        "user_token": auth.issue_session(ids["user_id"]),
        "api_key": api_key,
        "agent_keys": agent_keys,
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, demo: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # The file holds credentials: readable by its owner only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(demo, out, indent=2)
        out.write("\n")
    os.replace(tmp, path)
