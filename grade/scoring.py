"""Batch scoring with a trained policy: requests in log format -> fused scores and ranks.

For each request the serving policy (the TorchScript export when present) maps the request's
user/context features to weights w [K]; each candidate's score is S_i = sum_k w_k z_ik with z the
standardised log-predictions. Raw values become model inputs through the model's
:class:`grade.transform.FeatureTransform`, the one feature extraction wrote the training shards with.
Work is row-wise and vectorised: the request's weights are broadcast to its rows and ranks come from
one sort per record batch; lists are never padded. Input files are streamed in request-aligned record batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from grade import store
from grade.errors import InputError
from grade.features import aligned_batches, list_log_files
from grade.transform import FeatureTransform

log = logging.getLogger("grade.scoring")


class ServingModel:
    """The weights function of a model folder or registry version: (num, cat) -> weights [B, K]."""

    def __init__(self, uri: str):
        self.uri = uri
        root = uri
        if store.exists(store.join(uri, "model", "feature_spec.json")):  # a registry version
            root = store.join(uri, "model")
        try:
            self.spec = store.read_json(store.join(root, "feature_spec.json"))
        except store.NotFound:
            raise InputError(f"{uri}: not a model folder (no feature_spec.json)") from None
        self.transform = FeatureTransform.from_spec(self.spec)
        from grade.policy import TORCHSCRIPT_FILE, load_policy, load_torchscript

        ts = store.join(uri, TORCHSCRIPT_FILE)
        if store.exists(ts):
            local = Path(store.open_published(uri)) / TORCHSCRIPT_FILE if store.is_s3(uri) else Path(ts)
            self.fn = load_torchscript(local)
            self.kind = "torchscript"
        else:
            self.fn = load_policy(root)
            self.kind = "eager"

    @torch.inference_mode()
    def weights(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        out = self.fn(torch.from_numpy(num), torch.from_numpy(cat))
        return (out[0] if isinstance(out, tuple) else out).numpy()


def _columns(t: pa.Table, names: list[str], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Numpy values of the named columns (at ``rows`` when given)."""
    out = {c: t[c].to_numpy(zero_copy_only=False) for c in names}
    return out if rows is None else {c: v[rows] for c, v in out.items()}


def score_batch(model: ServingModel, t: pa.Table, keys: np.ndarray, where: str) -> pa.Table:
    """Scores and 0-based ranks for one request-aligned table of rows."""
    transform = model.transform
    missing = transform.missing(t.column_names) + ([] if "request_id" in t.column_names else ["request_id"])
    if missing:
        raise InputError(f"{where}: missing column(s) {missing} required by the model's feature spec")
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    run = np.cumsum(np.r_[False, keys[1:] != keys[:-1]])              # request index of every row
    num, cat = transform.request_features(_columns(t, [*transform.numeric, *transform.categorical], starts),
                                          len(starts))
    w = model.weights(num, cat)                                          # [R, K]
    pred = transform.stack_predictions(_columns(t, transform.pred_columns))
    if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
        row = int(np.flatnonzero(~(np.isfinite(pred) & (pred > 0)).all(-1))[0])
        raise InputError(f"{where}: row {row}: predictions must be finite and > 0")
    z = transform.z(pred)
    score = (w[run] * z).sum(-1).astype(np.float32)
    order = np.lexsort((np.arange(len(score)), -score, run))            # by request, best first, stable
    rank = np.empty(len(score), dtype=np.int32)
    rank[order] = np.arange(len(score)) - starts[run[order]]
    cols = {"request_id": t["request_id"], "score": pa.array(score), "rank": pa.array(rank)}
    if "item_id" in t.column_names:
        cols = {"request_id": t["request_id"], "item_id": t["item_id"], "score": pa.array(score),
                "rank": pa.array(rank)}
    for k, o in enumerate(transform.objectives):
        cols[f"w_{o}"] = pa.array(w[run, k].astype(np.float32))
    return pa.table(cols)


def score_requests(model_uri: str, requests_uri: str, out_uri: str,
                   batch_rows: int = 262_144) -> dict[str, Any]:
    """Score every request of ``requests_uri`` (log-format Parquet) and publish the scores to ``out_uri``."""
    model = ServingModel(model_uri)
    files = list_log_files(requests_uri)
    if not files:
        raise InputError(f"{requests_uri}: no Parquet files to score")
    t0 = time.monotonic()
    rows = requests = 0
    with store.publishing(out_uri, extra={"model": model_uri, "requests": requests_uri}) as staging:
        for i, uri in enumerate(files):
            fs, path = store.arrow_filesystem(uri)
            writer = None
            try:
                for b in aligned_batches(fs, path, i, None, batch_rows):
                    out = score_batch(model, b.table, b.keys, uri)
                    if writer is None:
                        writer = pq.ParquetWriter(staging / f"part-{i:05d}.parquet", out.schema,
                                                  compression="zstd")
                    writer.write_table(out)
                    rows += out.num_rows
                    requests += int(np.count_nonzero(np.r_[True, b.keys[1:] != b.keys[:-1]]))
            finally:
                if writer is not None:
                    writer.close()
            log.info("score: %s (%d rows so far, %.0f rows/s)", uri, rows,
                     rows / max(time.monotonic() - t0, 1e-9))
    seconds = time.monotonic() - t0
    return {"out": out_uri, "rows": rows, "requests": requests, "seconds": seconds, "model_kind": model.kind,
            "rows_per_s": rows / max(seconds, 1e-9)}
