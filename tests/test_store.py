"""The object store on both backends (local folder, S3 test server): objects, publish, CAS, retries."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grade.core import store
from tests.conftest import free_port, s3_environ


def test_bytes_json_exists_list_delete(store_root):
    a = store.join(store_root, "x", "a.bin")
    assert not store.exists(a)
    store.write_bytes(a, b"\x00\x01hello")
    assert store.exists(a) and store.read_bytes(a) == b"\x00\x01hello"
    store.write_json(store.join(store_root, "x", "sub", "b.json"), {"k": [1, 2]})
    assert store.read_json(store.join(store_root, "x", "sub", "b.json")) == {"k": [1, 2]}
    assert store.list_prefix(store.join(store_root, "x")) == ["a.bin", "sub/b.json"]
    assert store.list_prefix(store.join(store_root, "nothing-here")) == []
    store.delete(a)
    store.delete(a)  # deleting a missing object is fine
    assert not store.exists(a)
    with pytest.raises(store.NotFound):
        store.read_bytes(a)
    store.delete_prefix(store.join(store_root, "x"))
    assert store.list_prefix(store.join(store_root, "x")) == []


def test_files_copy_and_a_multipart_upload(store_root, tmp_path, monkeypatch):
    from grade.core.store import s3

    monkeypatch.setattr(s3, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part: 12 MiB go up in 3 parts
    src = tmp_path / "big.bin"
    data = os.urandom(12 * 1024 * 1024 + 17)
    src.write_bytes(data)
    uri = store.join(store_root, "files", "big.bin")
    store.upload_file(src, uri)
    if store.is_s3(uri):
        bucket, key = s3.S3Backend.split(uri)
        assert store._s3().client.stat_object(bucket, key).etag.endswith("-3"), "a 3-part multipart upload"
    store.copy(uri, store.join(store_root, "files", "copy.bin"))
    out = tmp_path / "down" / "copy.bin"
    store.download_file(store.join(store_root, "files", "copy.bin"), out)
    assert out.read_bytes() == data
    with pytest.raises(store.NotFound):
        store.download_file(store.join(store_root, "files", "missing"), tmp_path / "m")


def test_delete_prefix_in_batches_keeps_siblings(store_root, monkeypatch):
    from grade.core.store import s3

    monkeypatch.setattr(s3, "DELETE_BATCH", 3)  # 7 objects: three multi-object DELETEs on S3
    for i in range(7):
        store.write_bytes(store.join(store_root, "x", f"d{i % 2}", f"{i}.bin"), b"%d" % i)
    store.write_bytes(store.join(store_root, "x2", "keep.bin"), b"k")  # shares the prefix "x"
    store.delete_prefix(store.join(store_root, "x"))
    assert store.list_prefix(store.join(store_root, "x")) == []
    assert store.list_prefix(store_root) == ["x2/keep.bin"]
    store.delete_prefix(store.join(store_root, "x"))  # nothing left: not an error


def test_concurrent_downloads_to_one_path_never_mix(store_root, tmp_path):
    """Readers filling one cache path at once: the file is always whole, no temp file stays behind."""
    blob = os.urandom(3 * 1024 * 1024 + 1)
    store.write_bytes(store.join(store_root, "v.bin"), blob)
    dst = tmp_path / "cache" / "v.bin"
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def fetch() -> None:
        try:
            for _ in range(4):
                barrier.wait(30)
                store.download_file(store.join(store_root, "v.bin"), dst)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and dst.read_bytes() == blob
    with pytest.raises(store.NotFound):
        store.download_file(store.join(store_root, "missing.bin"), dst)
    assert dst.read_bytes() == blob, "a failed download leaves the previous file alone"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["v.bin"]


def test_a_missing_local_file_fails_at_once_without_retries(store_root, tmp_path, caplog):
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(FileNotFoundError):
            store.upload_file(tmp_path / "not-there.bin", store.join(store_root, "x.bin"))
    assert time.monotonic() - t0 < 1.0 and "retrying" not in caplog.text
    assert not store.exists(store.join(store_root, "x.bin"))


def test_publish_open_and_content_hash(store_root, tmp_path):
    uri = store.join(store_root, "out")
    with store.publishing(uri, extra={"producer": "test"}) as staging:
        (staging / "a.txt").write_text("alpha")
        (staging / "d").mkdir()
        (staging / "d" / "b.txt").write_text("beta")
    manifest = store.read_manifest(uri)
    assert sorted(manifest["files"]) == ["a.txt", "d/b.txt"] and manifest["producer"] == "test"
    local = store.open_published(uri)
    assert (local / "d" / "b.txt").read_text() == "beta"
    # the content hash ignores where the folder is stored
    other = tmp_path / "elsewhere"
    with store.publishing(str(other)) as staging:
        (staging / "a.txt").write_text("alpha")
        (staging / "d").mkdir()
        (staging / "d" / "b.txt").write_text("beta")
    assert store.content_hash(uri) == store.content_hash(str(other))


def test_failed_writer_publishes_nothing(store_root):
    uri = store.join(store_root, "failed")
    with pytest.raises(RuntimeError):
        with store.publishing(uri) as staging:
            (staging / "a.txt").write_text("alpha")
            raise RuntimeError("boom")
    assert not store.is_published(uri) and store.list_prefix(uri) == []
    with pytest.raises(store.NotPublished):
        store.open_published(uri)


_STALLED_PUBLISHER = """
import sys, time
from grade.core import store
real = store.write_json
def stall(uri, obj):
    if uri.endswith(store.MANIFEST):
        print("files uploaded", flush=True)  # the parent kills us here, before the manifest
        time.sleep(120)
    return real(uri, obj)
