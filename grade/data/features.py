"""Raw search logs (long-format Parquet) -> validated, split, standardised request tensors.

Two streaming passes over the same record batches (memory bounded by the batch and shard sizes,
plus a few numbers per request, never by the number of rows):

1. **scan**: check the schema of every file and every row (vectorised per batch), and keep per
   request only its id, time, length and sums (log-prediction sums, first-row user features).
   From those: the time boundaries of the train/valid/test split and the standardisation
   statistics and vocabularies, all fitted on the train requests only; they define the
   :class:`grade.data.transform.FeatureTransform` that turns raw values into model inputs.
2. **write**: read the batches again and scatter each request into a fixed-size shard buffer of its
   split; a full buffer becomes ``<split>/part-NNNNN.safetensors``. Bad requests (``skip`` mode)
   go to ``quarantine.parquet`` with a reason.

The output format is the "Feature tensors" contract of ``docs/architecture.md``; ``docs/features.md``
describes it for users. Batches are request-aligned: a request cut by a batch boundary is carried
over to the next batch, so every check and every scatter sees whole requests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grade.core import config as config_mod
from grade.core import store
from grade.core.config import ranged
from grade.core.errors import ConfigError, InputError
from grade.core.progress import Progress
from grade.data.transform import PRED_EPS, FeatureTransform, log_predictions

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
_TIME_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_MASK63 = np.uint64((1 << 63) - 1)


@dataclasses.dataclass
class FeaturesConfig:
    valid_fraction: float = ranged(0.15, "[0, 1)")
    """share of requests (by event_time quantile) in the validation split, after train"""
    test_fraction: float = ranged(0.15, "[0, 1)")
    """share of requests (the latest ones by event_time) in the test split"""
    shard_requests: int = ranged(8192, "[1, 1e7]")
    """requests per safetensors shard (the last shard of a split may hold fewer)"""
    on_bad_rows: Literal["fail", "skip"] = "fail"
    """fail: bad input exits with status 2; skip: bad requests go to quarantine.parquet"""
    batch_rows: int = ranged(262_144, "[1, 1e8]", retired=True)
    """Parquet rows read per record batch (bounds memory together with shard_requests)"""
    max_vocab: int = ranged(100_000, "[1, 1e8]")
    """largest vocabulary per categorical feature (the most frequent train values are kept)"""
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["ctr", "cvr", "gmv"])
    """objectives the logs must predict, a pred_<name> column each (other pred_ columns are ignored)"""
    clip_quantile: float = ranged(0.001, "[0, 0.5)")
    """q: u_ features are clipped to [a - w, b + w], a/b the train q/1-q quantiles, w = b - a"""
    max_list_size: int = ranged(512, "[1, 10000]")
    """longest list kept: a longer request keeps its rows of the smallest logged positions"""

    def validate(self) -> None:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"features.valid_fraction + test_fraction: must be < 1 (train needs "
                              f"requests), got {self.valid_fraction} + {self.test_fraction}")
        bad = [o for o in self.objectives if not re.fullmatch(r"[A-Za-z0-9_]+", o)]
        if not self.objectives or bad or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"features.objectives: expected a non-empty list of distinct names (letters, "
                              f"digits, '_'), got {self.objectives}")


# --------------------------------------------------------------------------------------------
# Input discovery and schema
# --------------------------------------------------------------------------------------------

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

    @property
    def pred_columns(self) -> list[str]:
        return [f"pred_{k}" for k in self.objectives]

    def used_columns(self) -> list[str]:
        cols = list(REQUIRED_COLUMNS) + self.pred_columns + self.numeric + self.categorical + self.truth_rows
        return cols + ([TRUTH_SEGMENT_COLUMN] if self.has_segment else [])

    def ground_truth(self) -> list[str]:
        return self.truth_rows + (["segment"] if self.has_segment else [])


def _kind(t: pa.DataType) -> str:
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


def _expected_kinds(name: str) -> tuple[set[str], str]:
    """Accepted type kinds of a column and how to say so in a message."""
    if name == "request_id":
        return {"int", "string"}, "int64 or string"
    if name == "event_time":
        return {"timestamp"}, "a timestamp"
    if name in ("click", "order"):
        return {"int", "bool"}, "an integer 0/1 (int8)"
    if name in ("user_id", "item_id", "position", TRUTH_SEGMENT_COLUMN) or name.startswith("c_"):
        return {"int"}, "an integer"
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
        request_id_is_string=_kind(schema.field("request_id").type) == "string",
    )
    for col in found.used_columns():
        kinds, words = _expected_kinds(col)
        t = schema.field(col).type
        if _kind(t) not in kinds:
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


# --------------------------------------------------------------------------------------------
# Request ids
# --------------------------------------------------------------------------------------------

_FNV_PRIME = 0x100000001B3


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arithmetic wraps mod 2**64)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


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
        h = _mix64(h ^ (lengths * np.uint64(0x9E3779B97F4A7C15)))
    return (h & _MASK63).view(np.int64)


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


# --------------------------------------------------------------------------------------------
# Request-aligned batches
# --------------------------------------------------------------------------------------------

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
                yield Batch(t.slice(0, cut), keys[:cut], file_index, rows[:cut], *_gather(orphans))
                orphans = []
            carry, carry_keys, carry_rows = t.slice(cut), keys[cut:], rows[cut:]
        if (carry is not None and carry.num_rows) or orphans:
            assert carry is not None
            yield Batch(carry, carry_keys, file_index, carry_rows, *_gather(orphans))


def _gather(orphans: list[tuple[pa.Table, np.ndarray]]) -> tuple[pa.Table | None, np.ndarray]:
    if not orphans:
        return None, np.zeros(0, np.int64)
    return pa.concat_tables([t for t, _ in orphans]), np.concatenate([r for _, r in orphans])


# --------------------------------------------------------------------------------------------
# Validation (vectorised per batch)
# --------------------------------------------------------------------------------------------

def _column(table: pa.Table, name: str, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(values as numpy ``dtype`` with nulls filled by 0, null mask or None)."""
    col = table.column(name)
    nulls = None
    if col.null_count:
        nulls = col.is_null().to_numpy(zero_copy_only=False)
        col = col.fill_null(pa.scalar(False if pa.types.is_boolean(col.type) else 0, col.type))
    if pa.types.is_timestamp(col.type):
        values = col.cast(pa.int64()).to_numpy() * _TIME_UNIT_NS[col.type.unit]
    else:
        values = col.to_numpy()
    return np.asarray(values, dtype=dtype), nulls


