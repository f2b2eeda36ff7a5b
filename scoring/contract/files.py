"""Where uploaded input files are looked up when a run names them.

The run contract asks three things of a file key: does it exist, which team owns it, and what is
its content type. :class:`FileStore` is that interface (one ``stat`` call, so object storage pays
one request per file, not three); :class:`InMemoryFileStore` serves tests and
:class:`S3FileStore` serves production, reading the owner from object metadata. boto3 is imported
only when an S3 store is used, so the core library does not depend on it (it is the ``s3`` extra).
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

#: Object metadata key holding the owning team's UUID (S3 returns user metadata keys lower-cased).
TEAM_METADATA_KEY = "team-id"

# RFC 6838 restricted-name characters, lower-cased; the subtype may also be the ``*`` wildcard.
_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]*"
_PATTERN_RE = re.compile(rf"(?:\*/\*|{_TOKEN}/(?:\*|{_TOKEN}))")


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the store knows about one uploaded file.

    ``team_id`` is ``None`` when the owner is missing or unreadable; such a file belongs to nobody
    and is rejected as another team's (fail closed). ``content_type`` is ``None`` when unknown.
    """

    key: str
    team_id: UUID | None
    content_type: str | None
    size: int | None = None


@runtime_checkable
class FileStore(Protocol):
    """The file-store interface the run contract needs."""

    def stat(self, key: str) -> FileInfo | None:
        """Return what is known about ``key``, or ``None`` if no such file was uploaded."""
        ...


class _StatHelpers(ABC):
    """Single-question helpers shared by the stores, all answered by ``stat``."""

    @abstractmethod
    def stat(self, key: str) -> FileInfo | None:
        """What is known about ``key``, or ``None`` if no such file was uploaded."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` was uploaded."""
        return self.stat(key) is not None

    def team_of(self, key: str) -> UUID | None:
        """The owning team of ``key``, or ``None`` if unknown or absent."""
        info = self.stat(key)
        return None if info is None else info.team_id

    def content_type(self, key: str) -> str | None:
        """The content type of ``key``, or ``None`` if unknown or absent."""
        info = self.stat(key)
        return None if info is None else info.content_type


def _team_uuid(value: Any) -> UUID | None:
    """Parse an owner; anything unparseable means "owner unknown" rather than an exception."""
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value).strip())
    except (ValueError, TypeError, AttributeError):
        return None


class InMemoryFileStore(_StatHelpers):
    """A dict-backed :class:`FileStore` for tests, simulations and single-process servers.

    Examples
    --------
    >>> store = InMemoryFileStore()
    >>> store.put("inputs/t/1/photo.png", team_id="7f9c2a52-0d1e-4b7a-9a43-5a1f0c3b2d10",
    ...           content_type="image/png", size=1048576)
    >>> store.content_type("inputs/t/1/photo.png")
    'image/png'
    """

    def __init__(self, files: Iterable[FileInfo] = ()) -> None:
        self._files: dict[str, FileInfo] = {}
        self._lock = threading.Lock()  # puts may race with a server's validating threads
        for info in files:
            self._files[info.key] = info

    def put(
        self, key: str, *, team_id: UUID | str, content_type: str | None, size: int | None = None
    ) -> None:
        """Record an uploaded file, replacing any earlier file under the same key.

        Raises
        ------
        ValueError
            If ``team_id`` is not a UUID: a store must never hold a file without an owner.
        """
        team = _team_uuid(team_id)
        if team is None:
            raise ValueError(f"team_id {team_id!r} is not a UUID")
        with self._lock:
            self._files[key] = FileInfo(key, team, content_type, size)

    def remove(self, key: str) -> None:
        """Forget ``key``; absent keys are ignored."""
        with self._lock:
            self._files.pop(key, None)

    def stat(self, key: str) -> FileInfo | None:
        """See :meth:`FileStore.stat`."""
        return self._files.get(key)

    def __len__(self) -> int:
        return len(self._files)


