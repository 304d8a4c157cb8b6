"""The local-folder backend of :mod:`grade.core.store`: plain paths on this machine (or a shared mount).

Every write goes through a uniquely named hidden temp file next to its target and a rename, so
readers never see a half-written object and concurrent writers never mix. Those temp files and the
compare-and-swap locks (``.<name>.lock``) are bookkeeping, never listed as objects.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grade.core.errors import InputError, NotFound, PreconditionFailed, StoreError
from grade.core.store.backend import file_chunks, write_chunks

#: suffixes of the backend's own bookkeeping files (hidden temp files, CAS locks): never listed
SCRATCH_SUFFIXES = (".tmp", ".lock")


@contextmanager
def _temp_beside(dst: Path) -> Iterator[tuple[int, str]]:
    """(fd, path) of a hidden temp file next to ``dst``; removed unless the body renamed it away."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        yield fd, tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def _writing(uri: str | os.PathLike) -> Iterator[None]:
    """Turn the OS's refusals to write ``uri`` into one-line errors: a full disk is a fault
    (:class:`StoreError`, exit 1: free space and run again), a read-only or protected folder is bad
    input (:class:`InputError`, exit 2)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"{uri}: no space left on the device ({e.strerror}); nothing was "
                             "replaced") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise InputError(f"{uri}: cannot write here ({e.strerror}): a read-only or protected "
                             "folder") from None
        raise


def _is_scratch(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(SCRATCH_SUFFIXES)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBackend:
    """Objects are files; a folder URI is a directory; the ETag is the sha256 of the content."""

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{uri}: not found") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        with _writing(uri), _temp_beside(Path(uri)) as (fd, tmp):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, uri)

    def get_with_etag(self, uri: str) -> tuple[bytes, str]:
        data = self.read_bytes(uri)
        return data, _sha256(data)

    def put_if_absent(self, uri: str, data: bytes) -> str:
        with _writing(uri), _temp_beside(Path(uri)) as (fd, tmp):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, uri)  # atomic create-if-absent on POSIX
            except FileExistsError:
                raise PreconditionFailed(f"{uri}: already exists") from None
        return _sha256(data)

    def put_if_match(self, uri: str, data: bytes, etag: str) -> str:
        import fcntl

        p = Path(uri)
        if not p.parent.is_dir():
            raise PreconditionFailed(f"{uri}: does not exist")
        lock_path = p.with_name(f".{p.name}.lock")  # next to the object: works on any shared filesystem
        with _writing(uri), open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # serialise local compare-and-swap between processes
            try:
                current = _sha256(p.read_bytes())
            except FileNotFoundError:
                raise PreconditionFailed(f"{uri}: does not exist") from None
            if current != etag:
                raise PreconditionFailed(f"{uri}: changed since it was read (ETag mismatch)")
            self.write_bytes(uri, data)
        return _sha256(data)

    def upload_file(self, local_path: str, uri: str) -> None:
        self._copy_file(local_path, uri)

    def download_file(self, uri: str, local_path: str, digest: bool = False) -> str | None:
        if not Path(uri).is_file():
            raise NotFound(f"{uri}: not found")
        return self._copy_file(uri, local_path, digest)

    def _copy_file(self, src: str | os.PathLike, dst: str | os.PathLike, digest: bool = False) -> str | None:
        """Copy through a temp file + rename; with ``digest`` hashed on the way (its sha256 returned)."""
        with _writing(dst), _temp_beside(Path(dst)) as (fd, tmp):
            if digest:
                with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                    sha256 = write_chunks(file_chunks(fin), fout, digest=True)
            else:
                os.close(fd)
                shutil.copyfile(src, tmp)  # the kernel's copy: faster than through Python
                sha256 = None
            os.replace(tmp, dst)
        return sha256

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()

    def folder_exists(self, uri: str) -> bool:
        return Path(uri).is_dir()

    def check_writable(self, uri: str) -> None:
        path = Path(uri).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            what = "an existing file" if existing == path else f"{existing} is a file"
            raise InputError(f"{uri}: not a writable output folder ({what})")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"{uri}: not a writable output folder (no permission to write in {existing})")

    def list_prefix(self, uri: str) -> list[str]:
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                      if p.is_file() and not p.is_symlink() and not _is_scratch(p))

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def delete_prefix(self, uri: str) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def copy(self, src: str, dst: str) -> None:
        self.download_file(src, dst)

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(Path(uri).absolute())

    def local_path(self, uri: str) -> Path | None:
        return Path(uri)
