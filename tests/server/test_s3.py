"""``--s3-bucket``: uploads go to S3 (moto on 127.0.0.1) and runs check file keys there."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ServerProcess, example_body, upload


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback, with dummy credentials in the environment (which the
    server subprocess inherits)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        try:
            host, port = moto.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            moto.stop()


def test_uploads_and_run_checks_use_the_s3_store(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    bucket = f"uploads-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    server = ServerProcess(tmp_path, "--s3-bucket", bucket, "--s3-endpoint", s3_endpoint)
    server.start()
    try:
        with server.client() as client:
            key = upload(client)
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ContentType"] == "image/png"
            assert head["Metadata"]["team-id"] == server.demo["team_id"]
            assert not (tmp_path / "files" / key).exists()  # not in the local directory
            run = f"/r/workflows/{server.demo['workflow_id']}/run"
            assert client.post(run, json=example_body(key)).status_code == 202
            missing = client.post(run, json=example_body(key + ".nope"))
            assert missing.json()["errors"][0]["code"] == "file_not_found"
    finally:
        server.stop()
        s3.close()