@dataclasses.dataclass
class Rule:
    """One row-level check: the rows it flags in a batch, the column it names, and what was expected."""

    column: str
    expectation: str
    bad: np.ndarray
    values: np.ndarray | None = None

    def message(self, i: int) -> str:
        got = "" if self.values is None else f", got {self.values[i].item()!r}"
        return f"{self.expectation}{got}"


def _check_rows(b: Batch, ls: LogSchema, starts: np.ndarray, lengths: np.ndarray) -> tuple[dict, list[Rule]]:
    """Numpy columns of a batch and the rules that flag at least one row."""
    t = b.table
    cols: dict[str, np.ndarray] = {}
    rules: list[Rule] = []

    def add(col, expectation, bad, values=None):
        if bad is not None and bad.any():
            rules.append(Rule(col, expectation, bad, values))

    specs = [("event_time", np.int64), ("item_id", np.int64), ("position", np.int64),
             ("click", np.float32), ("order", np.float32), ("gmv", np.float32)]
    specs += [(c, np.float32) for c in ls.pred_columns + ls.numeric + ls.truth_rows]
    specs += [(c, np.int64) for c in ls.categorical + ([TRUTH_SEGMENT_COLUMN] if ls.has_segment else [])]
    for name in ("request_id", "user_id"):
        if t.column(name).null_count:
            add(name, "expected a value, got null", t.column(name).is_null().to_numpy(zero_copy_only=False))
    for name, dtype in specs:
        cols[name], nulls = _column(t, name, dtype)
        add(name, "expected a value, got null", nulls)
    for c in ls.pred_columns:
        p = cols[c]
        add(c, "expected a finite prediction > 0", ~(np.isfinite(p) & (p > 0)), p)
    for c in ("click", "order"):
        v = cols[c]
        add(c, "expected 0 or 1", (v != 0) & (v != 1), v)
    add("order", "expected no order without a click (click = 0, order = 1)",
        (cols["order"] == 1) & (cols["click"] == 0), cols["order"])
    gmv = cols["gmv"]
    add("gmv", "expected a finite value >= 0", ~(np.isfinite(gmv) & (gmv >= 0)), gmv)
    add("gmv", "expected gmv = 0 without an order", (gmv > 0) & (cols["order"] == 0), gmv)
    add("position", "expected a position >= 0", cols["position"] < 0, cols["position"])
    for c in ls.numeric:
        add(c, "expected a finite number", ~np.isfinite(cols[c]), cols[c])
    for c in ls.truth_rows:  # ground truth goes into the valid/test tensors as it is
        add(c, "expected a finite number >= 0", ~(np.isfinite(cols[c]) & (cols[c] >= 0)), cols[c])
    if ls.has_segment:
        add(TRUTH_SEGMENT_COLUMN, "expected a segment >= 0", cols[TRUTH_SEGMENT_COLUMN] < 0,
            cols[TRUTH_SEGMENT_COLUMN])
    add("item_id", "expected each (request_id, item_id) once; this item repeats in its request",
        _repeats_in_request(cols["item_id"], starts, lengths), cols["item_id"])
    # the position orders the list (and decides which rows a truncated list keeps): one row each
    add("position", "expected each (request_id, position) once; this position repeats in its request",
        _repeats_in_request(cols["position"], starts, lengths), cols["position"])
    add("event_time", "expected a time between 1677 and 2262 (int64 nanoseconds since the epoch)",
        _beyond_ns_range(t.column("event_time")))
    # the request's time decides its split: its rows must agree on it
    time = cols["event_time"]
    add("event_time", "expected one event_time per request; this row's differs from the request's first row",
        time != np.repeat(time[starts], lengths), time)
    return cols, rules


