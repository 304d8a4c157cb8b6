"""Feature extraction step: raw search logs (Parquet) -> validated, time-split request tensors.

    python -m components.features --logs URI --out URI [--config YAML] [--on-bad-rows fail|skip]

Exit status 2 on bad input (the message names the file, column, row and expectation); nothing is
published then. Output format: docs/features.md.
"""

from __future__ import annotations

import argparse
import sys

import grade.cli
from grade import config
from grade.features import extract_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m components.features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", required=True, metavar="URI", nargs="+",
                   help="folder or s3:// prefix of Parquet logs (its _MANIFEST.json files when present, "
                        "else every *.parquet below it), or one .parquet file; several: read together "
                        "(a data window's partitions)")
    p.add_argument("--out", required=True, metavar="URI",
                   help="output folder or s3:// prefix (published atomically: _MANIFEST.json last)")
    p.add_argument("--config", metavar="YAML", help="config file; its 'features' section is used")
    p.add_argument("--on-bad-rows", choices=["fail", "skip"], default=None,
                   help="fail: exit 2 on the first bad row; skip: quarantine bad requests to "
                        "quarantine.parquet (overrides features.on_bad_rows)")
    p.add_argument("--valid-fraction", type=float, default=None, metavar="F",
                   help="share of requests in the validation split (overrides features.valid_fraction)")
    p.add_argument("--test-fraction", type=float, default=None, metavar="F",
                   help="share of the latest requests in the test split (overrides features.test_fraction)")
    p.add_argument("--shard-requests", type=int, default=None, metavar="N",
                   help="requests per safetensors shard (overrides features.shard_requests)")
    p.add_argument("--batch-rows", type=int, default=None, metavar="N",
                   help="Parquet rows per record batch (overrides features.batch_rows)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config.load_section(args.config, "features", {
        "on_bad_rows": args.on_bad_rows, "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction, "shard_requests": args.shard_requests,
        "batch_rows": args.batch_rows,
    })
    extract_features(args.logs[0] if len(args.logs) == 1 else args.logs, args.out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(grade.cli.run(main))
