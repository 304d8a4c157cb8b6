"""The path rule for paths read from data, and the hostile folders it stops (both backends)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grade.core import cli, store
from grade.core.errors import InputError
from grade.core.store import paths
from grade.model.registry import Registry
from grade.release.promotion import PromoteConfig, promote
from tests.test_promote import write_report
from tests.test_registry import model_folder

# -- the rule, as properties -------------------------------------------------------------------

PART = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=8)
SAFE_PART = PART.filter(lambda p: paths.path_problem(p) is None)
ANY_PATH = st.lists(st.one_of(PART, st.sampled_from(["..", ".", "", "/", "\\", "a\x00b"])),
                    min_size=1, max_size=6).map("/".join)


@settings(max_examples=400, deadline=None)
@given(ANY_PATH)
def test_an_accepted_path_stays_inside_its_folder_and_is_already_normalised(path):
    root = "/srv/store/out"
    if paths.path_problem(path) is not None:
        with pytest.raises(InputError, match="refused"):
            paths.safe_relpath(path, "where")
        return
    joined = posixpath.join(root, paths.safe_relpath(path, "where"))
    assert posixpath.normpath(joined) == joined, "accepted paths need no normalising"
    assert joined.startswith(root + "/") and ".." not in joined.split("/")
    assert os.path.commonpath([root, os.path.normpath(joined)]) == root


@settings(max_examples=300, deadline=None)
@given(st.lists(SAFE_PART, min_size=1, max_size=4), st.integers(0, 3))
def test_a_dotdot_part_anywhere_is_refused(parts, at):
    parts.insert(min(at, len(parts)), "..")
    with pytest.raises(InputError, match=r"'\.\.' part"):
        paths.safe_relpath("/".join(parts), "manifest")


@settings(max_examples=200, deadline=None)
@given(SAFE_PART)
def test_absolute_doubled_or_trailing_separators_are_refused(part):
    for bad in (f"/{part}", f"{part}//x", f"{part}/", f"./{part}", f"{part}\\x"):
        assert paths.path_problem(bad) is not None, bad
    assert paths.safe_name(part, "version") == part
    with pytest.raises(InputError, match="single name"):
        paths.safe_name(f"{part}/x", "version")


def test_join_refuses_a_part_that_leaves_the_folder(tmp_path):
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(InputError, match="refused"):
            store.join(str(tmp_path), bad)
        with pytest.raises(InputError, match="refused"):
            store.join("s3://bucket/prefix", bad)
    assert store.join("s3://bucket/p", "a/b.txt") == "s3://bucket/p/a/b.txt"


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200))
def test_json_nesting_is_bounded(depth):
    text = "[" * depth + "0" + "]" * depth
    if depth <= paths.MAX_JSON_DEPTH:
        assert paths.json_depth(paths.loads(text, "f.json")) == depth
    else:
        with pytest.raises(InputError, match=f"f.json: JSON nested deeper than {paths.MAX_JSON_DEPTH}"):
            paths.loads(text, "f.json")


# -- hostile folders ------------------------------------------------------------------------------

def _rewrite_manifest(uri: str, edit) -> None:
    manifest = json.loads(store.read_bytes(store.join(uri, store.MANIFEST)))
    edit(manifest)
    store.write_bytes(store.join(uri, store.MANIFEST), json.dumps(manifest).encode())


def _entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_manifest_entry_leaving_the_folder_is_refused_by_readers_the_gate_and_the_registry(store_root,
                                                                                              tmp_path):
    """``../../X.txt`` with its correct sha256, beside the model folder: before, readers accepted it
    and the registry wrote X.txt two levels above the version folder."""
    a = model_folder(store_root, "a", 1)
    data = b"planted\n"
    store.write_bytes(store.join(store_root, "X.txt"), data)  # ../../X.txt from models/a
    _rewrite_manifest(a, lambda m: m["files"].__setitem__("../../X.txt", _entry(data)))
    with pytest.raises(InputError, match=r"entry '\.\./\.\./X\.txt'"):
        store.open_published(a)
    registry = store.join(store_root, "registry")
    with pytest.raises(InputError, match=r"\.\./\.\./X\.txt"):
        promote(write_report(store_root, "r1", a, opm=0.05), a, registry, PromoteConfig())
    with pytest.raises(InputError, match=r"\.\./\.\./X\.txt"):
        Registry(registry).register(a)
    assert not store.exists(store.join(registry, "grade-mtf", "X.txt"))
    assert Registry(registry).versions() == []


def test_an_s3_manifest_entry_cannot_write_on_the_reading_host(s3_env, tmp_path, capsys):
    """``../../../../tmp/X`` in an S3 model folder: before, the download wrote an attacker-chosen file."""
    a = model_folder(s3_env, "a", 1)
    target = tmp_path / "planted"
    escape = "../" * 12 + str(target).lstrip("/")
    data = b"owned\n"
    store.write_bytes(store.join(s3_env, "models", "x"), data)
    _rewrite_manifest(a, lambda m: m["files"].__setitem__(escape, {**_entry(data), "path": "policy.json"}))
    assert cli.run(lambda argv: store.open_published(a), []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_MANIFEST.json: files: entry" in err[0] and "refused" in err[0], err
    assert not target.exists()


@pytest.mark.parametrize("field, value", [("path", "../x"), ("path", "/etc/hostname"),
                                          ("size", -1), ("sha256", "abc")])
def test_a_malformed_manifest_entry_is_named(store_root, field, value):
    a = model_folder(store_root, "a", 1)
    _rewrite_manifest(a, lambda m: m["files"]["metrics.json"].__setitem__(field, value))
    with pytest.raises(InputError, match=r"files\['metrics.json'\]"):
        store.open_published(a)


def test_a_retired_entry_outside_the_folder_is_never_deleted(store_root):
    out = store.join(store_root, "out")
    victim = store.join(store_root, "victim.txt")
    store.write_bytes(victim, b"keep")
    with store.publishing(out) as staging:
        (staging / "a.txt").write_text("1")
    _rewrite_manifest(out, lambda m: m.__setitem__(store.RETIRED, ["../victim.txt"]))
    with pytest.raises(InputError, match=r"_retired: entry '\.\./victim\.txt'"):
        with store.publishing(out) as staging:
            (staging / "a.txt").write_text("2")
    assert store.read_bytes(victim) == b"keep"


def test_a_symlink_in_a_model_folder_is_not_followed(tmp_path, capsys):
    """``notes.txt -> <a host file>``, manifest rebuilt: before, the gate copied the target into the
    registry."""
    from components import promote as promote_cli

    secret = tmp_path / "host-file"
    secret.write_text("host secret\n")
    a = model_folder(str(tmp_path), "a", 1)
    os.symlink(secret, Path(a, "notes.txt"))
    _rewrite_manifest(a, lambda m: m["files"].__setitem__("notes.txt", _entry(secret.read_bytes())))
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    registry = tmp_path / "registry"
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", a, "--registry", str(registry),
                                      "--create-registry"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'notes.txt' is a symbolic link" in err[0], err
    assert not any(p.name == "notes.txt" for p in registry.rglob("*"))
    with pytest.raises(InputError, match="symbolic link"):
        store.build_manifest(a)


def test_a_symlinked_folder_inside_a_published_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    with store.publishing(str(out)) as staging:
        (staging / "d").mkdir()
        (staging / "d" / "f.txt").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f.txt").write_text("x")
    import shutil

    shutil.rmtree(out / "d")
    os.symlink(elsewhere, out / "d")
    with pytest.raises(InputError, match=r"'d/f.txt' is a symbolic link"):
        store.open_published(str(out))


def test_deeply_nested_json_in_a_manifest_or_a_report_is_refused(store_root, capsys):
    a = model_folder(store_root, "a", 1)
    deep = "[" * 100_000 + "]" * 100_000
    report = store.join(store_root, "r")
    with store.publishing(report) as staging:
        (staging / "report.json").write_text('{"policies": ' + deep + "}")
    with pytest.raises(InputError, match="report.json: JSON nested deeper than 64"):
        promote(report, a, store.join(store_root, "registry"), PromoteConfig())
    store.write_bytes(store.join(a, store.MANIFEST), ('{"files": {}, "x": ' + deep + "}").encode())
    assert cli.run(lambda argv: store.open_published(a), []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_MANIFEST.json: JSON nested deeper than 64 levels" in err[0], err


@pytest.mark.parametrize("version", ["../../../x", "/etc", "v1/../../y"])
def test_a_version_id_from_the_alias_record_must_be_a_name(store_root, version):
    reg = Registry(store.join(store_root, "registry"))
    store.write_bytes(reg.alias_uri, json.dumps({"version": version}).encode())
    with pytest.raises(InputError, match="refused"):
        reg.production()
    with pytest.raises(InputError, match="refused"):
        reg.version_uri(version)


@pytest.mark.parametrize("name", ["../other", "a/b", "", "/abs"])
def test_a_model_name_must_be_a_name(tmp_path, name):
    with pytest.raises(InputError, match="model name"):
        Registry(str(tmp_path), name)


def test_evaluate_refuses_a_model_whose_manifest_leaves_its_folder_before_the_work(s3_env, tmp_path, capsys):
    """``evaluate --model grade=s3://...`` with an entry aimed at the evaluating host: exit 2, one line
    naming the flag and the entry, nothing written there, before the features are read."""
    from components import evaluate as evaluate_cli

    a = model_folder(s3_env, "a", 1)
    target = tmp_path / "planted"
    escape = "../" * 12 + str(target).lstrip("/")
    _rewrite_manifest(a, lambda m: m["files"].__setitem__(escape, _entry(b"owned\n")))
    argv = ["--features", store.join(s3_env, "no-features"), "--model", f"grade={a}",
            "--out", str(tmp_path / "report")]
    assert cli.run(evaluate_cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model grade={a}: ") and "refused" in err[0], err
    assert not target.exists() and not (tmp_path / "report").exists()
