"""Batch scoring with a trained policy: requests in log format -> fused scores and ranks.

For each request the serving policy (the TorchScript export when present) maps the request's
user/context features to weights w [K]; each candidate's score is S_i = sum_k w_k z_ik with z the
standardised log-predictions. Raw values become model inputs through the model's
:class:`grade.data.transform.FeatureTransform`, the one feature extraction wrote the training shards with.
Work is row-wise and vectorised: the request's weights are broadcast to its rows and ranks come from
one sort per record batch; lists are never padded. Input files are streamed in request-aligned record batches.

With exploration on (config ``serve.explore``), a share of the requests are scored with weights drawn
from the policy's Dirichlet, seeded by the request key (the id, or the stable hash of a string id: the
key the features step gives the request), as serving draws them (grade.model.exploration); the output
then carries the log contract's ``served_log_propensity`` and ``model_version`` beside ``w_<objective>``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from grade.core import store
from grade.core.errors import InputError
from grade.data.raw_logs import aligned_batches, list_log_files
from grade.data.transform import FeatureTransform, repeated_key
from grade.model.exploration import ExploreConfig, explore

log = logging.getLogger("grade.release.scoring")


class ServingModel:
    """The weights function of a model folder or registry version: (num, cat) -> weights [B, K].

    Only a published folder is read, every file checked against its manifest (a folder without one,
    or with a file changed since it was published, exits 2 naming it).
    """

    def __init__(self, uri: str, exploring: ExploreConfig | None = None):
        from grade.model.policy import TORCHSCRIPT_FILE, load_policy, load_torchscript, published_model

        self.uri = uri
        self.exploring = exploring if exploring is not None and exploring.share > 0 else None
        self.version = str(store.read_manifest(uri).get("version") or uri)
        with published_model(uri) as folder:
            root = folder / "model" if (folder / "model" / "feature_spec.json").is_file() else folder
            try:
                self.spec = json.loads((root / "feature_spec.json").read_bytes())
            except FileNotFoundError:
                raise InputError(f"{uri}: not a model folder (no feature_spec.json)") from None
            self.transform = FeatureTransform.from_spec(self.spec)
            if (folder / TORCHSCRIPT_FILE).is_file():   # a registry version's serving export
                self.fn = load_torchscript(folder / TORCHSCRIPT_FILE)
                self.kind = "torchscript"
                self.dirichlet = getattr(self.fn, "dirichlet", None)
                self.alpha_floor = float(self.fn.alpha_floor()) if self.dirichlet is not None else None
            else:
                self.fn = load_policy(root)
                self.kind = "eager"
                self.dirichlet, self.alpha_floor = self.fn, self.fn.alpha_floor
        if self.exploring is not None and self.dirichlet is None:
            raise InputError(f"{uri}: serve.explore.share is {self.exploring.share} but this version's "
                             "TorchScript export has no Dirichlet to draw from (published before "
                             "exploration); score it with serve.explore.share 0")

    @torch.inference_mode()
    def weights(self, num: np.ndarray, cat: np.ndarray, keys: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """(weights [R, K], log-propensities [R] or None without exploration) of R requests, whose
        request keys [R] seed exploration's draws."""
        tn, tc = torch.from_numpy(num), torch.from_numpy(cat)
        if self.exploring is None:
            out = self.fn(tn, tc)
            return (out[0] if isinstance(out, tuple) else out).numpy(), None
        mu, kappa = self.dirichlet(tn, tc)
        served = explore(mu.numpy(), kappa.numpy(), self.alpha_floor, keys, self.exploring, self.version)
        return served.weights, served.log_propensity


