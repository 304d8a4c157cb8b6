"""Feature extraction speed and memory against a bare streaming pyarrow scan of the same files.

    python -m benchmarks.features [--rows 10000000] [--logs DIR] [--repeat 3]

Without ``--logs`` a log set with the contract's columns (simulator-like: 50 candidates per
request, 3 objectives, 6 numeric and 3 categorical features, ground truth) is synthesised with
numpy into a temporary folder, day-partitioned Parquet files of 500k rows. Every timed run is a
fresh subprocess, so its peak RSS (``ru_maxrss``) is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import emit

LIST_SIZE = 50
ROWS_PER_FILE = 500_000


def synthesise(folder: Path, rows: int, seed: int = 0) -> int:
    """Write ``rows`` log rows (rounded to whole requests) as day=YYYY-MM-DD/part-NNNNN.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_req = rows // LIST_SIZE
    per_file = ROWS_PER_FILE // LIST_SIZE
    t0 = np.datetime64("2026-01-01T00:00:00", "ns").astype(np.int64)
    day_ns = 86_400 * 10**9
    span = 14 * day_ns
    written = 0
    for f, r0 in enumerate(range(0, n_req, per_file)):
        r = min(per_file, n_req - r0)
        n = r * LIST_SIZE
        times = t0 + (r0 + np.arange(r)) * (span // n_req)
        day = np.datetime_as_string(np.datetime64(int(times[0]), "ns"), unit="D")
        rep = np.repeat
        ctr = rng.uniform(0.005, 0.3, n).astype(np.float32)
        cvr = rng.uniform(0.005, 0.2, n).astype(np.float32)
        price = np.exp(rng.normal(3, 1, n)).astype(np.float32)
        click = (rng.random(n) < ctr).astype(np.int8)
        order = (click * (rng.random(n) < cvr)).astype(np.int8)
        cols = {
            "request_id": rep(np.arange(r0, r0 + r, dtype=np.int64), LIST_SIZE),
            "user_id": rep(rng.integers(0, 100_000, r), LIST_SIZE),
            "event_time": pa.array(rep(times, LIST_SIZE), pa.timestamp("ns")),
        }
        for j in range(6):
            cols[f"u_f{j}"] = rep(rng.normal(size=r).astype(np.float32), LIST_SIZE)
        for j, card in enumerate((4, 12, 200)):
            cols[f"c_f{j}"] = rep(rng.integers(0, card, r).astype(np.int32), LIST_SIZE)
        cols |= {
            # random ids, unique within a request (the position fills the low bits)
            "item_id": (rng.integers(0, 1 << 24, n) << 6) | np.tile(np.arange(LIST_SIZE), r),
            "position": np.tile(np.arange(LIST_SIZE, dtype=np.int16), r),
            "pred_ctr": ctr * rng.uniform(0.8, 1.2, n).astype(np.float32),
            "pred_cvr": cvr * rng.uniform(0.8, 1.2, n).astype(np.float32),
            "pred_gmv": price,
            "click": click, "order": order, "gmv": np.where(order == 1, price, 0).astype(np.float32),
            "true_ctr": ctr, "true_cvr": cvr, "price": price,
            "true_segment": rep(rng.integers(0, 4, r).astype(np.int8), LIST_SIZE),
        }
        path = folder / f"day={day}" / f"part-{f:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path, row_group_size=250_000)
        written += n
    return written


_CHILD = {
    "scan": """
import pyarrow.dataset as ds
n = 0
for b in ds.dataset(LOGS, format="parquet", partitioning=None).to_batches():
    n += b.num_rows
""",
    "features": """
from grade.data.features import extract_features
extract_features(LOGS, OUT)
""",
}


def _child(kind: str, logs: str, out: str) -> dict[str, float]:
    """Run one measurement in a fresh interpreter; returns seconds and its peak RSS."""
    code = (f"import time, resource, json\nLOGS, OUT = {logs!r}, {out!r}\nt0 = time.perf_counter()\n"
            + _CHILD[kind]
            + "\nprint(json.dumps({'seconds': time.perf_counter() - t0, "
              "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         env={**__import__("os").environ, "GRADE_LOG_LEVEL": "WARNING"})
    if res.returncode:
        raise RuntimeError(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(rows: int, logs: str | None, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        t0 = time.perf_counter()
        if logs is None:
            logs = str(Path(tmp, "logs"))
            rows = synthesise(Path(logs), rows)
        else:
            import pyarrow.dataset as ds

            rows = ds.dataset(logs, format="parquet").count_rows()
        gen_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(logs).rglob("*.parquet"))
        scans, feats = [], []
        for i in range(repeat):
            scans.append(_child("scan", logs, ""))
            feats.append(_child("features", logs, str(Path(tmp, f"out{i}"))))
        scan_s = statistics.median(r["seconds"] for r in scans)
        feat_s = statistics.median(r["seconds"] for r in feats)
        out_size = sum(p.stat().st_size for p in Path(tmp, "out0").rglob("*") if p.is_file())
    return {
        "rows": rows, "parquet_mib": size / 2**20, "features_mib": out_size / 2**20,
        "generate_s": gen_s, "repeat": repeat,
        "features": {"median_s": feat_s, "rows_per_s": rows / feat_s,
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in feats)},
        "bare_scan": {"median_s": scan_s, "rows_per_s": rows / scan_s,
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in scans)},
        "ratio_features_to_scan_time": feat_s / scan_s,
        "target_rows_per_s": 1_000_000,
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows to synthesise (ignored with --logs)")
    p.add_argument("--logs", default=None, help="an existing local log folder to measure instead")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each kind (median reported)")
    args = p.parse_args(argv)
    emit("features", run(args.rows, args.logs, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
