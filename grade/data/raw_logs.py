"""Reading raw search logs: the files, their schema and request-aligned record batches.

The first step of :func:`grade.data.features.extract_features`: which Parquet files make the logs, which
columns they must carry (``REQUIRED_COLUMNS``, one ``pred_<objective>`` per objective, ``u_*``/``c_*``
features), the 63-bit request keys (string ids hashed) and batches that never cut a request.
"""


from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade.core import store
from grade.core.errors import InputError

log = logging.getLogger("grade.data.features")


SPEC_FILE = "feature_spec.json"


QUARANTINE_FILE = "quarantine.parquet"


FORMAT_VERSION = 1


SPLITS = ("train", "valid", "test")


#: the canonical order of the last axis of ``z`` / ``pred``; other objectives follow, sorted
KNOWN_OBJECTIVES = ("ctr", "cvr", "gmv", "rel")


#: per-item ground-truth columns carried into valid/test only
TRUTH_ROW_COLUMNS = ("true_ctr", "true_cvr", "price")


TRUTH_SEGMENT_COLUMN = "true_segment"


REQUIRED_COLUMNS = ("request_id", "user_id", "event_time", "item_id", "position", "click", "order", "gmv")


#: optional columns of logs served by a model (docs/input_contract.md): the served weights, one per
#: declared objective, their log-density under the logging policy (null: served the policy's mean, or
#: not known) and the version that served the request
SERVED_PREFIX = "served_w_"
PROPENSITY_COLUMN = "served_log_propensity"
MODEL_VERSION_COLUMN = "model_version"

TIME_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


MASK63 = np.uint64((1 << 63) - 1)


def list_log_files(logs_uri: str | list[str]) -> list[str]:
    """The Parquet file URIs of a log folder: the manifest's files when there is one, else every
    ``*.parquet`` below the prefix (hidden ``.``/``_`` names skipped), sorted. A list of folders
    (a data window's partitions) gives their files in the list's order."""
    if isinstance(logs_uri, list):
        return [f for uri in logs_uri for f in list_log_files(uri)]
    logs_uri = str(logs_uri)
    if logs_uri.endswith(".parquet") and store.exists(logs_uri):
        return [logs_uri]
    if store.is_published(logs_uri):
        names = sorted(store.read_manifest(logs_uri)["files"])
    else:
        names = [n for n in store.list_prefix(logs_uri)
                 if not any(part.startswith((".", "_")) for part in n.split("/"))]
    return [store.join(logs_uri, n) for n in names if n.endswith(".parquet")]


def objective_order(names: list[str]) -> list[str]:
    """ctr, cvr, gmv, rel when present, then any other objective sorted by name."""
    known = [k for k in KNOWN_OBJECTIVES if k in names]
    return known + sorted(set(names) - set(known))


@dataclasses.dataclass
class LogSchema:
    """The columns found in the logs and how they map to tensors."""

    objectives: list[str]
    numeric: list[str]
    categorical: list[str]
    truth_rows: list[str]
    has_segment: bool
    request_id_is_string: bool
    served: bool = False
    """the logs carry served_w_<objective> for every objective"""
    has_propensity: bool = False
    has_model_version: bool = False

    @property
    def pred_columns(self) -> list[str]:
        return [f"pred_{k}" for k in self.objectives]

    @property
    def served_columns(self) -> list[str]:
        return [f"{SERVED_PREFIX}{k}" for k in self.objectives] if self.served else []

    def used_columns(self) -> list[str]:
        cols = list(REQUIRED_COLUMNS) + self.pred_columns + self.numeric + self.categorical + self.truth_rows
        cols += self.served_columns + ([PROPENSITY_COLUMN] if self.has_propensity else [])
        cols += [MODEL_VERSION_COLUMN] if self.has_model_version else []
        return cols + ([TRUTH_SEGMENT_COLUMN] if self.has_segment else [])

    def ground_truth(self) -> list[str]:
        return self.truth_rows + (["segment"] if self.has_segment else [])


def kind_of(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)


def expected_kinds(name: str) -> tuple[set[str], str]:
    """Accepted type kinds of a column and how to say so in a message."""
    if name == "request_id":
        return {"int", "string"}, "int64 or string"
    if name == "event_time":
        return {"timestamp"}, "a timestamp"
    if name in ("click", "order"):
        return {"int", "bool"}, "an integer 0/1 (int8)"
    if name in ("user_id", "item_id", "position", TRUTH_SEGMENT_COLUMN) or name.startswith("c_"):
        return {"int"}, "an integer"
    if name == MODEL_VERSION_COLUMN:
        return {"string"}, "a string"
    return {"float", "int"}, "a number (float32)"


