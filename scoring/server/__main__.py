"""``python -m scoring.server --host 127.0.0.1 --port 8000 --database sqlite:///scoring.db
--files ./files [--demo PATH]``."""

from __future__ import annotations

import argparse
import logging
import sys

from scoring.server.config import Settings


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line."""
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m scoring.server", description=__doc__)
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--database",
        default=d.database,
        help="SQLAlchemy URL: sqlite:///PATH (default) or postgresql+psycopg://...",
    )
    p.add_argument("--files", default=d.files_dir, help="directory of uploaded files")
    p.add_argument("--s3-bucket", default=None, help="keep uploads in this S3 bucket instead")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (S3-compatible stores)")
    p.add_argument(
        "--demo",
        default=None,
        metavar="PATH",
        help="create a demo team, workflow, user and keys (once) and write them here",
    )
    p.add_argument(
        "--demo-agents",
        type=int,
        default=d.demo_agents,
        help="how many agent keys the demo has (gpu-node-01, ...)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=d.heartbeat_timeout_s,
        help="seconds without a heartbeat before an agent is stale",
    )
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument(
        "--max-lost-attempts",
        type=int,
        default=d.max_lost_attempts,
        help="attempts lost with their agent before a task fails",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=d.start_timeout_s,
        help="seconds a dispatched task may wait for its agent's start before it is queued again",
    )
    p.add_argument("--cloud-url", default=d.cloud_url, help="ComfyUI API base URL for comfy_cloud")
    p.add_argument(
        "--cloud-poll", type=float, default=d.cloud_poll_s, help="seconds between Cloud polls"
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="worker threads for database calls"
    )
    p.add_argument(
        "--sync-interval",
        type=float,
        default=None,
        help="seconds between reads of other replicas' changes (default 0.25 on PostgreSQL)",
    )
    p.add_argument(
        "--refresh-each-round",
        action="store_true",
        help="with replicas, read the agents' counts at the start of every dispatch round",
    )
    p.add_argument(
        "--no-slot-holds",
        dest="slot_holds",
        action="store_false",
        help="give a freshly freed slot to the first run that fits (no hold for warm runs or, "
        "with replicas, for the agent's owner)",
    )
    p.add_argument(
        "--tie-band", type=float, default=d.tie_band, help="pick among agents this near the best"
    )
    p.add_argument("--stats", default=None, metavar="PATH", help="write dispatch counters here")
    p.add_argument(
        "--public-url",
        default=None,
        help="the address clients reach this server at, for upload URLs (default: host and port)",
    )
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request body may take (408 after)")  # fmt: skip
    p.add_argument("--upload-timeout", type=float, default=d.upload_timeout_s,
                   help="seconds an upload's body may take (408 after)")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a request head may take (408 after)")  # fmt: skip
    p.add_argument("--keep-alive", type=float, default=d.keep_alive_s,
                   help="seconds an idle connection is kept")  # fmt: skip
    p.add_argument("--db-busy-timeout", type=float, default=d.db_busy_timeout_s,
                   help="seconds a write waits for the database (503 after)")  # fmt: skip
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper())
    return Settings(
        database=a.database, files_dir=a.files, host=a.host, port=a.port, demo=a.demo,
        demo_agents=a.demo_agents, s3_bucket=a.s3_bucket, s3_endpoint=a.s3_endpoint,
        heartbeat_timeout_s=a.heartbeat_timeout, max_attempts=a.max_attempts, threads=a.threads,
        max_lost_attempts=a.max_lost_attempts, start_timeout_s=a.start_timeout,
        cloud_url=a.cloud_url, cloud_poll_s=a.cloud_poll,
        sync_interval_s=a.sync_interval, tie_band=a.tie_band,
        refresh_each_round=a.refresh_each_round, slot_holds=a.slot_holds, stats_path=a.stats,
        public_url=a.public_url, body_timeout_s=a.body_timeout, header_timeout_s=a.header_timeout,
        upload_timeout_s=a.upload_timeout,
        keep_alive_s=a.keep_alive, db_busy_timeout_s=a.db_busy_timeout,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Build the app and serve it with uvicorn until interrupted.

    Exit status 2, with one line on stderr, when the database cannot be used (not a database,
    another application's, an unknown schema version, locked).

    uvicorn's own limits: the request head is bounded in size (``h11_max_incomplete_event_size``)
    and, by :mod:`scoring.server.protocol`, in time; idle connections by ``timeout_keep_alive``;
    bodies by the application (:mod:`scoring.server.limits`). What it does not bound is the
    number of connections (``limit_concurrency`` would answer its 503 in plain text): behind a
    proxy, cap them there (nginx ``limit_conn``), which also sets the proxy's own timeouts
    (``client_header_timeout``, ``client_body_timeout``).
    """
    import uvicorn
    from sqlalchemy.exc import DatabaseError

    from scoring.server.app import create_app
    from scoring.server.db import UnusableDatabase
    from scoring.server.limits import MAX_HEADER_BYTES
    from scoring.server.protocol import protocol_class

    settings = parse_args(argv)
    try:
        app = create_app(settings)
    except (UnusableDatabase, DatabaseError) as exc:  # e.g. malformed pages read after the check
        line = str(exc.orig if isinstance(exc, DatabaseError) else exc).splitlines()[0]
        print(f"scoring.server: cannot use database {settings.database}: {line}", file=sys.stderr)
        return 2
    log_level = logging.getLevelName(logging.getLogger().level).lower()
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
        http=protocol_class(settings.header_timeout_s, MAX_HEADER_BYTES),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
