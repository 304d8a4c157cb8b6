"""The data window of a scheduled run: the schedule time and a date-partitioned log prefix -> the
partitions to train on.

Logs usually land one partition per day (``s3://grade/logs/dt=2026-01-14/``). A recurring run trains
on the ``window_days`` days up to and including its schedule date: ``raw_logs_uri`` names the
partitions with a ``{date}`` field (``s3://grade/logs/dt={date}``, the date as YYYY-MM-DD). Days
without data are reported; a window without any data is bad input.

The schedule time comes from KFP (``dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER``). Recent KFP
backends resolve it; older ones and the local runner pass the placeholder through unchanged, and then
the current time is used (and said so).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from grade.core.errors import InputError

log = logging.getLogger("grade.data.window")

#: The field of a partition pattern that takes the date (YYYY-MM-DD).
DATE_FIELD = "{date}"


@dataclass(frozen=True)
class Window:
    """The partitions of one run's data window."""

    pattern: str
    """the partition pattern, with the {date} field"""
    start: dt.date
    """first day of the window"""
    end: dt.date
    """last day of the window (the schedule date)"""
    present: list[str] = field(default_factory=list)
    """URIs of the window's partitions that hold Parquet logs, oldest first"""
    missing: list[str] = field(default_factory=list)
    """dates (YYYY-MM-DD) of the window without any log file"""

    def describe(self) -> str:
        """One line naming the pattern, the days and the gaps (also the lineage's data URI)."""
        days = (self.end - self.start).days + 1
        gaps = f", missing {', '.join(self.missing)}" if self.missing else ""
        return f"{self.pattern} [{self.start}..{self.end}: {len(self.present)} of {days} days{gaps}]"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "present": list(self.present), "missing": list(self.missing), "describe": self.describe()}


def is_partitioned(uri: str) -> bool:
    """True when ``uri`` is a partition pattern (has the {date} field)."""
    return DATE_FIELD in uri


def is_unresolved(value: str) -> bool:
    """True for an empty value or a KFP placeholder (``{{$.…}}``) that the backend did not resolve."""
    return not value.strip() or "{{" in value


def parse_time(value: str, what: str = "schedule time") -> dt.datetime:
    """An ISO 8601 date or time as an aware UTC datetime (a naive time is taken as UTC)."""
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{what} '{value}': expected an ISO 8601 time such as "
                         "2026-01-14T02:00:00Z") from None
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def schedule_time(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """The run's schedule time in UTC; the current time when ``value`` is an unresolved placeholder."""
    if is_unresolved(value):
        now = now or dt.datetime.now(dt.timezone.utc)
        log.warning("window: the schedule time is not resolved (%r: this backend or the local runner does "
                    "not fill it in); using the current time %s", value, now.isoformat(timespec="seconds"))
        return now
    return parse_time(value)


def partition_uri(pattern: str, day: dt.date) -> str:
    return pattern.replace(DATE_FIELD, day.isoformat())


def resolve(pattern: str, when: dt.datetime, window_days: int) -> Window:
    """The ``window_days`` partitions of ``pattern`` up to ``when``'s date; :class:`InputError` when the
    window holds no log file at all (or the arguments are not a window)."""
    from grade.data.features import list_log_files

    if not is_partitioned(pattern):
        raise InputError(f"raw_logs_uri '{pattern}': a data window needs a partition pattern with "
                         f"{DATE_FIELD}, e.g. s3://grade/logs/dt={{date}}")
    if int(window_days) < 1:
        raise InputError(f"window_days: expected a number of days >= 1, got {window_days}")
    end = when.astimezone(dt.timezone.utc).date()
    days = [end - dt.timedelta(days=i) for i in range(int(window_days) - 1, -1, -1)]
    present, missing = [], []
    for day in days:
        uri = partition_uri(pattern, day)
        if list_log_files(uri):
            present.append(uri)
        else:
            missing.append(day.isoformat())
    window = Window(pattern, days[0], end, present, missing)
    if not present:
        raise InputError(f"raw_logs_uri '{pattern}': no log files in the {window_days}-day window "
                         f"{days[0]}..{end} (looked for {partition_uri(pattern, days[0])} .. "
                         f"{partition_uri(pattern, end)})")
    if missing:
        log.warning("window: %d of %d day(s) have no logs: %s", len(missing), len(days), ", ".join(missing))
    log.info("window: %s", window.describe())
    return window
