"""The database: schema version check and migration steps, and DDL portable to PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_mock_engine, inspect, select, text, update

from scoring.server import db


def test_create_records_the_version_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    database = db.Database(f"sqlite:///{tmp_path}/s.db")
    database.create()
    assert database.get_meta("schema_version") == str(db.SCHEMA_VERSION)
    database.create()  # a second start on the same file is fine
    with database.begin() as conn:
        conn.execute(update(db.meta).where(db.meta.c.key == "schema_version").values(value="99"))
    with pytest.raises(RuntimeError, match="schema version 99"):
        database.create()
    database.dispose()


def test_migration_steps_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = db.Database(f"sqlite:///{tmp_path}/s.db")
    database.create()
    ran: list[int] = []
    monkeypatch.setattr(db, "SCHEMA_VERSION", db.SCHEMA_VERSION + 2)
    steps = {db.SCHEMA_VERSION - 2: lambda conn: ran.append(1),
             db.SCHEMA_VERSION - 1: lambda conn: ran.append(2)}  # fmt: skip
    monkeypatch.setattr(db, "MIGRATIONS", steps)
    database.create()
    assert ran == [1, 2]
    assert database.get_meta("schema_version") == str(db.SCHEMA_VERSION)
    database.dispose()


def test_tables_compile_for_postgresql() -> None:
    statements: list[str] = []

    def record(sql: Any, *_: Any, **__: Any) -> None:
        statements.append(str(sql.compile(dialect=engine.dialect)))

    engine = create_mock_engine("postgresql+psycopg://", record)
    db.metadata.create_all(engine, checkfirst=False)
    ddl = "\n".join(statements)
    assert "CREATE TABLE tasks" in ddl and "CREATE TABLE agents" in ddl
    assert "JSON" in ddl and "AUTOINCREMENT" not in ddl  # nothing SQLite-only


def _as_version_1(database: db.Database) -> None:
    """Turn a fresh database back into schema version 1 (before the lifecycle's columns)."""
    with database.begin() as conn:
        for index in db.V2_INDEXES:
            index.drop(conn)
        for name in db._V2_COLUMNS:
            conn.execute(text(f"ALTER TABLE tasks DROP COLUMN {name}"))
        conn.execute(update(db.meta).where(db.meta.c.key == "schema_version").values(value="1"))
        conn.execute(db.teams.insert().values(id="t", name="t", created_at=0.0))
        conn.execute(db.workflows.insert().values(id="w", team_id="t", slug="w",
                                                  latest_version=1, created_at=0.0))  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO tasks (id, team_id, workflow_id, workflow_version, dispatch_target, "
                "tool_type, status, agent_id, parameters, request, attempts, excluded, explain, "
                "outputs, created_at, updated_at) VALUES ('x', 't', 'w', 1, 'agent', 'comfyui', "
                "'running', 'a', '{}', NULL, 1, '[\"b\"]', 'e', NULL, 5.0, 6.0)"
            )
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_database_is_upgraded_with_its_tasks(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        from .conftest import new_database

        url = new_database(request.getfixturevalue("postgres"))
    database = db.Database(url)
    database.create()
    _as_version_1(database)
    assert database.get_meta("schema_version") == "1"
    database.create()
    assert database.get_meta("schema_version") == str(db.SCHEMA_VERSION) == "2"
    with database.read() as conn:
        row = conn.execute(select(db.tasks).where(db.tasks.c.id == "x")).one()
        names = {i["name"] for i in inspect(conn).get_indexes("tasks")}
    # The task keeps what it had; the new columns start from their defaults.
    assert (row.status, row.agent_id, row.attempts, row.excluded) == ("running", "a", 1, ["b"])
    assert (row.lost, row.unlisted, row.cancel_requested) == (0, 0, 0)
    assert (row.attempt, row.dispatched_at) == (2, 6.0)  # its second attempt, since its change
    assert row.history is None and row.idempotency_key is None
    assert {"ix_tasks_queue", "ix_tasks_idempotency"} <= names
    database.create()  # a second start at version 2 changes nothing
    database.dispose()
