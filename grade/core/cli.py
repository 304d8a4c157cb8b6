"""Shared command-line plumbing: logging to stderr, exit status 2 on bad input, the check that an output
does not overwrite an input, progress bars."""

from __future__ import annotations

import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from grade.core.errors import InputError, IntegrityError, NotFound, NotPublished, StoreError

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

    Bad input (InputError, a missing or unpublished input folder, a published file that differs from
    its manifest) -> 2; an object-store operation that failed after its retries -> 1 (a retry of the
    task may succeed); anything else propagates.
    """
    setup_logging()
    try:
        rc = main(argv)
    except (InputError, NotFound, NotPublished, IntegrityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


def metavar(option: str, kind: Any) -> str | None:
    """How an option's value reads in ``--help``: ``--requests N``, ``--lr X``, ``--model-name NAME``.

    None for a choice (argparse shows the choices) and for true|false flags (their caller names them).
    """
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]  # an optional value reads like the value
    if typing.get_origin(kind) is typing.Literal or kind is bool:
        return None
    if option.endswith("name"):
        return "NAME"
    origin = typing.get_origin(kind) or kind
    words = {int: "N", float: "X", list: "LIST", tuple: "LIST", dict: "MAPPING", str: "TEXT"}
    return words.get(origin, "VALUE")


def _location(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path parts) of a URI, comparable across spellings: local paths absolute and resolved,
    S3 keys without empty parts (``s3://b/x/`` is ``s3://b/x``)."""
    from grade.core import store

    if store.is_s3(uri):
        return "s3", tuple(p for p in str(uri).removeprefix("s3://").split("/") if p)
    return "", Path(uri).expanduser().resolve().parts


def check_output(out: str, **inputs: str | Sequence[str] | None) -> None:
    """InputError unless ``out`` may be published as a new output folder.

    Refused: an existing file, and a folder that is, lies inside or contains one of ``inputs``
    (flag name -> URI or URIs; None is skipped): publishing there would replace the input's
    ``_MANIFEST.json`` or mix the output's files into it. Every component that publishes a folder
    calls this before any work.
    """
    from grade.core import store

    if not store.is_s3(out) and Path(out).is_file():
        raise InputError(f"--out {out}: an existing file; expected a folder (new or a previous output) "
                         "to publish into")
    scheme, mine = _location(out)
    for flag, uris in inputs.items():
        for uri in [uris] if isinstance(uris, str) else (uris or []):
            other_scheme, theirs = _location(uri)
            if other_scheme != scheme:
                continue
            n = min(len(mine), len(theirs))
            if mine[:n] != theirs[:n]:
                continue
            how = "is" if len(mine) == len(theirs) else "is inside" if len(mine) > n else "contains"
            raise InputError(f"--out {out}: {how} --{flag.replace('_', '-')} {uri}; publishing there would "
                             "replace or mix with the input's files: choose a separate folder")



def check_new_output(out: str, **inputs: str | Sequence[str] | None) -> None:
    """Before any work of a component that publishes a folder: :func:`check_output` (no overlap with
    ``inputs``, not a file), then the store's writability probe (a missing bucket is bad input; a store
    that does not answer, a fault)."""
    from grade.core import store

    check_output(out, **inputs)
    store.check_writable(out)

def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             unit: str = "it") -> Iterator[T]:
    """A progress bar on stderr with rate and ETA; plain periodic log lines when stderr is not a TTY."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        return
    from grade.core.progress import Progress

    bar = Progress(desc, total, unit, logger=log)
    for item in iterable:
        yield item
        bar.add(1)
