"""Data-parallel training throughput: pretrain and finetune requests/s on 1 process vs 2 (torchrun).

The same synthetic logs (benchmarks.pretrain's two-segment marketplace) go through feature
extraction once; then each stage runs as the real component, in a fresh process:

- ``1x1``: one process, 1 thread (the reference: one rank's worth of compute);
- ``1x2``: one process, 2 threads (what a single process gets from this machine);
- ``2x1``: ``torchrun --nproc-per-node 2``, 1 thread per rank (gloo all-reduce every step).

Reported per stage and layout: training requests/s from the run's metrics.json (the job's rate,
all ranks together), the process wall time (start-up, validation and publishing included), the
peak RSS of the whole process tree and of its largest process (sampled every 50 ms), and the
speed-ups of 2x1 and 1x2 over 1x1. Each run is repeated (layouts interleaved, so a burst of load
from elsewhere does not hit one layout only) and medians are reported, with the load average before
and after. Finetune starts from the first 1x1 Stage 1 model.

    python -m benchmarks.distributed [--requests 20000] [--list 50] [--pretrain-epochs 2]
                                     [--finetune-epochs 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks._common import emit
from benchmarks.pretrain import synthetic_features
from grade.data import dataset

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}   # name -> (processes, threads per process)


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; its wall time and the peak RSS (MiB) of its process tree, summed and per process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_total = peak_one = 0.0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = [p.memory_info().rss / 2**20 for p in tree]
        except psutil.Error:
            rss = []
        if rss:
            peak_total, peak_one = max(peak_total, sum(rss)), max(peak_one, max(rss))
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_tree_mib": peak_total, "peak_rss_process_mib": peak_one}


def launch(module: str, args: list[str], processes: int, threads: int) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GRADE_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if processes == 1:
        return [sys.executable, "-m", module, *args], env
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc-per-node", str(processes), "-m", module, *args], env


def _median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": len(runs)}


def run(n_requests: int = 20000, list_size: int = 50, pretrain_epochs: int = 2, finetune_epochs: int = 1,
        repeat: int = 3) -> dict:
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list]] = {"pretrain": {k: [] for k in LAYOUTS},
                                        "finetune": {k: [] for k in LAYOUTS}}
    with tempfile.TemporaryDirectory(prefix="grade-bench-dist-") as tmp:
        features = synthetic_features(tmp, n_requests, list_size)
        n_train = dataset.count_requests(features, "train")
        config = Path(tmp, "config.yaml")
        # the same work on every layout: fixed epochs (no early stop), validation on 2,000 requests,
        # finetune's curve at the end only
        config.write_text(json.dumps({
            "pretrain": {"epochs": pretrain_epochs, "patience": pretrain_epochs + 1,
                         "max_valid_requests": 2000},
            "finetune": {"epochs": finetune_epochs, "eval_every": 10**6, "eval_max_requests": 2000,
                         "checkpoint_every": 10**6}}))
        init = str(Path(tmp, "pretrain-1x1-0"))
        for stage in ("pretrain", "finetune"):
            for i in range(repeat):
                for name, (processes, threads) in LAYOUTS.items():
                    out = Path(tmp, f"{stage}-{name}-{i}")
                    args = ["--features", features, "--out", str(out), "--config", str(config)]
                    if stage == "pretrain":
                        args += ["--threads", str(threads)]
                    else:
                        args += ["--init", init]
                    cmd, env = launch(f"components.{stage}", args, processes, threads)
                    measured = run_measured(cmd, env)
                    metrics = json.loads((out / "metrics.json").read_text())
                    runs[stage][name].append({"requests_per_s": metrics["requests_per_s"], **measured})
    results: dict[str, dict] = {}
    for stage, by_layout in runs.items():
        res = {name: _median_runs(r) for name, r in by_layout.items()}
        ref = res["1x1"]["requests_per_s"]
        res["speedup_2x1_vs_1x1"] = res["2x1"]["requests_per_s"] / ref
        res["speedup_1x2_vs_1x1"] = res["1x2"]["requests_per_s"] / ref
        res["speedup_2x1_vs_1x2"] = res["2x1"]["requests_per_s"] / res["1x2"]["requests_per_s"]
        results[stage] = res
    return {"requests": n_requests, "list_size": list_size, "train_requests": n_train,
            "pretrain_epochs": pretrain_epochs, "finetune_epochs": finetune_epochs, "repeat": repeat,
            "layouts": {k: {"processes": p, "threads_per_process": t} for k, (p, t) in LAYOUTS.items()},
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, **results}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="synthetic requests (all splits)")
    p.add_argument("--list", type=int, default=50, dest="list_size", help="candidates per request")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="pretraining epochs per run")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per stage and layout (medians reported)")
    args = p.parse_args(argv)
    emit("distributed", run(args.requests, args.list_size, args.pretrain_epochs, args.finetune_epochs,
                            args.repeat))


if __name__ == "__main__":
    main()
