"""One object-store interface over local paths and ``s3://bucket/key`` URIs (MinIO in production).

Local paths and S3 URIs are interchangeable everywhere a component takes a URI.

Atomic publish: a multi-file output is written files first, then ``_MANIFEST.json`` (names, sizes,
sha256) last. Readers (:func:`open_published`, :func:`read_manifest`) refuse a folder without its
manifest, so a writer killed half-way leaves nothing visible.

S3 settings come from the environment only: ``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, optional ``AWS_REGION``. Secret values are never printed or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "_MANIFEST.json"
#: suffixes of the local backend's own bookkeeping files (hidden temp files, CAS locks): never listed
_LOCAL_SCRATCH_SUFFIXES = (".tmp", ".lock")


class StoreError(Exception):
    """An object-store operation failed (after retries)."""


class NotFound(StoreError):
    """The object or folder does not exist."""


class NotPublished(StoreError):
    """A folder has no manifest: its writer did not finish (or it was never a published output)."""


class PreconditionFailed(StoreError):
    """A conditional put lost: the object exists (If-None-Match) or changed (If-Match). HTTP 412."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI."""
    base = str(uri)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(base, *parts))


# --------------------------------------------------------------------------------------------
# Plain objects
# --------------------------------------------------------------------------------------------

def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        return _s3().read_bytes(uri)
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{uri}: not found") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object; local writes go through a temp file + rename (never half-written)."""
    if is_s3(uri):
        _s3().write_bytes(uri, data)
        return
    p = Path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to ``uri`` (streaming multipart upload on S3)."""
    if is_s3(uri):
        _s3().upload_file(str(local_path), uri)
        return
    _copy_atomically(local_path, uri)


def download_file(uri: str, local_path: str | os.PathLike) -> None:
    """Copy ``uri`` to a local file (streaming on S3)."""
    if is_s3(uri):
        _s3().download_file(uri, str(local_path))
        return
    if not Path(uri).is_file():
        raise NotFound(f"{uri}: not found")
    _copy_atomically(uri, local_path)


def _copy_atomically(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy through a uniquely named hidden temp file + rename: concurrent writers never mix."""
    d = Path(dst)
    d.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d.parent, prefix=f".{d.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, d)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_local_scratch(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_LOCAL_SCRATCH_SUFFIXES)


def exists(uri: str) -> bool:
    """True when an object (file) exists at ``uri``."""
    if is_s3(uri):
        return _s3().exists(uri)
    return Path(uri).is_file()


def list_prefix(uri: str) -> list[str]:
    """Relative names (with '/' separators) of every object below the folder ``uri``, sorted.

    Locally, in-flight temp files and compare-and-swap locks are not objects and are left out.
    """
    if is_s3(uri):
        return _s3().list_prefix(uri)
    root = Path(uri)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and not _is_local_scratch(p))


def delete(uri: str) -> None:
    """Delete one object; deleting a missing object is not an error."""
    if is_s3(uri):
        _s3().delete(uri)
        return
    Path(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Delete every object below the folder ``uri``."""
    if is_s3(uri):
        _s3().delete_prefix(uri)
        return
    shutil.rmtree(uri, ignore_errors=True)


def copy(src: str, dst: str) -> None:
    """Copy one object (server-side on S3 when both ends are S3)."""
    if is_s3(src) and is_s3(dst):
        _s3().copy(src, dst)
    elif not is_s3(src) and not is_s3(dst):
        upload_file(src, dst)
    elif is_s3(dst):
        upload_file(src, dst)
    else:
        download_file(src, dst)


# --------------------------------------------------------------------------------------------
# Conditional writes (compare-and-swap)
# --------------------------------------------------------------------------------------------

def get_with_etag(uri: str) -> tuple[bytes, str]:
    """The object's bytes and its ETag (local: sha256 of the content)."""
    if is_s3(uri):
        return _s3().get_with_etag(uri)
    data = read_bytes(uri)
    return data, hashlib.sha256(data).hexdigest()


def put_if_absent(uri: str, data: bytes) -> str:
    """Create the object only if it does not exist (``If-None-Match: *``); returns the new ETag.

    Raises :class:`PreconditionFailed` when it exists.
    """
    if is_s3(uri):
        return _s3().put_conditional(uri, data, if_none_match=True)
    p = Path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, p)  # atomic create-if-absent on POSIX
    except FileExistsError:
        raise PreconditionFailed(f"{uri}: already exists") from None
    finally:
        os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()


