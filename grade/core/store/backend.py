"""The interface every object-store backend implements (local folder, S3), and its shared helpers.

:mod:`grade.core.store` picks a backend by URI scheme and dispatches to it; backends know nothing of
manifests or publishing, only of single objects and prefixes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

#: bytes per read/write when streaming a file (and hashing it on the way)
CHUNK = 1 << 20


@runtime_checkable
class StoreBackend(Protocol):
    """Single-object operations on the URIs of one scheme. Missing objects raise ``NotFound``."""

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write the whole object at once: readers see the old or the new bytes, never a mix."""

    def get_with_etag(self, uri: str) -> tuple[bytes, str]: ...

    def put_if_absent(self, uri: str, data: bytes) -> str:
        """Create only if absent; the new ETag; ``PreconditionFailed`` when it exists."""

    def put_if_match(self, uri: str, data: bytes, etag: str) -> str:
        """Replace only if the ETag is still ``etag``; the new ETag; ``PreconditionFailed`` otherwise."""

    def upload_file(self, local_path: str, uri: str) -> None: ...

    def download_file(self, uri: str, local_path: str, digest: bool = False) -> str | None:
        """Copy the object to a local file (temp file + rename); with ``digest`` the sha256 of its bytes."""

    def exists(self, uri: str) -> bool: ...

    def folder_exists(self, uri: str) -> bool:
        """Whether the folder ``uri`` exists (on S3: its bucket)."""

    def check_writable(self, uri: str) -> None:
        """``InputError`` when nothing can be written below the folder ``uri`` (a missing bucket, an
        existing file, no permission); a store that does not answer raises ``StoreError``."""

    def list_prefix(self, uri: str) -> list[str]:
        """Relative names ('/' separators) of every object below the folder ``uri``, sorted."""

    def delete(self, uri: str) -> None:
        """Delete one object; a missing object is not an error."""

    def delete_prefix(self, uri: str) -> None: ...

    def copy(self, src: str, dst: str) -> None:
        """Copy one object within this backend (server-side where the backend can)."""

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """(pyarrow filesystem, path) for ``uri``."""

    def local_path(self, uri: str) -> Path | None:
        """The local path of ``uri`` when the backend stores it on this machine's filesystem, else None."""


def file_chunks(f: BinaryIO) -> Iterator[bytes]:
    """The content of an open binary file, ``CHUNK`` bytes at a time."""
    return iter(lambda: f.read(CHUNK), b"")


def write_chunks(chunks: Iterable[bytes], dst: BinaryIO, digest: bool = False) -> str | None:
    """Write ``chunks`` to ``dst``; with ``digest`` the sha256 of the bytes written (no second read).

    Hashing is opt-in: on a fast link it costs as much CPU as the transfer itself.
    """
    h = hashlib.sha256() if digest else None
    for chunk in chunks:
        if h is not None:
            h.update(chunk)
        dst.write(chunk)
    return h.hexdigest() if h is not None else None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in file_chunks(f):
            h.update(chunk)
    return h.hexdigest()
