"""Latency of the TorchScript serving policy (features -> weights) and of fused ranking.

Batch 1 (one request, the online path) and batch 1024 (batch scoring), median and p99 over many calls.
The reference in the same process is the eager (non-scripted) module on the same inputs.

    python -m benchmarks.inference [--calls 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import emit
from grade.data.fusion import fuse, top_e
from grade.model.policy import PolicyConfig, PolicyNet, export_torchscript, load_torchscript


def _latencies(fn, calls: int) -> dict[str, float]:
    for _ in range(min(50, calls)):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return {"median_ms": float(np.median(out) * 1e3), "p99_ms": float(np.quantile(out, 0.99) * 1e3)}


def run(calls: int = 2000, list_size: int = 50) -> dict:
    torch.manual_seed(0)
    cfg = PolicyConfig(n_numeric=6, cat_sizes=[4, 9, 13], n_objectives=3)
    model = PolicyNet(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy.pt"
        export_torchscript(model, path)
        scripted = load_torchscript(path)
    results = {}
    with torch.inference_mode():
        for batch in (1, 1024):
            num = torch.randn(batch, cfg.n_numeric)
            cat = torch.randint(0, 4, (batch, len(cfg.cat_sizes)))
            z = torch.randn(batch, list_size, cfg.n_objectives)
            n = calls if batch == 1 else max(50, calls // 20)
            scripted_lat = _latencies(lambda num=num, cat=cat: scripted(num, cat), n)
            eager_lat = _latencies(lambda num=num, cat=cat: model.mean_weights(num, cat), n)
            w = scripted(num, cat)
            rank_lat = _latencies(lambda z=z, w=w: top_e(fuse(z, w), 10), n)
            results[f"batch_{batch}"] = {
                "scripted_policy": scripted_lat,
                "eager_policy": eager_lat,
                "scripted_vs_eager_median": scripted_lat["median_ms"] / eager_lat["median_ms"],
                "fuse_and_top10": rank_lat,
                "requests_per_s_scripted": batch / (scripted_lat["median_ms"] / 1e3),
                "calls": n,
            }
    return {"list_size": list_size, **results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="timed calls at batch 1 (batch 1024: calls/20)")
    args = p.parse_args()
    emit("inference", run(args.calls))


if __name__ == "__main__":
    main()
