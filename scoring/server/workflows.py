"""Workflows and their versions in the database.

A version is the JSON of the library's ``Workflow`` record and never changes; a new definition is
a new version. Runs use the latest version and record which one they ran.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any
from uuid import UUID

from sqlalchemy import select, update

from scoring import Workflow
from scoring.server import db

#: How long a looked-up workflow is reused without asking the database (versions are immutable,
#: so this only bounds how late a replica sees a newly published version).
CACHE_SECONDS = 5.0
_VERSION = re.compile(r"[0-9]{1,9}")


def save(conn: db.Connection, workflow: Workflow) -> int:
    """Store ``workflow`` as the next version of its id (inside the caller's transaction)."""
    now = time.time()
    definition = workflow.model_dump(mode="json")
    wid = str(workflow.id)
    row = conn.execute(
        select(db.workflows.c.latest_version).where(db.workflows.c.id == wid)
    ).first()
    if row is None:
        version = 1
        conn.execute(
            db.workflows.insert().values(
                id=wid, team_id=str(workflow.team_id), slug=workflow.slug, latest_version=1,
                created_at=now,
            )
        )  # fmt: skip
    else:
        version = row[0] + 1
        conn.execute(
            update(db.workflows)
            .where(db.workflows.c.id == wid)
            .values(latest_version=version, slug=workflow.slug)
        )
    conn.execute(
        db.workflow_versions.insert().values(
            workflow_id=wid, version=version, definition=definition, created_at=now
        )
    )
    return version


class WorkflowRepository:
    """Reads workflows for one team at a time; another team's workflow is simply not found."""

    def __init__(self, database: db.Database) -> None:
        self._db = database
        self._cache: dict[tuple[str, str], tuple[float, tuple[Workflow, int] | None]] = {}
        self._lock = threading.Lock()

    def by_id(self, team_id: UUID, workflow_id: str) -> tuple[Workflow, int] | None:
        """The latest version of a workflow of ``team_id`` with its version number, or ``None``."""
        try:
            wid = str(UUID(workflow_id))
        except ValueError:
            return None
        return self._lookup(team_id, ("id", wid), None)

    def by_slug(self, team_id: UUID, slug: str) -> tuple[Workflow, int] | None:
        """``slug`` or ``slug@version`` of ``team_id``, or ``None``."""
        name, _, version = slug.partition("@")
        wanted: int | None = None
        if version:
            # ASCII digits only: str.isdigit() also takes superscripts and circled digits,
            # which int() refuses
            if not _VERSION.fullmatch(version):
                return None
            wanted = int(version)
        with self._db.read() as conn:
            row = conn.execute(
                select(db.workflows.c.id).where(
                    db.workflows.c.team_id == str(team_id), db.workflows.c.slug == name
                )
            ).first()
        if row is None:
            return None
        return self._lookup(team_id, ("id", row[0]), wanted)

    def _lookup(
        self, team_id: UUID, key: tuple[str, str], version: int | None
    ) -> tuple[Workflow, int] | None:
        cache_key = (str(team_id), key[1])
        if version is None:
            with self._lock:
                hit = self._cache.get(cache_key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        wv = db.workflow_versions
        query = (
            select(wv.c.definition, wv.c.version)
            .join(db.workflows, db.workflows.c.id == wv.c.workflow_id)
            .where(db.workflows.c.id == key[1], db.workflows.c.team_id == str(team_id))
        )
        if version is None:
            query = query.where(wv.c.version == db.workflows.c.latest_version)
        else:
            query = query.where(wv.c.version == version)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        found = None if row is None else (Workflow.model_validate(row[0]), int(row[1]))
        if version is None:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[cache_key] = (time.monotonic() + CACHE_SECONDS, found)
        return found


def to_json(workflow: Workflow, version: int) -> dict[str, Any]:
    """The answer of ``GET /r/workflows/...``."""
    data = workflow.model_dump(mode="json")
    return {
        "id": data["id"],
        "slug": data["slug"],
        "version": version,
        "team_id": data["team_id"],
        "tool_type": data["tool_type"],
        "status": data["status"],
        "default_dispatch_target": data["default_dispatch_target"],
        "required_labels": sorted(data["required_labels"]),
        "parameters": data["parameters"],
    }
