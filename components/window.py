"""Resolve a scheduled run's data window: a date-partitioned log prefix -> the partitions to train on.

    python -m components.window --logs PATTERN --window-days N [--schedule-time ISO] [--out FILE]
                                [--config YAML]

PATTERN names the daily partitions with a {date} field (YYYY-MM-DD), e.g. s3://grade/logs/dt={date}.
The window is the N days up to and including the schedule date; an empty or unresolved
--schedule-time (a KFP placeholder the backend did not fill in) means now, with a warning. Writes
the window as JSON (pattern, start, end, present partition URIs, missing dates) to FILE or stdout.
Exit status 2 when no partition of the window holds a log file.
"""

from __future__ import annotations

import argparse
import json
import sys

import grade.core.cli
from grade.core import config, store
from grade.data import window


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.window", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", required=True, metavar="PATTERN",
                   help="partitioned log prefix with a {date} field, e.g. s3://grade/logs/dt={date}")
    p.add_argument("--window-days", type=int, required=True, metavar="N", help="days up to the schedule date")
    p.add_argument("--schedule-time", default="", metavar="ISO",
                   help="the run's schedule time (UTC); empty or an unresolved placeholder: now")
    p.add_argument("--out", metavar="FILE", help="write the window JSON here (default: stdout)")
    config.add_arguments(p, config_help="YAML config, checked like every step's (the window itself is set by "
                                        "the flags above)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config.from_args(args)  # a bad config fails here as it would in any other step
    resolved = window.resolve(args.logs, window.schedule_time(args.schedule_time), args.window_days)
    text = json.dumps(resolved.to_dict(), indent=2) + "\n"
    if args.out:
        store.write_bytes(args.out, text.encode())
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