def _beyond_ns_range(column: pa.ChunkedArray) -> np.ndarray | None:
    """Rows of a coarser-than-ns timestamp column whose time in ns would overflow int64 (None: no such
    rows possible)."""
    unit = _TIME_UNIT_NS[column.type.unit]
    if unit == 1:
        return None
    raw = np.asarray(column.cast(pa.int64()).fill_null(0).to_numpy(), dtype=np.int64)
    limit = np.iinfo(np.int64).max // unit
    return (raw > limit) | (raw < -limit)


def _repeats_in_request(items: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """Rows whose value already appeared earlier in the same request (None when there are none)."""
    n = len(items)
    run = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    lo, hi = (int(items.min()), int(items.max())) if n else (0, 0)
    if lo >= 0 and hi < (1 << 40) and len(starts) < (1 << 23):
        # fast exact path: one int64 key per row, a plain sort says whether any pair repeats
        key = np.sort((run << 40) | items)
        if not (key[1:] == key[:-1]).any():
            return None
    order = np.lexsort((np.arange(n), items, run))
    same = (run[order][1:] == run[order][:-1]) & (items[order][1:] == items[order][:-1])
    if not same.any():
        return None
    bad = np.zeros(n, dtype=bool)
    bad[order[1:][same]] = True
    return bad


# --------------------------------------------------------------------------------------------
# Pass 1: scan
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Scan:
    """Per-request facts gathered by pass 1 (one entry per run of rows)."""

    key: np.ndarray
    file: np.ndarray
    row: np.ndarray
    length: np.ndarray
    """rows kept (at most ``max_list_size``)"""
    cut: np.ndarray
    """rows left out by the truncation to ``max_list_size``"""
    time: np.ndarray
    reason: np.ndarray
    log_sum: np.ndarray
    log_sq: np.ndarray
    numeric: np.ndarray
    categorical: np.ndarray


NULL_ID_REASON = "column 'request_id': expected a value, got null"


def truncate_lists(position: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_len: int
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows kept or None when all are, kept lengths) of runs ``starts``/``lengths`` of rows: a run
    longer than ``max_len`` keeps its rows of the ``max_len`` smallest ``position`` values, in their
    logged order. Per request, so both passes cut the same rows whatever the batches."""
    long = np.flatnonzero(lengths > max_len)
    if not len(long):
        return None, lengths
    keep = np.ones(len(position), dtype=bool)
    for r in long:  # rare, and each one holds more than max_len rows
        s, n = int(starts[r]), int(lengths[r])
        keep[s + np.argsort(position[s:s + n], kind="stable")[max_len:]] = False
    return keep, np.minimum(lengths, max_len)


def _reason_codes(rules: list[Rule], starts: np.ndarray, lengths: np.ndarray, reasons: list[str]
                  ) -> np.ndarray:
    """Per run, 1 + the index in ``reasons`` of the first rule that flags one of its rows (0: none);
    ``reasons`` grows by the texts it has not seen."""
    reason = np.zeros(len(starts), dtype=np.int16)
    run_of_row = np.repeat(np.arange(len(starts)), lengths)
    for r in rules:
        text = f"column '{r.column}': {r.expectation}"
        if text not in reasons:
            reasons.append(text)
        flagged = np.zeros(len(starts), dtype=bool)
        flagged[run_of_row[r.bad]] = True
        reason[flagged & (reason == 0)] = reasons.index(text) + 1
    return reason


def _scan(files: list[str], fs, paths: list[str], ls: LogSchema, cfg: FeaturesConfig,
          reasons: list[str], total_rows: int) -> tuple[Scan, int]:
    """The per-request facts of every file and the number of rows without a request_id."""
    columns = ls.used_columns()
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in dataclasses.fields(Scan)}
    rate = Progress("scan", total_rows, "rows", every_s=5, logger=log)
    n_orphans = 0
    for fi, path in enumerate(paths):
        for b in aligned_batches(fs, path, fi, columns, cfg.batch_rows, set_apart_null_ids=True):
            rate.add(b.table.num_rows + len(b.orphan_rows))
            if len(b.orphan_rows) and cfg.on_bad_rows == "fail":
                raise InputError("expected a value, got null", file=files[fi], column="request_id",
                                 row=int(b.orphan_rows[0]))
            n_orphans += len(b.orphan_rows)
            if not b.table.num_rows:
                continue
            starts, lengths = b.runs()
            cols, rules = _check_rows(b, ls, starts, lengths)
            if rules and cfg.on_bad_rows == "fail":
                r = rules[0]
                i = int(np.flatnonzero(r.bad)[0])
                rid = b.table.column("request_id")[i].as_py()
                raise InputError(f"{r.message(i)} (request_id {rid!r})", file=files[fi],
                                 column=r.column, row=int(b.rows[i]))
            keep, kept = truncate_lists(cols["position"], starts, lengths, cfg.max_list_size)
            logp = log_predictions(np.stack([cols[c] for c in ls.pred_columns], axis=1), np.float64)
            kept_starts = starts if keep is None else _run_starts(kept)
            logp = logp if keep is None else logp[keep]
            parts["key"].append(b.keys[starts])
            parts["file"].append(np.full(len(starts), fi, dtype=np.int32))
            parts["row"].append(b.rows[starts])
            parts["length"].append(kept.astype(np.int32))
            parts["cut"].append((lengths - kept).astype(np.int32))
            parts["time"].append(cols["event_time"][starts])
            parts["reason"].append(_reason_codes(rules, starts, lengths, reasons))
            parts["log_sum"].append(np.add.reduceat(logp, kept_starts, axis=0))
            parts["log_sq"].append(np.add.reduceat(logp * logp, kept_starts, axis=0))
            parts["numeric"].append(np.stack([cols[c][starts] for c in ls.numeric], axis=1).astype(np.float64)
                                    if ls.numeric else np.zeros((len(starts), 0)))
            parts["categorical"].append(np.stack([cols[c][starts] for c in ls.categorical], axis=1)
                                        if ls.categorical else np.zeros((len(starts), 0), np.int64))
    seconds = rate.finish()
    log.info("scan: %d rows in %.1fs", rate.done, seconds)
    if rate.done == 0:
        raise InputError("empty input: the log files hold no rows", file=files[0] if files else None)
    k, u, c = len(ls.objectives), len(ls.numeric), len(ls.categorical)
    empty = {"log_sum": (0, k), "log_sq": (0, k), "numeric": (0, u), "categorical": (0, c)}
    scan = Scan(**{name: np.concatenate(v) if v else np.zeros(empty.get(name, (0,)))
                   for name, v in parts.items()})
    return scan, n_orphans


def _check_contiguous(scan: Scan, files: list[str], cfg: FeaturesConfig, reasons: list[str]) -> None:
    """A request key may form only one run of rows in the whole input."""
    order = np.argsort(scan.key, kind="stable")
    sk = scan.key[order]
    again = np.flatnonzero(sk[1:] == sk[:-1]) + 1
    if not len(again):
        return
    if cfg.on_bad_rows == "fail":
        second = int(order[again].min())
        first = int(order[np.searchsorted(sk, scan.key[second])])
        raise InputError(
            f"expected the rows of a request to be contiguous in one file; this request_id (key "
            f"{scan.key[second]}) already had rows at {files[scan.file[first]]} row {scan.row[first]}",
            file=files[scan.file[second]], column="request_id", row=int(scan.row[second]))
    text = "column 'request_id': expected the rows of a request to be contiguous in one file"
    if text not in reasons:
        reasons.append(text)
    repeated = np.isin(scan.key, sk[again])
    scan.reason[repeated & (scan.reason == 0)] = reasons.index(text) + 1


# --------------------------------------------------------------------------------------------
# Split and statistics (fitted on train)
# --------------------------------------------------------------------------------------------

def split_boundaries(times: np.ndarray, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(valid_start, test_start) in ns: train is t < valid_start, valid is valid_start <= t < test_start,
    test is t >= test_start. Quantiles of the request times; requests at equal times stay together."""
    s = np.sort(times)
    n = len(s)
    n_test = int(round(n * test_fraction))
    n_valid = int(round(n * valid_fraction))
    never = np.iinfo(np.int64).max
    n_train = n - n_valid - n_test
    valid_start = int(s[n_train]) if n_valid + n_test > 0 else never
    test_start = int(s[n_train + n_valid]) if n_test > 0 else never
    return valid_start, test_start


def _iso(ns: int | None) -> str | None:
    if ns is None or ns == np.iinfo(np.int64).max:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc).isoformat()


