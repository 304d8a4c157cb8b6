"""Offline auction evaluation: every policy on the same held-out requests, report.json/html, KFP metrics.

    python -m components.evaluate --features URI --model NAME=URI [--model NAME=URI ...] --out URI
                                  [--outcome URI] [--config YAML] [--set SECTION.KEY=VALUE ...]
                                  [--registry URI]

Without --outcome a value model is fitted on the features' train split (config section ``outcome``) and
published in the report folder's value_model/.

Prints a table of metrics and lifts vs static (with paired bootstrap CIs) and the report's path.
"""

from __future__ import annotations

import argparse
import sys

import grade.core.cli
from grade.core import config, store
from grade.core.errors import InputError


def parse_model(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=URI, got {text!r}")
    return name, uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="URI",
                   help="published features folder (components.features output), local path or s3://")
    p.add_argument("--model", action="append", default=[], type=parse_model, metavar="NAME=URI",
                   help="a policy model folder to evaluate under NAME (repeatable), e.g. grade=s3://b/models/grade")
    p.add_argument("--out", required=True, metavar="URI",
                   help="output folder: report.json, report.html, metrics.json (KFP), config.json")
    p.add_argument("--outcome", metavar="URI",
                   help="value model (components.outcome output) for the estimated flavour; without it one "
                        "is fitted on the train split and published in OUT/value_model/")
    p.add_argument("--registry", metavar="URI",
                   help="model registry root; its production model is evaluated as 'incumbent' "
                        "when it exists")
    config.add_arguments(p, ("evaluate.split", "evaluate.bootstrap_samples", "shared.seed"),
                         config_help="config file; its 'evaluate', 'business' and 'value_model' sections and "
                                     "finetune.reward are used")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grade.evaluate.evaluation import run_evaluation
    from grade.evaluate.summary import format_table

    models: dict[str, str] = {}
    for name, uri in args.model:
        if name in models:
            raise InputError(f"--model {name}=...: the name is given twice")
        models[name] = uri
    sections = config.from_args(args)
    cfg = sections["evaluate"]
    grade.core.cli.check_new_output(args.out, features=args.features, model=list(models.values()),
                               outcome=args.outcome, registry=args.registry)
    for name, uri in models.items():  # every manifest checked (entries, paths) before the work
        try:
            store.read_manifest(uri)
        except (InputError, store.NotPublished) as e:
            raise InputError(f"--model {name}={uri}: {e}") from None
    # best_static searches the best global answer to the reward Stage 2 was trained on
    reward = sections["finetune"].reward
    report = run_evaluation(args.features, models, args.out, cfg, registry_uri=args.registry, reward=reward,
                            business=sections["business"], outcome_uri=args.outcome,
                            value_model_cfg=sections["value_model"])
    print(format_table(report))
    print(f"report: {store.join(args.out, 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
