"""Value-model step: examination curve and outcome model from the logs (what a ranking is worth).

    python -m components.outcome --features URI --out URI [--config YAML]

Estimates the examination curve theta from the train split's clicks (the logging policy's
per-request noise moves items across positions; ``shared.eta_mode: fixed`` assumes a power law instead),
fits the outcome model (click given examination, order given click, order value) as a correction of
the MTL predictions on each request's items within the examination depth, reports its calibration
on the valid split next to the raw MTL predictions', and publishes the folder atomically
(docs/estimators.md). Fine-tuning (``--outcome``) and evaluation (``--outcome``) read it; without it
they fit it themselves. Exit status 2 on bad input or config.
"""

from __future__ import annotations

import argparse
import sys

import grade.core.cli
from grade.core import config
from grade.value.value_model import build_value_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m components.outcome", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="URI",
                   help="published features folder or s3:// prefix (output of components.features)")
    p.add_argument("--out", required=True, metavar="URI", help="value-model folder or s3:// prefix")
    config.add_arguments(p, ("shared.eta_mode", "shared.eta", "value_model.outcome.epochs", "shared.seed",
                             "value_model.fixed_eta", "value_model.outcome.seed"),
                         renamed={"value_model.outcome.epochs": "--model-epochs",
                                  "value_model.outcome.seed": "--model-seed"},
                         config_help="config file; its 'value_model' section is used")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config.from_args(args)["value_model"]
    grade.core.cli.check_new_output(args.out, features=args.features)
    metrics = build_value_model(args.features, args.out, cfg)
    exam = metrics["examination"]
    print(f"examination: {exam['method']} eta {exam['eta']:.3f} from {exam['n_clicks']} clicks")
    for label, rows in metrics.get("calibration", {}).items():
        if isinstance(rows, dict) and "outcome" in rows:
            mtl = rows.get("mtl", {})
            print(f"calibration on valid, {label}: log-loss {rows['outcome']['logloss']:.5f} "
                  f"(MTL {mtl.get('logloss', float('nan')):.5f}), ECE {rows['outcome']['ece']:.5f} "
                  f"(MTL {mtl.get('ece', float('nan')):.5f})")
    print(f"value model: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
