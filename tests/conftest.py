"""Shared fixtures: the S3 test server (a real S3 HTTP endpoint on loopback) and store roots; the
order and grouping of the tests for parallel workers (pytest-xdist).

The server is a ``moto_server`` subprocess started once per test session on a free port and
stopped at the end (under pytest-xdist: one server per worker process). Tests that need S3 take the
``s3_env`` fixture (environment set, fresh bucket) or the parametrised ``store_root`` fixture (the
same test on a local folder and on S3).

With several workers each worker (and every process it starts) uses one torch intra-op thread:
two workers of two threads each on two cores would oversubscribe them. Modules whose tests share an
expensive module-scoped fixture (a trained model, a running server) run on one worker, so the
fixture is built once; modules with slow tests are collected first, so that the long tests start
while the short ones fill the gaps.
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


#: Modules whose module-scoped fixtures train models or start servers: each runs whole on one worker.
ONE_WORKER_MODULES = ("test_evaluate", "test_faults", "test_finetune", "test_pretrain", "test_report_browser",
                      "test_score", "test_serve", "test_window")


def _workers() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config):
    if _workers() > 1:
        # inherited by every process a test starts (pipeline steps, torchrun, servers)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Modules holding slow tests first (each module's tests stay together and in order); the
    one-worker modules marked as an xdist group."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
    for item in items:
        name = item.module.__name__.rpartition(".")[2]
        if name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(name))


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
def _one_thread_per_worker():
    """Under parallel workers, back to one torch thread after a test that set more (a trainer's config)."""
    yield
    torch = sys.modules.get("torch")
    if _workers() > 1 and torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _scratch_tmpdir(tmp_path, monkeypatch):
    """Keep temp folders (KFP local tasks, staging dirs) inside the test's own tmp_path."""
    d = tmp_path / "_tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))
    os.environ.setdefault("GRADE_LOG_LEVEL", "WARNING")
