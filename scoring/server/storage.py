"""Uploaded input files: presigned upload URLs and the file store runs are checked against.

``POST /r/files/presign`` hands out a file key ``inputs/{team_id}/{uuid}/{file_name}`` and an
upload URL on this server carrying a signed, expiring token (what a presigned object-storage URL
is); a PUT of exactly the announced size to it stores the file in the configured store:
:class:`LocalFileStore` (a directory, the default) or the library's ``S3FileStore``. Run
validation asks the same store through the library's ``FileStore`` interface.

A PUT first claims its key (:func:`claim_upload`), then reads the bytes: of several PUTs to one
URL the first stores its bytes and the others are refused before they send theirs. The bytes of
an image must be of the declared type (:func:`check_content`, by puremagic's signatures).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import puremagic
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from scoring import FileInfo
from scoring.server import db
from scoring.server.errors import ApiError, ServerCode
from scoring.server.limits import MAX_FILE_NAME_BYTES

UPLOAD_TOKEN_SECONDS = 15 * 60
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


class UploadStore(Protocol):
    """A ``FileStore`` that can also take an upload (both stores of this module qualify)."""

    def stat(self, key: str) -> FileInfo | None: ...

    def put(self, key: str, body: bytes, *, team_id: UUID | str, content_type: str) -> None: ...


class LocalFileStore:
    """Files in a directory; owner, type and size in the database's ``files`` table.

    ``stat`` reads one row, so validating a run costs one indexed query per file parameter.
    """

    def __init__(self, root: str | Path, database: db.Database) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = database

    def path_of(self, key: str) -> Path:
        """Where the bytes of ``key`` live (keys are built by :func:`presign`, never by clients)."""
        return self.root / key

    def put(self, key: str, body: bytes, *, team_id: UUID | str, content_type: str) -> None:
        """Write the bytes (atomically: a reader never sees half a file); the row is written by
        :func:`record_upload`, once the bytes are on disk."""
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Named apart from the file: the file's own name may be as long as the limit allows.
        tmp = path.with_name(f".{uuid.uuid4().hex}.part")
        with open(tmp, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def stat(self, key: str) -> FileInfo | None:
        """See the library's ``FileStore.stat``."""
        if not isinstance(key, str) or len(key) > 1024:
            return None
        with self._db.read() as conn:
            row = conn.execute(
                select(db.files.c.team_id, db.files.c.content_type, db.files.c.size).where(
                    db.files.c.key == key
                )
            ).first()
        if row is None:
            return None
        return FileInfo(key=key, team_id=UUID(row.team_id), content_type=row.content_type,
                        size=row.size)  # fmt: skip


class NotCached(Exception):
    """:meth:`KnownFiles.cached` was asked of a key it has not seen: look it up in the store."""


class KnownFiles:
    """The upload store's answers for files that exist, kept in memory.

    An uploaded file never changes owner, type or size (an upload URL stores its bytes once), so
    a found file's :class:`FileInfo` can be kept; a missing one is asked again each time (it may
    be uploaded next). :meth:`cached` answers without touching the store, so validating a run
    that names known files needs neither a database read nor a worker thread.
    """

    MAX_KEPT = 100_000

    def __init__(self, store: UploadStore) -> None:
        self.store = store
        self._kept: dict[str, FileInfo] = {}

    def stat(self, key: str) -> FileInfo | None:
        """The store's answer (kept when the file exists)."""
        info = self._kept.get(key) if isinstance(key, str) else None
        if info is None:
            info = self.store.stat(key)
            if info is not None:
                if len(self._kept) >= self.MAX_KEPT:
                    self._kept.clear()
                self._kept[key] = info
        return info

    def cached(self) -> _CachedOnly:
        """A ``FileStore`` that answers kept files and raises :class:`NotCached` for others."""
        return _CachedOnly(self._kept)


class _CachedOnly:
    def __init__(self, kept: dict[str, FileInfo]) -> None:
        self._kept = kept

    def stat(self, key: str) -> FileInfo | None:
        info = self._kept.get(key) if isinstance(key, str) else None
        if info is None:
            raise NotCached(key)
        return info