def _fit_vocab(values: np.ndarray, max_vocab: int) -> np.ndarray:
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) > max_vocab:
        keep = np.lexsort((uniq, -counts))[:max_vocab]  # most frequent, ties by value
        uniq = np.sort(uniq[keep])
    return uniq


def clip_bounds(values: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(low [U], high [U]) float64 of train values [N, U]: [a - w, b + w] with a, b the q and 1 - q
    quantiles (the nearest values inside, so one extreme value never moves them) and w = b - a.

    Far enough out that clean data keep (nearly) every value, near enough that one 1e30 cannot
    blow the standard deviation up and squash every other request onto one standardised value.
    """
    if not len(values):
        return np.full(values.shape[1], -np.inf), np.full(values.shape[1], np.inf)
    a = np.quantile(values, q, axis=0, method="higher")
    b = np.quantile(values, 1.0 - q, axis=0, method="lower")
    a, b = np.minimum(a, b), np.maximum(a, b)  # a handful of values: the two indices may cross
    return a - (b - a), b + (b - a)


def _fit(scan: Scan, split_of: np.ndarray, ls: LogSchema, cfg: FeaturesConfig
         ) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """(the fitted statistics of the spec, {u_ column: {split: values clipped}} for the columns with
    clipped values); ``split_of``: split index of each request, -1 for a bad one."""
    train = split_of == 0
    n_items = float(scan.length[train].sum())
    mean = scan.log_sum[train].sum(axis=0) / n_items
    var = np.maximum(scan.log_sq[train].sum(axis=0) / n_items - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-12, std, 1.0)  # a constant signal stays 0 after centring
    low, high = clip_bounds(scan.numeric[train], cfg.clip_quantile)
    num = np.clip(scan.numeric[train], low, high)
    num_mean, num_std = num.mean(axis=0), num.std(axis=0)
    num_std = np.where(num_std > 1e-12, num_std, 1.0)
    outside = (scan.numeric < low) | (scan.numeric > high)
    clipped = {name: {split: int(outside[split_of == si, j].sum()) for si, split in enumerate(SPLITS)}
               for j, name in enumerate(ls.numeric) if outside[split_of >= 0, j].any()}
    if clipped:
        log.warning("u_ feature values outside their clip bounds (clipped): %s", clipped)
    vocabs = [_fit_vocab(scan.categorical[train, j], cfg.max_vocab) for j in range(len(ls.categorical))]
    fitted = {
        "pred_log_mean": [float(x) for x in mean],
        "pred_log_std": [float(x) for x in std],
        "numeric": [{"name": n, "mean": float(m), "std": float(s), "clip": [float(lo), float(hi)]}
                    for n, m, s, lo, hi in zip(ls.numeric, num_mean, num_std, low, high, strict=True)],
        "categorical": [{"name": n, "vocab": [int(v) for v in voc], "size": len(voc) + 1}
                        for n, voc in zip(ls.categorical, vocabs, strict=True)],
    }
    return fitted, clipped


# --------------------------------------------------------------------------------------------
# Pass 2: shards
# --------------------------------------------------------------------------------------------

class ShardWriter:
    """Fixed-size shard buffers of one split, filled request by request, written when full."""

    def __init__(self, root: Path, split: str, capacity: int, list_size: int, k: int, u: int, c: int,
                 truth_rows: list[str], has_segment: bool):
        self.root, self.split, self.capacity, self.L = root, split, capacity, list_size
        n, L = capacity, list_size
        self.row_fields = {"z": ((n, L, k), np.float32, 0), "pred": ((n, L, k), np.float32, 0),
                           "mask": ((n, L), np.bool_, False), "click": ((n, L), np.float32, 0),
                           "order": ((n, L), np.float32, 0), "gmv": ((n, L), np.float32, 0),
                           "position": ((n, L), np.int64, -1)}
        for name in truth_rows:
            self.row_fields[name] = ((n, L), np.float32, 0)
        self.req_fields = {"num": ((n, u), np.float32, 0), "cat": ((n, c), np.int64, 0),
                           "event_time": ((n,), np.int64, 0), "request_id": ((n,), np.int64, 0)}
        if has_segment:
            self.req_fields["segment"] = ((n,), np.int64, 0)
        self.buf = {name: np.full(shape, fill, dtype=dtype)
                    for name, (shape, dtype, fill) in {**self.row_fields, **self.req_fields}.items()}
        self.cursor = 0
        self.shards: list[str] = []
        self.sizes: list[int] = []
        self.n_rows = 0
        self.time_min: int | None = None
        self.time_max: int | None = None

    def add(self, req: dict[str, np.ndarray], rows: dict[str, np.ndarray], lengths: np.ndarray) -> None:
        """Append requests: ``req`` fields [m, ...], ``rows`` fields [sum(lengths), ...] in request order."""
        m = len(lengths)
        if not m:
            return
        t = req["event_time"]
        self.time_min = int(t.min()) if self.time_min is None else min(self.time_min, int(t.min()))
        self.time_max = int(t.max()) if self.time_max is None else max(self.time_max, int(t.max()))
        self.n_rows += int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        req_of_row = np.repeat(np.arange(m), lengths)
        pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        i = 0
        while i < m:
            take = min(self.capacity - self.cursor, m - i)
            r0, r1 = offsets[i], offsets[i + take]
            flat = (self.cursor + req_of_row[r0:r1] - i) * self.L + pos[r0:r1]
            for name in self.row_fields:
                target = self.buf[name]
                target.reshape((self.capacity * self.L,) + target.shape[2:])[flat] = rows[name][r0:r1]
            for name in self.req_fields:
                self.buf[name][self.cursor:self.cursor + take] = req[name][i:i + take]
            self.cursor += take
            i += take
            if self.cursor == self.capacity:
                self.flush()

    def flush(self) -> None:
        if not self.cursor:
            return
        from safetensors.numpy import save_file

        rel = f"{self.split}/part-{len(self.shards):05d}.safetensors"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        n = self.cursor
        save_file({name: np.ascontiguousarray(a[:n]) for name, a in self.buf.items()}, str(path),
                  # one key only: safetensors writes metadata in hash-map order, which varies per run
                  metadata={"grade_features_format": str(FORMAT_VERSION)})
        for name, (_, _, fill) in {**self.row_fields, **self.req_fields}.items():
            self.buf[name][:n] = fill
        self.shards.append(rel)
        self.sizes.append(n)
        self.cursor = 0

    def summary(self) -> dict[str, Any]:
        return {"n_requests": int(sum(self.sizes)), "n_rows": self.n_rows, "shards": self.shards,
                "shard_requests": self.sizes, "time_min": self.time_min, "time_max": self.time_max,
                "time_min_iso": _iso(self.time_min), "time_max_iso": _iso(self.time_max)}


class _Quarantine:
    """The used columns of bad requests' rows, with the reason, the source file and the row in it.

    One schema for every file, from the log schema alone (request_id as in the logs, event_time as
    UTC ns, other numbers int64 or float64): files may differ in their integer widths, time units or
    ignored columns and still share one quarantine file.
    """

    def __init__(self, path: Path, ls: LogSchema):
        def canonical(name: str) -> pa.DataType:
            if name == "request_id":
                return pa.string() if ls.request_id_is_string else pa.int64()
            if name == "event_time":
                return pa.timestamp("ns", tz="UTC")
            return pa.float64() if "float" in _expected_kinds(name)[0] else pa.int64()

        self.schema = pa.schema([pa.field(n, canonical(n)) for n in ls.used_columns()]
                                + [("reason", pa.string()), ("source_file", pa.string()),
                                   ("source_row", pa.int64())])
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.n_rows = 0

    def add(self, table: pa.Table, reason: np.ndarray, file_uri: str, rows: np.ndarray) -> None:
        columns = []
        for field in self.schema:
            if field.name == "reason":
                columns.append(pa.array(reason, pa.string()))
            elif field.name == "source_file":
                columns.append(pa.array([file_uri] * len(rows), pa.string()))
            elif field.name == "source_row":
                columns.append(pa.array(rows, pa.int64()))
            else:
                columns.append(_cast_kept(table.column(field.name), field.type))
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.n_rows += len(rows)

    def close(self) -> None:
        self.writer.close()


def _cast_kept(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """``column`` as ``target``; a value the cast cannot keep exactly (a bad row's, e.g. a time out of
    the ns range) is cast anyway: the quarantine shows bad rows, it never fails on them."""
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column.cast(target, safe=False)


def _write(files, fs, paths, ls: LogSchema, cfg: FeaturesConfig, staging: Path, fitted: dict,
           boundaries: np.ndarray, list_size: int, bad_keys: np.ndarray, bad_reason: np.ndarray,
           total_rows: int, quarantine: bool) -> dict[str, ShardWriter]:
    k, u, c = len(ls.objectives), len(ls.numeric), len(ls.categorical)
    writers = {s: ShardWriter(staging, s, cfg.shard_requests, list_size, k, u, c,
                              [] if s == "train" else ls.truth_rows, s != "train" and ls.has_segment)
               for s in SPLITS}
    sink = _Quarantine(staging / QUARANTINE_FILE, ls) if quarantine else None
    transform = FeatureTransform.from_spec({"objectives": ls.objectives, **fitted})
    rate = Progress("write", total_rows, "rows", every_s=5, logger=log)
    try:
        for fi, path in enumerate(paths):
            for b in aligned_batches(fs, path, fi, ls.used_columns(), cfg.batch_rows,
                                     set_apart_null_ids=True):
                rate.add(b.table.num_rows + len(b.orphan_rows))
                if b.orphans is not None:
                    sink.add(b.orphans, np.full(len(b.orphan_rows), NULL_ID_REASON, object), files[fi],
                             b.orphan_rows)
                t, starts, lengths, run_keys = _drop_bad_requests(b, files[fi], bad_keys, bad_reason, sink)
                if len(starts):
                    keep, lengths = truncate_lists(_column(t, "position", np.int64)[0], starts, lengths,
                                                   cfg.max_list_size)
                    if keep is not None:
                        t, starts = t.filter(pa.array(keep)), _run_starts(lengths)
                    _emit(t, starts, lengths, run_keys, ls, writers, boundaries, transform)
        for w in writers.values():
            w.flush()
    finally:
        if sink is not None:
            sink.close()
    seconds = rate.finish()
    log.info("write: %d rows in %.1fs", rate.done, seconds)
    return writers


def _drop_bad_requests(b: Batch, file_uri: str, bad_keys: np.ndarray, bad_reason: np.ndarray,
                       sink: _Quarantine | None) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """(table, run starts, run lengths, run keys) of the batch's good requests; the rows of its bad
    ones (keys in sorted ``bad_keys``) go to the quarantine with their reason."""
    starts, lengths = b.runs()
    run_keys = b.keys[starts]
    if not len(bad_keys):
        return b.table, starts, lengths, run_keys
    idx = np.minimum(np.searchsorted(bad_keys, run_keys), len(bad_keys) - 1)
    bad = bad_keys[idx] == run_keys
    if not bad.any():
        return b.table, starts, lengths, run_keys
    rows_bad = np.repeat(bad, lengths)
    sink.add(b.table.filter(pa.array(rows_bad)), np.repeat(bad_reason[idx[bad]], lengths[bad]), file_uri,
             b.rows[rows_bad])
    lengths = lengths[~bad]
    return b.table.filter(pa.array(~rows_bad)), _run_starts(lengths), lengths, run_keys[~bad]


def _run_starts(lengths: np.ndarray) -> np.ndarray:
    """Start row of each run of contiguous runs of ``lengths`` rows."""
    return (np.cumsum(lengths) - lengths).astype(np.int64)


def _emit(t: pa.Table, starts, lengths, run_keys, ls: LogSchema, writers, boundaries,
          transform: FeatureTransform) -> None:
    """Tensors of the good requests of one batch, handed to their split's writer."""
    def col(name, dtype):
        return _column(t, name, dtype)[0]

    times = col("event_time", np.int64)[starts]
    split_of = np.searchsorted(boundaries, times, side="right")
    pred = transform.stack_predictions({p: col(p, np.float32) for p in ls.pred_columns})
    rows = {"pred": pred,
            "z": transform.z(pred),
            "mask": np.ones(len(pred), dtype=np.bool_),
            "click": col("click", np.float32), "order": col("order", np.float32),
            "gmv": col("gmv", np.float32), "position": col("position", np.int64)}
    for name in ls.truth_rows:
        rows[name] = col(name, np.float32)
    values = {n: col(n, np.float32)[starts] for n in ls.numeric}
    values.update({n: col(n, np.int64)[starts] for n in ls.categorical})
    num, cat = transform.request_features(values, len(starts))
    req = {"event_time": times, "request_id": run_keys, "num": num, "cat": cat}
    if ls.has_segment:
        req["segment"] = col(TRUTH_SEGMENT_COLUMN, np.int64)[starts]
    for si, split in enumerate(SPLITS):
        sel = split_of == si
        if not sel.any():
            continue
        w = writers[split]
        if sel.all():
            w.add({n: req[n] for n in w.req_fields}, {n: rows[n] for n in w.row_fields}, lengths)
            continue
        row_sel = np.repeat(sel, lengths)
        w.add({n: req[n][sel] for n in w.req_fields}, {n: rows[n][row_sel] for n in w.row_fields},
              lengths[sel])


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def _open_inputs(logs_uri: str | list[str], objectives: list[str]
                 ) -> tuple[list[str], Any, list[str], LogSchema, int]:
    files = list_log_files(logs_uri)
    if not files:
        raise InputError("empty input: no *.parquet files found", file=str(logs_uri))
    fs, _ = store.arrow_filesystem(files[0])
    paths = [store.arrow_filesystem(f)[1] for f in files]
    ls: LogSchema | None = None
    total = 0
    for uri, path in zip(files, paths, strict=True):
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                schema, n = pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"not a readable Parquet file ({e})", file=uri) from None
        ls = read_log_schema(uri, schema, objectives, ls)
        total += n
    assert ls is not None
    ignored = sorted(n for n in schema.names if n.startswith("pred_") and n not in ls.pred_columns)
    if ignored:
        log.warning("prediction column(s) %s ignored: not among features.objectives %s", ignored, objectives)
    return files, fs, paths, ls, total


