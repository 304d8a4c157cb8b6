"""One object-store interface over local paths and ``s3://bucket/key`` URIs (MinIO in production).

Local paths and S3 URIs are interchangeable everywhere a component takes a URI: every function
here picks the URI's backend (:func:`backend_for`, the one place a scheme is looked at) and
dispatches to it; the backends (:mod:`grade.core.store.local`, :mod:`grade.core.store.s3`) implement
:class:`grade.core.store.backend.StoreBackend`.

Published outputs: a multi-file output is written files first, then ``_MANIFEST.json`` (names,
sizes, sha256) last. Readers (:func:`open_published`, :func:`read_manifest`) refuse a folder without
its manifest, so a writer killed half-way leaves nothing visible, and :func:`open_published` checks
every file it hands out against the manifest's sha256 (``IntegrityError`` otherwise). Re-publishing
over a published output never overwrites a file the current manifest lists with other bytes: such
files go beside the old ones (under ``_pending/``) until the new manifest is in place, so readers
see the old output or the new one, whole, and a failed re-publish leaves the old one as it was.

Faults: every S3 operation, and every read pyarrow makes of an S3 object, is retried within one
budget (:mod:`grade.core.store.s3`); what outlasts it is a :class:`StoreError` (exit 1). A step checks
that its output is writable (:func:`check_writable`) before its work. Local temp folders
(``grade-<kind>-<pid>-*``) are removed when done; those of killed processes are cleared by the next
process that makes one.

S3 settings come from the environment only: ``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, optional ``AWS_REGION``. Secret values are never printed or logged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grade.core.errors import (  # noqa: F401 - re-exported: callers catch them as store.<Error>
    InputError,
    IntegrityError,
    NotFound,
    NotPublished,
    PreconditionFailed,
    S3ConfigError,
    StoreError,
)
from grade.core.store import paths
from grade.core.store.backend import StoreBackend, sha256_file
from grade.core.store.local import LocalBackend

log = logging.getLogger("grade.core.store")

MANIFEST = "_MANIFEST.json"
#: folder inside a published folder holding a re-publish's new files whose names the old output still uses
PENDING = "_pending"
#: manifest key listing objects of a replaced output still to delete (only while a re-publish runs)
RETIRED = "_retired"
#: local temp folders this package makes: ``grade-<kind>-<owner pid>-<random>``
TEMP_FOLDER = re.compile(r"grade-(publish|fetch|register|copy)-(?:(\d+)-)?[a-z0-9_]+")
#: a temp folder whose process is gone is removed once it is this old (its owner may run on another host)
STALE_TEMP_AGE_S = 6 * 3600.0


# --------------------------------------------------------------------------------------------
# Backends by URI scheme
# --------------------------------------------------------------------------------------------

_LOCAL = LocalBackend()
_S3_CLIENT = None


def _s3():
    """The S3 backend, built from the environment on first use (``S3ConfigError`` when unset)."""
    global _S3_CLIENT
    if _S3_CLIENT is None:
        from grade.core.store.s3 import S3Backend  # imports minio: only when an s3:// URI is used

        _S3_CLIENT = S3Backend.from_env()
    return _S3_CLIENT


def reset_s3_client() -> None:
    """Forget the cached S3 client (after the environment changed, e.g. in tests)."""
    global _S3_CLIENT
    _S3_CLIENT = None


#: URI scheme -> the backend serving it; anything without a listed scheme is a local path
_BACKENDS = {"s3": _s3}


def _scheme(uri: str | os.PathLike) -> str:
    head, sep, _ = str(uri).partition("://")
    return head if sep else ""


def backend_for(uri: str | os.PathLike) -> StoreBackend:
    """The backend storing ``uri``, chosen by its scheme."""
    factory = _BACKENDS.get(_scheme(uri))
    return factory() if factory else _LOCAL


def is_s3(uri: str | os.PathLike) -> bool:
    return _scheme(uri) == "s3"


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join relative path parts onto a local path or a URI.

    Every part must pass the path rule (:mod:`grade.core.store.paths`: relative, normalised, no
    ``..``): parts often come from data (manifest entries, version ids), and nothing joined here may
    leave ``uri``.
    """
    base = str(uri)
    for p in parts:
        paths.safe_relpath(p, base)
    if _scheme(base) not in _BACKENDS:
        return str(Path(base, *parts))
    out = base.rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