store.write_json = stall
with store.publishing(sys.argv[1]) as staging:
    for i in range(3):
        (staging / f"part-{i}.bin").write_bytes(bytes([i]) * 1000)
"""


def test_interrupted_publish_is_invisible_to_readers(store_root):
    """A writer killed (SIGKILL) between its files and its manifest: readers see no output."""
    uri = store.join(store_root, "interrupted")
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_PUBLISHER, uri], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a writer stuck elsewhere must not hang the suite
    watchdog.start()
    try:
        assert proc.stdout.readline() == "files uploaded\n", proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -9
    assert len(store.list_prefix(uri)) == 3, "the files were uploaded before the writer died"
    assert not store.is_published(uri)
    with pytest.raises(store.NotPublished):
        store.read_manifest(uri)
    with pytest.raises(store.NotPublished):
        store.open_published(uri)
    # a re-run completes it, and the manifest names only what this run wrote
    with store.publishing(uri) as staging:
        (staging / "part-0.bin").write_bytes(b"x")
    assert list(store.read_manifest(uri)["files"]) == ["part-0.bin"]
    assert (store.open_published(uri) / "part-0.bin").read_bytes() == b"x"


def test_conditional_puts_conflict_with_412(store_root):
    uri = store.join(store_root, "alias.json")
    etag = store.put_if_absent(uri, b"v1")
    with pytest.raises(store.PreconditionFailed):
        store.put_if_absent(uri, b"v2")
    data, current = store.get_with_etag(uri)
    assert data == b"v1" and current == etag
    new = store.put_if_match(uri, b"v2", current)
    with pytest.raises(store.PreconditionFailed):
        store.put_if_match(uri, b"v3", current)  # stale ETag: somebody moved it
    assert store.get_with_etag(uri) == (b"v2", new)
    with pytest.raises(store.PreconditionFailed):
        store.put_if_match(store.join(store_root, "missing.json"), b"x", new)
    with pytest.raises(store.PreconditionFailed):
        store.put_if_match(store.join(store_root, "no-such-folder", "missing.json"), b"x", new)
    # compare-and-swap leaves nothing else behind that a listing would show
    assert store.list_prefix(store_root) == ["alias.json"]


def test_listing_skips_a_local_writer_s_temp_file(tmp_path):
    root = tmp_path / "store"
    store.write_bytes(str(root / "a.json"), b"{}")
    (root / ".b.json.k2j3.tmp").write_bytes(b"half-writ")  # a concurrent writer, not yet renamed
    assert store.list_prefix(str(root)) == ["a.json"]


def test_racing_conditional_creates_exactly_one_wins(store_root):
    uri = store.join(store_root, "race.json")
    results: list[str] = []
    barrier = threading.Barrier(4)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.put_if_absent(uri, f"writer {i}".encode())
            results.append("won")
        except store.PreconditionFailed:
            results.append("lost")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["lost", "lost", "lost", "won"]


def test_parquet_through_arrow_filesystem(store_root, tmp_path):
    uri = store.join(store_root, "t", "a.parquet")
    table = pa.table({"x": list(range(5000)), "y": [float(i) for i in range(5000)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    store.upload_file(tmp_path / "a.parquet", uri)  # outputs are published through the store
    fs, path = store.arrow_filesystem(uri)
    assert pq.read_table(path, filesystem=fs).equals(table)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 5000
        batches = list(pf.iter_batches(batch_size=700, columns=["y"]))
        assert pa.Table.from_batches(batches) == table.select(["y"])
    if store.is_s3(uri):
        with pytest.raises(NotImplementedError, match="read-only"):
            pq.write_table(table, path, filesystem=fs)


def test_missing_settings_name_the_variables_and_never_the_secret(monkeypatch, caplog):
    from grade.core.store.s3 import S3Backend, S3ConfigError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    store.reset_s3_client()
    with pytest.raises(S3ConfigError) as e:
        store.read_bytes("s3://bucket/key")
    assert "S3_ENDPOINT_URL" in str(e.value) and "very-secret-value-123" not in str(e.value)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:1")
    backend = S3Backend.from_env()
    assert "very-secret-value-123" not in repr(backend)
    backend.max_attempts, backend.base_delay = 2, 0.01
    with caplog.at_level(logging.WARNING):
        with pytest.raises(store.StoreError) as e:
            backend.read_bytes("s3://bucket/key")
    assert "very-secret-value-123" not in str(e.value) + caplog.text
    assert "attempt 1/2" in caplog.text
    store.reset_s3_client()


def test_operation_succeeds_when_the_server_comes_back_within_the_retry_budget(monkeypatch, caplog):
    """The S3 server is down when the calls start and back ~1 s later: the retries carry them.

    The server runs in this process, so its buckets and objects outlive the restart (as a real
    MinIO's do): the read after the outage returns what was written before it.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    for k, v in s3_environ(f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GRADE_S3_MAX_ATTEMPTS", "12")
    store.reset_s3_client()
    try:
        backend = store._s3()
        backend.base_delay, backend.max_delay = 0.1, 0.5
        backend.client.make_bucket("retry-bucket")
        store.write_bytes("s3://retry-bucket/k", b"before the outage")
        servers[0].stop()
        with pytest.raises(OSError):  # really down: nothing listens on the port
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

        def restart() -> None:
            time.sleep(1.0)
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()

        t = threading.Thread(target=restart)
        t.start()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="grade.core.store.s3"):
            assert store.read_bytes("s3://retry-bucket/k") == b"before the outage"
        assert time.monotonic() - t0 >= 0.9, "the read must have waited for the server"
        assert "retrying" in caplog.text and "attempt 1/12" in caplog.text
        t.join(30)
        store.write_bytes("s3://retry-bucket/k2", b"after")
        assert store.list_prefix("s3://retry-bucket") == ["k", "k2"]
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - already stopped
                pass
        store.reset_s3_client()


