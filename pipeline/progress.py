"""A quiet terminal for KFP's local runner: a few lines per step, everything else to a log file.

The local runner prints every task's executor dump (outputs, artifacts, metadata) and streams the
step's own log to stdout. :func:`quiet_runner_output` sends all of it to a log file and keeps, on
the terminal, a line when a step starts, the step's progress lines (the ones with a rate, e.g.
``finetune: 120/400 steps (310 requests/s, ETA 41s)`` from :class:`grade.core.progress.Progress`) at
most one per ``every_s`` seconds, and a line when it ends (with its duration). Both the runner's
logging handler and its ``print`` calls look ``sys.stdout`` up when they write, so swapping
``sys.stdout`` for the duration of the run is enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# A step's log line whose message has a rate ("... (310 requests/s, ETA 41s)"), in the format of KFP's
# executor ("[KFP Executor <time> INFO]: <message>") or of grade.core.cli ("<time> INFO <logger>: <message>").
_STEP_PROGRESS = re.compile(r"^\s*(?:\[KFP Executor [\d-]+ [\d:,.]+ INFO\]|[\d-]+ [\d:,.]+ INFO [\w.]+): "
                            r"(.*\d [\w-]+/s\b.*)$")
#: seconds between two progress lines of one step on the terminal (steps log theirs every 10 s)
PROGRESS_EVERY_S = 10.0


class ProgressFilter:
    """A write-only text stream: every line to ``log``; step start/end lines, and the running step's
    progress lines at most one per ``every_s`` seconds, to ``terminal``."""

    def __init__(self, log: TextIO, terminal: TextIO, every_s: float = PROGRESS_EVERY_S):
        self.log = log
        self.terminal = terminal
        self.every_s = every_s
        self.started: dict[str, float] = {}
        self.finished: list[tuple[str, str]] = []
        self.running: str | None = None
        self._shown_at = 0.0
        self._partial = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._progress(_ANSI.sub("", line))
        return len(text)

    def _progress(self, line: str) -> None:
        now = time.monotonic()
        if m := _STARTED.search(line):
            self.running = m.group(1)
            self.started[self.running] = self._shown_at = now
            self.terminal.write(f"  step {self.running} ...\n")
        elif m := _FINISHED.search(line):
            task, status = m.groups()
            seconds = now - self.started.get(task, now)
            self.finished.append((task, status))
            self.running = None
            self.terminal.write(f"  step {task}: {status.lower()} ({seconds:.1f} s)\n")
        elif (m := _STEP_PROGRESS.match(line)) and self.running and now - self._shown_at >= self.every_s:
            self._shown_at = now
            elapsed = now - self.started[self.running]
            self.terminal.write(f"  step {self.running}: {m.group(1)} [{elapsed:.0f} s in]\n")
        else:
            return
        self.terminal.flush()

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


def tail(path: str | Path, n: int = 40) -> str:
    """The last ``n`` lines of a text file, colour codes removed."""
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return "\n".join(_ANSI.sub("", line) for line in lines)


class _RunnerRecords(logging.Filter):
    """Diverts the runner's own log records (module paths under kfp/) from a handler to the log file."""

    def __init__(self, log: TextIO):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}kfp{os.sep}" in record.pathname:
            self.log.write(f"{record.levelname} {record.getMessage()}\n")
            return False
        return True


@contextlib.contextmanager
def quiet_runner_output(log_path: str | Path) -> Iterator[ProgressFilter]:
    """Within the block, stdout (and the runner's log records) go to ``log_path``; only step progress
    lines reach the terminal."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(log_path, "a", encoding="utf-8") as log:
        stream = ProgressFilter(log, terminal)
        diverted = _RunnerRecords(log)
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(diverted)
        sys.stdout = stream  # type: ignore[assignment]
        try:
            yield stream
        finally:
            sys.stdout = terminal
            for handler in handlers:
                handler.removeFilter(diverted)
