"""Feature extraction step: raw search logs (Parquet) -> validated, time-split request tensors.

    python -m components.features --logs URI --out URI [--config YAML] [--on-bad-rows fail|skip]
                                  [--production-registry URI] [--set SECTION.KEY=VALUE ...]

Exit status 2 on bad input (the message names the file, column, row and expectation); nothing is
published then. With ``--production-registry``, logs whose objectives or u_/c_ columns differ from
the production model's feature spec are bad input too. Output format: docs/features.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

import grade.core.cli
from grade.core import config, store
from grade.data.features import SPEC_FILE, extract_features
from grade.model.registry import production_model

log = logging.getLogger("grade.data.features")


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
    p.add_argument("--production-registry", metavar="URI",
                   help="model registry: the logs must give the objectives and u_/c_ columns its production "
                        "model (shared.model_name) reads; nothing is checked while none is in production")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = config.from_args(args)
    grade.core.cli.check_new_output(args.out, logs=args.logs)
    model = None
    if args.production_registry:
        found = production_model(args.production_registry, sections["shared"].model_name)
        if found is None:
            log.warning("%s: no production model to check the logs against", args.production_registry)
        else:
            version, uri = found
            spec = store.read_json(store.join(uri, SPEC_FILE))
            model = (f"{sections['shared'].model_name} {version}", spec)
    logs = args.logs[0] if len(args.logs) == 1 else args.logs
    extract_features(logs, args.out, sections["features"], model)
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
