"""Simulator throughput and memory: rows/s and peak RSS at two sizes, each in its own process.

Peak memory must not grow with the number of requests (rows are generated and written in chunks),
so the ratio of the two peaks should stay near 1 while the sizes differ 10x. Reference, in the same
process: a bare pyarrow write of one already generated chunk to zstd Parquet (median of 3), the floor
for the output step; ``ratio_vs_bare_write`` = simulator rows/s / bare-write rows/s.

    python -m benchmarks.simulate [--small 50000] [--large 500000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchmarks._common import emit

_CHILD = """
import json, resource, statistics, sys, time
import pyarrow.parquet as pq
from grade.data.simulator import SimulatorConfig, generate, write_logs
cfg = SimulatorConfig(n_requests=int(sys.argv[1]))
t0 = time.perf_counter()
summary = write_logs(cfg, sys.argv[2])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # before the reference adds its chunk
chunk = next(generate(cfg))
times = []
for _ in range(3):
    t1 = time.perf_counter()
    pq.write_table(chunk, sys.argv[2] + ".ref.parquet", compression="zstd")
    times.append(time.perf_counter() - t1)
bare = chunk.num_rows / statistics.median(times)
print(json.dumps({"requests": cfg.n_requests, "rows": summary["rows"], "seconds": dt,
                  "rows_per_s": summary["rows"] / dt, "peak_rss_mib": peak,
                  "bare_write_rows_per_s": bare, "ratio_vs_bare_write": summary["rows"] / dt / bare}))
"""


def measure(n_requests: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(n_requests), d + "/logs"], check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=50_000, help="requests in the small run")
    p.add_argument("--large", type=int, default=500_000, help="requests in the large run")
    args = p.parse_args()
    small, large = measure(args.small), measure(args.large)
    emit("simulate", {"small": small, "large": large,
                      "peak_rss_ratio_large_vs_small": large["peak_rss_mib"] / small["peak_rss_mib"]})


if __name__ == "__main__":
    main()
