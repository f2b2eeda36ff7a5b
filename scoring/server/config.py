"""The server's settings: a TOML file (``--config``), ``SCORING_*`` environment variables and the
command line (``python -m scoring.server --help``), each overriding the one before.

Every name is the same in all three: ``tie_band = 0.1`` in the file, ``SCORING_TIE_BAND=0.1`` in
the environment; a table such as ``[weights]`` is ``SCORING_WEIGHTS__WARM=3`` one key at a time
(or ``SCORING_WEIGHTS='{"warm": 3}'``). ``python -m scoring.server --print-config`` prints the
effective settings as TOML, which ``--config`` reads back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from scoring import ScoringPolicy, holds

#: The ``--config`` file of the settings being loaded (see :meth:`Settings.load`).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("scoring_config_file", default=None)
#: What ``--print-config`` shows instead of a secret.
HIDDEN = "<hidden>"


class Settings(BaseSettings):
    """Everything :func:`scoring.server.create_app` needs; built once, then immutable.

    ``secret`` ``None`` takes ``SCORING_SERVER_SECRET`` from the environment, else a secret
    generated once and kept in the database. ``s3_bucket`` selects the S3 file store instead of
    the directory ``files_dir``. The dispatch policy (:meth:`policy`) is validated when the
    settings are: a bad weight fails the start, by its path.
    """

    model_config = SettingsConfigDict(
        env_prefix="SCORING_",
        env_nested_delimiter="__",
        extra="forbid",  # a misspelt key in the file is an error, not a silent default
        frozen=True,
    )

    database: str = "sqlite:///scoring.db"
    files_dir: str = "./files"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    demo: str | None = None
    demo_agents: int = 2
    s3_bucket: str | None = None
    s3_endpoint: str | None = None
    secret: str | None = None
    max_attempts: int = 3
    #: Attempts lost with their agent before a task fails (DESIGN section 10.1).
    max_lost_attempts: int = Field(10, ge=0)
    #: The ComfyUI API that ``comfy_cloud`` runs go to (:mod:`scoring.server.cloud`).
    cloud_url: str = "https://cloud.comfy.org/api"
    #: Seconds between polls of a Cloud run's history.
    cloud_poll_s: float = Field(1.0, gt=0)
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
    #: Seconds a freshly freed slot is open only to runs with their models cached there.
    slot_hold_s: float = Field(holds.HOLD_S, ge=0)
    #: Seconds another replica leaves a freshly freed slot to the agent's owner replica.
    owner_grace_s: float = Field(holds.GRACE_S, ge=0)
    #: Seconds a dispatched task may wait for its agent's start before it is queued again.
    start_timeout_s: float = Field(60.0, gt=0)
    #: Write the dispatch counters (placements, lost races) to this JSON file.
    stats_path: str | None = None

    # The dispatch policy: the fields of ScoringPolicy, validated by it (policy()).
    #: Seconds without a heartbeat before an agent is stale (``ScoringPolicy``).
    heartbeat_timeout_s: float = 30.0
    #: ``ScoringPolicy.tie_band``: agents within this score of the best are picked among by the
    #: task id's hash, which spreads replicas' picks (DESIGN section 11).
    tie_band: float = 0.0
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

    #: How long a run may wait for an agent with its models cached (0: never).
    locality_wait_s: float = ScoringPolicy().locality_wait_s
    #: Deferrals for a warm agent per busy slot of it (``ScoringPolicy.deferrals_per_slot``).
    deferrals_per_slot: int = ScoringPolicy().deferrals_per_slot
    #: Weight of each factor (``region``, ``load``, ``pool``, ``warm``, ``gpu``,
    #: ``reliability``); one not given keeps the library's default.
    weights: dict[str, float] = Field(default_factory=dict)
    #: ``[region_a, region_b, affinity]`` triples: the region factor of the two regions.
    region_affinity: list[tuple[str, str, float]] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (the constructor's arguments) over ``SCORING_*`` over the ``--config`` file."""
        path = _CONFIG_FILE.get()
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path)

    @classmethod
    def load(cls, config: str | Path | None = None, **flags: Any) -> Settings:
        """The settings from the TOML file ``config`` (if any), the environment and ``flags``.

        Raises
        ------
        FileNotFoundError
            If ``config`` names no file.
        pydantic.ValidationError
            Every bad value, by its name (and the policy's by its path).
        """
        if config is None:
            return cls(**flags)
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"no configuration file {path}")
        with _reading(path):
            return cls(**flags)

    @model_validator(mode="after")
    def _valid_policy(self) -> Settings:
        self.policy()  # raises with the bad field's path
        return self

    def policy(self) -> ScoringPolicy:
        """The dispatch policy these settings describe."""
        return ScoringPolicy(
            weights=self.weights,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            tie_band=self.tie_band,
            locality_wait_s=self.locality_wait_s,
            deferrals_per_slot=self.deferrals_per_slot,
            region_affinity={(a, b): v for a, b, v in self.region_affinity},
        )

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

    def effective(self) -> dict[str, Any]:
        """Every setting with the policy's values filled in and secrets hidden (the
        secret, a database password); ``None`` for one not set."""
        values = self.model_dump()
        policy = self.policy()
        values["weights"] = dict(policy.weights.items())
        values["region_affinity"] = [[a, b, v] for (a, b), v in policy.region_affinity]
        if self.secret is not None:
            values["secret"] = HIDDEN
        values["database"] = _without_password(self.database)
        return values

    def to_toml(self) -> str:
        """:meth:`effective` as a TOML file (settings not set are left out)."""
        lines, tables = [], []
        for name, value in self.effective().items():
            if value is None:
                lines.append(f"# {name} is not set")
            elif isinstance(value, dict):
                rows = (f"{k} = {_toml_value(v)}" for k, v in value.items())
                tables.append("\n".join([f"[{name}]", *rows]))
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        return "\n\n".join(["\n".join(lines), *tables]) + "\n"


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


def _toml_value(value: Any) -> str:
    """A TOML literal: JSON's strings, numbers, booleans and arrays are TOML's too."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the database will say so at start
        return url
