"""File stores: the in-memory store, the S3 store against moto on loopback, and MIME matching."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from scoring.contract.files import (
    FileInfo,
    FileStore,
    InMemoryFileStore,
    S3FileStore,
    content_type_matches,
    normalize_accept_pattern,
    normalize_content_type,
)

TEAM = uuid.UUID("7f9c2a52-0d1e-4b7a-9a43-5a1f0c3b2d10")
OTHER_TEAM = uuid.UUID("0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f")
BUCKET = "scoring-uploads"


# --- in-memory ---------------------------------------------------------------------------------


def test_in_memory_round_trip() -> None:
    store = InMemoryFileStore()
    key = f"inputs/{TEAM}/{uuid.uuid4()}/photo.png"
    store.put(key, team_id=str(TEAM), content_type="image/png", size=1048576)
    assert isinstance(store, FileStore)
    assert store.stat(key) == FileInfo(key, TEAM, "image/png", 1048576)
    assert store.exists(key)
    assert store.team_of(key) == TEAM
    assert store.content_type(key) == "image/png"
    assert len(store) == 1


def test_in_memory_absent_key() -> None:
    store = InMemoryFileStore([FileInfo("a.png", TEAM, "image/png")])
    assert store.stat("b.png") is None
    assert not store.exists("b.png")
    assert store.team_of("b.png") is None
    assert store.content_type("b.png") is None


def test_in_memory_replace_and_remove() -> None:
    store = InMemoryFileStore()
    store.put("k", team_id=TEAM, content_type="image/png")
    store.put("k", team_id=OTHER_TEAM, content_type="video/mp4")
    assert store.team_of("k") == OTHER_TEAM
    store.remove("k")
    store.remove("k")  # absent keys are ignored
    assert not store.exists("k")


def test_in_memory_rejects_ownerless_file() -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        InMemoryFileStore().put("k", team_id="team-a", content_type="image/png")


# --- content types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "patterns", "expected"),
    [
        ("image/png", ("image/*",), True),
        ("image/png", ("image/png",), True),
        ("IMAGE/PNG", ("image/png",), True),  # MIME types are case-insensitive
        ("image/png; charset=binary", ("image/png",), True),  # parameters are ignored
        ("image/png", ("*/*",), True),
        ("image/png", ("image/jpeg",), False),
        ("image/png", ("video/*", "image/jpeg"), False),
        ("image/png", ("video/*", "image/png"), True),  # any pattern may match
        ("imagex/png", ("image/*",), False),  # the type must match whole, not as a prefix
        ("image", ("image/*",), False),  # no subtype at all
        (None, ("image/*",), False),  # unknown type only passes */*
        (None, ("*/*",), True),
        ("", ("image/*",), False),
        ("image/png", (), False),  # no pattern; the validator treats "no accept" as "any"
    ],
    ids=[
        "wildcard-subtype",
        "exact",
        "upper-case-type",
        "parameters-ignored",
        "anything",
        "other-subtype",
        "no-pattern-matches",
        "second-pattern-matches",
        "type-is-not-prefix",
        "no-subtype",
        "unknown-vs-wildcard",
        "unknown-vs-anything",
        "empty",
        "empty-pattern-list",
    ],
)
def test_content_type_matches(
    content_type: str | None, patterns: tuple[str, ...], expected: bool
) -> None:
    assert content_type_matches(content_type, patterns) is expected


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("image/*", "image/*"),
        ("Image/PNG", "image/png"),
        (" */* ", "*/*"),
        ("text/plain; charset=utf-8", "text/plain"),
        ("application/vnd.api+json", "application/vnd.api+json"),
    ],
    ids=["wildcard", "case", "spaces", "parameters", "vendor-tree"],
)
def test_accept_pattern_normalised(raw: str, normalised: str) -> None:
    assert normalize_accept_pattern(raw) == normalised


@pytest.mark.parametrize(
    "bad",
    ["image", "*/png", "image/", "/png", "", "image/png/x", ".png", 3],
    ids=[
        "no-slash",
        "wildcard-type",
        "no-subtype",
        "no-type",
        "empty",
        "two-slashes",
        "extension",
        "not-a-string",
    ],
)
def test_accept_pattern_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        normalize_accept_pattern(bad)


def test_normalize_content_type() -> None:
    assert normalize_content_type(None) is None
    assert normalize_content_type("  ") is None
    assert normalize_content_type("Image/PNG ; q=1") == "image/png"


# --- S3 against moto on loopback ----------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random free port), with dummy credentials in the env."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_store(s3_endpoint: str) -> Iterator[S3FileStore]:
    """A store over a fresh bucket (one per test, so tests share no state)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    store = S3FileStore(f"{BUCKET}-{uuid.uuid4().hex[:8]}", client=client)
    client.create_bucket(Bucket=store.bucket)
    yield store
    client.close()


