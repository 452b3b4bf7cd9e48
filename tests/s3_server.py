"""A real S3-compatible server on loopback for the object-storage tests: moto's standalone
server (`moto[server]`, a dev dependency) in a child process, on a port chosen at run time.

    s3_server  (session)   the running server: its endpoint and a boto3 client to look inside
    s3_env     (function)  a fresh bucket, and the environment that points Sluice at it
                           (AWS_* variables + SLUICE_BLOB_URL=s3://<bucket>/sluice), also set in
                           this process's environment for in-process stores

No Docker, no network beyond 127.0.0.1; the process is stopped at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sluice-test", "AWS_SECRET_ACCESS_KEY": "sluice-test-secret",
               "AWS_REGION": REGION}


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def env(self, bucket: str, prefix: str = "sluice") -> dict[str, str]:
        """What points Sluice (a child process) at `bucket`."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "SLUICE_BLOB_URL": f"s3://{bucket}/{prefix}"}

    def keys(self, bucket: str) -> dict[str, int]:
        """Every object of `bucket`: key -> size."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update({obj["Key"]: obj["Size"] for obj in page.get("Contents", [])})
        return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 60
        while True:  # bounded polling until it answers
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {Path(log).read_text()[-2000:]}")
            try:
                httpx.get(server.endpoint, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer within 60 s") from None
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3Bucket:
    server: S3Server
    bucket: str
    prefix: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.env["SLUICE_BLOB_URL"]

    def objects(self) -> dict[str, int]:
        """This test's objects (file id -> size), without the prefix."""
        return {key.removeprefix(self.prefix + "/"): size for key, size in self.server.keys(self.bucket).items()}


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    bucket = f"sluice-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = s3_server.env(bucket)
    for name, value in env.items():
        if name != "SLUICE_BLOB_URL":
            monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    return S3Bucket(s3_server, bucket, "sluice", env)
