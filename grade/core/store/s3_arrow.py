"""Parquet reads of S3 objects through the S3 backend, so that pyarrow's reads are retried like any other.

pyarrow's own ``S3FileSystem`` retries with the AWS SDK's policy, and a connection lost while it reads
a footer or a column chunk surfaces as an ``OSError`` that readers cannot tell from a corrupt file.
Here every read pyarrow makes (the footer, each column chunk) is one ranged GET of
:meth:`grade.core.store.s3.S3Backend.read_range`: retried with the store's policy and budget, and a
failure that outlasts it is a :class:`grade.core.errors.StoreError` (exit 1), raised through pyarrow
unchanged.

The filesystem is read-only: outputs are written to a local staging folder and published through
:mod:`grade.core.store`.
"""

from __future__ import annotations

import io
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from grade.core.errors import NotFound

#: bytes fetched at least per GET: small neighbouring reads (a footer, short column chunks) share one request
READ_AHEAD = 1 << 20


class S3Backend(Protocol):
    """What the readers need of :class:`grade.core.store.s3.S3Backend` (each call retried there)."""

    def size(self, uri: str) -> int: ...

    def read_range(self, uri: str, offset: int, length: int) -> bytes: ...

    def list_prefix(self, uri: str) -> list[str]: ...


class S3ObjectReader(io.RawIOBase):
    """A seekable, read-only file over one S3 object; each read outside the buffer is a retried ranged GET."""

    def __init__(self, backend: S3Backend, uri: str):
        super().__init__()
        self.backend, self.uri = backend, uri
        self.size = backend.size(uri)
        self.pos = 0
        self._buf_start, self._buf = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if not (self._buf_start <= self.pos and end <= self._buf_start + len(self._buf)):
            length = min(self.size - self.pos, max(end - self.pos, READ_AHEAD))
            self._buf_start, self._buf = self.pos, self.backend.read_range(self.uri, self.pos, length)
        out = self._buf[self.pos - self._buf_start:end - self._buf_start]
        self.pos = end
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class S3ReadHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over an :class:`~grade.core.store.s3.S3Backend`; paths are
    ``bucket/key``."""

    def __init__(self, backend: S3Backend):
        self.backend = backend

    def _uri(self, path: str) -> str:
        return "s3://" + path.lstrip("/")

    def get_type_name(self) -> str:
        return "grade-s3"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other) -> bool:
        return isinstance(other, S3ReadHandler) and other.backend is self.backend

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            try:
                infos.append(pafs.FileInfo(path, pafs.FileType.File, size=self.backend.size(self._uri(path))))
            except NotFound:
                kind = pafs.FileType.Directory if self.backend.list_prefix(self._uri(path)) else \
                    pafs.FileType.NotFound
                infos.append(pafs.FileInfo(path, kind))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir.rstrip("/")
        names = self.backend.list_prefix(self._uri(base))
        if not selector.recursive:
            names = [n for n in names if "/" not in n]
        return self.get_file_info([f"{base}/{n}" for n in names])

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(S3ObjectReader(self.backend, self._uri(path)), mode="r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def _read_only(self, *args, **kwargs):
        raise NotImplementedError("the S3 arrow filesystem is read-only: "
                                  "publish outputs through grade.core.store")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def arrow_filesystem(backend: S3Backend) -> pafs.PyFileSystem:
    """The read-only pyarrow filesystem of ``backend``'s objects (paths ``bucket/key``)."""
    return pafs.PyFileSystem(S3ReadHandler(backend))
