"""Errors with a meaning for the command line: bad input exits with status 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (file, column, row, config key). Components exit with status 2.

    The message must name what was wrong and what was expected, e.g.
    ``logs/day=2026-01-01/part-0.parquet: column 'click', row 17: expected 0 or 1, got 3``.
    """

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 row: int | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        self.file, self.column, self.row = file, column, row
        super().__init__(": ".join([", ".join(where), message]) if where else message)


class ConfigError(InputError):
    """An invalid YAML config: unknown section or key, wrong type."""


class StoreError(Exception):
    """An object-store operation failed (after retries)."""


class NotFound(StoreError):
    """The object or folder does not exist."""


class NotPublished(StoreError):
    """A folder has no manifest: its writer did not finish (or it was never a published output)."""


class IntegrityError(StoreError):
    """A published folder's file is missing or differs from its manifest (size or sha256): bad input."""


class PreconditionFailed(StoreError):
    """A conditional put lost: the object exists (If-None-Match) or changed (If-Match). HTTP 412."""


class S3ConfigError(InputError):
    """S3 settings are missing or malformed (names the variables, never their values)."""
