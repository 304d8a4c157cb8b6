"""Progress of a long loop as periodic log lines (stderr) with the rate and the ETA.

The one progress logger of the project: training (:mod:`grade.model.training`), feature extraction and
the command-line progress bar's fallback when stderr is not a terminal. Free of torch, so that
light modules can use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)



class Progress:
    """Periodic progress lines (logging, i.e. stderr) with the rate and the ETA of a known amount of work.

    ``add(units)`` counts work towards ``total`` (the ETA's unit); ``amount`` counts what the rate
    is in when that differs (``finetune`` counts steps and reports requests/s). A line is logged
    every ``every_s`` seconds and when the work is complete; ``detail()`` appends text to it.
    Without a ``total`` the lines have no ETA.
    """

    def __init__(self, what: str, total: int | None, unit: str = "rows", *, rate_unit: str | None = None,
                 every_s: float = 10.0, done: int = 0, logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.rate_unit = rate_unit or unit
        self.log = logger or log
        self.done = done
        self.start_done = done
        self.amount = 0
        self.start = self.last = time.monotonic()
        self._logged_at = -1

    def add(self, units: int = 1, amount: int | None = None, detail: Callable[[], str] | None = None) -> None:
        self.done += units
        self.amount += units if amount is None else amount
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self._line(now, detail)

    def retire(self, units: int) -> None:
        """Work of the total that will not be done (a loop that stops early, e.g. early stopping): the
        total shrinks by ``units``, so the ETA counts only the work that remains."""
        if self.total is not None and units > 0:
            self.total = max(self.done, self.total - units)

    def finish(self) -> float:
        """Log the last line (unless it was just logged); the seconds since the start."""
        now = time.monotonic()
        if self._logged_at != self.done:
            self._line(now, None)
        return now - self.start

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float:
        """``amount`` per second since the start."""
        return self.amount / max(self.seconds(), 1e-9)

    def _line(self, now: float, detail: Callable[[], str] | None) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.amount / elapsed
        work = self.done - self.start_done
        extra = f"; {detail()}" if detail is not None else ""
        if self.total is None:
            self.log.info("%s: %d %s (%.1f %s/s)%s", self.what, self.done, self.unit, rate, self.rate_unit,
                          extra)
        else:
            eta = (self.total - self.done) * elapsed / work if work > 0 else float("nan")
            self.log.info("%s: %d/%d %s (%.0f %s/s, ETA %.0fs)%s", self.what, self.done, self.total,
                          self.unit, rate, self.rate_unit, eta, extra)
        self._logged_at = self.done