class _ScriptedS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers each path from a script: (status, content type, body), the last repeats."""

    script: dict[str, list[tuple[int, str, bytes]]] = {}
    seen: list[tuple[str, str, dict[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.seen.append((self.command, self.path, dict(self.headers)))
        steps = self.script[self.path]
        status, ctype, body = steps.pop(0) if len(steps) > 1 else steps[0]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"abc"')
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


def _s3_error(code: str) -> tuple[str, bytes]:
    return "application/xml", f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()


@pytest.fixture
def scripted_s3(monkeypatch):
    """(backend with 4 attempts, the script, the requests seen, the backoff delays slept)."""
    from grade.core.store import s3

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedS3)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    _ScriptedS3.script, _ScriptedS3.seen = {}, []
    slept: list[float] = []
    monkeypatch.setattr(s3.time, "sleep", slept.append)
    backend = s3.S3Backend(f"http://127.0.0.1:{server.server_address[1]}", "id", "secret", "us-east-1",
                           max_attempts=4, base_delay=0.2, max_delay=0.5)
    yield backend, _ScriptedS3.script, _ScriptedS3.seen, slept
    server.shutdown()
    server.server_close()


def test_throttling_and_5xx_are_retried_with_bounded_backoff(scripted_s3, caplog):
    backend, script, seen, slept = scripted_s3
    script["/bkt/k"] = [(503, *_s3_error("SlowDown")), (502, "text/html", b"<html>bad gateway</html>"),
                        (500, *_s3_error("InternalError")), (200, "application/octet-stream", b"payload")]
    with caplog.at_level(logging.WARNING, logger="grade.core.store.s3"):
        assert backend.read_bytes("s3://bkt/k") == b"payload"
    assert len(seen) == 4 and caplog.text.count("retrying") == 3
    # full jitter: attempt n sleeps uniformly in [0, min(cap, base * 2^(n-1))] = [0, .2], [0, .4], [0, .5]
    assert len(slept) == 3 and all(0 <= d <= cap for d, cap in zip(slept, (0.2, 0.4, 0.5), strict=True))


def test_retries_are_bounded_and_not_doubled_by_the_http_layer(scripted_s3):
    backend, script, seen, slept = scripted_s3
    script["/bkt/busy"] = [(503, *_s3_error("SlowDown"))]
    with pytest.raises(store.StoreError, match="SlowDown"):
        backend.read_bytes("s3://bkt/busy")
    assert len(seen) == 4 and len(slept) == 3  # exactly max_attempts requests, one sleep between each


def test_retries_stop_when_the_time_budget_is_spent(scripted_s3, monkeypatch):
    import types

    from grade.core.store import s3

    backend, script, seen, _ = scripted_s3
    clock, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(s3, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    backend.max_attempts, backend.retry_seconds, backend.max_delay = 1000, 10.0, 5.0
    script["/bkt/down"] = [(503, *_s3_error("ServiceUnavailable"))]
    with pytest.raises(store.StoreError, match=r"after \d+ attempt\(s\) in [\d.]+ s: ServiceUnavailable"):
        backend.read_bytes("s3://bkt/down")
    assert len(seen) == len(slept) + 1 < 1000, "the time budget ended the retries, not the attempts"
    assert 10.0 - 5.0 < sum(slept) <= 10.0, "it gave up only when the next wait would pass the budget"


@pytest.mark.parametrize("name, value", [("GRADE_S3_RETRY_SECONDS", "soon"), ("GRADE_S3_RETRY_SECONDS", "-1"),
                                         ("GRADE_S3_MAX_ATTEMPTS", "2.5"), ("GRADE_S3_MAX_ATTEMPTS", "0")])
def test_a_malformed_retry_setting_names_the_variable(monkeypatch, name, value):
    from grade.core.store.s3 import S3Backend

    for k, v in s3_environ("http://127.0.0.1:1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(name, value)
    with pytest.raises(store.S3ConfigError, match=f"{name} must be a positive"):
        S3Backend.from_env()


def test_a_conditional_put_whose_first_attempt_was_applied_is_not_a_conflict(scripted_s3):
    """The first answer is lost (502) though the write happened; the retry gets 412 from our own write."""
    backend, script, seen, slept = scripted_s3
    script["/bkt/claim"] = [(502, "text/html", b"<html>bad gateway</html>"),
                            (412, *_s3_error("PreconditionFailed")),
                            (200, "application/octet-stream", b"ours")]
    assert backend.put_conditional("s3://bkt/claim", b"ours", if_none_match=True) == "abc"
    assert [m for m, _, _ in seen] == ["PUT", "PUT", "GET"]
    # somebody else's bytes there: a real conflict
    script["/bkt/other"] = [(502, "text/html", b"<html>bad gateway</html>"),
                            (412, *_s3_error("PreconditionFailed")),
                            (200, "application/octet-stream", b"theirs")]
    with pytest.raises(store.PreconditionFailed):
        backend.put_conditional("s3://bkt/other", b"ours", if_none_match=True)
    # a 412 at the first attempt is a conflict without a second look
    script["/bkt/third"] = [(412, *_s3_error("PreconditionFailed"))]
    seen.clear()
    with pytest.raises(store.PreconditionFailed):
        backend.put_conditional("s3://bkt/third", b"ours", if_none_match=True)
    assert [m for m, _, _ in seen] == ["PUT"]


@pytest.mark.parametrize("status, code, error", [
    (403, "AccessDenied", store.StoreError), (400, "InvalidArgument", store.StoreError),
    (404, "NoSuchKey", store.NotFound), (404, "NoSuchBucket", store.NotFound),
])
def test_client_errors_fail_at_once(scripted_s3, status, code, error):
    backend, script, seen, slept = scripted_s3
    script["/bkt/k"] = [(status, *_s3_error(code))]
    with pytest.raises(error, match=code):
        backend.read_bytes("s3://bkt/k")
    assert len(seen) == 1 and slept == []


def test_conditional_put_sends_the_real_headers(scripted_s3):
    backend, script, seen, slept = scripted_s3
    script["/bkt/alias.json"] = [(412, *_s3_error("PreconditionFailed")), (200, "application/xml", b"")]
    with pytest.raises(store.PreconditionFailed):
        backend.put_conditional("s3://bkt/alias.json", b"{}", if_none_match=True)
    assert backend.put_conditional("s3://bkt/alias.json", b"{}", if_match="abc") == "abc"
    (_, _, first), (_, _, second) = seen
    headers = [{k.lower(): v for k, v in h.items()} for h in (first, second)]
    assert headers[0]["if-none-match"] == "*" and "if-match" not in headers[0]
    assert headers[1]["if-match"] == '"abc"' and "if-none-match" not in headers[1]
    assert not any(k.startswith("x-amz-meta-") for h in headers for k in h)  # not turned into metadata
    assert slept == []  # a lost compare-and-swap is an answer, not a transient failure


def test_manifest_lists_names_sizes_and_hashes(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_bytes(b"abc")
    m = store.build_manifest(d)
    assert m["files"]["a"]["size"] == 3
    assert m["files"]["a"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert json.loads(json.dumps(m)) == m


# --------------------------------------------------------------------------------------------
# Integrity on read, safe re-publish, no leaked temp folders, no import cycle
# --------------------------------------------------------------------------------------------

V1 = {"a.txt": b"alpha-1", "b.txt": b"beta", "d/c.txt": b"gamma-1"}
V2 = {"a.txt": b"alpha-2", "b.txt": b"beta", "e.txt": b"epsilon"}  # a changed, b same, c gone, e new


def _publish(uri: str, files: dict[str, bytes]) -> None:
    with store.publishing(uri) as staging:
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)


def _read_output(uri: str) -> dict[str, bytes]:
    local = store.open_published(uri)
    return {rel: (local / rel).read_bytes() for rel in store.read_manifest(uri)["files"]}


def _temp_folders(prefix: str) -> list[str]:
    import tempfile

    return [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(prefix)]


def test_a_file_replaced_by_another_of_the_same_size_is_refused(store_root):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    assert _read_output(uri) == V1
    store.write_bytes(store.join(uri, "a.txt"), b"ALPHA-1")  # same size, other bytes
    fetched = _temp_folders("grade-fetch-")
    with pytest.raises(store.IntegrityError, match=r"a\.txt: content differs from the manifest"):
        store.open_published(uri)
    assert _temp_folders("grade-fetch-") == fetched, "a refused fetch leaves no temp folder behind"
    store.delete(store.join(uri, "b.txt"))
    store.write_bytes(store.join(uri, "a.txt"), b"alpha-1")
    with pytest.raises(store.IntegrityError, match=r"b\.txt: missing"):
        store.open_published(uri)


def test_a_corrupt_published_input_exits_2_with_one_line(tmp_path, capsys):
    from grade.core import cli

    uri = str(tmp_path / "out")
    _publish(uri, V1)
    (tmp_path / "out" / "b.txt").write_bytes(b"BETA")
    assert cli.run(lambda argv: store.open_published(uri), []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.txt" in err[0] and "sha256" in err[0]


def test_a_cached_download_is_checked_and_refetched(store_root, tmp_path):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    cache = tmp_path / "cache"
    if not store.is_s3(uri):
        assert store.open_published(uri, cache_dir=cache) == tmp_path / "store" / "out"  # used in place
        return
    store.open_published(uri, cache_dir=cache)
    (cache / "a.txt").write_bytes(b"ALPHA-1")  # the cached copy went bad: fetched again
    assert (store.open_published(uri, cache_dir=cache) / "a.txt").read_bytes() == b"alpha-1"


class _Injected(Exception):
    pass


def _fail_at(monkeypatch, name: str, nth: int) -> None:
    """Make the ``nth`` call of ``store.<name>`` (as publish_dir makes it) raise ``_Injected``."""
    real, calls = getattr(store, name), []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            raise _Injected(f"{name} #{nth}")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, name, failing)


@pytest.mark.parametrize("step, nth", [("upload_file", 1), ("upload_file", 3), ("write_json", 1)])
def test_a_failed_republish_before_the_switch_keeps_the_old_output(store_root, monkeypatch, step, nth):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    with monkeypatch.context() as m:
        _fail_at(m, step, nth)
        with pytest.raises(_Injected):
            _publish(uri, V2)
    assert _read_output(uri) == V1
    assert _temp_folders("grade-publish-") == [], "the staging folder is removed after a failure"
    _publish(uri, V2)  # the next publish completes and clears the failed one's leftovers
    assert _read_output(uri) == V2
    assert store.list_prefix(uri) == sorted([*V2, store.MANIFEST])


@pytest.mark.parametrize("step, nth", [("copy", 1), ("write_json", 2), ("delete_prefix", 1), ("delete", 1)])
def test_a_republish_that_fails_after_the_switch_shows_the_new_output(store_root, monkeypatch, step, nth):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    with monkeypatch.context() as m:
        _fail_at(m, step, nth)
        with pytest.raises(_Injected):
            _publish(uri, V2)
    assert _read_output(uri) == V2
    _publish(uri, V2)
    assert store.list_prefix(uri) == sorted([*V2, store.MANIFEST])


def test_readers_see_the_old_or_the_new_output_whole_at_every_step_of_a_republish(store_root, monkeypatch):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    seen = []

    def reading_after(name: str) -> None:
        real = getattr(store, name)

        def step(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.append(_read_output(uri))
            return out

        monkeypatch.setattr(store, name, step)

    for name in ("upload_file", "write_json", "delete", "copy", "delete_prefix"):
        reading_after(name)
    _publish(uri, V2)
    assert len(seen) >= 7 and all(s in (V1, V2) for s in seen), seen
    assert seen[0] == V1 and seen[-1] == V2
    files = store.read_manifest(uri)["files"]
    assert sorted(files) == sorted(V2) and all("path" not in meta for meta in files.values())
    assert store.list_prefix(uri) == sorted([*V2, store.MANIFEST]), "old and pending objects are gone"


def test_publish_of_unchanged_content_keeps_files_in_place(store_root, monkeypatch):
    uri = store.join(store_root, "out")
    _publish(uri, V1)
    copies = []
    monkeypatch.setattr(store, "copy", lambda *a: copies.append(a))
    _publish(uri, V1)
    assert copies == [] and _read_output(uri) == V1


def test_each_scheme_has_its_backend(store_root):
    from grade.core.store.backend import StoreBackend
    from grade.core.store.local import LocalBackend
    from grade.core.store.s3 import S3Backend

    backend = store.backend_for(store_root)
    assert isinstance(backend, StoreBackend)
    assert isinstance(backend, S3Backend if store_root.startswith("s3://") else LocalBackend)
    assert (backend.local_path(store_root) is None) == store.is_s3(store_root)


def test_no_module_of_grade_imports_in_a_cycle():
    """Every grade module imports alone (fresh grade.* modules each time); the import graph has no cycle."""
    import ast

    from tests.test_layers import grade_imports, modules

    mods = modules()
    graph = {m: grade_imports(ast.parse(p.read_text()), set(mods)) & set(mods) - {m} for m, p in mods.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            # a package's own submodules load while it initialises: not a cycle
            if dep.startswith(name + "."):
                continue
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, name, dep])}"
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(mods):
        if name not in state:
            visit(name, [])
    script = ("import importlib, sys\n"
              f"for name in {sorted(mods)!r}:\n"
              "    for m in [m for m in sys.modules if m == 'grade' or m.startswith('grade.')]:\n"
              "        del sys.modules[m]\n"
              "    importlib.import_module(name)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


_KILLED_PUBLISHER = """
import sys, time
from grade.core import store
with store.publishing(sys.argv[1]) as staging:
    (staging / "a.txt").write_text("half")
    print(staging, flush=True)
    time.sleep(120)