def _columns(t: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    """Numpy values of the named columns (nulls become NaN or None: refused by the transform)."""
    return {c: t[c].to_numpy(zero_copy_only=False) for c in names}


def _check_request_ids(t: pa.Table, where: str, row0: int) -> None:
    """InputError unless every row has an integer or string request_id."""
    col = t["request_id"]
    if not (pa.types.is_integer(col.type) or pa.types.is_string(col.type)
            or pa.types.is_large_string(col.type)):
        raise InputError(f"wrong type {col.type}: expected int64 or string", file=where, column="request_id")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError("expected a value, got null", file=where, column="request_id", row=row0 + row)


def score_batch(model: ServingModel, t: pa.Table, keys: np.ndarray, where: str, row0: int = 0) -> pa.Table:
    """Scores and 0-based ranks for one request-aligned table of rows (``row0``: its first row's number
    in the file ``where``, for error messages). Every row's inputs are checked by the transform."""
    transform = model.transform
    missing = transform.missing(t.column_names) + ([] if "request_id" in t.column_names else ["request_id"])
    if missing:
        raise InputError(f"{where}: missing column(s) {missing} required by the model's feature spec")
    _check_request_ids(t, where, row0)
    rows = row0 + np.arange(t.num_rows)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    run = np.cumsum(np.r_[False, keys[1:] != keys[:-1]])              # request index of every row
    # every row's request features are checked (a request's later rows must not hide a NaN); the
    # request's first row gives its values
    num, cat = transform.request_features(_columns(t, [*transform.numeric, *transform.categorical]),
                                          t.num_rows, where=where, rows=rows)
    w, log_p = model.weights(num[starts], cat[starts], keys[starts])    # [R, K], [R]
    z = transform.z(transform.stack_predictions(_columns(t, transform.pred_columns), where=where, rows=rows))
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
    if log_p is not None:
        cols["served_log_propensity"] = pa.array(log_p[run], pa.float32(), from_pandas=True)  # NaN -> null
        cols["model_version"] = pa.array(np.full(len(score), model.version, dtype=object), pa.string())
    return pa.table(cols)


class _RequestRuns:
    """Where each run of equal request keys starts (file, row): a request must form exactly one run."""

    def __init__(self, files: list[str]):
        self.files = files
        self.keys: list[np.ndarray] = []
        self.where: list[np.ndarray] = []

    def add(self, keys: np.ndarray, file_index: int, row0: int) -> int:
        """Record the runs of a batch's ``keys`` [n]; their number."""
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys.append(keys[starts])
        self.where.append(np.stack([np.full(len(starts), file_index), row0 + starts], axis=1))
        return len(starts)

    def check(self) -> None:
        """InputError naming the first run of a request that already had rows elsewhere."""
        if not self.keys:
            return
        keys, where = np.concatenate(self.keys), np.concatenate(self.where)
        repeat = repeated_key(keys)
        if repeat is not None:
            first, second = (where[i] for i in repeat)
            raise InputError(f"expected the rows of a request to be contiguous in one file; this request "
                             f"already had rows at {self.files[first[0]]} row {first[1]}",
                             file=self.files[second[0]], column="request_id", row=int(second[1]))


def score_requests(model_uri: str, requests_uri: str, out_uri: str,
                   batch_rows: int = 262_144, exploring: ExploreConfig | None = None) -> dict[str, Any]:
    """Score every request of ``requests_uri`` (log-format Parquet) and publish the scores to ``out_uri``
    (exploring as ``exploring`` says; None: the policy's mean)."""
    model = ServingModel(model_uri, exploring)
    files = list_log_files(requests_uri)
    if not files:
        raise InputError(f"{requests_uri}: no Parquet files to score")
    t0 = time.monotonic()
    rows = requests = 0
    runs = _RequestRuns(files)
    with store.publishing(out_uri, extra={"model": model_uri, "requests": requests_uri}) as staging:
        for i, uri in enumerate(files):
            fs, path = store.arrow_filesystem(uri)
            writer = None
            try:
                for b in aligned_batches(fs, path, i, None, batch_rows):
                    row0 = int(b.rows[0]) if len(b.rows) else 0   # contiguous: null ids are not set apart
                    out = score_batch(model, b.table, b.keys, uri, row0)
                    if writer is None:
                        writer = pq.ParquetWriter(staging / f"part-{i:05d}.parquet", out.schema,
                                                  compression="zstd")
                    writer.write_table(out)
                    rows += out.num_rows
                    requests += runs.add(b.keys, i, row0)
            finally:
                if writer is not None:
                    writer.close()
            log.info("score: %s (%d rows so far, %.0f rows/s)", uri, rows,
                     rows / max(time.monotonic() - t0, 1e-9))
        runs.check()  # before anything is published: a request split in two runs was ranked twice
    seconds = time.monotonic() - t0
    return {"out": out_uri, "rows": rows, "requests": requests, "seconds": seconds, "model_kind": model.kind,
            "rows_per_s": rows / max(seconds, 1e-9)}
