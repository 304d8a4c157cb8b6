"""Run every benchmark and print one JSON document (``make bench``).

Each benchmark runs in its own process (its peak RSS is its own) and prints its JSON; this collects
them under their names, with the wall time of each and the machine. ``--quick`` uses smaller sizes
(minutes instead of tens of minutes); the numbers in benchmarks/README.md say which sizes they used.

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--out FILE]
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


def run_one(module: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
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
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    p.add_argument("--out", help="also write the JSON document to this file")
    args = p.parse_args()
    results = {}
    for name, (module, full, quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        if not Path(module.replace(".", "/") + ".py").exists():
            results[name] = {"error": f"{module} is not present"}
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(module, quick if args.quick else full)
    doc = {"machine": machine(), "quick": args.quick, "results": results}
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
