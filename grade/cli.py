"""Shared command-line plumbing: logging to stderr, exit status 2 on bad input, progress bars."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from grade.errors import InputError

T = TypeVar("T")
log = logging.getLogger("grade")


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("GRADE_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "werkzeug", "matplotlib", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a component's ``main`` and turn expected failures into one line on stderr and an exit status.

    Bad input (InputError, a missing or unpublished input folder) -> 2; an object-store operation that
    failed after its retries -> 1 (a retry of the task may succeed); anything else propagates.
    """
    from grade import store

    setup_logging()
    try:
        rc = main(argv)
    except (InputError, store.NotFound, store.NotPublished) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             unit: str = "it") -> Iterator[T]:
    """A progress bar on stderr with rate and ETA; plain periodic log lines when stderr is not a TTY."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        return
    from grade.progress import Progress

    bar = Progress(desc, total, unit, logger=log)
    for item in iterable:
        yield item
        bar.add(1)
