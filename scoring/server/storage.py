"""Uploaded input files: presigned upload URLs and the file store runs are checked against.

``POST /r/files/presign`` hands out a file key ``inputs/{team_id}/{uuid}/{file_name}`` and an
upload URL on this server carrying a signed, expiring token (what a presigned object-storage URL
is); a PUT of exactly the announced size to it stores the file in the configured store:
:class:`LocalFileStore` (a directory, the default) or the library's ``S3FileStore``. Run
validation asks the same store through the library's ``FileStore`` interface.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import select

from scoring import FileInfo
from scoring.server import db
from scoring.server.errors import ApiError

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
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.part")
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


def check_file_name(name: str) -> str:
    """A file name usable as the last part of a key and of a path: no separators, no ``..``."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name != name.strip()
        or len(name.encode("utf-8", "surrogatepass")) > 255
    )
    if bad:
        raise ApiError(400, "invalid_value", "not a plain file name", "file_name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_value", "not valid Unicode", "file_name") from None
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
        raise ApiError(400, "invalid_value", "not a MIME type like image/png", "content_type")
    if file_size > MAX_UPLOAD_BYTES:
        raise ApiError(413, "payload_too_large", f"at most {MAX_UPLOAD_BYTES} bytes", "file_size")
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


def record_upload(database: db.Database, key: str, team: str, content_type: str, size: int) -> bool:
    """Record an uploaded file's row; ``False`` if the key was already uploaded."""
    with database.begin() as conn:
        if conn.execute(select(db.files.c.key).where(db.files.c.key == key)).first() is not None:
            return False
        conn.execute(
            db.files.insert().values(
                key=key, team_id=team, content_type=content_type, size=size,
                uploaded_at=time.time(),
            )
        )  # fmt: skip
    return True
