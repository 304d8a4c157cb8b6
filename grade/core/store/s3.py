"""The S3 backend of :mod:`grade.core.store`, on the ``minio`` SDK (MinIO in production, any S3 API).

Settings come from the environment only: ``S3_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optionally ``AWS_REGION``; secret values are never
printed or logged. Every operation is retried with exponential backoff and full jitter on connection
errors, HTTP 5xx and throttling (``SlowDown``) while its retry budget lasts: ``GRADE_S3_RETRY_SECONDS``
(default 60) seconds from its first attempt, at most ``GRADE_S3_MAX_ATTEMPTS`` attempts (default 20).
Parquet reads go through the same policy: :meth:`S3Backend.arrow_filesystem` is a read-only pyarrow
filesystem whose every read is a retried ranged GET (:mod:`grade.core.store.s3_arrow`).

Conditional writes (``If-None-Match: *``, ``If-Match: <etag>``) go through minio's request layer,
because its public ``put_object`` turns extra headers into ``x-amz-meta-*`` metadata and would
silently overwrite: the real headers are sent and HTTP 412 becomes ``PreconditionFailed``.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from grade.core.errors import InputError, NotFound, PreconditionFailed, S3ConfigError, StoreError
from grade.core.store.backend import write_chunks

log = logging.getLogger("grade.core.store.s3")
T = TypeVar("T")

ENV_VARS = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: S3 error codes worth another attempt (throttling and transient server trouble)
RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                   "RequestTimeTooSkewed", "OperationAborted", "ThrottlingException"}
#: HTTP statuses worth another attempt whatever the body says (429 throttling, 5xx except 501)
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
PART_SIZE = 16 * 1024 * 1024
STREAM_CHUNK = 1024 * 1024
#: longest wait for a connection and for each read of an answer (both also at most the retry budget)
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0
#: names per multi-object DELETE (the S3 API's limit)
DELETE_BATCH = 1000
#: OSErrors about the local side of a transfer (raised as they are, like the local backend does)
LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class S3Backend:
    def __init__(self, endpoint_url: str, access_key: str, secret_key: str, region: str | None = None,
                 max_attempts: int = 20, base_delay: float = 0.2, max_delay: float = 5.0,
                 retry_seconds: float = 60.0):
        parsed = _parse_endpoint(endpoint_url)
        self.endpoint_url = endpoint_url
        self.secure = parsed.scheme == "https"
        self.host = parsed.netloc
        self.region = region
        self.max_attempts = max(1, max_attempts)
        self.base_delay, self.max_delay = base_delay, max_delay
        self.retry_seconds = retry_seconds
        # urllib3's own retries are off: the retry policy lives in one place (``_call``). A server
        # that accepts a connection and then stalls (a stopped process) must not hold one attempt
        # longer than the whole budget: each socket wait is bounded by it too.
        timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, retry_seconds),
                                  read=min(READ_TIMEOUT_S, retry_seconds))
        http = urllib3.PoolManager(timeout=timeout, retries=False, maxsize=16)
        try:
            self.client = Minio(self.host, access_key=access_key, secret_key=secret_key, secure=self.secure,
                                region=region, http_client=http)
        except ValueError:
            raise S3ConfigError("S3_ENDPOINT_URL: not a usable endpoint (expected http(s)://host[:port])") \
                from None

    @classmethod
    def from_env(cls) -> S3Backend:
        missing = [v for v in ENV_VARS if not os.environ.get(v)]
        if missing:
            raise S3ConfigError(f"s3:// URIs need the environment variables {', '.join(missing)} "
                                f"(S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; "
                                f"optional AWS_REGION)")
        attempts = _env_number("GRADE_S3_MAX_ATTEMPTS", 20, int)
        seconds = _env_number("GRADE_S3_RETRY_SECONDS", 60.0, float)
        return cls(os.environ["S3_ENDPOINT_URL"], os.environ["AWS_ACCESS_KEY_ID"],
                   os.environ["AWS_SECRET_ACCESS_KEY"], os.environ.get("AWS_REGION") or None, attempts,
                   retry_seconds=seconds)

    def __repr__(self) -> str:  # never shows credentials
        return f"S3Backend(endpoint={self.endpoint_url!r}, region={self.region!r})"

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        rest = str(uri)[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InputError(f"{uri}: expected s3://bucket/key")
        return bucket, key

    @staticmethod
    def _retryable(e: Exception) -> bool:
        """Transient: connection trouble, throttling, HTTP 5xx (also a proxy's non-XML 502/503 page).

        Other 4xx answers (denied, bad request, not implemented) would fail the same way again.
        """
        if isinstance(e, S3Error):
            return e.code in RETRYABLE_CODES or getattr(e.response, "status", None) in RETRYABLE_STATUS
        if isinstance(e, ServerError):
            return e.status_code in RETRYABLE_STATUS
        if isinstance(e, InvalidResponseError):
            return getattr(e, "_code", None) in RETRYABLE_STATUS
        return isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries (exponential backoff, full jitter) on transient failures.

        Retries stop after ``max_attempts`` attempts, or when the next one would start more than
        ``retry_seconds`` after the first: a longer outage is a :class:`StoreError` (exit 1), never bad input.
        """
        start = time.monotonic()
        for attempt in itertools.count(1):
            try:
                return fn()
            except S3Error as e:
                if e.code in NOT_FOUND_CODES:
                    raise NotFound(f"{uri}: not found ({e.code})") from None
                if e.code == "PreconditionFailed" or getattr(e.response, "status", None) == 412:
                    raise PreconditionFailed(f"{uri}: precondition failed (412)") from None
                retry, err, detail = self._retryable(e), e.code, f"{e.code}: {e.message}"
            except (StoreError, InputError, *LOCAL_FILE_ERRORS):
                raise  # a missing or unwritable local file is not the server's fault: no retry
            except Exception as e:  # noqa: BLE001 - classified below
                retry, err, detail = self._retryable(e), type(e).__name__, f"{type(e).__name__}: {e}"
            delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
            elapsed = time.monotonic() - start
            if not retry or attempt >= self.max_attempts or elapsed + delay > self.retry_seconds:
                raise StoreError(f"{what} {uri} failed after {attempt} attempt(s) in {elapsed:.1f} s: "
                                 f"{detail}") from None
            log.warning("%s %s: %s (attempt %d/%d), retrying in %.2fs", what, uri, err, attempt,
                        self.max_attempts, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # -- objects --------------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = self.split(uri)

        def get() -> bytes:
            resp = self.client.get_object(bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call("GET", uri, get)

    def get_with_etag(self, uri: str) -> tuple[bytes, str]:
        bucket, key = self.split(uri)

        def get() -> tuple[bytes, str]:
            resp = self.client.get_object(bucket, key)
            try:
                return resp.read(), resp.headers.get("etag", "").strip('"')
            finally:
                resp.close()
                resp.release_conn()

        return self._call("GET", uri, get)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self.split(uri)
        self._call("PUT", uri, lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data)))

    def put_conditional(self, uri: str, data: bytes, *, if_none_match: bool = False,
                        if_match: str | None = None) -> str:
        """PUT with the real conditional headers; returns the new ETag; 412 -> PreconditionFailed."""
        bucket, key = self.split(uri)
        headers = {"Content-Type": "application/octet-stream"}
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match is not None:
            headers["If-Match"] = f'"{if_match.strip(chr(34))}"'
        attempts = 0

        def put():
            nonlocal attempts
            attempts += 1
            # minio's request layer: the public put_object would turn these into x-amz-meta-* metadata
            return self.client._put_object(bucket, key, data, headers=headers)

        try:
            return self._call("PUT (conditional)", uri, put).etag
        except NotFound:  # If-Match on an object that is gone: the expected version no longer exists
            raise PreconditionFailed(f"{uri}: does not exist (If-Match)") from None
        except PreconditionFailed:
            # An earlier attempt may have been applied before its answer was lost (a dropped
            # connection, a 5xx from a proxy); its retry then conflicts with our own write.
            # Holding exactly our bytes means that write won.
            if attempts > 1:
                current, etag = self.get_with_etag(uri)
                if current == data:
                    log.warning("PUT (conditional) %s: an earlier attempt was applied; not a conflict", uri)
                    return etag
            raise

    def put_if_absent(self, uri: str, data: bytes) -> str:
        return self.put_conditional(uri, data, if_none_match=True)

    def put_if_match(self, uri: str, data: bytes, etag: str) -> str:
        return self.put_conditional(uri, data, if_match=etag)

    def upload_file(self, local_path: str, uri: str) -> None:
        bucket, key = self.split(uri)
        self._call("upload", uri,
                   lambda: self.client.fput_object(bucket, key, local_path, part_size=PART_SIZE))

    def download_file(self, uri: str, local_path: str, digest: bool = False) -> str | None:
        """Stream into a uniquely named hidden temp file next to ``local_path``, then rename.

        With ``digest`` the bytes are hashed as they arrive (their sha256 returned), so a verified
        download reads the file once. Unlike
        minio's ``fget_object`` (a fixed ``.part.minio`` name, remove-then-rename), concurrent
        downloads to one path never mix, readers never see the path missing or half-written, and a
        failed attempt leaves nothing behind.
        """
        bucket, key = self.split(uri)
        dst = Path(local_path)
        dst.parent.mkdir(parents=True, exist_ok=True)

        def get() -> str | None:
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
            resp = None
            try:
                with os.fdopen(fd, "wb") as f:
                    resp = self.client.get_object(bucket, key)
                    sha256 = write_chunks(resp.stream(amt=STREAM_CHUNK), f, digest)
                os.replace(tmp, dst)
                return sha256
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            finally:
                if resp is not None:
                    resp.close()
                    resp.release_conn()

        return self._call("download", uri, get)

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (one ranged GET; a short answer is retried)."""
        bucket, key = self.split(uri)

        def get() -> bytes:
            resp = self.client.get_object(bucket, key, offset=offset, length=length)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
            if len(data) != length:  # the connection ended early without an error
                raise ConnectionError(f"{len(data)} of {length} bytes received")
            return data

        return self._call("GET (range)", uri, get)

    def size(self, uri: str) -> int:
        bucket, key = self.split(uri)
        return self._call("HEAD", uri, lambda: self.client.stat_object(bucket, key)).size

    def check_writable(self, uri: str) -> None:
        """Write and delete a probe object below ``uri``: a missing bucket is bad input, found at once."""
        bucket, _ = self.split(uri)
        probe = f"{str(uri).rstrip('/')}/.write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.write_bytes(probe, b"")
        except NotFound:
            raise InputError(f"{uri}: bucket '{bucket}' does not exist (no step creates buckets)") from None
        self.delete(probe)

    def exists(self, uri: str) -> bool:
        bucket, key = self.split(uri)
        try:
            self._call("HEAD", uri, lambda: self.client.stat_object(bucket, key))
            return True
        except NotFound:
            return False

    def folder_exists(self, uri: str) -> bool:
        bucket, _ = self.split(uri)
        return self._call("HEAD (bucket)", f"s3://{bucket}", lambda: self.client.bucket_exists(bucket))

    def list_prefix(self, uri: str) -> list[str]:
        bucket, key = self.split(uri)
        prefix = key.rstrip("/") + "/" if key else ""

        def ls() -> list[str]:
            return sorted(o.object_name[len(prefix):] for o in self.client.list_objects(bucket, prefix=prefix,
                                                                                         recursive=True)
                          if not o.is_dir)

        try:
            return self._call("LIST", uri, ls)
        except NotFound:
            return []

    def delete(self, uri: str) -> None:
        bucket, key = self.split(uri)
        try:
            self._call("DELETE", uri, lambda: self.client.remove_object(bucket, key))
        except NotFound:
            pass

    def delete_prefix(self, uri: str) -> None:
        """Delete every object below the folder ``uri``: one multi-object DELETE per ``DELETE_BATCH``
        names."""
        bucket, key = self.split(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        names = [prefix + rel for rel in self.list_prefix(uri)]
        for start in range(0, len(names), DELETE_BATCH):
            batch = [DeleteObject(n) for n in names[start:start + DELETE_BATCH]]

            def remove(batch=batch) -> None:
                errors = list(self.client.remove_objects(bucket, batch))  # lazy: consuming sends it
                if errors:
                    raise StoreError(f"DELETE below {uri}: {len(errors)} object(s) not deleted, "
                                           f"first {errors[0].name}: {errors[0].code}")

            self._call("DELETE (batch)", uri, remove)

    def copy(self, src: str, dst: str) -> None:
        sb, sk = self.split(src)
        db, dk = self.split(dst)
        self._call("COPY", f"{src} -> {dst}", lambda: self.client.copy_object(db, dk, CopySource(sb, sk)))

    def local_path(self, uri: str) -> Path | None:
        return None  # objects live on the server: readers download them

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        from grade.core.store.s3_arrow import arrow_filesystem

        return arrow_filesystem(self), str(uri)[len("s3://"):]


def _parse_endpoint(endpoint_url: str):
    """The parsed endpoint, or S3ConfigError; the messages never repeat the value (it may hold a secret)."""
    try:
        parsed = urlparse(endpoint_url)
        parsed.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise S3ConfigError("S3_ENDPOINT_URL: not a URL (expected http(s)://host[:port])") from None
    if parsed.username is not None or parsed.password is not None:
        raise S3ConfigError("S3_ENDPOINT_URL must not hold credentials (user:password@host): give them in "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; the value is not shown")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise S3ConfigError(f"S3_ENDPOINT_URL must look like http(s)://host:port, got scheme "
                            f"'{parsed.scheme}' and host '{parsed.hostname or ''}'")
    if parsed.path.strip("/") or parsed.query or parsed.fragment:
        raise S3ConfigError("S3_ENDPOINT_URL must be http(s)://host[:port] with nothing after the port "
                            "(buckets and prefixes go into the s3:// URIs)")
    return parsed


def _env_number(name: str, default: T, kind: Callable[[str], T]) -> T:
    """A positive number from the environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise S3ConfigError(f"{name} must be a positive {kind.__name__}, got '{text}'")
    return value