def read_log_schema(file_uri: str, schema: pa.Schema, objectives: list[str],
                    expected: LogSchema | None = None) -> LogSchema:
    """Check one file's Arrow schema against the declared ``objectives``; the first file fixes the
    other columns, later files must match."""
    names = schema.names
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise InputError(f"missing column; the log contract requires {list(REQUIRED_COLUMNS)} "
                             "and a pred_<objective> per declared objective", file=file_uri, column=col)
    for name in objective_order(objectives):
        if f"pred_{name}" not in names:
            raise InputError(f"missing prediction column: features.objectives declares '{name}' "
                             f"(declared: {list(objectives)})", file=file_uri, column=f"pred_{name}")
    found = LogSchema(
        objectives=objective_order(objectives),
        numeric=sorted(n for n in names if n.startswith("u_")),
        categorical=sorted(n for n in names if n.startswith("c_")),
        truth_rows=[n for n in TRUTH_ROW_COLUMNS if n in names],
        has_segment=TRUTH_SEGMENT_COLUMN in names,
        request_id_is_string=kind_of(schema.field("request_id").type) == "string",
        **served_columns_found(file_uri, names, objective_order(objectives)),
    )
    for col in found.used_columns():
        kinds, words = expected_kinds(col)
        t = schema.field(col).type
        if kind_of(t) not in kinds:
            raise InputError(f"wrong type {t}: expected {words}", file=file_uri, column=col)
    if expected is not None:
        mine, theirs = set(found.used_columns()), set(expected.used_columns())
        for col in sorted(mine ^ theirs):
            where = "missing here" if col in theirs else "not in the first file"
            raise InputError(f"column set differs between files ({where}); every file needs the same "
                             "pred_/u_/c_/ground-truth columns", file=file_uri, column=col)
        if found.request_id_is_string != expected.request_id_is_string:
            raise InputError("request_id type differs from the first file", file=file_uri,
                             column="request_id")
    return found


def served_columns_found(file_uri: str, names: list[str], objectives: list[str]) -> dict[str, bool]:
    """Which optional served columns a file has (LogSchema's ``served``, ``has_propensity``,
    ``has_model_version``): served weights come for every declared objective or not at all, and a
    log-propensity only with them (it is the density of those weights)."""
    served = [n for n in names if n.startswith(SERVED_PREFIX)]
    expected = [f"{SERVED_PREFIX}{k}" for k in objectives]
    for name in served:
        if name not in expected:
            raise InputError(f"served weights of an objective features.objectives does not declare "
                             f"(declared: {objectives})", file=file_uri, column=name)
    if served:
        for name in expected:
            if name not in served:
                raise InputError(f"missing column: served weights come for every declared objective "
                                 f"({expected})", file=file_uri, column=name)
    if PROPENSITY_COLUMN in names and not served:
        raise InputError(f"a log-propensity without the weights it is the density of: expected "
                         f"{expected} too", file=file_uri, column=PROPENSITY_COLUMN)
    return {"served": bool(served), "has_propensity": PROPENSITY_COLUMN in names,
            "has_model_version": MODEL_VERSION_COLUMN in names}


_FNV_PRIME = 0x100000001B3
# mix64's constants as uint64 (numba, compiling it, turns a uint64 combined with a plain int into a float)
_MIX_A, _MIX_B = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arithmetic wraps mod 2**64) of a uint64 array; the same function,
    compiled, finalises one value in exploration's draws (grade.model.explore_kernels)."""
    h = h ^ (h >> _S30)
    h = h * _MIX_A
    h = h ^ (h >> _S27)
    h = h * _MIX_B
    return h ^ (h >> _S31)


def hash_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A stable 63-bit non-negative int64 hash of each string, vectorised over the byte buffer.

    h = mix(sum_j (b_j + 1) * P**(n-1-j) + n * golden), computed for all strings at once as
    P**(end-1) * sum_j (b_j + 1) * P**(-j) over the concatenated bytes (P odd, so invertible mod 2**64).
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.large_string())
    values = values.cast(pa.large_binary())
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset:values.offset + n + 1]
    data_buf = values.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]].astype(np.uint64) + np.uint64(1)
    rel = offsets - offsets[0]
    total = len(data)
    with np.errstate(over="ignore"):
        inv_pows = np.full(max(total, 1), pow(_FNV_PRIME, -1, 1 << 64), dtype=np.uint64)
        inv_pows[0] = 1
        np.cumprod(inv_pows, out=inv_pows)
        pows = np.full(max(total, 1), _FNV_PRIME, dtype=np.uint64)
        pows[0] = 1
        np.cumprod(pows, out=pows)
        csum = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum(data * inv_pows[:total], out=csum[1:])
        sums = csum[rel[1:]] - csum[rel[:-1]]
        lengths = (rel[1:] - rel[:-1]).astype(np.uint64)
        h = sums * pows[np.maximum(rel[1:] - 1, 0)]
        h = mix64(h ^ (lengths * np.uint64(0x9E3779B97F4A7C15)))
    return (h & MASK63).view(np.int64)