def put_if_match(uri: str, data: bytes, etag: str) -> str:
    """Replace the object only if its ETag is still ``etag`` (``If-Match``); returns the new ETag.

    Raises :class:`PreconditionFailed` when it changed meanwhile (or is gone).
    """
    if is_s3(uri):
        return _s3().put_conditional(uri, data, if_match=etag)
    import fcntl

    p = Path(uri)
    if not p.parent.is_dir():
        raise PreconditionFailed(f"{uri}: does not exist")
    lock_path = p.with_name(f".{p.name}.lock")  # next to the object: works on any shared filesystem
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # serialise local compare-and-swap between processes
        try:
            current = hashlib.sha256(p.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise PreconditionFailed(f"{uri}: does not exist") from None
        if current != etag:
            raise PreconditionFailed(f"{uri}: changed since it was read (ETag mismatch)")
        write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic publish of multi-file outputs
# --------------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(local_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    root = Path(local_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root)).replace(os.sep, "/")
        # only the folder's own manifest is left out: a nested published folder keeps its manifest
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256_file(p)}
    return {"files": files, **(extra or {})}


def publish_dir(local_dir: str | os.PathLike, uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish every file of ``local_dir`` under ``uri``: files first, ``_MANIFEST.json`` last.

    A previous manifest at ``uri`` is removed first, so readers never see a manifest that
    disagrees with the files. Returns the manifest.
    """
    manifest = build_manifest(local_dir, extra)
    delete(join(uri, MANIFEST))
    for rel in manifest["files"]:
        upload_file(Path(local_dir, rel), join(uri, rel))
    write_json(join(uri, MANIFEST), manifest)
    return manifest


@contextmanager
def publishing(uri: str, extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a local staging folder; on normal exit its files are published to ``uri``.

    On an exception nothing is published and the staging folder is removed.
    """
    staging = Path(tempfile.mkdtemp(prefix="grade-publish-"))
    try:
        yield staging
        publish_dir(staging, uri, extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_published(uri: str) -> bool:
    return exists(join(uri, MANIFEST))


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a published folder; :class:`NotPublished` when it has none."""
    try:
        return read_json(join(uri, MANIFEST))
    except NotFound:
        raise NotPublished(f"{uri}: no {MANIFEST} (output missing or its writer did not finish)") from None


def content_hash(uri_or_manifest: str | dict[str, Any]) -> str:
    """A stable hash of a published folder's content: sha256 over its files' names and sha256s.

    Identifies exactly what was evaluated / registered, independent of where it is stored.
    """
    manifest = uri_or_manifest if isinstance(uri_or_manifest, dict) else read_manifest(uri_or_manifest)
    lines = "".join(f"{rel}\t{meta['sha256']}\n" for rel, meta in sorted(manifest["files"].items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def open_published(uri: str, cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """A local folder holding the published output at ``uri`` (downloaded when on S3).

    Only files named in the manifest are fetched; sizes (and sha256 when ``verify``) are checked.
    """
    manifest = read_manifest(uri)
    if not is_s3(uri):
        root = Path(uri)
        for rel, meta in manifest["files"].items():
            p = root / rel
            if not p.is_file() or p.stat().st_size != meta["size"]:
                raise StoreError(f"{uri}: {rel} missing or of the wrong size (manifest says {meta['size']} bytes)")
        return root
    local = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="grade-fetch-"))
    for rel, meta in manifest["files"].items():
        dst = local / rel
        if dst.is_file() and dst.stat().st_size == meta["size"] and _sha256_file(dst) == meta["sha256"]:
            continue
        download_file(join(uri, rel), dst)
        if verify and _sha256_file(dst) != meta["sha256"]:
            raise StoreError(f"{join(uri, rel)}: sha256 does not match the manifest")
    return local


# --------------------------------------------------------------------------------------------
# Parquet through pyarrow
# --------------------------------------------------------------------------------------------

def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path or S3 URI."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        return _s3().arrow_fs(), str(uri)[len("s3://"):]
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


# --------------------------------------------------------------------------------------------
# S3 backend
# --------------------------------------------------------------------------------------------

_S3_CLIENT = None


def _s3():
    global _S3_CLIENT
    if _S3_CLIENT is None:
        from grade.s3 import S3Backend

        _S3_CLIENT = S3Backend.from_env()
    return _S3_CLIENT


def reset_s3_client() -> None:
    """Forget the cached S3 client (after the environment changed, e.g. in tests)."""
    global _S3_CLIENT
    _S3_CLIENT = None