"""


def _killed_publisher(out) -> Path:
    """The staging folder of a publish killed with SIGKILL half-way (it is left behind)."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PUBLISHER, str(out)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    staging = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait(30)
    proc.stdout.close()
    assert staging.is_dir() and staging.name.startswith("grade-publish-")
    return staging


def test_temp_folders_of_killed_processes_are_removed_once_stale(tmp_path):
    old, young = _killed_publisher(tmp_path / "o1"), _killed_publisher(tmp_path / "o2")
    day_ago = time.time() - 24 * 3600
    os.utime(old, (day_ago, day_ago))
    with store.publishing(str(tmp_path / "mine")) as live:   # a folder in use by a live process
        os.utime(live, (day_ago, day_ago))
        # the next process to publish (or fetch) clears stale folders when it starts
        subprocess.run([sys.executable, "-c", "import sys; from grade.core import store\n"
                        "with store.publishing(sys.argv[1]) as s: pass", str(tmp_path / "o3")],
                       check=True, env=dict(os.environ), timeout=120)
        assert not old.exists(), "older than the age and its process is gone: removed"
        assert young.is_dir(), "a recent folder is kept (its owner may run on another host)"
        assert live.is_dir(), "a folder whose process still runs is kept, whatever its age"
    store.remove_stale_temp(max_age_s=0)
    assert not young.exists()