def check_against_model(ls: LogSchema, model_spec: Mapping[str, Any], model: str, logs: str) -> None:
    """InputError unless a model's feature spec reads the objectives and u_/c_ columns these logs give
    (same names, same order): features it could not score must not be built silently."""
    for what, mine, theirs in (
            ("objectives", ls.pred_columns, [f"pred_{o}" for o in model_spec["objectives"]]),
            ("numeric features", ls.numeric, [c["name"] for c in model_spec["numeric"]]),
            ("categorical features", ls.categorical, [c["name"] for c in model_spec["categorical"]])):
        if list(mine) != list(theirs):
            differing = sorted(set(mine) ^ set(theirs)) or list(mine)
            raise InputError(f"{what} differ from the model {model}: it reads {list(theirs)}, these logs "
                             f"give {list(mine)}", file=logs, column=differing[0])


def _bad_requests(scan: Scan, reasons: list[str], n_orphans: int
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(sorted keys of the bad requests, their reasons, the quarantine counts of the spec)."""
    good = scan.reason == 0
    bad_order = np.argsort(scan.key[~good], kind="stable")
    bad_keys_all = scan.key[~good][bad_order]
    first = np.concatenate([[True], bad_keys_all[1:] != bad_keys_all[:-1]]) if len(bad_keys_all) else \
        np.zeros(0, bool)
    bad_keys = bad_keys_all[first]
    bad_codes = scan.reason[~good][bad_order][first]
    bad_reason = np.array([reasons[cd - 1] for cd in range(1, len(reasons) + 1)] or [""], dtype=object)
    bad_reason = bad_reason[np.maximum(bad_codes - 1, 0)] if len(bad_codes) else bad_reason[:0]
    counts = {r: int((bad_codes == i + 1).sum()) for i, r in enumerate(reasons) if (bad_codes == i + 1).any()}
    if n_orphans:  # rows of no request: counted as rows
        counts[NULL_ID_REASON] = n_orphans
    quarantined = bool(len(bad_keys) or n_orphans)
    summary = {"n_requests": int(len(bad_keys)),
               "n_rows": int(scan.length[~good].sum() + scan.cut[~good].sum()) + n_orphans,
               "reasons": counts, "file": QUARANTINE_FILE if quarantined else None}
    if quarantined:
        log.warning("quarantined %d request(s) (%d rows): %s", summary["n_requests"], summary["n_rows"],
                    counts)
    return bad_keys, bad_reason, summary


def extract_features(logs_uri: str | list[str], out_uri: str, cfg: FeaturesConfig | None = None,
                     model: tuple[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Validate the logs at ``logs_uri`` and publish feature tensors + spec at ``out_uri``.

    Returns the feature spec. Raises :class:`InputError` on bad input (``on_bad_rows="fail"``),
    before anything is published. ``model``: (name, feature spec) of a model the features must fit
    (e.g. the production model), checked before the logs are scanned.
    """
    cfg = cfg or FeaturesConfig()
    config_mod.check(cfg)
    log.info("features config: %s", config_mod.to_dict(cfg))
    files, fs, paths, ls, total_rows = _open_inputs(logs_uri, cfg.objectives)
    log.info("%d log file(s), %d rows; objectives %s, %d numeric, %d categorical feature(s)",
             len(files), total_rows, ls.objectives, len(ls.numeric), len(ls.categorical))
    if model is not None:
        check_against_model(ls, model[1], model[0], files[0])
    reasons: list[str] = []
    scan, n_orphans = _scan(files, fs, paths, ls, cfg, reasons, total_rows)
    _check_contiguous(scan, files, cfg, reasons)
    bad_keys, bad_reason, quarantine_counts = _bad_requests(scan, reasons, n_orphans)
    good = scan.reason == 0
    if not good.any():
        counts = quarantine_counts["reasons"]
        top = max(counts, key=counts.get)  # every reason reads "column '<name>': <expectation>"
        raise InputError(f"no valid request left after quarantining bad ones: {counts}", file=str(logs_uri),
                         column=top.split("'")[1])

    valid_start, test_start = split_boundaries(scan.time[good], cfg.valid_fraction, cfg.test_fraction)
    boundaries = np.array([valid_start, test_start], dtype=np.int64)
    split_of = np.where(good, np.searchsorted(boundaries, scan.time, side="right"), -1)
    wanted = {"train": True, "valid": cfg.valid_fraction > 0, "test": cfg.test_fraction > 0}
    for si, split in enumerate(SPLITS):
        if wanted[split] and not (split_of == si).any():
            raise InputError(f"cannot split {int(good.sum())} request(s) by event_time: split '{split}' "
                             "would be empty (too few requests or distinct event times)",
                             file=str(logs_uri), column="event_time")
    fitted, clipped = _fit(scan, split_of, ls, cfg)
    truncated = {"n_requests": int((scan.cut[good] > 0).sum()), "n_rows": int(scan.cut[good].sum()),
                 "max_list_size": cfg.max_list_size}
    if truncated["n_requests"]:
        log.warning("truncated %d request(s) longer than max_list_size %d (%d rows left out)",
                    truncated["n_requests"], cfg.max_list_size, truncated["n_rows"])
    list_size = int(scan.length[good].max())
    del scan

    with store.publishing(out_uri) as staging:
        writers = _write(files, fs, paths, ls, cfg, staging, fitted, boundaries, list_size, bad_keys,
                         bad_reason, total_rows, quarantine_counts["file"] is not None)
        spec = {
            "format_version": FORMAT_VERSION,
            "objectives": ls.objectives,
            "pred_columns": ls.pred_columns,
            "pred_eps": PRED_EPS,
            **fitted,
            "numeric_clipped": clipped,
            "list_size": list_size,
            "truncated": truncated,
            "splits": {s: w.summary() for s, w in writers.items()},
            "split_boundaries": {"valid_start": valid_start, "test_start": test_start,
                                 "valid_start_iso": _iso(valid_start), "test_start_iso": _iso(test_start)},
            "ground_truth": ls.ground_truth(),
            "request_id": {"source_type": "string" if ls.request_id_is_string else "int64",
                           "hashed": ls.request_id_is_string},
            "input": {"uri": str(logs_uri), "files": len(files), "n_rows": total_rows},
            "quarantine": quarantine_counts,
            "config": config_mod.to_dict(cfg),
        }
        store.write_json(str(staging / SPEC_FILE), spec)
    log.info("published %s: %s", out_uri,
             ", ".join(f"{s} {spec['splits'][s]['n_requests']} requests" for s in SPLITS))
    return spec
