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
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grade.core import config as config_mod
from grade.core import store
from grade.core.config import ranged
from grade.core.errors import ConfigError, InputError
from grade.data.log_checks import bad_requests, check_contiguous, scan_logs
from grade.data.raw_logs import FORMAT_VERSION, SPEC_FILE, SPLITS, LogSchema, list_log_files, read_log_schema
from grade.data.shard_writer import fit_statistics, iso_time, split_boundaries, write_shards
from grade.data.simulator import logged_world
from grade.data.transform import PRED_EPS

log = logging.getLogger("grade.data.features")


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
    scan, n_orphans = scan_logs(files, fs, paths, ls, cfg, reasons, total_rows)
    check_contiguous(scan, files, cfg, reasons)
    bad_keys, bad_reason, quarantine_counts = bad_requests(scan, reasons, n_orphans)
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
    fitted, clipped = fit_statistics(scan, split_of, ls, cfg)
    truncated = {"n_requests": int((scan.cut[good] > 0).sum()), "n_rows": int(scan.cut[good].sum()),
                 "max_list_size": cfg.max_list_size}
    if truncated["n_requests"]:
        log.warning("truncated %d request(s) longer than max_list_size %d (%d rows left out)",
                    truncated["n_requests"], cfg.max_list_size, truncated["n_rows"])
    list_size = int(scan.length[good].max())
    del scan

    with store.publishing(out_uri) as staging:
        writers = write_shards(files, fs, paths, ls, cfg, staging, fitted, boundaries, list_size, bad_keys,
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
                                 "valid_start_iso": iso_time(valid_start),
                                 "test_start_iso": iso_time(test_start)},
            "ground_truth": ls.ground_truth(),
            **logged_world(logs_uri),   # the click model the truth is computed under (simulated logs)
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
