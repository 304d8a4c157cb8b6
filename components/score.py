"""Score requests with a trained policy: personalised fusion weights, fused scores and ranks.

    python -m components.score --requests URI --out URI (--model URI | --registry URI [--model-name NAME])
                              [--config YAML] [--set SECTION.KEY=VALUE ...]

--requests: log-format Parquet (a file, a folder or an s3:// prefix) with request_id, the user/context
features and pred_* columns of the model's feature spec. --model: a model folder or a registry
version folder; by default the registry's production model. Output: Parquet with request_id,
item_id, score, rank (0 = top) and the request's weights w_<objective>, published atomically. With
exploration on (config serve.explore.share > 0) a share of the requests are scored with weights drawn
from the policy's Dirichlet, seeded by the request id, and the output adds served_log_propensity
(null where the request was scored with the mean) and model_version (docs/serving.md).
"""

from __future__ import annotations

import argparse
import sys

from grade.core import cli, config
from grade.core.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", required=True, metavar="URI",
                   help="log-format Parquet file, folder or s3:// prefix to score")
    p.add_argument("--out", required=True, metavar="URI", help="output folder or s3:// prefix for the scores")
    p.add_argument("--model", metavar="URI",
                   help="model folder or registry version (default: the registry's production model)")
    p.add_argument("--registry", metavar="URI", help="registry root, used when --model is not given")
    config.add_arguments(p, ("shared.model_name",),
                         config_help="YAML config; its shared.model_name is the default model name, its "
                                     "serve.explore the exploration (share 0.2 by default)")
    p.add_argument("--batch-rows", type=int, default=262_144, metavar="N", help="rows per record batch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grade.model.registry import Registry
    from grade.release.scoring import score_requests

    cfg = config.from_args(args)
    args.model_name = cfg["shared"].model_name
    cli.check_new_output(args.out, requests=args.requests, model=args.model, registry=args.registry)
    model = args.model
    if model is None:
        if not args.registry:
            raise InputError("give --model URI, or --registry URI to score with the production model")
        reg = Registry(args.registry, args.model_name)
        current = reg.production()
        if current is None:
            raise InputError(f"{args.registry}: no production model '{args.model_name}'")
        model = reg.version_uri(current[0]["version"])
        cli.log.info("scoring with %s/production = %s", args.model_name, current[0]["version"])
    summary = score_requests(model, args.requests, args.out, args.batch_rows, cfg["serve"].explore)
    print(f"scored {summary['requests']:,} requests ({summary['rows']:,} rows) with the "
          f"{summary['model_kind']} policy in {summary['seconds']:.1f} s "
          f"({summary['rows_per_s']:,.0f} rows/s) -> {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