def test_s3_round_trip_with_plain_boto3_upload(s3_store: S3FileStore) -> None:
    """An uploader that only knows boto3 and the metadata convention is read back correctly."""
    key = f"inputs/{TEAM}/{uuid.uuid4()}/photo.png"
    s3_store.client.put_object(
        Bucket=s3_store.bucket,
        Key=key,
        Body=b"\x89PNG\r\n\x1a\n" + b"\0" * 24,
        ContentType="image/png",
        Metadata={"team-id": str(TEAM)},
    )
    assert isinstance(s3_store, FileStore)
    assert s3_store.stat(key) == FileInfo(key, TEAM, "image/png", 32)
    assert s3_store.exists(key)
    assert s3_store.team_of(key) == TEAM
    assert s3_store.content_type(key) == "image/png"


def test_s3_put_then_stat(s3_store: S3FileStore) -> None:
    s3_store.put("inputs/a/clip.mp4", b"data", team_id=str(OTHER_TEAM), content_type="video/mp4")
    info = s3_store.stat("inputs/a/clip.mp4")
    assert info == FileInfo("inputs/a/clip.mp4", OTHER_TEAM, "video/mp4", 4)


def test_s3_missing_key_is_none(s3_store: S3FileStore) -> None:
    assert s3_store.stat("inputs/nothing/here.png") is None
    assert s3_store.stat("") is None
    assert not s3_store.exists("inputs/nothing/here.png")


def test_s3_object_without_owner_belongs_to_nobody(s3_store: S3FileStore) -> None:
    put = s3_store.client.put_object
    put(Bucket=s3_store.bucket, Key="a", Body=b"x", ContentType="image/png")
    put(
        Bucket=s3_store.bucket,
        Key="b",
        Body=b"x",
        ContentType="image/png",
        Metadata={"team-id": "nope"},
    )
    assert s3_store.exists("a") and s3_store.team_of("a") is None
    assert s3_store.exists("b") and s3_store.team_of("b") is None


def test_s3_denied_access_propagates(s3_store: S3FileStore) -> None:
    """Denied access is a server fault, not a missing file: it must not become a 400."""
    from botocore.exceptions import ClientError
    from botocore.stub import Stubber

    with Stubber(s3_store.client) as stub:
        stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
        with pytest.raises(ClientError):
            s3_store.stat("inputs/x.png")


def test_s3_check_finds_a_missing_bucket(s3_store: S3FileStore, s3_endpoint: str) -> None:
    """HEAD on an object of a missing bucket is a plain 404, so ``check`` is what catches it."""
    from botocore.exceptions import ClientError

    s3_store.check()
    store = S3FileStore("no-such-bucket", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert store.stat("inputs/x.png") is None
    with pytest.raises(ClientError):
        store.check()
    store.client.close()


def test_s3_store_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="bucket"):
        S3FileStore("")


def test_s3_put_rejects_ownerless_file() -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        S3FileStore("b", client=object()).put("k", b"", team_id="x", content_type="image/png")


def test_core_does_not_import_boto3() -> None:
    """boto3 is the optional ``s3`` extra: validating runs must not need it."""
    code = "import sys, scoring.contract; sys.exit('boto3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