def request_keys(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 request key per row: the id itself, or the stable 63-bit hash of a string id.

    Strings are hashed once per run of equal adjacent values (a request's rows are contiguous).
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if column.null_count:  # reported by the row checks; any key keeps the batching going
            column = column.fill_null(0)
        return np.asarray(column.to_numpy(), dtype=np.int64)
    if column.null_count:
        column = column.fill_null("")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    n = len(column)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    changed = pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(changed) + 1])
    hashed = hash_strings(column.take(pa.array(starts)))
    return np.repeat(hashed, np.diff(np.append(starts, n)))


@dataclasses.dataclass
class Batch:
    """Whole requests from one file: the Arrow rows, their keys and their row numbers in the file.

    ``orphans``: rows without a request_id (they belong to no request) met since the previous batch,
    with their row numbers; only when :func:`aligned_batches` is asked to set them apart.
    """

    table: pa.Table
    keys: np.ndarray
    file_index: int
    rows: np.ndarray
    orphans: pa.Table | None = None
    orphan_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each run of equal request keys."""
        n = len(self.keys)
        if not n:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.flatnonzero(self.keys[1:] != self.keys[:-1]) + 1])
        return starts, np.diff(np.append(starts, n))


def aligned_batches(fs, path: str, file_index: int, columns: list[str] | None,
                    batch_rows: int, set_apart_null_ids: bool = False) -> Iterator[Batch]:
    """Whole-request batches of about ``batch_rows`` rows of one Parquet file (``columns``: all when None).

    ``fs``/``path`` as from :func:`grade.core.store.arrow_filesystem`; a request cut by a record batch
    boundary is carried over to the next batch. With ``set_apart_null_ids``, rows whose request_id
    is null leave the table for ``Batch.orphans``: they cannot split or join the requests around them.
    """
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        carry: pa.Table | None = None
        carry_keys = carry_rows = np.zeros(0, dtype=np.int64)
        orphans: list[tuple[pa.Table, np.ndarray]] = []
        next_row = 0
        for rb in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True):
            t = pa.Table.from_batches([rb])
            rows = np.arange(next_row, next_row + t.num_rows, dtype=np.int64)
            next_row += t.num_rows
            if set_apart_null_ids and t.column("request_id").null_count:
                null = t.column("request_id").is_null().to_numpy(zero_copy_only=False)
                orphans.append((t.filter(pa.array(null)), rows[null]))
                t, rows = t.filter(pa.array(~null)), rows[~null]
            if carry is not None and carry.num_rows:
                t, rows = pa.concat_tables([carry, t]), np.concatenate([carry_rows, rows])
            keys = request_keys(t.column("request_id"))
            boundaries = np.flatnonzero(keys[1:] != keys[:-1])
            cut = int(boundaries[-1]) + 1 if len(boundaries) else 0
            if cut:
                yield Batch(t.slice(0, cut), keys[:cut], file_index, rows[:cut], *gather_rows(orphans))
                orphans = []
            carry, carry_keys, carry_rows = t.slice(cut), keys[cut:], rows[cut:]
        if (carry is not None and carry.num_rows) or orphans:
            assert carry is not None
            yield Batch(carry, carry_keys, file_index, carry_rows, *gather_rows(orphans))


def gather_rows(orphans: list[tuple[pa.Table, np.ndarray]]) -> tuple[pa.Table | None, np.ndarray]:
    if not orphans:
        return None, np.zeros(0, np.int64)
    return pa.concat_tables([t for t, _ in orphans]), np.concatenate([r for _, r in orphans])


def column_of(table: pa.Table, name: str, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(values as numpy ``dtype`` with nulls filled by 0, null mask or None)."""
    col = table.column(name)
    nulls = None
    if col.null_count:
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        col = col.fill_null(pa.scalar(False if pa.types.is_boolean(col.type) else 0, col.type))
    if pa.types.is_timestamp(col.type):
        values = col.cast(pa.int64()).to_numpy() * TIME_UNIT_NS[col.type.unit]
    else:
        values = col.to_numpy()
    return np.asarray(values, dtype=dtype), nulls


def run_starts(lengths: np.ndarray) -> np.ndarray:
    """Start row of each run of contiguous runs of ``lengths`` rows."""
    return (np.cumsum(lengths) - lengths).astype(np.int64)
