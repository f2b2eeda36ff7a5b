"""``python -m scoring.server --host 127.0.0.1 --port 8000 --database sqlite:///scoring.db
--files ./files [--demo PATH] [--config scoring.toml] [--print-config]``.

Settings come from the ``--config`` TOML file, then ``SCORING_*`` environment variables, then
these flags, each overriding the one before (:mod:`scoring.server.config`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from scoring.server.config import Settings


def _parser() -> argparse.ArgumentParser:
    # Every default is None: a flag not given leaves the file's or the environment's value.
    p = argparse.ArgumentParser(prog="python -m scoring.server", description=__doc__,
                                argument_default=None)  # fmt: skip
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (secrets hidden) and exit",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--database", help="SQLAlchemy URL: sqlite:///PATH (default) or postgresql+psycopg://..."
    )
    p.add_argument("--files", dest="files_dir", help="directory of uploaded files")
    p.add_argument("--s3-bucket", help="keep uploads in this S3 bucket instead")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (S3-compatible stores)")
    p.add_argument(
        "--demo",
        metavar="PATH",
        help="create a demo team, workflow, user and keys (once) and write them here",
    )
    p.add_argument(
        "--demo-agents", type=int, help="how many agent keys the demo has (gpu-node-01, ...)"
    )
    p.add_argument(
        "--heartbeat-timeout",
        dest="heartbeat_timeout_s",
        type=float,
        help="seconds without a heartbeat before an agent is stale",
    )
    p.add_argument(
        "--start-timeout",
        dest="start_timeout_s",
        type=float,
        help="seconds a dispatched task may wait for its agent's start before it is queued again",
    )
    p.add_argument("--max-attempts", type=int)
    p.add_argument(
        "--max-lost-attempts", type=int, help="attempts lost with their agent before a task fails"
    )
    p.add_argument("--cloud-url", help="ComfyUI API base URL for comfy_cloud runs")
    p.add_argument(
        "--cloud-poll", dest="cloud_poll_s", type=float, help="seconds between Cloud polls"
    )
    p.add_argument("--threads", type=int, help="worker threads for database calls")
    p.add_argument(
        "--sync-interval",
        dest="sync_interval_s",
        type=float,
        help="seconds between reads of other replicas' changes (default 0.25 on PostgreSQL)",
    )
    p.add_argument(
        "--refresh-each-round",
        action="store_const",
        const=True,
        help="with replicas, read the agents' counts at the start of every dispatch round",
    )
    p.add_argument(
        "--no-slot-holds",
        dest="slot_holds",
        action="store_const",
        const=False,
        help="give a freshly freed slot to the first run that fits (no hold for warm runs or, "
        "with replicas, for the agent's owner)",
    )
    p.add_argument("--tie-band", type=float, help="pick among agents this near the best")
    p.add_argument(
        "--locality-wait",
        dest="locality_wait_s",
        type=float,
        help="seconds a run may wait for an agent with its models cached (0: never)",
    )
    p.add_argument("--stats", dest="stats_path", metavar="PATH",
                   help="write dispatch counters here")  # fmt: skip
    p.add_argument(
        "--public-url",
        help="the address clients reach this server at, for upload URLs (default: host and port)",
    )
    p.add_argument("--body-timeout", dest="body_timeout_s", type=float,
                   help="seconds a request body may take (408 after)")  # fmt: skip
    p.add_argument("--upload-timeout", dest="upload_timeout_s", type=float,
                   help="seconds an upload's body may take (408 after)")  # fmt: skip
    p.add_argument("--header-timeout", dest="header_timeout_s", type=float,
                   help="seconds a request head may take (408 after)")  # fmt: skip
    p.add_argument("--keep-alive", dest="keep_alive_s", type=float,
                   help="seconds an idle connection is kept")  # fmt: skip
    p.add_argument("--db-busy-timeout", dest="db_busy_timeout_s", type=float,
                   help="seconds a write waits for the database (503 after)")  # fmt: skip
    p.add_argument("--log-level")
    return p


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the ``--config`` file, the environment and the command line."""
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[Settings, bool]:
    """The settings, and whether only to print them."""
    parser = _parser()
    flags: dict[str, Any] = vars(parser.parse_args(argv))
    config, print_only = flags.pop("config"), flags.pop("print_config")
    try:
        settings = Settings.load(config, **{k: v for k, v in flags.items() if v is not None})
    except (FileNotFoundError, ValidationError) as exc:
        parser.error(str(exc))
    return settings, print_only


def main(argv: list[str] | None = None) -> int:
    """Build the app and serve it with uvicorn until interrupted (or print the settings).

    Exit status 2, with one line on stderr, when the database cannot be used (not a database,
    another application's, an unknown schema version, locked).

    uvicorn's own limits: the request head is bounded in size and time by
    :mod:`scoring.server.protocol`; idle connections by ``timeout_keep_alive``;
    bodies by the application (:mod:`scoring.server.limits`). What it does not bound is the
    number of connections (``limit_concurrency`` would answer its 503 in plain text): behind a
    proxy, cap them there (nginx ``limit_conn``), which also sets the proxy's own timeouts
    (``client_header_timeout``, ``client_body_timeout``).
    """
    settings, print_only = _parse(argv)
    if print_only:
        sys.stdout.write(settings.to_toml())
        return 0
    import uvicorn
    from sqlalchemy.exc import DatabaseError

    from scoring.server.app import create_app
    from scoring.server.db import UnusableDatabase
    from scoring.server.limits import MAX_HEADER_BYTES
    from scoring.server.protocol import protocol_class

    logging.basicConfig(level=settings.log_level.upper())
    try:
        app = create_app(settings)
    except (UnusableDatabase, DatabaseError) as exc:  # e.g. malformed pages read after the check
        line = str(exc.orig if isinstance(exc, DatabaseError) else exc).splitlines()[0]
        print(f"scoring.server: cannot use database {settings.database}: {line}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        access_log=False, http=protocol_class(settings.header_timeout_s, MAX_HEADER_BYTES),
        loop="uvloop",
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
    )  # fmt: skip

    class Server(uvicorn.Server):
        """uvicorn's server, ending the long-polled heartbeats as soon as it is asked to stop
        (it waits for the requests in flight before the application's shutdown runs)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.server.waiters.close()
            super().handle_exit(sig, frame)

    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
