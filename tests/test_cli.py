"""Command-line plumbing: exit statuses, one clear message for bad input, progress with rates."""

from __future__ import annotations

import logging

import pytest

from grade.core import cli, store
from grade.core.errors import InputError


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


# -- outputs that would overwrite inputs ------------------------------------------------------------

@pytest.mark.parametrize("out, inputs, words", [
    ("{d}/logs", {"logs": "{d}/logs"}, "is --logs"),
    ("{d}/logs/", {"logs": ["{d}/other", "{d}/./logs"]}, "is --logs"),
    ("{d}/logs/scores", {"logs": "{d}/logs"}, "is inside --logs"),
    ("{d}", {"features": "{d}/feats", "init": None}, "contains --features"),
    ("s3://b/runs/feats", {"features": "s3://b/runs/feats/"}, "is --features"),
    ("s3://b/runs", {"model": ["s3://b/runs/m1"]}, "contains --model"),
])
def test_an_output_overlapping_an_input_is_refused(tmp_path, out, inputs, words):
    """Publishing into an input would replace its manifest (or mix outputs into it)."""
    d = str(tmp_path)
    fill = {k: [u.format(d=d) for u in v] if isinstance(v, list) else v and v.format(d=d)
            for k, v in inputs.items()}
    with pytest.raises(InputError, match=f"^--out {out.format(d=d)}: {words} "):
        cli.check_output(out.format(d=d), **fill)


def test_separate_outputs_are_accepted(tmp_path):
    cli.check_output(str(tmp_path / "logs2"), logs=str(tmp_path / "logs"))          # a name prefix only
    cli.check_output(str(tmp_path / "feats"), logs=[str(tmp_path / "logs")], registry=None)
    cli.check_output("s3://b/feats", logs=str(tmp_path / "feats"))                 # other backend
    cli.check_output("s3://b2/x", logs="s3://b/x")                                   # other bucket


def test_an_existing_file_as_output_folder_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: an existing file; expected a folder"):
        cli.check_output(str(tmp_path / "afile"))


def _published_input(folder) -> bytes:
    with store.publishing(str(folder)) as staging:
        (staging / "part-0.parquet").write_bytes(b"not read: the output check comes first")
    return (folder / store.MANIFEST).read_bytes()


@pytest.mark.parametrize("component, args", [
    ("simulate", ["--out", "{i}"]),
    ("features", ["--logs", "{i}", "--out", "{i}"]),
    ("pretrain", ["--features", "{i}", "--out", "{i}"]),
    ("finetune", ["--features", "{d}/f", "--init", "{i}", "--out", "{i}/stage2"]),
    ("outcome", ["--features", "{i}", "--out", "{d}"]),
    ("evaluate", ["--features", "{d}/f", "--model", "grade={i}", "--out", "{i}"]),
    ("score", ["--requests", "{i}", "--model", "{d}/m", "--out", "{i}"]),
])
def test_every_component_refuses_an_output_over_its_input(tmp_path, capsys, component, args):
    """``--out`` equal to (inside, containing) an input exits 2 and leaves the input's manifest as it was;
    for simulate, whose output is the only folder, an existing file as ``--out`` does."""
    import importlib

    main = importlib.import_module(f"components.{component}").main
    folder = tmp_path / "input"
    manifest = _published_input(folder)
    if component == "simulate":
        folder = tmp_path / "afile"
        folder.write_text("x")
    argv = [a.format(i=folder, d=tmp_path) for a in args]
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --out "), err
    assert (tmp_path / "input" / store.MANIFEST).read_bytes() == manifest


def test_promote_a_candidate_missing_its_weights_exits_2_and_claims_no_version(tmp_path, capsys):
    """One line naming the file, and no ``vNNNN.claim`` left in the registry."""
    from components import promote as promote_cli
    from tests.test_promote import write_report
    from tests.test_registry import model_folder

    root = str(tmp_path)
    candidate = model_folder(root, "a", 1)
    report = write_report(root, "r1", candidate, opm=0.05)
    (tmp_path / "models" / "a" / "policy.safetensors").unlink()
    registry = tmp_path / "registry"
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", candidate,
                                      "--registry", str(registry)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "policy.safetensors: missing" in err, err
    assert list(registry.rglob("*.claim")) == []
