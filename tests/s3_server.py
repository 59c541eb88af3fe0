"""A local S3 server (moto) for tests, and pytest fixtures around it.

``MotoServer`` starts ``python -m moto.server`` as a subprocess bound to
127.0.0.1 on a free port, so other processes started by a test can reach it
too. Nothing here contacts real AWS: every client gets ``endpoint_url``.

Use the fixtures by importing them into a test module or conftest.py::

    from s3_server import s3_server, s3_bucket  # noqa: F401

``s3_bucket`` yields an ``S3Bucket`` with a fresh, empty bucket and sets the
``AWS_*`` variables to dummy values for the duration of one test.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STARTUP_TIMEOUT_SECONDS = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A moto S3 server in a subprocess on 127.0.0.1; use as a context manager."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MotoServer":
        """Start the server and wait until it responds to HTTP requests."""
        env = {**os.environ, **TEST_CREDENTIALS}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with code {self.process.returncode} before it started on port {self.port}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {STARTUP_TIMEOUT_SECONDS} s")

    def stop(self) -> None:
        """Terminate the server process."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def reset(self) -> None:
        """Delete every bucket and object the server holds."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """An empty bucket on a test server, with what an fsspec or boto3 client needs."""

    name: str
    endpoint_url: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict:
        """Return s3fs options that point at the test server with the dummy credentials."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    def client(self):
        """Return a boto3 S3 client for the test server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        )


@pytest.fixture(scope="session")
def s3_server():
    """Start one moto server for the test session and yield it."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """Create a fresh bucket, set dummy AWS credentials for this test, and yield an ``S3Bucket``."""
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)

    bucket = S3Bucket(name=f"evomerge-test-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server.endpoint_url)
    bucket.client().create_bucket(Bucket=bucket.name)
    yield bucket