def check_file_name(name: str) -> str:
    """A file name usable as the last part of a key and of a path: no separators, no ``..``, at
    most :data:`~scoring.server.limits.MAX_FILE_NAME_BYTES` bytes of UTF-8.

    Raises
    ------
    ApiError
        400 ``invalid_file_name``.
    """
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name != name.strip()
    )
    if bad:
        raise ApiError(400, ServerCode.INVALID_FILE_NAME, "not a plain file name", "file_name")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        message = "not valid Unicode"
        raise ApiError(400, ServerCode.INVALID_FILE_NAME, message, "file_name") from None
    if size > MAX_FILE_NAME_BYTES:
        message = f"{size} bytes of UTF-8; at most {MAX_FILE_NAME_BYTES}"
        raise ApiError(400, ServerCode.INVALID_FILE_NAME, message, "file_name")
    return name


def presign(
    sign: Any, team_id: UUID, file_name: str, file_size: int, content_type: str, base_url: str
) -> tuple[str, str]:
    """A new file key and its upload URL (signed with ``sign(claims) -> token``).

    Raises
    ------
    ApiError
        400 for a bad name or content type, 413 for a size above :data:`MAX_UPLOAD_BYTES`.
    """
    check_file_name(file_name)
    if not _MIME.fullmatch(content_type):
        message = "not a MIME type like image/png"
        raise ApiError(400, ServerCode.INVALID_VALUE, message, "content_type")
    if file_size > MAX_UPLOAD_BYTES:
        message = f"at most {MAX_UPLOAD_BYTES} bytes"
        raise ApiError(413, ServerCode.PAYLOAD_TOO_LARGE, message, "file_size")
    key = f"inputs/{team_id}/{uuid.uuid4()}/{file_name}"
    claims = {
        "typ": "upload",
        "key": key,
        "team": str(team_id),
        "size": file_size,
        "ct": content_type.lower(),
        "exp": int(time.time()) + UPLOAD_TOKEN_SECONDS,
    }
    return key, f"{base_url}/api/v1/uploads/{sign(claims)}"


def claim_upload(database: db.Database, key: str) -> bool:
    """Take the right to store ``key`` before reading its bytes; ``False`` if another PUT has it
    or the key was already uploaded."""
    try:
        with database.begin() as conn:
            if conn.execute(select(db.files.c.key).where(db.files.c.key == key)).first():
                return False
            conn.execute(db.upload_claims.insert().values(key=key, claimed_at=time.time()))
    except IntegrityError:  # another replica's PUT claimed it first
        return False
    return True


def release_claim(database: db.Database, key: str) -> None:
    """Give a claim back (its PUT failed), so the URL can be used again."""
    with database.begin() as conn:
        conn.execute(delete(db.upload_claims).where(db.upload_claims.c.key == key))


def record_upload(database: db.Database, key: str, team: str, content_type: str, size: int) -> bool:
    """Record an uploaded file's row and drop its claim; ``False`` if the key was already
    uploaded."""
    with database.begin() as conn:
        if conn.execute(select(db.files.c.key).where(db.files.c.key == key)).first() is not None:
            return False
        conn.execute(
            db.files.insert().values(
                key=key, team_id=team, content_type=content_type, size=size,
                uploaded_at=time.time(),
            )
        )  # fmt: skip
        conn.execute(delete(db.upload_claims).where(db.upload_claims.c.key == key))
    return True


#: Bytes of an upload's beginning that its type is recognised by.
SNIFF_BYTES = 64 * 1024


@cache
def _recognisable() -> frozenset[str]:
    """The image types puremagic has signatures for (other types cannot be checked)."""
    known = {m.mime_type for m in puremagic.magic_header_array}
    known |= {m.mime_type for m in puremagic.magic_footer_array}
    # Text formats (SVG is XML) have no fixed first bytes to check.
    return frozenset(t for t in known if t.startswith("image/") and not t.endswith("+xml"))


def check_content(content_type: str, body: bytes) -> None:
    """The bytes of an image upload must be of the type declared at presign.

    Only image types with a binary signature are checked; other declared types are taken as
    declared (run validation checks the declared type against the parameter's ``accept``).

    Raises
    ------
    ApiError
        400 ``content_mismatch``.
    """
    if content_type not in _recognisable():
        return
    try:
        found = {m.mime_type for m in puremagic.magic_string(body[:SNIFF_BYTES])}
    except (puremagic.PureError, ValueError):  # nothing recognised (or no bytes)
        found = set()
    if content_type not in found:
        message = f"the bytes are not {content_type} as declared at presign"
        raise ApiError(400, ServerCode.CONTENT_MISMATCH, message)
