"""The database: schema version check and migration steps, and DDL portable to PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_mock_engine, update

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
