"""Who is calling: session JWTs (users), team API keys (``sk-``) and agent keys (``dk-``).

DESIGN section 10: ``Authorization: Bearer <token>``. A session JWT (HS256, signed with the
server's secret) must come with ``X-Team-ID`` naming one of the user's teams; keys carry their
team, and an ``X-Team-ID`` sent with them is ignored. Keys are stored as their SHA-256 only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

import jwt
from sqlalchemy import insert, select

from scoring.server import db
from scoring.server.errors import ApiError, ServerCode

#: How long a resolved membership is trusted without asking the database again.
CACHE_SECONDS = 30.0
#: How often the keys in use are checked against the database: a key revoked by the admin CLI
#: (another process) stops working on every replica within this (one query for all keys).
KEY_CACHE_SECONDS = 1.0
#: Characters of a key kept in clear (``sk-`` and 9 random ones, 54 bits): how an administrator
#: names a key to revoke (``python -m scoring.server.admin revoke-key PREFIX``).
PREFIX_CHARS = 12
SESSION_SECONDS = 30 * 24 * 3600

Kind = Literal["user", "team_key", "agent"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its kind, the team it acts for, and the user or agent behind it."""

    kind: Kind
    team_id: UUID
    user_id: str | None = None
    agent_id: str | None = None


def hash_key(key: str) -> str:
    """SHA-256 of a key, hex.

    A fast hash is right here, unlike for passwords: keys are 256 random bits
    (:func:`new_key`), so no dictionary or brute-force search can invert the hash, and a fast,
    deterministic hash lets each request find its key by the primary-key index.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(kind: Literal["sk", "dk"]) -> str:
    """A fresh key with 256 bits of entropy: ``sk-...`` (team) or ``dk-...`` (agent)."""
    return f"{kind}-{secrets.token_urlsafe(32)}"


def store_key(conn: db.Connection, key: str, team_id: str, agent_id: str | None = None) -> None:
    """Insert a key's hash and its prefix (inside the caller's transaction)."""
    kind, digest = key[:2], hash_key(key)
    conn.execute(
        insert(db.api_keys).values(
            key_hash=digest,
            kind=kind,
            team_id=team_id,
            agent_id=agent_id,
            created_at=time.time(),
        )
    )
    conn.execute(insert(db.key_prefixes).values(key_hash=digest, prefix=key[:PREFIX_CHARS]))


class Authenticator:
    """Resolves a request's credentials to a :class:`Principal`, or raises the error answer."""

    def __init__(self, database: db.Database, secret: str) -> None:
        self._db = database
        self._secret = secret
        self._cache: dict[tuple[str, ...], tuple[float, object]] = {}
        #: The keys in use (by SHA-256), checked for revocation together (``_recheck_keys``).
        self._keys: dict[str, Principal] = {}
        self._keys_checked = -float("inf")
        self._lock = threading.Lock()

    def issue_session(self, user_id: str, ttl: float = SESSION_SECONDS) -> str:
        """A session JWT for ``user_id`` valid for ``ttl`` seconds."""
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + int(ttl), "typ": "session"}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def sign(self, claims: dict[str, object]) -> str:
        """Sign other claims (upload tokens) with the same secret."""
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def digest(self, purpose: str, text: str) -> str:
        """A keyed hash (HMAC-SHA-256 with the server's secret) of ``text``, hex; ``purpose``
        keeps the digests of different uses apart."""
        message = f"{purpose}\0{text}".encode("utf-8", "surrogatepass")
        return hmac.new(self._secret.encode(), message, hashlib.sha256).hexdigest()

    def verify(self, token: str, typ: str) -> dict[str, object] | None:
        """The claims of a valid, unexpired token of type ``typ``; ``None`` otherwise."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["exp", "typ"]}
            )
        except jwt.PyJWTError:
            return None
        return claims if claims.get("typ") == typ else None

    def resolve(self, authorization: str | None, team_header: str | None) -> Principal:
        """The caller behind an ``Authorization`` header (and ``X-Team-ID`` for users).

        Raises
        ------
        ApiError
            401 ``unauthorized`` without valid credentials; 400 ``missing_team_header`` for a
            session without ``X-Team-ID``; 403 ``forbidden`` for a team the user is not in.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, ServerCode.UNAUTHORIZED, "send Authorization: Bearer <token>")
        if token.startswith(("sk-", "dk-")):
            principal = self._key(token)
            if principal is None:
                raise ApiError(401, ServerCode.UNAUTHORIZED, "unknown key")
            return principal
        claims = self.verify(token, "session")
        if claims is None or not isinstance(claims.get("sub"), str):
            raise ApiError(401, ServerCode.UNAUTHORIZED, "invalid or expired token")
        user_id = str(claims["sub"])
        if team_header is None or not team_header.strip():
            message = "session tokens need X-Team-ID"
            raise ApiError(400, ServerCode.MISSING_TEAM_HEADER, message, "X-Team-ID")
        not_member = ApiError(403, ServerCode.FORBIDDEN, "not a member of this team", "X-Team-ID")
        try:
            team = UUID(team_header.strip())
        except ValueError:
            raise not_member from None
        if not self._is_member(user_id, str(team)):
            raise not_member
        return Principal("user", team, user_id=user_id)

    def _cached(self, key: tuple[str, ...]) -> tuple[bool, object]:
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def _remember(self, key: tuple[str, ...], value: object, ttl: float = CACHE_SECONDS) -> None:
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()  # bounded: a flood of bad keys cannot grow it forever
            self._cache[key] = (time.monotonic() + ttl, value)

    def _key(self, token: str) -> Principal | None:
        digest = hash_key(token)
        self._recheck_keys()
        with self._lock:
            known = self._keys.get(digest)
        if known is not None:
            return known
        hit, _ = self._cached(("unknown key", digest))
        if hit:
            return None
        with self._db.read() as conn:
            row = conn.execute(
                select(db.api_keys.c.kind, db.api_keys.c.team_id, db.api_keys.c.agent_id).where(
                    db.api_keys.c.key_hash == digest
                )
            ).first()
        principal = None
        if row is not None and row.kind == token[:2]:
            kind: Kind = "agent" if row.kind == "dk" else "team_key"
            principal = Principal(kind, UUID(row.team_id), agent_id=row.agent_id)
        if principal is None:
            self._remember(("unknown key", digest), None, KEY_CACHE_SECONDS)
        else:
            with self._lock:
                if len(self._keys) > 100_000:
                    self._keys.clear()  # bounded: every key is looked up again once
                self._keys[digest] = principal
        return principal

    def _recheck_keys(self) -> None:
        """At most once per :data:`KEY_CACHE_SECONDS`, drop the known keys that were revoked
        (deleted by the admin CLI, maybe in another process): one query for all the keys in
        use, not one per key and second."""
        now = time.monotonic()
        with self._lock:
            if now - self._keys_checked < KEY_CACHE_SECONDS:
                return
            self._keys_checked = now
            digests = list(self._keys)
        kept: set[str] = set()
        with self._db.read() as conn:
            for i in range(0, len(digests), 500):
                chunk = digests[i : i + 500]
                query = select(db.api_keys.c.key_hash).where(db.api_keys.c.key_hash.in_(chunk))
                kept.update(conn.execute(query).scalars())
        with self._lock:
            for digest in digests:
                if digest not in kept:
                    self._keys.pop(digest, None)

    def _is_member(self, user_id: str, team_id: str) -> bool:
        hit, value = self._cached(("member", user_id, team_id))
        if hit:
            return bool(value)
        with self._db.read() as conn:
            row = conn.execute(
                select(db.memberships.c.user_id).where(
                    db.memberships.c.user_id == user_id, db.memberships.c.team_id == team_id
                )
            ).first()
        self._remember(("member", user_id, team_id), row is not None)
        return row is not None


def require(principal: Principal, *kinds: Kind) -> Principal:
    """Refuse (403) a caller of another kind: agents only on /agents, others only on /r."""
    if principal.kind not in kinds:
        where = "/agents/..." if "agent" in kinds else "/r/..."
        raise ApiError(403, ServerCode.FORBIDDEN, f"these credentials may not call {where}")
    return principal


def load_secret(database: db.Database, env_value: str | None) -> str:
    """The JWT secret: from the environment, else one generated once and kept in the database
    (so sessions stay valid across restarts)."""
    if env_value:
        return env_value
    stored = database.get_meta("jwt_secret")
    if stored is not None:
        return stored
    secret = secrets.token_urlsafe(48)
    with database.begin() as conn:
        existing = conn.execute(
            select(db.meta.c.value).where(db.meta.c.key == "jwt_secret")
        ).first()
        if existing is not None:  # another replica won the race
            return str(existing[0])
        conn.execute(insert(db.meta).values(key="jwt_secret", value=secret))
    return secret
