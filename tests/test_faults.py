"""Fault injection: the network to the S3 test server fails while a step reads, uploads or publishes.

A loopback TCP proxy stands between the store and the S3 test server. Armed with a request pattern,
it drops that request and every open connection when the pattern passes, then resets every new
connection for a while (the server restarting, as a client sees it). Each step must either finish
within its retry budget (``GRADE_S3_RETRY_SECONDS``) with the same output as without the fault, or
exit 1 with one line; a reader never sees a half-written folder and a previous output survives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
import uuid

import pytest

import components.features as features_cli
from grade.core import cli, store
from tests.conftest import ACCESS_KEY, SECRET_KEY, s3_environ
from tests.test_features import make_logs, write_logs

pytestmark = pytest.mark.faults

#: how long an outage the budget outlasts lasts (it is healed as soon as the step has given up)
LONG_OUTAGE_S = 60.0
SHORT_OUTAGE_S = 1.0


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server or a dropped link looks to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FlakyProxy:
    """A TCP proxy on loopback that can drop every connection for a while, on demand or on a request."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down_until = 0.0
        self.requests: list[bytes] = []       # the first line of every request chunk forwarded or dropped
        self.fired = threading.Event()
        self._trigger: tuple[bytes, float, int] | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes, seconds: float, nth: int = 1) -> None:
        """Start an outage of ``seconds`` when the ``nth`` request containing ``pattern`` arrives."""
        self._trigger = (pattern, seconds, nth)
        self.fired.clear()

    def outage(self, seconds: float) -> None:
        """Drop every open connection now and reset new ones for ``seconds``."""
        with self._lock:
            self.down_until = time.monotonic() + seconds
            for sock in self._open:
                _reset(sock)
            self._open.clear()

    def heal(self) -> None:
        self.down_until = 0.0
        self._trigger = None

    def close(self) -> None:
        self.heal()
        self.listener.close()
        self.outage(0)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                _reset(client)
                continue
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _fires(self, data: bytes) -> bool:
        if data[:8].split(b" ")[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"):
            self.requests.append(data.split(b"\r\n", 1)[0])
        trigger = self._trigger
        if trigger is None or trigger[0] not in data:
            return False
        pattern, seconds, nth = trigger
        if nth > 1:
            self._trigger = (pattern, seconds, nth - 1)
            return False
        self._trigger = None
        self.fired.set()
        self.outage(seconds)
        return True

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_client and self._fires(data):
                    return  # dropped with everything else: the request never reaches the server
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()
        with self._lock:
            self._open -= {src, dst}


class Flaky:
    """The S3 test server behind a :class:`FlakyProxy`, a fresh bucket, and a direct reader beside it."""

    def __init__(self, endpoint: str, proxy: FlakyProxy, bucket: str, reference: str):
        from grade.core.store.s3 import S3Backend

        self.proxy, self.bucket, self.root = proxy, bucket, f"s3://{bucket}"
        self.reference = reference  # the content hash of the features made without a fault
        self.out = f"out-{uuid.uuid4().hex[:8]}"  # this test's output folder
        # readers that bypass the proxy: what anyone else sees while the step fails
        self.direct = S3Backend(endpoint, ACCESS_KEY, SECRET_KEY, "us-east-1")

    def snapshot(self, folder: str) -> str | None:
        """The content hash of the published folder ``folder`` as a reader sees it now (None: unpublished).

        Every file the manifest names is read and checked against its sha256: a half-written or
        mixed folder fails here.
        """
        uri = store.join(self.root, folder)
        try:
            manifest = json.loads(self.direct.read_bytes(store.join(uri, store.MANIFEST)))
        except store.NotFound:
            return None
        for rel, meta in manifest["files"].items():
            data = self.direct.read_bytes(store.join(uri, meta.get("path", rel)))
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"{uri}/{rel}: not as listed"
        return store.content_hash(manifest)


@pytest.fixture(scope="module")
def published_logs(s3_server, tmp_path_factory):
    """(bucket, content hash of the features of its logs without faults): logs of two Parquet files."""
    endpoint, _ = s3_server
    bucket = f"f-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as m:
        for k, v in s3_environ(endpoint).items():
            m.setenv(k, v)
        store.reset_s3_client()
        store._s3().client.make_bucket(bucket)
        logs = write_logs(tmp_path_factory.mktemp("logs") / "logs", make_logs(40), parts=2)
        store.publish_dir(logs, f"s3://{bucket}/logs")
        assert cli.run(features_cli.main, ["--logs", f"s3://{bucket}/logs", "--out", f"s3://{bucket}/reference",
                                           *SHARDS]) == 0
        reference = store.content_hash(f"s3://{bucket}/reference")
    store.reset_s3_client()
    return bucket, reference


@pytest.fixture
def flaky(s3_server, published_logs, monkeypatch):
    """The store pointed at the proxy with a short retry budget; the published logs' bucket."""
    endpoint, _ = s3_server
    host, port = endpoint.split("://", 1)[1].split(":")
    proxy = FlakyProxy((host, int(port)))
    for k, v in s3_environ(f"http://127.0.0.1:{proxy.port}").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GRADE_S3_RETRY_SECONDS", "8")
    store.reset_s3_client()
    bucket, reference = published_logs
    yield Flaky(endpoint, proxy, bucket, reference)
    proxy.close()
    store.reset_s3_client()


#: small shards: an output of a dozen files
SHARDS = ("--set", "features.shard_requests=8")


def run_features(f: Flaky, out: str, capsys, *extra: str) -> tuple[int, str]:
    rc = cli.run(features_cli.main, ["--logs", f"{f.root}/logs", "--out", f"{f.root}/{out}", *SHARDS, *extra])
    return rc, capsys.readouterr().err


def assert_one_line_fault(rc: int, err: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0]


#: (name, request that starts the outage, its occurrence, output re-published over a previous one)
PHASES = [
    ("read a footer", b"GET /{bucket}/logs/part-00001.parquet", 1, False),
    ("read mid-scan", b"GET /{bucket}/logs/part-00001.parquet", 2, False),
    ("upload", b"PUT /{bucket}/{out}/train/part-00001.safetensors", 1, False),
    ("publish", b"PUT /{bucket}/{out}/_MANIFEST.json", 1, True),
]


def _arm(f: Flaky, pattern: bytes, nth: int, seconds: float) -> None:
    pattern = pattern.replace(b"{bucket}", f.bucket.encode()).replace(b"{out}", f.out.encode())
    f.proxy.arm(pattern, seconds, nth)


@pytest.mark.parametrize("name, pattern, nth, republish", PHASES, ids=[p[0] for p in PHASES])
def test_an_outage_within_the_retry_budget_is_carried(flaky, capsys, name, pattern, nth, republish):
    f = flaky
    if republish:
        assert run_features(f, f.out, capsys, "--set", "features.valid_fraction=0.3")[0] == 0
    _arm(f, pattern, nth, SHORT_OUTAGE_S)
    t0 = time.monotonic()
    rc, err = run_features(f, f.out, capsys)
    assert f.proxy.fired.is_set(), f"the outage never started: {f.proxy.requests}"
    assert rc == 0, err
    assert time.monotonic() - t0 >= SHORT_OUTAGE_S, "the step waited for the server"
    assert f.snapshot(f.out) == f.reference, "the same output as without the fault"


@pytest.mark.parametrize("name, pattern, nth, republish", PHASES, ids=[p[0] for p in PHASES])
def test_an_outage_beyond_the_retry_budget_exits_1_and_keeps_the_previous_output(
        flaky, capsys, monkeypatch, name, pattern, nth, republish):
    f = flaky
    previous = None
    if republish:
        assert run_features(f, f.out, capsys, "--set", "features.valid_fraction=0.3")[0] == 0
        previous = f.snapshot(f.out)
        assert previous not in (None, f.reference)
    monkeypatch.setenv("GRADE_S3_RETRY_SECONDS", "1.5")
    store.reset_s3_client()
    _arm(f, pattern, nth, LONG_OUTAGE_S)
    seen: list[str | None] = []
    stop = threading.Event()

    def reader() -> None:  # another process reading the output while the step fails
        while not stop.is_set():
            seen.append(f.snapshot(f.out))
            time.sleep(0.1)

    watcher = threading.Thread(target=reader)
    watcher.start()
    t0 = time.monotonic()
    try:
        rc, err = run_features(f, f.out, capsys)
    finally:
        stop.set()
        watcher.join(30)
    assert f.proxy.fired.is_set(), f"the outage never started: {f.proxy.requests}"
    assert_one_line_fault(rc, err)
    assert time.monotonic() - t0 < 15, "the step gave up within its budget, not after the outage"
    f.proxy.heal()
    assert set(seen) | {f.snapshot(f.out)} == {previous}, "readers saw only the previous output"


def test_a_missing_output_bucket_is_found_before_any_input_is_read(flaky, capsys):
    f = flaky
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    f.proxy.requests.clear()
    rc = cli.run(features_cli.main, ["--logs", f"{f.root}/logs", "--out", f"s3://{missing}/features"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"bucket '{missing}' does not exist" in err, err
    assert not [r for r in f.proxy.requests if b"/logs" in r], "no log was read before the output was checked"


def test_an_unreachable_store_is_a_fault_not_bad_input(flaky, capsys, monkeypatch):
    """The server is down before the step starts and stays down: exit 1 after the budget, one line."""
    monkeypatch.setenv("GRADE_S3_RETRY_SECONDS", "1")
    store.reset_s3_client()
    flaky.proxy.outage(LONG_OUTAGE_S)
    rc, err = run_features(flaky, flaky.out, capsys)
    assert_one_line_fault(rc, err)


#: every step that publishes an output, with inputs that do not exist: the output is checked first
STEPS = {
    "features": ["--logs", "{tmp}/no-logs"],
    "score": ["--requests", "{tmp}/no-requests", "--model", "{tmp}/no-model"],
    "simulate": ["--set", "simulator.n_requests=200"],
    "evaluate": ["--features", "{tmp}/no-features"],
    "pretrain": ["--features", "{tmp}/no-features"],
    "finetune": ["--features", "{tmp}/no-features", "--init", "{tmp}/no-model"],
    "outcome": ["--features", "{tmp}/no-features"],
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_step_checks_its_output_bucket_before_the_work(s3_env, tmp_path, capsys, step):
    import importlib

    main = importlib.import_module(f"components.{step}").main
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in STEPS[step]] + ["--out", f"s3://{missing}/out"]
    rc = cli.run(main, argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: s3://{missing}/out: ") and f"bucket '{missing}' does not exist" in err


def test_an_output_that_is_an_existing_file_is_refused_before_the_work(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("a file, not a folder")
    rc = cli.run(features_cli.main, ["--logs", str(tmp_path / "no-logs"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{out}: an existing file" in err, err
    assert out.read_text() == "a file, not a folder"


def _checkpoints(out: str, n: int) -> None:
    import torch
    from torch import nn

    from grade.model import training

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(1, n + 1):
        training.save_checkpoint(out, "epoch", epoch, fingerprint={"config": {}},
                                 tensors={"model": training.state_tensors(model)}, optimizer=optimizer,
                                 state={"epoch": epoch},
                                 log_lines=[f'{{"epoch": {e}}}\n' for e in range(1, epoch + 1)])


@pytest.mark.parametrize("damage", ["truncate model", "truncate state", "delete optimizer", "truncate log"])
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before_it(tmp_path, caplog, damage):
    """A latest checkpoint cut short (a full disk, a copy killed): before, resuming failed; now the
    run resumes from the previous committed checkpoint, with a warning naming the damaged one."""
    import logging

    from grade.model import training

    out = str(tmp_path)
    _checkpoints(out, 3)
    folder = tmp_path / training.CHECKPOINTS / "epoch-0003"
    what, name = damage.split()
    files = {"model": "model.safetensors", "state": "state.json", "optimizer": "optimizer.safetensors",
             "log": "train_log.jsonl"}
    path = folder / files[name]
    if what == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="grade.model.training"):
        ckpt = training.load_checkpoint(out, {"config": {}})
    assert ckpt is not None and ckpt.state["epoch"] == 2 and len(ckpt.log_lines) == 2
    assert "epoch-0003 cannot be read back" in caplog.text
    (tmp_path / training.CHECKPOINTS / "epoch-0002" / "rng.safetensors").write_bytes(b"x")
    assert training.load_checkpoint(out, {"config": {}}) is None  # both damaged: start afresh


@pytest.mark.parametrize("where, nth", [("staging", 2), ("output", 1), ("output", 3)])
def test_a_full_disk_in_features_leaves_its_output_complete_or_absent(tmp_path, capsys, monkeypatch, where,
                                                                     nth):
    """ENOSPC while a shard is written to the staging folder, or while the output is copied into
    place: exit 1 with one line; the output folder holds nothing of the failed run (before, the
    files copied so far stayed, without a manifest)."""
    import errno
    import shutil

    import safetensors.numpy

    logs = write_logs(tmp_path / "logs", make_logs(40), parts=2)
    out = tmp_path / "features"
    calls = []

    def full(real):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return write

    if where == "staging":
        monkeypatch.setattr(safetensors.numpy, "save_file", full(safetensors.numpy.save_file))
    else:
        monkeypatch.setattr(shutil, "copyfile", full(shutil.copyfile))
    rc = cli.run(features_cli.main, ["--logs", str(logs), "--out", str(out), *SHARDS])
    err = capsys.readouterr().err
    assert len(calls) >= nth
    assert_one_line_fault(rc, err)
    assert "no space left" in err
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == [], sorted(out.rglob("*"))
