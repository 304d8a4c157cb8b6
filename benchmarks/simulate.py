"""Simulator throughput and memory: rows/s and peak RSS at two sizes, each in its own process.

Peak memory must not grow with the number of requests (rows are generated and written in chunks),
so the ratio of the two peaks should stay near 1 while the sizes differ 10x.

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
import json, resource, sys, time
from grade.simulator import SimulatorConfig, write_logs
cfg = SimulatorConfig(n_requests=int(sys.argv[1]))
t0 = time.perf_counter()
summary = write_logs(cfg, sys.argv[2])
dt = time.perf_counter() - t0
print(json.dumps({"requests": cfg.n_requests, "rows": summary["rows"], "seconds": dt,
                  "rows_per_s": summary["rows"] / dt,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