# --------------------------------------------------------------------------------------------
# Plain objects
# --------------------------------------------------------------------------------------------

def read_bytes(uri: str) -> bytes:
    return backend_for(uri).read_bytes(str(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object whole: readers see the old or the new bytes, never half of them."""
    backend_for(uri).write_bytes(str(uri), data)


def read_json(uri: str) -> Any:
    """A JSON object read from the store; not JSON, or nested deeper than ``paths.MAX_JSON_DEPTH``:
    InputError naming ``uri``."""
    return paths.loads(read_bytes(uri), uri)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to ``uri`` (streaming multipart upload on S3)."""
    backend_for(uri).upload_file(str(local_path), str(uri))


def download_file(uri: str, local_path: str | os.PathLike) -> None:
    """Copy ``uri`` to a local file (streaming on S3)."""
    backend_for(uri).download_file(str(uri), str(local_path))


def check_writable(uri: str | os.PathLike) -> None:
    """Fail before a step's work when its output folder cannot be written.

    A missing bucket, a path that is an existing file or a folder without write permission is bad
    input (:class:`InputError`, exit 2); a store that does not answer within the retry budget is a
    fault (:class:`StoreError`, exit 1). On S3 a small probe object is written and deleted.
    """
    backend_for(uri).check_writable(str(uri))


def exists(uri: str) -> bool:
    """True when an object (file) exists at ``uri``."""
    return backend_for(uri).exists(str(uri))


def folder_exists(uri: str) -> bool:
    """True when the folder ``uri`` exists: a local directory; on S3 its bucket (prefixes are not
    folders there: any prefix of an existing bucket can be written)."""
    return backend_for(uri).folder_exists(str(uri))


def list_prefix(uri: str) -> list[str]:
    """Relative names (with '/' separators) of every object below the folder ``uri``, sorted.

    Locally, in-flight temp files and compare-and-swap locks are not objects and are left out.
    """
    return backend_for(uri).list_prefix(str(uri))


def delete(uri: str) -> None:
    """Delete one object; deleting a missing object is not an error."""
    backend_for(uri).delete(str(uri))


def delete_prefix(uri: str) -> None:
    """Delete every object below the folder ``uri``."""
    backend_for(uri).delete_prefix(str(uri))


def copy(src: str, dst: str) -> None:
    """Copy one object (server-side on S3 when both ends are S3)."""
    src, dst = str(src), str(dst)
    src_backend, dst_backend = backend_for(src), backend_for(dst)
    if src_backend is dst_backend:
        src_backend.copy(src, dst)
    elif (src_path := src_backend.local_path(src)) is not None:
        dst_backend.upload_file(str(src_path), dst)
    elif (dst_path := dst_backend.local_path(dst)) is not None:
        src_backend.download_file(src, str(dst_path))
    else:  # two remote backends: through a local temp file
        with temp_folder("copy") as d:
            src_backend.download_file(src, str(d / "object"))
            dst_backend.upload_file(str(d / "object"), dst)


# --------------------------------------------------------------------------------------------
# Local temp folders
# --------------------------------------------------------------------------------------------

_SWEPT = False


def new_temp_folder(kind: str) -> Path:
    """A new local folder ``grade-<kind>-<pid>-*`` in the temp dir; the caller removes it.

    The first one a process makes clears the stale folders of processes that were killed.
    """
    global _SWEPT
    if not _SWEPT:
        _SWEPT = True
        remove_stale_temp()
    return Path(tempfile.mkdtemp(prefix=f"grade-{kind}-{os.getpid()}-"))


@contextmanager
def temp_folder(kind: str) -> Iterator[Path]:
    """A new local temp folder (:func:`new_temp_folder`), removed when the block ends."""
    folder = new_temp_folder(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove this package's temp folders whose process is gone and that are ``max_age_s`` old; the list.

    A process killed with SIGKILL cannot remove its staging or download folders: the next process
    that makes one does. The age is the folder's last change.
    """
    removed = []
    now = time.time()
    for entry in os.scandir(tempfile.gettempdir()):
        match = TEMP_FOLDER.fullmatch(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        if match.group(2) and process_alive(int(match.group(2))):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if age >= max_age_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


# --------------------------------------------------------------------------------------------
# Conditional writes (compare-and-swap)
# --------------------------------------------------------------------------------------------

def get_with_etag(uri: str) -> tuple[bytes, str]:
    """The object's bytes and its ETag (local: sha256 of the content)."""
    return backend_for(uri).get_with_etag(str(uri))


def put_if_absent(uri: str, data: bytes) -> str:
    """Create the object only if it does not exist (``If-None-Match: *``); returns the new ETag.

    Raises :class:`PreconditionFailed` when it exists.
    """
    return backend_for(uri).put_if_absent(str(uri), data)


def put_if_match(uri: str, data: bytes, etag: str) -> str:
    """Replace the object only if its ETag is still ``etag`` (``If-Match``); returns the new ETag.

    Raises :class:`PreconditionFailed` when it changed meanwhile (or is gone).
    """
    return backend_for(uri).put_if_match(str(uri), data, etag)


# --------------------------------------------------------------------------------------------
# Atomic publish of multi-file outputs
# --------------------------------------------------------------------------------------------

def build_manifest(local_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    root = Path(local_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root)).replace(os.sep, "/")
        if p.is_symlink():
            raise InputError(f"{local_dir}: entry {rel!r} is a symbolic link; refused: a published folder "
                             "holds plain files only")
        # only the folder's own manifest is left out: a nested published folder keeps its manifest
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"files": files, **(extra or {})}


def _object_name(rel: str, meta: dict[str, Any]) -> str:
    """Where a manifest's file is stored, relative to the folder: its own name unless it waits beside it."""
    return meta.get("path", rel)


def _objects_in_use(manifest: dict[str, Any]) -> dict[str, str]:
    """Object name -> sha256 of every object ``manifest`` refers to."""
    return {_object_name(rel, meta): meta["sha256"] for rel, meta in manifest["files"].items()}


def _current_manifest(uri: str) -> dict[str, Any]:
    try:
        return read_manifest(uri)
    except NotPublished:
        return {"files": {}}


def publish_dir(local_dir: str | os.PathLike, uri: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish every file of ``local_dir`` under ``uri``: files first, ``_MANIFEST.json`` last; the manifest.

    A file whose name the current manifest uses for other bytes is uploaded beside it (under
    ``_pending/<id>/``) and the manifest switched to point there; only after that switch is it
    copied onto its own name and the manifest rewritten. Readers thus always see a whole output,
    the old or the new one; a failure before the switch leaves the old output untouched. Objects
    of the old output the new one does not list are deleted after the switch (the switched manifest
    names them under ``_retired`` until then, so a publish that dies first leaves them to the next
    one). A reader opening a listed name directly (not through the manifest) sees the new bytes once
    the publish has returned. One writer per ``uri`` at a time.
    """
    manifest = build_manifest(local_dir, extra)
    if any(rel.startswith(PENDING + "/") for rel in manifest["files"]):
        raise ValueError(f"{local_dir}: '{PENDING}/' is reserved for the store's own use while publishing")
    current = _current_manifest(uri)
    in_use = _objects_in_use(current)
    token = uuid.uuid4().hex[:12]
    beside: dict[str, str] = {}  # name -> where its new bytes wait while the old output still uses the name
    written: list[str] = []
    try:
        for rel, meta in manifest["files"].items():
            target = rel if in_use.get(rel, meta["sha256"]) == meta["sha256"] else f"{PENDING}/{token}/{rel}"
            if target not in in_use:
                written.append(target)
            upload_file(Path(local_dir, rel), join(uri, target))
            if target != rel:
                beside[rel] = target
    except BaseException:
        _remove_unpublished(uri, written)
        raise
    switched = {rel: {**meta, "path": beside[rel]} if rel in beside else meta
                for rel, meta in manifest["files"].items()}
    referenced = set(_objects_in_use({"files": switched}))
    retired = sorted((set(in_use) | set(current.get(RETIRED, []))) - referenced - set(beside))
    # the switch: from here on readers see the new output
    to_delete = {RETIRED: retired} if retired else {}
    write_json(join(uri, MANIFEST), {**manifest, "files": switched, **to_delete})
    for name in retired:
        delete(join(uri, name))
    for rel, target in beside.items():
        copy(join(uri, target), join(uri, rel))
    if beside or retired:
        write_json(join(uri, MANIFEST), manifest)  # every file at its own name, nothing left to delete
    delete_prefix(join(uri, PENDING))  # this publish's and any failed earlier one's
    return manifest


def _remove_unpublished(uri: str, names: list[str]) -> None:
    """After a publish failed before its switch: delete what it wrote, so the output is the old one
    (or absent) and no partial file stays beside it. Best effort: the failure that got us here
    (a full disk, an outage) may make deleting fail too; the next publish clears ``_pending/``."""
    for name in names:
        try:
            delete(join(uri, name))
        except (StoreError, OSError) as e:
            log.warning("%s: could not remove %s after a failed publish: %s", uri, name, e)
            return


@contextmanager
def publishing(uri: str, extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a local staging folder; on normal exit its files are published to ``uri``.

    On an exception nothing is published; the staging folder is removed in every case.
    """
    with temp_folder("publish") as staging:
        try:
            yield staging
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # the staging disk filled while the output was written: a fault, like a full output disk
            raise StoreError(f"{staging}: no space left on the device while staging {uri} "
                             f"({e.strerror}); nothing was published") from None
        publish_dir(staging, uri, extra)


def is_published(uri: str) -> bool:
    return exists(join(uri, MANIFEST))


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a published folder, checked (:func:`check_manifest`); :class:`NotPublished`
    when it has none."""
    where = join(uri, MANIFEST)
    try:
        doc = read_json(where)
    except NotFound:
        raise NotPublished(f"{uri}: no {MANIFEST} (output missing or its writer did not finish)") from None
    return check_manifest(doc, where)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(doc: Any, where: str) -> dict[str, Any]:
    """``doc`` when it is a well-formed manifest; else InputError naming the entry.

    Every file name, object path and ``_retired`` name passes the path rule
    (:func:`grade.core.store.paths.safe_relpath`): a manifest decides where readers write their
    copies and what a re-publish deletes, so an entry like ``../../x`` would leave the folder.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise InputError(f"{where}: not a manifest (expected an object with a 'files' object)")
    for rel, meta in doc["files"].items():
        paths.safe_relpath(rel, f"{where}: files")
        if not isinstance(meta, dict):
            raise InputError(f"{where}: files[{rel!r}]: expected an object with size and sha256")
        size, sha = meta.get("size"), meta.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InputError(f"{where}: files[{rel!r}].size: expected a byte count >= 0, got {size!r}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise InputError(f"{where}: files[{rel!r}].sha256: expected 64 hex digits, got {sha!r}")
        if "path" in meta:
            paths.safe_relpath(meta["path"], f"{where}: files[{rel!r}].path")
    retired = doc.get(RETIRED, [])
    if not isinstance(retired, list):
        raise InputError(f"{where}: {RETIRED}: expected a list of names")
    for name in retired:
        paths.safe_relpath(name, f"{where}: {RETIRED}")
    return doc


def read_published_file(uri: str, rel: str) -> bytes:
    """The bytes of the file ``rel`` of the published folder ``uri``, checked against its manifest.

    One read, then its size and sha256 compared with the manifest's entry (``IntegrityError``
    otherwise), so what the caller gets is exactly what was published; a name the manifest does not
    list is ``IntegrityError`` too.
    """
    manifest = read_manifest(uri)
    meta = manifest["files"].get(rel)
    if meta is None:
        raise IntegrityError(f"{join(uri, rel)}: not listed in {join(uri, MANIFEST)}")
    where = join(uri, _object_name(rel, meta))
    root = backend_for(uri).local_path(uri)
    if root is not None:
        paths.check_no_symlink(root, _object_name(rel, meta), where)
    try:
        data = read_bytes(where)
    except NotFound:
        raise IntegrityError(f"{where}: missing (the manifest lists it with {meta['size']} bytes)") from None
    if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise _changed(where)
    return data


def content_hash(uri_or_manifest: str | dict[str, Any]) -> str:
    """A stable hash of a published folder's content: sha256 over its files' names and sha256s.

    Identifies exactly what was evaluated / registered, independent of where it is stored.
    """
    manifest = uri_or_manifest if isinstance(uri_or_manifest, dict) else read_manifest(uri_or_manifest)
    lines = "".join(f"{rel}\t{meta['sha256']}\n" for rel, meta in sorted(manifest["files"].items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def open_published(uri: str, cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """A local folder holding the published output at ``uri``, every file checked against the manifest.

    A local folder is used in place; an S3 one is downloaded (to ``cache_dir``, else a new
    ``grade-fetch-*`` temp folder the caller owns, removed again if the fetch fails; :func:`fetched`
    removes it when done), only the files the manifest names. Sizes are always checked, sha256 too
    when ``verify`` (hashed while downloading); a file that differs raises :class:`IntegrityError`.
    """
    return _open_published(uri, cache_dir, verify)[0]


@contextmanager
def fetched(uri: str, verify: bool = True) -> Iterator[Path]:
    """:func:`open_published` for the length of a ``with`` block: a temp download is removed at its end."""
    local, temporary = _open_published(uri, None, verify)
    try:
        yield local
    finally:
        if temporary:
            shutil.rmtree(local, ignore_errors=True)


def verify_published(uri: str) -> None:
    """Check every file of the published folder ``uri`` against its manifest (``IntegrityError``)."""
    with fetched(uri):
        pass


def _open_published(uri: str, cache_dir: str | os.PathLike | None, verify: bool) -> tuple[Path, bool]:
    """(local folder, whether it is a new temp folder) of :func:`open_published`."""
    uri = str(uri)
    manifest = read_manifest(uri)
    backend = backend_for(uri)
    root = backend.local_path(uri)
    if root is not None and all("path" not in meta for meta in manifest["files"].values()):
        for rel, meta in manifest["files"].items():
            _check_file(join(uri, rel), paths.check_no_symlink(root, rel, join(uri, rel)), meta, verify)
        return root, False
    local = Path(cache_dir) if cache_dir else new_temp_folder("fetch")
    try:
        for rel, meta in manifest["files"].items():
            src = join(uri, _object_name(rel, meta))
            if root is not None:
                paths.check_no_symlink(root, _object_name(rel, meta), src)
            _fetch_file(backend, src, local / rel, meta, verify)
    except BaseException:
        if not cache_dir:
            shutil.rmtree(local, ignore_errors=True)
        raise
    return local, not cache_dir


def _check_file(where: str, path: Path, meta: dict[str, Any], verify: bool) -> None:
    """``IntegrityError`` unless ``path`` holds the manifest's bytes (size; sha256 when ``verify``)."""
    if not path.is_file() or path.stat().st_size != meta["size"]:
        raise IntegrityError(f"{where}: missing or of the wrong size "
                             f"(the manifest says {meta['size']} bytes)")
    if verify and sha256_file(path) != meta["sha256"]:
        raise _changed(where)


def _changed(where: str) -> IntegrityError:
    return IntegrityError(f"{where}: content differs from the manifest (sha256 mismatch): "
                          f"changed after it was published; publish the output again")


def _fetch_file(backend: StoreBackend, src: str, dst: Path, meta: dict[str, Any], verify: bool) -> None:
    """Download ``src`` to ``dst`` unless ``dst`` already holds the manifest's bytes; verify what arrives."""
    if (not dst.is_symlink() and dst.is_file() and dst.stat().st_size == meta["size"]
            and sha256_file(dst) == meta["sha256"]):
        return
    try:
        sha256 = backend.download_file(src, str(dst), digest=verify)
    except NotFound:
        raise IntegrityError(f"{src}: missing (the manifest lists it with {meta['size']} bytes)") from None
    if verify and sha256 != meta["sha256"]:
        dst.unlink(missing_ok=True)
        raise _changed(src)


# --------------------------------------------------------------------------------------------
# Parquet through pyarrow
# --------------------------------------------------------------------------------------------

def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path or S3 URI."""
    return backend_for(uri).arrow_filesystem(str(uri))
