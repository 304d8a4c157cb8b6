"""Stage 1 pretraining throughput (requests/s), on synthetic logs run through feature extraction.

Measures whole epochs of ``grade.train.pretrain.pretrain`` (data streaming, LambdaLoss over 3 objectives,
AdamW, validation, checkpoints) and, as the reference in the same process, the loss forward pass alone
over the same train batches.

    python -m benchmarks.pretrain [--requests 20000] [--list 50] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks._common import emit, peak_rss_mib
from grade.data import dataset
from grade.data.features import FeaturesConfig, extract_features
from grade.model.policy import PolicyNet
from grade.train.pretrain import PretrainConfig, multi_objective_loss, policy_config, pretrain, with_signal


def synthetic_logs(n_requests: int, list_size: int, seed: int = 0) -> pd.DataFrame:
    """Search logs whose users fall into two segments that order differently."""
    rng = np.random.default_rng(seed)
    n = n_requests * list_size
    req = np.repeat(np.arange(n_requests), list_size)
    pos = np.tile(np.arange(list_size), n_requests)
    seg = rng.integers(0, 2, n_requests)[req]
    ctr, cvr = rng.uniform(0.02, 0.4, n), rng.uniform(0.02, 0.3, n)
    value = np.exp(rng.uniform(1, 6, n))
    util = np.where(seg == 0, 2 * np.log(ctr) + np.log(cvr), np.log(value) + 0.3 * np.log(ctr))
    util = (util - util.mean()) / util.std()
    p_click = 1 / (1 + np.exp(-(1.5 * util - 2.0)))
    click = (rng.random(n) < p_click).astype(np.int8)
    order = (click * (rng.random(n) < 0.5 * p_click)).astype(np.int8)
    return pd.DataFrame({
        "request_id": req.astype(np.int64) + 1, "user_id": (req % 500).astype(np.int64),
        "event_time": pd.Timestamp("2026-03-01") + pd.to_timedelta(req, unit="s"),
        "u_noise": rng.normal(size=n_requests)[req].astype(np.float32),
        "c_segment": seg.astype(np.int32), "item_id": (req * 100 + pos).astype(np.int64),
        "position": pos.astype(np.int16), "pred_ctr": ctr.astype(np.float32),
        "pred_cvr": cvr.astype(np.float32), "pred_gmv": value.astype(np.float32),
        "click": click, "order": order, "gmv": np.where(order == 1, value, 0).astype(np.float32),
    })


def synthetic_features(folder: str | Path, n_requests: int, list_size: int) -> str:
    """Write :func:`synthetic_logs` under ``folder``/logs and extract them to ``folder``/features."""
    logs = Path(folder, "logs")
    logs.mkdir()
    pq.write_table(pa.Table.from_pandas(synthetic_logs(n_requests, list_size), preserve_index=False),
                   logs / "part-00000.parquet")
    features = str(Path(folder, "features"))
    extract_features(str(logs), features, FeaturesConfig(shard_requests=4096))
    return features


def run(n_requests: int = 20000, list_size: int = 50, epochs: int = 2) -> dict:
    with tempfile.TemporaryDirectory(prefix="grade-bench-pretrain-") as tmp:
        features = synthetic_features(tmp, n_requests, list_size)
        cfg = PretrainConfig(epochs=epochs, patience=epochs + 1)

        t0 = time.perf_counter()
        metrics = pretrain(features, str(Path(tmp, "model")), cfg)
        wall = time.perf_counter() - t0

        # reference: the loss forward pass over the same batches (no backward, no optimiser, no I/O)
        torch.manual_seed(cfg.seed)
        model = PolicyNet(policy_config(dataset.load_spec(features), cfg))
        batches = [with_signal(b, cfg) for b in dataset.iter_batches(
            features, "train", cfg.batch_size, shuffle=True, seed=0, epoch=1,
            fields=["z", "mask", "num", "cat", "click", "order", "gmv"])]
        t1 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                multi_objective_loss(model, b, cfg)
        forward_s = time.perf_counter() - t1

    n_train = metrics["n_train_requests"]
    epoch_rates = [h["requests_per_s"] for h in metrics["epochs"] if h["epoch"] > 0]
    return {
        "requests": n_requests, "list_size": list_size, "train_requests": n_train, "epochs": epochs,
        "batch_size": cfg.batch_size, "weighing_scheme": cfg.weighing_scheme,
        "train_requests_per_s_median": float(np.median(epoch_rates)),
        "wall_s_including_validation_and_publish": wall,
        "end_to_end_requests_per_s": n_train * epochs / wall,
        "forward_only_requests_per_s": n_train / forward_s,
        "ratio_train_vs_forward_only": float(np.median(epoch_rates)) / (n_train / forward_s),
        "valid_ndcg_order": {"policy": metrics["best"]["policy"]["order"],
                             "static": metrics["best"]["static"]["order"]},
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="synthetic requests (all splits)")
    p.add_argument("--list", type=int, default=50, dest="list_size", help="candidates per request")
    p.add_argument("--epochs", type=int, default=2, help="training epochs timed")
    args = p.parse_args(argv)
    emit("pretrain", run(args.requests, args.list_size, args.epochs))


if __name__ == "__main__":
    main()