class S3FileStore(_StatHelpers):
    """A :class:`FileStore` over an S3-compatible bucket.

    Each file is one object whose key is the file key. The owner is the user metadata entry
    ``team-id`` (sent as the ``x-amz-meta-team-id`` header); the content type is the object's
    ``Content-Type``. One ``HeadObject`` request answers all three questions.

    Parameters
    ----------
    bucket : str
        Bucket holding the uploads.
    client : botocore S3 client, optional
        A ready client (endpoint, credentials, retries configured by the caller). When omitted,
        ``boto3.client("s3", **client_kwargs)`` is created on first use.
    **client_kwargs
        Passed to ``boto3.client`` when no client is given (e.g. ``endpoint_url``).
    """

    def __init__(self, bucket: str, client: Any = None, **client_kwargs: Any) -> None:
        if not bucket:
            raise ValueError("bucket must be a non-empty string")
        self.bucket = bucket
        self._client = client
        self._client_kwargs = client_kwargs

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created lazily so importing this module never needs boto3."""
        if self._client is None:
            import boto3  # the optional ``s3`` extra

            self._client = boto3.client("s3", **self._client_kwargs)
        return self._client

    def check(self) -> None:
        """Fail fast if the bucket is missing or unreadable (call it at server start).

        ``HeadObject`` answers 404 both for a missing object and for a missing bucket, so a
        misconfigured bucket would otherwise look like "no file was uploaded" on every run.

        Raises
        ------
        botocore.exceptions.ClientError
            If the bucket cannot be reached with the client's credentials.
        """
        self.client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, body: bytes, *, team_id: UUID | str, content_type: str) -> None:
        """Upload ``body`` under ``key`` with the owner and content type this store reads back."""
        team = _team_uuid(team_id)
        if team is None:
            raise ValueError(f"team_id {team_id!r} is not a UUID")
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            Metadata={TEAM_METADATA_KEY: str(team)},
        )

    def stat(self, key: str) -> FileInfo | None:
        """See :meth:`FileStore.stat`.

        Raises
        ------
        botocore.exceptions.ClientError
            For anything but a missing object (denied access, throttling): those are server
            faults, not a client's bad request, so they must not turn into a 400.
        """
        from botocore.exceptions import ClientError

        if not key:
            return None  # S3 has no object with an empty key; don't spend a request on it
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return FileInfo(
            key=key,
            team_id=_team_uuid(metadata.get(TEAM_METADATA_KEY)),
            content_type=head.get("ContentType") or None,
            size=head.get("ContentLength"),
        )


# --- content types -----------------------------------------------------------------------------


def normalize_content_type(value: str | None) -> str | None:
    """``"Image/PNG; charset=binary"`` -> ``"image/png"``; ``None`` or blank -> ``None``."""
    if value is None:
        return None
    media = value.split(";", 1)[0].strip().lower()
    return media or None


def normalize_accept_pattern(value: Any) -> str:
    """Validate and lower-case one ``accept`` pattern (``image/png``, ``image/*`` or ``*/*``).

    Raises
    ------
    ValueError
        If the pattern is not ``type/subtype`` with an optional ``*`` subtype.
    """
    if not isinstance(value, str):
        raise ValueError("accept patterns must be strings")
    pattern = normalize_content_type(value) or ""
    if not _PATTERN_RE.fullmatch(pattern):
        raise ValueError(f"accept pattern {value!r} is not a MIME pattern like 'image/*'")
    return pattern


def content_type_matches(content_type: str | None, patterns: Iterable[str]) -> bool:
    """Whether ``content_type`` matches any of the (normalised) ``accept`` ``patterns``.

    An unknown content type matches only ``*/*``: a file whose type nobody recorded cannot be
    shown to be an image.
    """
    media = normalize_content_type(content_type)
    for pattern in patterns:
        if pattern == "*/*":
            return True
        if media is None:
            continue
        major, _, minor = pattern.partition("/")
        if minor == "*" and media.partition("/")[0] == major and "/" in media:
            return True
        if media == pattern:
            return True
    return False
