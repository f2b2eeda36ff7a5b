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
    dispatch_interval_s: float = 1.0
    max_body_bytes: int = 1024 * 1024
    threads: int = 8  # worker threads for the blocking (database) part of requests

    @property
    def base_url(self) -> str:
        """Where clients reach the API (``/api/v1`` included)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/api/v1"

    def jwt_secret_from_env(self) -> str | None:
        """The configured secret, if any."""
        return self.secret or os.environ.get("SCORING_SERVER_SECRET") or None
