"""Fitting the feature transform on the train requests and writing the request shards.

The second pass of :func:`grade.data.features.extract_features`: the time boundaries of the splits,
the standardisation statistics, clip bounds and vocabularies (train only), then every request
scattered into a fixed-size buffer of its split, written as ``<split>/part-NNNNN.safetensors``; bad
requests go to ``quarantine.parquet``.
"""


from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade.core.progress import Progress
from grade.data.log_checks import NULL_ID_REASON, Scan, truncate_lists
from grade.data.raw_logs import (
    FORMAT_VERSION,
    MODEL_VERSION_COLUMN,
    PROPENSITY_COLUMN,
    QUARANTINE_FILE,
    SPLITS,
    TRUTH_SEGMENT_COLUMN,
    Batch,
    LogSchema,
    aligned_batches,
    column_of,
    expected_kinds,
    hash_strings,
    run_starts,
)
from grade.data.transform import FeatureTransform

if TYPE_CHECKING:
    from grade.data.features import FeaturesConfig

log = logging.getLogger("grade.data.features")


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


def iso_time(ns: int | None) -> str | None:
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


def fit_statistics(scan: Scan, split_of: np.ndarray, ls: LogSchema, cfg: FeaturesConfig
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


class ShardWriter:
    """Fixed-size shard buffers of one split, filled request by request, written when full."""

    def __init__(self, root: Path, split: str, capacity: int, list_size: int, k: int, u: int, c: int,
                 truth_rows: list[str], has_segment: bool, served: tuple[str, ...] = ()):
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
        served_shapes = {SERVED_W: ((n, k), np.float32, 0), PROPENSITY_COLUMN: ((n,), np.float32, np.nan),
                         MODEL_VERSION_COLUMN: ((n,), np.int64, -1)}
        self.req_fields.update({name: served_shapes[name] for name in served})
        self.model_versions: dict[str, str] = {}
        """hash (as text) -> name of the model versions met (the model_version tensor holds the hash)"""
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
        out = {"n_requests": int(sum(self.sizes)), "n_rows": self.n_rows, "shards": self.shards,
               "shard_requests": self.sizes, "time_min": self.time_min, "time_max": self.time_max,
               "time_min_iso": iso_time(self.time_min), "time_max_iso": iso_time(self.time_max)}
        served = [n for n in SERVED_FIELDS if n in self.req_fields]
        if served:
            out["served_fields"] = served
        if MODEL_VERSION_COLUMN in self.req_fields:
            out["model_versions"] = dict(sorted(self.model_versions.items()))
        return out


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
            if name == MODEL_VERSION_COLUMN:
                return pa.string()
            return pa.float64() if "float" in expected_kinds(name)[0] else pa.int64()

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


def write_shards(files, fs, paths, ls: LogSchema, cfg: FeaturesConfig, staging: Path, fitted: dict,
           boundaries: np.ndarray, list_size: int, bad_keys: np.ndarray, bad_reason: np.ndarray,
           total_rows: int, quarantine: bool) -> dict[str, ShardWriter]:
    k, u, c = len(ls.objectives), len(ls.numeric), len(ls.categorical)
    writers = {s: ShardWriter(staging, s, cfg.shard_requests, list_size, k, u, c,
                              [] if s == "train" else ls.truth_rows, s != "train" and ls.has_segment,
                              served_fields(ls))
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
                    keep, lengths = truncate_lists(column_of(t, "position", np.int64)[0], starts, lengths,
                                                   cfg.max_list_size)
                    if keep is not None:
                        t, starts = t.filter(pa.array(keep)), run_starts(lengths)
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
    return b.table.filter(pa.array(~rows_bad)), run_starts(lengths), lengths, run_keys[~bad]


#: the request tensors of the log contract's optional served columns (docs/input_contract.md)
SERVED_W = "served_w"
SERVED_FIELDS = (SERVED_W, PROPENSITY_COLUMN, MODEL_VERSION_COLUMN)


def served_fields(ls: LogSchema) -> tuple[str, ...]:
    """The served request tensors the logs' columns give: served_w [N, K] float32,
    served_log_propensity [N] float32 (NaN: null), model_version [N] int64 (a stable hash; -1: null)."""
    present = (ls.served, ls.has_propensity, ls.has_model_version)
    return tuple(name for name, here in zip(SERVED_FIELDS, present, strict=True) if here)


def _served(t: pa.Table, starts: np.ndarray, ls: LogSchema, req: dict[str, np.ndarray]) -> dict[str, str]:
    """Adds the served request tensors of a batch's requests to ``req``; the model versions met
    (hash as text -> name)."""
    if ls.served:
        req[SERVED_W] = np.stack([column_of(t, c, np.float32)[0][starts] for c in ls.served_columns], axis=1)
    if ls.has_propensity:
        values, nulls = column_of(t, PROPENSITY_COLUMN, np.float32)
        req[PROPENSITY_COLUMN] = np.where(nulls[starts], np.nan, values[starts]).astype(np.float32) \
            if nulls is not None else values[starts]
    if not ls.has_model_version:
        return {}
    names = t.column(MODEL_VERSION_COLUMN).take(pa.array(starts))
    hashed = np.where(names.is_null().to_numpy(zero_copy_only=False), -1, hash_strings(names.fill_null("")))
    req[MODEL_VERSION_COLUMN] = hashed.astype(np.int64)
    return {str(h): n for h, n in zip(hashed.tolist(), names.to_pylist(), strict=True) if n is not None}


def _emit(t: pa.Table, starts, lengths, run_keys, ls: LogSchema, writers, boundaries,
          transform: FeatureTransform) -> None:
    """Tensors of the good requests of one batch, handed to their split's writer."""
    def col(name, dtype):
        return column_of(t, name, dtype)[0]

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
    versions = _served(t, starts, ls, req)
    for w in writers.values():
        w.model_versions.update(versions)
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
