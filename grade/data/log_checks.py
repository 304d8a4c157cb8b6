"""The scan of raw logs: every row checked, every request summed, bad requests found.

The first pass of :func:`grade.data.features.extract_features` (the module docstring there): the row
rules (each names the column and the expectation), the per-request summary :class:`Scan` the split and
the statistics are fitted on, and the verdict on bad requests (exit 2 or quarantine).
"""


from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from grade.core.errors import InputError
from grade.core.progress import Progress
from grade.data.raw_logs import (
    PROPENSITY_COLUMN,
    QUARANTINE_FILE,
    TIME_UNIT_NS,
    TRUTH_SEGMENT_COLUMN,
    Batch,
    LogSchema,
    aligned_batches,
    column_of,
    run_starts,
)
from grade.data.transform import log_predictions

if TYPE_CHECKING:
    from grade.data.features import FeaturesConfig

log = logging.getLogger("grade.data.features")


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
        cols[name], nulls = column_of(t, name, dtype)
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
    if ls.served:
        _check_served(t, ls, starts, lengths, cols, add)
    return cols, rules


#: how far a row of served weights may sum from 1 (float32 weights, written rounded)
SERVED_SUM_ATOL = 1e-3


def _check_served(t: pa.Table, ls: LogSchema, starts, lengths, cols: dict, add) -> None:
    """The rules of the optional served columns: weights on the simplex, a finite log-propensity or
    null, both the same on every row of a request (they were served once per request)."""
    names = ls.served_columns
    for c in names:
        cols[c], nulls = column_of(t, c, np.float32)
        add(c, "expected a value, got null", nulls)
        add(c, "expected a finite weight >= 0", ~(np.isfinite(cols[c]) & (cols[c] >= 0)), cols[c])
    total = np.sum([cols[c].astype(np.float64) for c in names], axis=0)
    add(names[0], f"expected served weights summing to 1 (within {SERVED_SUM_ATOL:g}) over {names}",
        ~(np.abs(total - 1.0) <= SERVED_SUM_ATOL), total)
    if ls.has_propensity:
        cols[PROPENSITY_COLUMN], nulls = column_of(t, PROPENSITY_COLUMN, np.float32)
        nulls = np.zeros(t.num_rows, bool) if nulls is None else nulls
        logp = np.where(nulls, np.nan, cols[PROPENSITY_COLUMN])
        cols[PROPENSITY_COLUMN] = logp.astype(np.float32)
        add(PROPENSITY_COLUMN, "expected a finite log-density or null (served the mean)",
            ~nulls & ~np.isfinite(logp), logp)
        names = [*names, PROPENSITY_COLUMN]
    for c in names:
        first = np.repeat(cols[c][starts], lengths)
        same = (cols[c] == first) | (np.isnan(cols[c]) & np.isnan(first))
        add(c, "expected one value per request; this row's differs from the request's first row", ~same,
            cols[c])


def _beyond_ns_range(column: pa.ChunkedArray) -> np.ndarray | None:
    """Rows of a coarser-than-ns timestamp column whose time in ns would overflow int64 (None: no such
    rows possible)."""
    unit = TIME_UNIT_NS[column.type.unit]
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


def reason_codes(rules: list[Rule], starts: np.ndarray, lengths: np.ndarray, reasons: list[str]
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


def scan_logs(files: list[str], fs, paths: list[str], ls: LogSchema, cfg: FeaturesConfig,
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
            kept_starts = starts if keep is None else run_starts(kept)
            logp = logp if keep is None else logp[keep]
            parts["key"].append(b.keys[starts])
            parts["file"].append(np.full(len(starts), fi, dtype=np.int32))
            parts["row"].append(b.rows[starts])
            parts["length"].append(kept.astype(np.int32))
            parts["cut"].append((lengths - kept).astype(np.int32))
            parts["time"].append(cols["event_time"][starts])
            parts["reason"].append(reason_codes(rules, starts, lengths, reasons))
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


def check_contiguous(scan: Scan, files: list[str], cfg: FeaturesConfig, reasons: list[str]) -> None:
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


def bad_requests(scan: Scan, reasons: list[str], n_orphans: int
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
