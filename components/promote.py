"""Promotion gate and model registry operations.

    python -m components.promote --report URI --candidate URI --registry URI [--config YAML]
                                 [--set SECTION.KEY=VALUE ...] [--create-registry]
                                 [--candidate-name grade] [--out URI] [--data URI]
    python -m components.promote status   --registry URI [--model-name NAME]
    python -m components.promote history  --registry URI [--model-name NAME]
    python -m components.promote rollback --registry URI [--model-name NAME] [--why TEXT] [--to VERSION]

The gate compares the candidate with the production model (or with static weights for the first
model) on the report's held-out requests and writes a blessing (JSON; to --out, by default
blessing.json in the report's folder). When blessed, the candidate
is registered and the ``production`` alias moves by compare-and-swap. Not blessed is a normal
outcome (exit 0); bad input exits with status 2. A local registry folder that does not exist is
refused (a typo would otherwise start an empty registry) unless --create-registry makes it; on S3 the
bucket must exist. The registry and the blessing's destination are checked before anything is
registered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grade.core import cli, config, store
from grade.core.errors import InputError

SUBCOMMANDS = ("status", "history", "rollback")


def gate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.promote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", required=True, metavar="URI",
                   help="evaluation report folder (or its report.json)")
    p.add_argument("--candidate", required=True, metavar="URI",
                   help="the candidate model folder that the report evaluated")
    p.add_argument("--registry", required=True, metavar="URI",
                   help="registry root (local folder or s3://bucket/prefix)")
    config.add_arguments(p, ("promote.candidate_name", "shared.model_name"),
                         config_help="YAML config; its `promote` section holds the thresholds")
    p.add_argument("--out", "--blessing", dest="out", metavar="URI",
                   help="where to write the blessing JSON (default: blessing.json in the report's folder)")
    p.add_argument("--data", metavar="URI", help="data URI recorded in the version's lineage")
    p.add_argument("--create-registry", action="store_true",
                   help="make the local registry folder when it does not exist (its first use); without "
                        "it a missing --registry folder is refused")
    return p


def check_blessing_output(out: str) -> None:
    """InputError unless the blessing JSON can be written to ``out`` (a file path, in a writable folder)."""
    if store.is_s3(out):
        store.check_writable(out.rsplit("/", 1)[0])
        return
    if Path(out).is_dir():
        raise InputError(f"--out {out}: a folder; expected the path of the blessing JSON file")
    store.check_writable(str(Path(out).absolute().parent))


def admin_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m components.promote {command}",
                                description={"status": "show the production alias",
                                             "history": "print every alias move",
                                             "rollback": "point the alias back at its previous version"
                                             }[command])
    p.add_argument("--registry", required=True, metavar="URI",
                   help="registry root (local folder or s3://bucket/prefix)")
    config.add_arguments(p, ("shared.model_name",),
                         config_help="YAML config; its shared.model_name is the default model name")
    if command == "rollback":
        p.add_argument("--why", default="manual rollback", help="reason recorded in the history")
        p.add_argument("--to", metavar="VERSION",
                       help="version to restore (default: the one that served before the current one)")
    return p


def admin(command: str, argv: list[str]) -> int:
    from grade.model.registry import Registry

    args = admin_parser(command).parse_args(argv)
    args.model_name = config.from_args(args)["shared"].model_name
    reg = Registry(args.registry, args.model_name)
    reg.check_exists()
    if command == "status":
        current = reg.production()
        if current is None:
            print(f"{args.model_name}: no production model in {args.registry}")
        else:
            rec = current[0]
            print(f"{args.model_name}/production -> {rec['version']} (since {rec['when']}; {rec['why']})")
            print(f"  content hash {rec['content_hash']}; previous {rec.get('previous_version')}")
            print(f"  model: {reg.model_uri(rec['version'])}")
        print(f"versions: {', '.join(reg.versions()) or 'none'}")
    elif command == "history":
        moves = reg.history()
        if not moves:
            print(f"{args.model_name}: no alias moves yet")
        for i, m in enumerate(moves, 1):
            print(f"{i:>3}  {m['when']}  {m.get('action', 'promote'):<8} {m.get('previous_version')} -> "
                  f"{m['version']}  ({m['why']})")
    else:
        reg.check_usable()
        try:
            rec = reg.rollback(args.why, to=args.to)
        except ValueError as e:
            raise InputError(str(e)) from None
        print(f"{args.model_name}/production rolled back to {rec['version']} (was {rec['previous_version']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return admin(argv[0], argv[1:])
    args = gate_parser().parse_args(argv)
    from grade.model.registry import Registry
    from grade.release import promotion

    cfg = config.from_args(args)["promote"]
    cli.log.info("promote config: %s", json.dumps(config.to_dict(cfg), sort_keys=True))
    out = args.out or store.join(promotion.report_folder(args.report), "blessing.json")

    def before_acting() -> None:
        Registry(args.registry, cfg.model_name).check_usable(create=args.create_registry)
        check_blessing_output(out)

    blessing = promotion.promote(args.report, args.candidate, args.registry, cfg, data_uri=args.data,
                                 before_acting=before_acting)
    store.write_json(out, blessing.to_json())
    print(promotion.format_blessing(blessing))
    print(f"blessing: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
