"""Run every benchmark and print one JSON document (``make bench``).

Each benchmark runs in its own process (its peak RSS is its own) and prints its JSON; this collects
them under their names, with the wall time of each and the machine. ``--quick`` uses smaller sizes
(minutes instead of tens of minutes); the numbers in benchmarks/README.md say which sizes they used.
``--tiny`` uses the smallest sizes that still run every part of each benchmark (seconds each, numbers
meaningless): the test suite's smoke test of every benchmark (tests/test_benchmarks.py) runs these.

    python -m benchmarks.run_all [--quick | --tiny] [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import machine

#: name -> (module, full-size arguments, quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "store": ("benchmarks.store", [], ["--mib", "64"]),
    "simulate": ("benchmarks.simulate", [], ["--small", "20000", "--large", "200000"]),
    "features": ("benchmarks.features", [], ["--rows", "2000000", "--repeat", "1"]),
    "lambdaloss": ("benchmarks.lambdaloss", [], ["--repeat", "10"]),
    "pretrain": ("benchmarks.pretrain", [], ["--requests", "10000"]),
    "finetune": ("benchmarks.finetune", [], ["--repeat", "5"]),
    "outcome": ("benchmarks.outcome", [], ["--requests", "4096", "--repeat", "3"]),
    "distributed": ("benchmarks.distributed", [], ["--requests", "6000"]),
    "auction": ("benchmarks.auction", [], ["--requests", "50000"]),
    "inference": ("benchmarks.inference", [], ["--calls", "500"]),
    "serve": ("benchmarks.serve", [], ["--seconds", "5"]),
}

#: name -> tiny arguments: every code path of the benchmark at the smallest sizes it accepts
TINY: dict[str, list[str]] = {
    "store": ["--mib", "1", "--repeat", "1"],
    "simulate": ["--small", "200", "--large", "400"],
    "features": ["--rows", "20000", "--repeat", "1"],
    "lambdaloss": ["--batch", "16", "--list", "10", "--repeat", "2"],
    "pretrain": ["--requests", "400", "--list", "10", "--epochs", "1"],
    "finetune": ["--batch", "16", "--group", "4", "--list-size", "10", "--requests", "64", "--repeat", "1"],
    "outcome": ["--requests", "64", "--list-size", "10", "--repeat", "1"],
    "distributed": ["--requests", "400", "--list", "10", "--pretrain-epochs", "1", "--finetune-epochs", "1",
                    "--repeat", "1"],
    "auction": ["--requests", "300", "--resamples", "20", "--policies", "3"],
    "inference": ["--calls", "20"],
    "serve": ["--seconds", "0.5", "--repeats", "1", "--clients", "2", "--no-floors", "--workers", "1"],
}


def arguments(name: str, size: str) -> tuple[str, list[str]]:
    """The module of benchmark ``name`` and its arguments at ``size`` ("full", "quick" or "tiny")."""
    module, full, quick = BENCHMARKS[name]
    return module, {"full": full, "quick": quick, "tiny": TINY[name]}[size]


def run_one(module: str, args: list[str], env: dict[str, str] | None = None,
            timeout: float | None = None) -> dict:
    """Run one benchmark in its own process; its JSON document with ``wall_s``, or an ``error``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:], "wall_s": wall}
    text = proc.stdout
    try:
        doc = json.loads(text[text.index("{"):])
    except ValueError:
        return {"error": "no JSON on stdout", "stdout_tail": text[-2000:], "wall_s": wall}
    doc.pop("machine", None)
    doc["wall_s"] = wall
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes")
    size.add_argument("--tiny", action="store_true", help="the smoke test's sizes: seconds each, numbers "
                                                           "meaningless")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    p.add_argument("--out", help="also write the JSON document to this file")
    args = p.parse_args()
    results = {}
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    for name in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        module, module_args = arguments(name, size)
        if not Path(module.replace(".", "/") + ".py").exists():
            results[name] = {"error": f"{module} is not present"}
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(module, module_args)
    doc = {"machine": machine(), "quick": args.quick, "tiny": args.tiny, "results": results}
    text = json.dumps(doc, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
