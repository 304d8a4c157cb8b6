"""The configuration: print every key with its default and documentation, or check a file.

    python -m components.config                 # the full default configuration as documented YAML
    python -m components.config --check FILE    # validate FILE as every step would (exit 2 naming the key)
    python -m components.config --check FILE --strict   # also refuse old key names

Every step reads one YAML file with a section per step (docs/pipeline.md, "Configuration"); an old
key name is accepted for one release with one warning (``--strict`` makes it an error).
"""

from __future__ import annotations

import argparse
import sys

import grade.core.cli
from grade.core import config
from grade.core.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", metavar="FILE", help="validate this config file (local path or s3://)")
    p.add_argument("--strict", action="store_true", help="with --check: old key names are errors too")
    p.add_argument("--set", dest="config_settings", action="append", default=[], type=config.parse_setting,
                   metavar="SECTION.KEY=VALUE", help="with --check: override one key, as every step takes it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check is None:
        if args.strict or args.config_settings:
            raise ConfigError("--strict and --set apply to --check FILE")
        sys.stdout.write(config.defaults_yaml())
        return 0
    config.load(args.check, dict(args.config_settings))
    old = config.old_names_used()
    if args.strict and old:
        raise ConfigError(f"{args.check}: old key name(s) {old}; python -m components.config lists the keys")
    print(f"{args.check}: valid" + (f" (old names: {', '.join(old)})" if old else ""))
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
