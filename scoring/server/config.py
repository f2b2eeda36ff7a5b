"""The server's settings, from the command line (``python -m scoring.server --help``)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Everything :func:`scoring.server.create_app` needs.

    ``secret`` ``None`` takes ``SCORING_SERVER_SECRET`` from the environment, else a secret
    generated once and kept in the database. ``s3_bucket`` selects the S3 file store instead of
    the directory ``files_dir``.
    """

    database: str = "sqlite:///scoring.db"
    files_dir: str = "./files"
    host: str = "127.0.0.1"
    port: int = 8000
    demo: str | None = None
    demo_agents: int = 2
    s3_bucket: str | None = None
    s3_endpoint: str | None = None
    secret: str | None = None
    heartbeat_timeout_s: float = 30.0
    max_attempts: int = 3
    #: Attempts lost with their agent before a task fails (DESIGN section 10.1).
    max_lost_attempts: int = 10
    #: A dispatched task not started within this many seconds is queued again.
    start_timeout_s: float = 60.0
    #: The ComfyUI API that ``comfy_cloud`` runs go to (:mod:`scoring.server.cloud`).
    cloud_url: str = "https://cloud.comfy.org/api"
    #: Seconds between polls of a Cloud run's history.
    cloud_poll_s: float = 1.0
    dispatch_interval_s: float = 1.0
    max_body_bytes: int = 1024 * 1024
    threads: int = 8  # worker threads for the blocking (database) part of requests
    #: Seconds between reads of the other replicas' changes (0: never; ``None``: 0.25 on
    #: PostgreSQL, where replicas share the database, 0 on SQLite).
    sync_interval_s: float | None = None
    #: With replicas (a sync interval), also read the agents' counts at the start of each
    #: dispatch round. Off: measured, it did not lower lost races (``tests/server/herding.py``).
    refresh_each_round: bool = False
    #: While the queue is longer than the free slots, keep a freshly freed slot a moment for runs
    #: with their models cached there and, with replicas, for the agent's owner
    #: (:mod:`scoring.holds`).
    slot_holds: bool = True
    #: ``ScoringPolicy.tie_band``: agents within this score of the best are picked among by the
    #: task id's hash, which spreads replicas' picks (DESIGN section 11).
    tie_band: float = 0.0
    #: Write the dispatch counters (placements, lost races) to this JSON file.
    stats_path: str | None = None
    #: The address clients reach the server at (``http://host:port``), used in upload URLs;
    #: default: from ``host`` and ``port``. Never taken from a request's Host header.
    public_url: str | None = None
    #: Seconds a request's body may take to arrive (408 after; DESIGN section 10.3).
    body_timeout_s: float = 30.0
    #: The same for an upload's body (up to 64 MiB: 300 s is about 220 kB/s).
    upload_timeout_s: float = 300.0
    #: Seconds a request's head (request line and headers) may take from its first byte.
    header_timeout_s: float = 10.0
    #: Seconds an idle keep-alive connection is kept open.
    keep_alive_s: float = 5.0
    #: Seconds a write waits for the database (SQLite's lock, this process's writers); a 503
    #: with ``Retry-After`` after.
    db_busy_timeout_s: float = 2.0

    @property
    def sync_interval(self) -> float:
        """The effective :attr:`sync_interval_s`."""
        if self.sync_interval_s is not None:
            return self.sync_interval_s
        return 0.0 if self.database.startswith("sqlite") else 0.25

    @property
    def base_url(self) -> str:
        """Where clients reach the API (``/api/v1`` included)."""
        if self.public_url:
            return self.public_url.rstrip("/") + "/api/v1"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/api/v1"

    def jwt_secret_from_env(self) -> str | None:
        """The configured secret, if any."""
        return self.secret or os.environ.get("SCORING_SERVER_SECRET") or None
