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
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DatabaseError

#: Version of the tables below; bump it with a step in MIGRATIONS when they change.
SCHEMA_VERSION = 2

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
    # Schema version 2: the lifecycle of DESIGN section 10.1 and the submissions of 10.3.
    #: The current attempt's number (0 before the first dispatch); fences start and complete.
    Column("attempt", Integer, nullable=False, default=0, server_default="0"),
    #: When the current attempt was dispatched (the start timeout counts from it).
    Column("dispatched_at", Float, nullable=True),
    #: Attempts lost with their agent (silent, or no longer listing the task): requeued without
    #: counting against ``max_attempts``, up to ``max_lost_attempts``.
    Column("lost", Integer, nullable=False, default=0, server_default="0"),
    #: Consecutive heartbeats of its agent that did not list the running task.
    Column("unlisted", Integer, nullable=False, default=0, server_default="0"),
    #: A cancel asked while running: done at the agent's next heartbeat.
    Column("cancel_requested", Integer, nullable=False, default=0, server_default="0"),
    #: Every ended attempt: ``[{"attempt", "agent_id", "outcome", "at"}]``.
    Column("history", JSON, nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(64), nullable=True),
    #: The ComfyUI Cloud prompt id of a ``comfy_cloud`` run once submitted.
    Column("cloud_prompt_id", String(128), nullable=True),
    Index("ix_tasks_agent", "agent_id", "status"),
)

#: Indexes added by schema version 2 (created by its migration on an older database).
V2_INDEXES = (
    # Fair dispatch reads the queue by group (team, workflow), oldest first within each; its
    # prefix (status, dispatch_target) serves the other reads by status.
    Index(
        "ix_tasks_queue",
        tasks.c.status,
        tasks.c.dispatch_target,
        tasks.c.team_id,
        tasks.c.workflow_id,
        tasks.c.id,
    ),
    Index("ix_tasks_idempotency", tasks.c.team_id, tasks.c.idempotency_key, unique=True),
)

#: Teams' ComfyUI Cloud API keys (``admin set-cloud-key``): kept as given, since the server
#: must present them to the Cloud.
cloud_keys = Table(
    "cloud_keys",
    metadata,
    Column("team_id", String(36), ForeignKey("teams.id"), primary_key=True),
    Column("api_key", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

#: Upload URLs being used: a PUT claims its file key here before it reads a byte, so of several
#: PUTs to one URL the first stores its bytes and the others are refused at once (storage.py).
upload_claims = Table(
    "upload_claims",
    metadata,
    Column("key", String(1024), primary_key=True),
    Column("claimed_at", Float, nullable=False),
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


def _v1_to_v2(conn: Connection) -> None:
    """Add the lifecycle's and the submissions' columns and indexes (DESIGN 10.1, 10.3)."""
    added = [c for c in tasks.columns if c.name in _V2_COLUMNS]
    for column in added:
        kind = column.type.compile(dialect=conn.dialect)
        server_default = getattr(column.server_default, "arg", None)
        default = f" DEFAULT {server_default}" if server_default is not None else ""
        null = " NOT NULL" if not column.nullable else ""
        conn.execute(text(f"ALTER TABLE tasks ADD COLUMN {column.name} {kind}{null}{default}"))
    for index in V2_INDEXES:
        index.create(conn, checkfirst=True)
    # Its prefix is ix_tasks_queue's: PostgreSQL without statistics preferred it for the
    # walk of the groups, and read the whole queue at every step.
    conn.execute(text("DROP INDEX IF EXISTS ix_tasks_status"))
    # Tasks on agents now: their attempt counts from their failed ones, their start timeout
    # from their last change.
    conn.execute(
        update(tasks)
        .where(tasks.c.status.in_(("dispatched", "running")))
        .values(attempt=tasks.c.attempts + 1, dispatched_at=tasks.c.updated_at)
    )


_V2_COLUMNS = ("attempt", "dispatched_at", "lost", "unlisted", "cancel_requested", "history",
               "idempotency_key", "request_hash", "cloud_prompt_id")  # fmt: skip

#: ``{from_version: step}``: each step upgrades a database by one version, inside a transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


class UnusableDatabase(RuntimeError):
    """The database cannot be this server's: not a database, another application's, of a schema
    version with no migration, or locked past the busy timeout (the message is one line)."""


class DatabaseBusy(Exception):
    """This process's writers waited longer than the busy timeout for their turn."""


class Database:
    """An engine plus the one way to write: :meth:`begin`, a transaction committed on exit.

    SQLite allows one writer at a time, and a transaction that reads before it writes fails at
    once (``SQLITE_BUSY``, no waiting) when another writer committed in between. Writers of this
    process therefore take one lock; on PostgreSQL they run concurrently and the conditional
    updates in :mod:`scoring.server.tasks` decide races.

    ``busy_timeout_s`` bounds how long a write waits for SQLite's lock (held by another process)
    or for this process's writers: past it the write fails (a 503 answer), so a locked file
    never holds requests for long.
    """

    def __init__(self, url: str, *, echo: bool = False, busy_timeout_s: float = 2.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.busy_timeout_s = busy_timeout_s
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            _make_parent(url)
            # sqlite3's timeout is SQLite's busy timeout (PRAGMA busy_timeout)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
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
        if not self._write_lock.acquire(timeout=self.busy_timeout_s):
            raise DatabaseBusy(f"no write turn within {self.busy_timeout_s} s")
        try:
            with self.engine.begin() as conn:
                yield conn
        finally:
            self._write_lock.release()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads (SQLite readers never wait for the writer in WAL mode)."""
        with self.engine.connect() as conn:
            yield conn

    def create(self) -> None:
        """Create missing tables, then check (or upgrade) the schema version.

        Raises
        ------
        UnusableDatabase
            If the file is not a database, holds another application's tables (no ``meta``
            table), has a schema version this server cannot upgrade from, or stays locked.
        """
        try:
            self._create()
        except DatabaseError as exc:  # "file is not a database", "database is locked", ...
            reason = str(exc.orig) if exc.orig is not None else str(exc)
            raise UnusableDatabase(reason.splitlines()[0]) from exc

    def _create(self) -> None:
        existing = inspect(self.engine).get_table_names()
        if existing and meta.name not in existing:
            raise UnusableDatabase(f"it holds another application's tables ({existing[0]}, ...)")
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
                raise UnusableDatabase(
                    f"schema version {row[0]}; this server uses {SCHEMA_VERSION} and has "
                    "no migration from it"
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
    cursor.close()
