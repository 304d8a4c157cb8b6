"""Command-line plumbing: exit statuses, one clear message for bad input, progress with rates."""

from __future__ import annotations

import logging

import pytest

from grade import cli, store
from grade.errors import InputError


def test_exit_statuses(capsys):
    assert cli.run(lambda argv: None, []) == 0
    assert cli.run(lambda argv: 3, []) == 3

    def bad(argv):
        raise InputError("expected 0 or 1, got 3", file="logs/part-0.parquet", column="click", row=17)

    assert cli.run(bad, []) == 2
    err = capsys.readouterr().err
    assert err == "error: logs/part-0.parquet, column 'click', row 17: expected 0 or 1, got 3\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130


def test_a_program_error_is_not_reported_as_bad_input():
    def broken(argv):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        cli.run(broken, [])


def test_store_failures_are_one_line_bad_input_or_a_retryable_failure(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert cli.run(lambda argv: store.read_bytes(missing), []) == 2          # not found: bad input
    assert capsys.readouterr().err == f"error: {missing}: not found\n"
    assert cli.run(lambda argv: store.read_manifest(missing), []) == 2       # not published: bad input
    assert "no _MANIFEST.json" in capsys.readouterr().err

    def exhausted(argv):
        raise store.StoreError("PUT s3://b/k failed after 5 attempt(s): connection refused")

    assert cli.run(exhausted, []) == 1                                        # transient: retry the task
    assert capsys.readouterr().err == "error: PUT s3://b/k failed after 5 attempt(s): connection refused\n"


def test_missing_s3_settings_exit_2_naming_the_variables(monkeypatch, capsys):
    for name in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    store.reset_s3_client()
    try:
        assert cli.run(lambda argv: store.read_bytes("s3://bucket/key"), []) == 2
    finally:
        store.reset_s3_client()
    err = capsys.readouterr().err
    assert "S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID" in err.splitlines()[0] and "do-not-print-me" not in err


def test_progress_yields_everything_and_logs_the_rate(caplog):
    with caplog.at_level(logging.INFO, logger="grade"):
        assert list(cli.progress(iter(range(5)), total=5, desc="requests", unit="req")) == [0, 1, 2, 3, 4]
    assert "requests: 5/5 req (" in caplog.text and "req/s" in caplog.text
