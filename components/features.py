"""Feature extraction step: raw search logs (Parquet) -> validated, time-split request tensors.

    python -m components.features --logs URI --out URI [--config YAML] [--on-bad-rows fail|skip]
                                  [--set SECTION.KEY=VALUE ...]

Exit status 2 on bad input (the message names the file, column, row and expectation); nothing is
published then. Output format: docs/features.md.
"""

from __future__ import annotations

import argparse
import sys

import grade.cli
from grade import config, store
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
    config.add_arguments(p, ("features.on_bad_rows", "features.valid_fraction", "features.test_fraction",
                             "features.shard_requests", "features.batch_rows"),
                         config_help="config file; its 'features' section is used")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config.from_args(args)["features"]
    grade.cli.check_output(args.out, logs=args.logs)
    store.check_writable(args.out)
    extract_features(args.logs[0] if len(args.logs) == 1 else args.logs, args.out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(grade.cli.run(main))
