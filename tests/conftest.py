"""Shared fixtures: the S3 test server (a real S3 HTTP endpoint on loopback) and store roots.

The server is a ``moto_server`` subprocess started once per test session on a free port and
stopped at the end. Tests that need S3 take the ``s3_env`` fixture (environment set, fresh bucket)
or the parametrised ``store_root`` fixture (the same test on a local folder and on S3).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from grade.core import store

ACCESS_KEY = "grade-test-access"
SECRET_KEY = "grade-test-secret-value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with status {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not become ready within 30 s")


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint URL, process) of the session's S3 test server."""
    port = free_port()
    proc = start_moto(port)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_environ(endpoint: str) -> dict[str, str]:
    return {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """S3 settings in the environment and a fresh bucket; yields its ``s3://bucket`` URI."""
    endpoint, _ = s3_server
    for k, v in s3_environ(endpoint).items():
        monkeypatch.setenv(k, v)
    store.reset_s3_client()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    from minio import Minio

    Minio(endpoint.split("://", 1)[1], access_key=ACCESS_KEY, secret_key=SECRET_KEY,
          secure=False, region="us-east-1").make_bucket(bucket)
    yield f"s3://{bucket}"
    store.reset_s3_client()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """A writable root URI: a local folder, then an S3 prefix on the test server."""
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        yield request.getfixturevalue("s3_env") + "/root"


@pytest.fixture(autouse=True)
def _scratch_tmpdir(tmp_path, monkeypatch):
    """Keep temp folders (KFP local tasks, staging dirs) inside the test's own tmp_path."""
    d = tmp_path / "_tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))
    os.environ.setdefault("GRADE_LOG_LEVEL", "WARNING")
