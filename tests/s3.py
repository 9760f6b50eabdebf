"""A real S3-compatible server for the S3 path's tests: moto in server mode on 127.0.0.1.

``moto_server`` starts it once per run as a subprocess on a free port; ``s3_storage`` gives a
test a fresh bucket and points Django's default storage at it (``settings`` overrides, so it
is undone after the test). Presigned URLs, django-storages and boto3 all talk HTTP to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.env_plugin import RUN_DIR, free_port

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class MotoServer:
    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": REGION}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - the child owns the handle
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"moto_server exited; log:\n{self.log.read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, timeout=30, what="the moto S3 server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


@dataclass
class S3Bucket:
    name: str
    server: MotoServer
    client: Any

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for obj in listed.get("Contents", []))


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer(RUN_DIR / "logs" / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_storage(moto_server: MotoServer, settings: Any) -> S3Bucket:
    """A fresh bucket as Django's default storage, configured as STORAGE_BACKEND=s3 would."""
    client = moto_server.client()
    bucket = f"media-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    settings.STORAGE_BACKEND = "s3"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "endpoint_url": moto_server.url,
                "region_name": REGION,
                "access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "file_overwrite": False,
                "querystring_expire": 3600,
            },
        },
    }
    return S3Bucket(name=bucket, server=moto_server, client=client)
