"""The server's database: tables, engine set-up and the schema version check.

SQLAlchemy 2 Core with portable types only (no SQLite-only SQL), so the same tables serve an
embedded SQLite file (the default, in WAL mode) and PostgreSQL for dispatcher replicas
(DESIGN section 11). Timestamps are float seconds since the epoch, as everywhere in the library.

Migrations: the schema is created on start (``create_all`` creates only missing tables), and
``meta.schema_version`` records its version. A database of another version is refused at start,
unless :data:`MIGRATIONS` holds the steps from it to :data:`SCHEMA_VERSION`; each step is a
function run in one transaction, so a database is always at exactly one version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    update,
)

#: Version of the tables below; bump it with a step in MIGRATIONS when they change.
SCHEMA_VERSION = 1

#: ``{from_version: step}``: each step upgrades a database by one version, inside a transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", String(36), ForeignKey("users.id"), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id"), primary_key=True),
)

#: Team API keys (``sk-``) and agent keys (``dk-``), by the SHA-256 of the key (see auth.py).
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("kind", String(2), nullable=False),
    Column("team_id", String(36), ForeignKey("teams.id"), nullable=False),
    Column("agent_id", String(256), ForeignKey("agents.id"), nullable=True),
    Column("created_at", Float, nullable=False),
)

#: The first characters of each key (``auth.PREFIX_CHARS``), by which an administrator names a key
#: to revoke without holding it. Added within schema version 1: ``create_all`` adds it (keys
#: issued before it have no prefix and are revoked by the whole key).
key_prefixes = Table(
    "key_prefixes",
    metadata,
    Column("key_hash", String(64), ForeignKey("api_keys.key_hash"), primary_key=True),
    Column("prefix", String(16), nullable=False, index=True),
)

workflows = Table(
    "workflows",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id"), nullable=False),
    Column("slug", String(128), nullable=False),
    Column("latest_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("team_id", "slug"),
)

#: Every version of a workflow, as the JSON of its ``Workflow`` record; versions never change.
workflow_versions = Table(
    "workflow_versions",
    metadata,
    Column("workflow_id", String(36), ForeignKey("workflows.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("key", String(1024), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id"), nullable=False),
    Column("content_type", String(255), nullable=True),
    Column("size", BigInteger, nullable=False),
    Column("uploaded_at", Float, nullable=False),
)

#: One row per connected agent. ``running_count`` counts the tasks this server has reserved on
#: the agent (dispatched or running): the source of truth for reservations, changed only by
#: conditional updates; ``record`` is the last heartbeat's Agent fields.
agents = Table(
    "agents",
    metadata,
    Column("id", String(256), primary_key=True),
    Column("team_id", String(36), ForeignKey("teams.id"), nullable=False),
    Column("record", JSON, nullable=True),
    Column("gpu_capacity", Integer, nullable=False, default=0),
    Column("running_count", Integer, nullable=False, default=0),
    Column("last_heartbeat", Float, nullable=True),
)

#: Server replicas on this database, each refreshing its row at every sync (the owners of
#: agents: :mod:`scoring.server.shares`). Added within schema version 1: ``create_all`` adds it.
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("seen_at", Float, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(36), primary_key=True),  # UUIDv7: ordering by id is submission order
    Column("team_id", String(36), ForeignKey("teams.id"), nullable=False),
    Column("workflow_id", String(36), ForeignKey("workflows.id"), nullable=False),
    Column("workflow_version", Integer, nullable=False),
    Column("dispatch_target", String(16), nullable=False),
    Column("tool_type", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("agent_id", String(256), nullable=True),
    Column("parameters", JSON, nullable=False),
    Column("request", JSON, nullable=True),  # the DispatchRequest, for agent runs
    Column("attempts", Integer, nullable=False, default=0),  # failed attempts so far
    Column("excluded", JSON, nullable=False),  # agents that failed this task
    Column("explain", Text, nullable=False, default=""),
    Column("outputs", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_tasks_status", "status", "dispatch_target"),
    Index("ix_tasks_agent", "agent_id", "status"),
)

#: Status history: one row per change of a task's status, written in the same transaction.
task_events = Table(
    "task_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(36), ForeignKey("tasks.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("agent_id", String(256), nullable=True),
    Column("at", Float, nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_task_events_task", "task_id"),
)


class Database:
    """An engine plus the one way to write: :meth:`begin`, a transaction committed on exit.

    SQLite allows one writer at a time, and a transaction that reads before it writes fails at
    once (``SQLITE_BUSY``, no waiting) when another writer committed in between. Writers of this
    process therefore take one lock; on PostgreSQL they run concurrently and the conditional
    updates in :mod:`scoring.server.tasks` decide races.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            _make_parent(url)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock() if self.is_sqlite else None

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (SQLite readers never wait for the writer in WAL mode)."""
        with self.engine.connect() as conn:
            yield conn

    def create(self) -> None:
        """Create missing tables, then check (or upgrade) the schema version.

        Raises
        ------
        RuntimeError
            If the database has a schema version this server cannot upgrade from.
        """
        metadata.create_all(self.engine)
        with self.begin() as conn:
            found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
            row = found.first()
            if row is None:
                conn.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(row[0])
            while version < SCHEMA_VERSION and version in MIGRATIONS:
                MIGRATIONS[version](conn)
                version += 1
            if version != SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.url} has schema version {row[0]}; this server uses "
                    f"{SCHEMA_VERSION} and has no migration from it"
                )
            conn.execute(
                update(meta).where(meta.c.key == "schema_version").values(value=str(version))
            )

    def get_meta(self, key: str) -> str | None:
        """A value of the ``meta`` table, or ``None``."""
        with self.read() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
        return None if row is None else str(row[0])

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _make_parent(url: str) -> None:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:" and not path.startswith("file:"):
        Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer nor each other. synchronous=NORMAL in WAL mode makes
    # every commit durable against a killed process (the commit is in the WAL file before the
    # answer); only an OS crash or power cut can lose the last commits, which FULL would prevent
    # at the price of one fsync per commit (several times fewer runs per second here).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
