"""Promotion gate on both backends: fail-closed blessing, incumbent replacement, races, rollback, CLI."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

import grade.model.registry as registry_mod
from components import promote as promote_cli
from grade.core import cli, store
from grade.core.errors import InputError, IntegrityError
from grade.model.registry import Registry, production_model
from grade.release.blessing import Blessing
from grade.release.promotion import PromoteConfig, promote
from tests.test_registry import killed_writer, model_folder


def lift(v: float) -> dict:
    return {"lift": v, "ci_low": v - 0.01, "ci_high": v + 0.01}


def write_report(root: str, name: str, candidate_uri: str, opm: float, gpm: float = 0.01, ctr: float = 0.01,
                 incumbent: tuple[str, float] | None = None, include_candidate: bool = True) -> str:
    """A report.json of the evaluation's shape: the candidate's lifts vs static (and vs the incumbent)."""
    metrics = {"opm": lift(opm), "gpm": lift(gpm), "ctr": lift(ctr), "cvr": lift(0.0)}
    report = {"n_requests": 1000, "primary_metric": "opm", "has_ground_truth": True,
              "policies": {"static": {"true": {}}}, "lift_vs_static": {}, "models": {}}
    if include_candidate:
        report["policies"]["grade"] = {"true": {}}
        report["lift_vs_static"]["grade"] = {"true": metrics}
        report["models"]["grade"] = {"uri": candidate_uri, "content_hash": store.content_hash(candidate_uri)}
    if incumbent:
        version, inc_opm = incumbent
        report["models"]["incumbent"] = {"version": version}
        report["lift_vs_incumbent"] = {"grade": {"true": {**metrics, "opm": lift(inc_opm)}}}
    uri = store.join(root, "reports", name)
    with store.publishing(uri) as staging:
        (staging / "report.json").write_text(json.dumps(report))
    return uri


def test_first_promotion_vs_static_then_better_replaces_and_worse_does_not(store_root):
    registry = store.join(store_root, "registry")
    cfg = PromoteConfig()
    a = model_folder(store_root, "a", 1)
    b1 = promote(write_report(store_root, "r1", a, opm=0.05), a, registry, cfg)
    assert b1.baseline == "static" and b1.blessed and b1.promoted
    v1 = b1.version
    assert production_model(registry)[0] == v1
    # primary check: ci_low 0.04 > 0; guardrails on their CI low: ctr 0 >= -0.005, cvr -0.01 >= -0.01,
    # gpm 0 >= -0.005
    assert [(c.name, round(c.value, 6), c.passed) for c in b1.checks] == [
        ("true/opm lift CI low", 0.04, True), ("true/ctr lift CI low", 0.0, True),
        ("true/cvr lift CI low", -0.01, True), ("true/gpm lift CI low", 0.0, True)]

    b = model_folder(store_root, "b", 2)
    b2 = promote(write_report(store_root, "r2", b, opm=0.05, incumbent=(v1, 0.03)), b, registry, cfg)
    assert b2.baseline == "incumbent" and b2.promoted and b2.incumbent_version == v1
    v2 = b2.version
    assert production_model(registry)[0] == v2 != v1

    c = model_folder(store_root, "c", 3)
    b3 = promote(write_report(store_root, "r3", c, opm=0.05, incumbent=(v2, -0.02)), c, registry, cfg)
    assert not b3.blessed and not b3.promoted and b3.verdict == "not blessed"
    assert any("lift CI low" in r for r in b3.reasons)
    assert production_model(registry)[0] == v2

    # the promoted version holds exactly what was evaluated, with its blessing and lineage
    reg = Registry(registry)
    assert reg.lineage(v2)["content_hash"] == store.content_hash(b) == b2.candidate_content_hash
    assert store.content_hash(reg.model_uri(v2)) == store.content_hash(b)
    assert reg.lineage(v2)["parent_version"] == v1
    assert store.read_json(store.join(reg.version_uri(v2), "blessing.json"))["baseline"] == "incumbent"
    assert [m["version"] for m in reg.history()] == [v1, v2]
    assert reg.versions() == [v1, v2]  # the rejected candidate was not registered


def test_guardrail_missing_candidate_and_no_thresholds_fail_closed(store_root):
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    # CTR lift CI low -0.016 is below the -0.005 margin
    b = promote(write_report(store_root, "r1", a, opm=0.05, ctr=-0.006), a, registry, PromoteConfig())
    assert not b.blessed and any("guardrail true/ctr" in r for r in b.reasons)
    b = promote(write_report(store_root, "r2", a, opm=0.05, include_candidate=False), a, registry,
                PromoteConfig())
    assert not b.blessed and any("no metrics for candidate" in r for r in b.reasons)
    b = promote(write_report(store_root, "r3", a, opm=0.05), a, registry,
                PromoteConfig(min_lift=None, guardrails={}))
    assert not b.blessed and any("no thresholds" in r for r in b.reasons)
    b = promote(write_report(store_root, "r4", a, opm=0.05), a, registry,
                PromoteConfig(primary_metric="nope"))
    assert not b.blessed and any("missing from the report" in r for r in b.reasons)
    assert production_model(registry) is None and Registry(registry).versions() == []


def test_candidate_that_differs_from_the_evaluated_content_is_not_blessed(store_root):
    registry = store.join(store_root, "registry")
    a, other = model_folder(store_root, "a", 1), model_folder(store_root, "other", 9)
    b = promote(write_report(store_root, "r1", a, opm=0.05), other, registry, PromoteConfig())
    assert not b.blessed and any("not what the report evaluated" in r for r in b.reasons)


def test_report_without_the_current_incumbent_is_not_blessed(store_root):
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    v1 = promote(write_report(store_root, "r1", a, opm=0.05), a, registry, PromoteConfig()).version
    b = model_folder(store_root, "b", 2)
    stale = promote(write_report(store_root, "r2", b, opm=0.05, incumbent=("v0000-deadbeef", 0.05)), b,
                    registry, PromoteConfig())
    assert not stale.blessed and production_model(registry)[0] == v1
    # no incumbent metrics at all (only vs static, which it beats): not blessed either
    c = promote(write_report(store_root, "r3", b, opm=0.05), b, registry, PromoteConfig())
    assert not c.blessed and c.baseline == "incumbent" and production_model(registry)[0] == v1


def test_rerun_is_idempotent(store_root):
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    report = write_report(store_root, "r1", a, opm=0.05)
    first = promote(report, a, registry, PromoteConfig())
    again = promote(report, a, registry, PromoteConfig())
    assert again.verdict == "already in production" and not again.promoted
    reg = Registry(registry)
    assert reg.versions() == [first.version] and len(reg.history()) == 1


def test_racing_promotions_exactly_one_wins(store_root, monkeypatch):
    registry = store.join(store_root, "registry")
    cands = [model_folder(store_root, n, s) for n, s in (("a", 1), ("b", 2))]
    reports = [write_report(store_root, f"r{i}", c, opm=0.05) for i, c in enumerate(cands)]
    results: list = [None, None]
    # both promotions read "no alias" and register before either moves the alias
    barrier = threading.Barrier(2)
    original = registry_mod.Registry.register

    def register_then_wait(self, *a, **k):
        out = original(self, *a, **k)
        barrier.wait(timeout=30)
        return out

    monkeypatch.setattr(registry_mod.Registry, "register", register_then_wait)

    def run(i):
        results[i] = promote(reports[i], cands[i], registry, PromoteConfig())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.verdict for r in results) == ["conflict", "promoted"]
    winner = next(r for r in results if r.promoted)
    loser = next(r for r in results if not r.promoted)
    assert any("moved concurrently" in r for r in loser.reasons)
    reg = Registry(registry)
    assert reg.production()[0]["version"] == winner.version
    assert [m["version"] for m in reg.history()] == [winner.version]


def test_killed_writer_then_promotion(store_root):
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    assert killed_writer(registry, a).returncode == 9
    assert production_model(registry) is None
    b = promote(write_report(store_root, "r1", a, opm=0.05), a, registry, PromoteConfig())
    assert b.promoted and Registry(registry).versions() == [b.version]
    assert production_model(registry)[0] == b.version


def test_rollback_restores_the_previous_version(store_root, capsys):
    registry = store.join(store_root, "registry")
    a, b = model_folder(store_root, "a", 1), model_folder(store_root, "b", 2)
    v1 = promote(write_report(store_root, "r1", a, opm=0.05), a, registry, PromoteConfig()).version
    v2 = promote(write_report(store_root, "r2", b, opm=0.05, incumbent=(v1, 0.04)), b, registry,
                 PromoteConfig()).version
    assert cli.run(promote_cli.main, ["rollback", "--registry", registry]) == 0
    assert production_model(registry)[0] == v1
    hist = Registry(registry).history()
    assert [(h["action"], h["version"]) for h in hist] == [("promote", v1), ("promote", v2), ("rollback", v1)]
    # nothing before v1: bad input, exit 2, alias unchanged
    assert cli.run(promote_cli.main, ["rollback", "--registry", registry]) == 2
    assert production_model(registry)[0] == v1


def test_cli_bad_input_exit_2_blessing_file_status_history(tmp_path, capsys):
    registry = str(tmp_path / "registry")
    a = model_folder(str(tmp_path), "a", 1)
    bad = str(tmp_path / "bad")
    with store.publishing(bad) as staging:
        (staging / "report.json").write_text("{not json")
    assert cli.run(promote_cli.main, ["--report", bad, "--candidate", a, "--registry", registry]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert cli.run(promote_cli.main, ["--report", str(tmp_path / "missing"), "--candidate", a,
                                      "--registry", registry]) == 2
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", str(tmp_path / "nope"),
                                      "--registry", registry]) == 2
    assert production_model(registry) is None

    # not blessed is exit 0; the blessing goes next to the report by default
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", a, "--registry", registry,
                                      "--config", str(_yaml(tmp_path, "promote:\n  min_lift: 0.2\n"))]) == 0
    out = capsys.readouterr().out
    assert "NOT BLESSED" in out and "[FAIL] true/opm lift CI low" in out
    assert store.read_json(store.join(report, "blessing.json"))["blessed"] is False
    assert production_model(registry) is None

    blessing = tmp_path / "blessing.json"
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", a, "--registry", registry,
                                      "--out", str(blessing), "--create-registry"]) == 0
    assert json.loads(blessing.read_text())["promoted"] is True
    assert cli.run(promote_cli.main, ["status", "--registry", registry]) == 0
    assert cli.run(promote_cli.main, ["history", "--registry", registry]) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and f"blessing: {blessing}" in out
    assert "grade-mtf/production -> v0001" in out and "None -> v0001" in out
    assert Path(registry, "grade-mtf", "versions").is_dir()


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["rollback", "--help"]])
def test_help_documents_the_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        promote_cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--registry" in out and ("--out" in out or "--model-name" in out)


def _corrupt(report: dict, path: list[str], value) -> None:
    """Set (or with value ... delete) the field at ``path`` of a report document."""
    for key in path[:-1]:
        report = report[key]
    if value is ...:
        del report[path[-1]]
    else:
        report[path[-1]] = value


@pytest.mark.parametrize("path, value", [
    (["has_ground_truth"], ...), (["has_ground_truth"], "yes"), (["models"], ...), (["models"], []),
    (["models", "grade", "content_hash"], 42), (["lift_vs_static"], ...),
    (["lift_vs_static", "grade"], "high"),
    (["lift_vs_static", "grade", "true", "opm", "ci_low"], "0.5"), (["policies"], ["grade"]),
])
def test_missing_or_malformed_report_field_fails_closed(tmp_path, capsys, path, value):
    """A report field the gate reads that is missing or of the wrong type: exit 2 naming it, nothing moves."""
    registry = str(tmp_path / "registry")
    a = model_folder(str(tmp_path), "a", 1)
    uri = write_report(str(tmp_path), "r1", a, opm=0.05)
    report = json.loads(Path(uri, "report.json").read_text())
    _corrupt(report, path, value)
    with store.publishing(uri) as staging:  # published as such: the field, not the manifest, is wrong
        (staging / "report.json").write_text(json.dumps(report))
    assert cli.run(promote_cli.main, ["--report", uri, "--candidate", a, "--registry", registry]) == 2
    assert path[-1] in capsys.readouterr().err
    assert production_model(registry) is None and Registry(registry).versions() == []


def test_blessing_record_round_trip_and_validation(tmp_path):
    registry = str(tmp_path / "registry")
    a = model_folder(str(tmp_path), "a", 1)
    blessing = promote(write_report(str(tmp_path), "r1", a, opm=0.05), a, registry, PromoteConfig())
    doc = json.loads(json.dumps(blessing.to_json()))
    # the JSON shape readers of blessing.json rely on
    assert set(doc) == {"candidate", "candidate_uri", "candidate_content_hash", "report", "registry",
                        "model_name", "thresholds", "incumbent_version", "primary", "baseline", "blessed",
                        "promoted", "verdict", "checks", "reasons", "version"}
    assert set(doc["thresholds"]) == {"min_lift", "guardrails"}
    assert set(doc["checks"][0]) == {"name", "value", "threshold", "passed"}
    assert Blessing.from_json(doc) == blessing
    stored = Registry(registry).version_uri(blessing.version)
    assert Blessing.from_json(store.read_json(store.join(stored, "blessing.json"))).verdict == "blessed"
    for field, value in [("verdict", ...), ("verdict", "maybe"), ("blessed", "true"), ("checks", {}),
                         ("promoted", False), ("baseline", "oracle"), ("thresholds", {"min_lift": 0.0})]:
        bad = json.loads(json.dumps(doc))
        _corrupt(bad, [field], value)
        with pytest.raises(InputError, match=r"blessing\.json: .*"):
            Blessing.from_json(bad, "blessing.json")


def test_truth_free_report_is_judged_on_its_estimated_flavour_and_primary_metric(tmp_path):
    """Primary flavour/metric come from the report; guardrails in the same flavour; primary not re-checked."""
    from grade.release.promotion import decide

    root = str(tmp_path)
    a = model_folder(root, "a", 1)
    metrics = {"opm": lift(-0.002), "gpm": lift(0.05), "ctr": lift(0.0), "cvr": lift(0.0)}
    report = {"n_requests": 1000, "primary_metric": "gpm", "primary_flavour": "estimated",
              "has_ground_truth": False, "policies": {"static": {}, "grade": {}},
              "lift_vs_static": {"grade": {"estimated": metrics, "prior": {"gpm": lift(-0.5)},
                                           "replay": {"ndcg_order": lift(-0.5)}}},
              "models": {"grade": {"uri": a, "content_hash": store.content_hash(a)}}}
    b = decide(report, a, Registry(store.join(root, "registry")), PromoteConfig())
    assert b.primary == "estimated/gpm"
    assert [(c.name, c.passed) for c in b.checks] == [
        ("estimated/gpm lift CI low", True), ("estimated/ctr lift CI low", True),
        ("estimated/cvr lift CI low", True)]
    assert b.blessed
    # an OPM-valued report: the estimated OPM lift's CI low (-0.012) fails the primary check
    b = decide({**report, "primary_metric": "opm"}, a, Registry(store.join(root, "registry")),
               PromoteConfig())
    assert b.primary == "estimated/opm" and not b.blessed
    assert [c.name for c in b.checks][-1] == "estimated/gpm lift CI low"


def test_a_candidate_changed_after_evaluation_is_refused(store_root):
    """Replacing the candidate's weights by another model's file of the same size after the evaluation
    must not promote: the gate verifies every file against the manifest's sha256 before registering."""
    registry = store.join(store_root, "registry")
    a, other = model_folder(store_root, "a", 1), model_folder(store_root, "other", 2)
    report = write_report(store_root, "r1", a, opm=0.05)
    weights = store.read_bytes(store.join(other, "policy.safetensors"))
    assert len(weights) == len(store.read_bytes(store.join(a, "policy.safetensors")))
    store.write_bytes(store.join(a, "policy.safetensors"), weights)
    with pytest.raises(IntegrityError, match="policy.safetensors"):
        promote(report, a, registry, PromoteConfig())
    assert production_model(registry) is None
    assert Registry(registry).versions() == []   # refused before any version was claimed


def test_promotion_leaves_no_temp_folder_behind(store_root):
    import os
    import tempfile

    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    assert promote(write_report(store_root, "r1", a, opm=0.05), a, registry, PromoteConfig()).promoted
    assert [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("grade-")] == []


def test_a_report_edited_after_publishing_is_refused(store_root):
    """A lift raised in report.json after the evaluation published it: the gate reads it through the
    report's manifest, so the edit is refused instead of promoted."""
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    report = write_report(store_root, "r1", a, opm=-0.05)
    doc = json.loads(store.read_bytes(store.join(report, "report.json")))
    doc["lift_vs_static"]["grade"]["true"]["opm"] = lift(0.5)
    store.write_bytes(store.join(report, "report.json"), json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match=r"report\.json: content differs from the manifest"):
        promote(report, a, registry, PromoteConfig())
    with pytest.raises(IntegrityError, match=r"report\.json"):
        promote(store.join(report, "report.json"), a, registry, PromoteConfig())
    assert production_model(registry) is None and Registry(registry).versions() == []


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` behaves as on a read-only mount (the tests run as root, whom permissions do not stop)."""
    import errno
    import os
    import tempfile

    real_access, real_mkstemp = os.access, tempfile.mkstemp

    def inside(path) -> bool:
        return Path(path).absolute().is_relative_to(folder)

    def access(path, mode, **kw):
        return False if inside(path) and mode & os.W_OK else real_access(path, mode, **kw)

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and inside(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_blessing_folder_is_refused_before_anything_is_registered(tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry"
    registry.mkdir()
    a = model_folder(str(tmp_path), "a", 1)
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    argv = ["--report", report, "--candidate", a, "--registry", str(registry),
            "--out", str(locked / "b.json")]
    assert cli.run(promote_cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "locked" in err[0] and "writable" in err[0], err
    assert production_model(str(registry)) is None and Registry(str(registry)).versions() == []
    assert list(registry.rglob("*.claim")) == []


def test_a_read_only_registry_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry"
    registry.mkdir()
    a = model_folder(str(tmp_path), "a", 1)
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    _read_only(monkeypatch, registry)
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", a, "--registry", str(registry)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(registry) in err[0] and "writable" in err[0], err
    assert list(registry.rglob("*")) == []
    assert cli.run(promote_cli.main, ["rollback", "--registry", str(registry)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_mistyped_registry_folder_is_refused_unless_created_on_purpose(tmp_path, capsys):
    registry = tmp_path / "registry"
    a = model_folder(str(tmp_path), "a", 1)
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    argv = ["--report", report, "--candidate", a, "--registry", str(registry)]
    assert cli.run(promote_cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0] and "--create-registry" in err[0], err
    assert not registry.exists()
    for command in ("status", "history"):
        assert cli.run(promote_cli.main, [command, "--registry", str(registry)]) == 2
        assert "no such folder" in capsys.readouterr().err
    assert cli.run(promote_cli.main, [*argv, "--create-registry"]) == 0
    assert production_model(str(registry)) is not None
    assert cli.run(promote_cli.main, ["status", "--registry", str(registry)]) == 0


def test_status_of_a_registry_in_a_missing_bucket_says_so(s3_env, capsys):
    missing = "s3://no-such-bucket-here/registry"
    for command in ("status", "history", "rollback"):
        assert cli.run(promote_cli.main, [command, "--registry", missing]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no such bucket" in err[0] and "no production model" not in err[0], err
    assert cli.run(promote_cli.main, ["status", "--registry", store.join(s3_env, "new-registry")]) == 0
    assert "no production model" in capsys.readouterr().out


COMPONENTS = ("simulate", "features", "outcome", "pretrain", "finetune", "evaluate", "promote", "score",
              "serve", "window")


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_command_takes_a_config_and_its_help_reads_like_the_options(name, capsys):
    """Before: ``--requests CONFIG_FLAG_REQUESTS`` in --help, and no --config on serve and window."""
    import importlib

    module = importlib.import_module(f"components.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config YAML" in out and "CONFIG_FLAG" not in out, out
    # no value named after its own option's dest (--out OUT, --batch-rows BATCH_ROWS): they read as N, URI...
    derived = [(opt, word) for opt, word in re.findall(r"(--[a-z-]+) ([A-Z][A-Z_0-9]*)\b", out)
               if word == opt[2:].upper().replace("-", "_") and word != "VERSION"]
    assert derived == [], derived


def test_window_and_serve_read_their_config(tmp_path, capsys, monkeypatch):
    from components import serve as serve_cli
    from components import window as window_cli

    bad = _yaml(tmp_path, "shared:\n  modle_name: x\n")
    argv = ["--logs", str(tmp_path / "dt={date}"), "--window-days", "2", "--config", str(bad)]
    assert cli.run(window_cli.main, argv) == 2
    assert "modle_name" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(serve_cli.server, "serve",
                        lambda settings, worker: seen.setdefault("name", settings.model_name) and 0)
    good = tmp_path / "serve.yaml"
    good.write_text("shared:\n  model_name: ranking-b\n")
    assert cli.run(serve_cli.main, ["--registry", str(tmp_path), "--config", str(good)]) == 0
    assert seen["name"] == "ranking-b"
    assert cli.run(serve_cli.main, ["--registry", str(tmp_path), "--config", str(bad)]) == 2


def _judged(root: str, *, truth: bool = False, diagnostics: dict | None = None, n: int = 3000,
            **metrics: dict) -> tuple[dict, str]:
    """A hand-written report judged on ``true`` (truth) or ``estimated``, the candidate's lifts vs static."""
    a = model_folder(root, "a", 1)
    flavour = "true" if truth else "estimated"
    lifts = {"opm": lift(0.2), "ctr": lift(0.02), "cvr": lift(0.02), "gpm": lift(0.02), **metrics}
    report = {"n_requests": n, "primary_metric": "opm", "primary_flavour": flavour, "has_ground_truth": truth,
              "policies": {"static": {}, "grade": {}}, "lift_vs_static": {"grade": {flavour: lifts}},
              "models": {"grade": {"uri": a, "content_hash": store.content_hash(a)}}}
    if diagnostics is not None:
        report["diagnostics"] = diagnostics
    return report, a


def _decide(root: str, report: dict, a: str, cfg: PromoteConfig | None = None) -> Blessing:
    from grade.release.promotion import decide

    return decide(report, a, Registry(store.join(root, "registry")), cfg or PromoteConfig())


@pytest.mark.parametrize("truth", [True, False])
def test_a_guardrail_is_judged_on_its_ci_lower_bound_never_the_point(tmp_path, truth):
    """Non-inferiority: a point lift above -margin whose CI low is below it is refused, in either flavour."""
    cfg = PromoteConfig(guardrails={"gpm": -0.01, "estimated/gpm": -0.05})
    margin = 0.01 if truth else 0.05
    ok = {"lift": 0.0, "ci_low": -margin + 0.001, "ci_high": 0.05}
    report, a = _judged(str(tmp_path), truth=truth, gpm=ok)
    b = _decide(str(tmp_path), report, a, cfg)
    assert b.blessed, b.reasons
    flavour = "true" if truth else "estimated"
    assert b.thresholds.guardrails == {"gpm": -margin}
    assert [(c.name, c.threshold) for c in b.checks][-1] == (
        f"{flavour}/gpm lift CI low", f">= {-margin} (non-inferiority margin {margin:g})")
    low = {"lift": 0.0, "ci_low": -margin - 0.001, "ci_high": 0.05}  # point 0 > -margin, CI low below
    report, a = _judged(str(tmp_path), truth=truth, gpm=low)
    b = _decide(str(tmp_path), report, a, cfg)
    assert not b.blessed
    expected = f"guardrail {flavour}/gpm: lift CI low {-margin - 0.001:+.4f}"
    assert any(r.startswith(expected) for r in b.reasons), b.reasons


def test_the_truth_gate_keeps_its_margins_and_the_estimated_one_its_own(tmp_path):
    """The estimated margins never loosen the true-flavour gate: a true CTR CI low of -0.02 is refused
    by the default margins (0.005) although the estimated default margin would pass it."""
    cfg = PromoteConfig()
    assert -0.02 >= cfg.margins("estimated")["ctr"] and -0.02 < cfg.margins("true")["ctr"] == -0.005
    assert set(cfg.margins("true")) == set(cfg.margins("estimated")) == {"ctr", "cvr", "gpm"}
    report, a = _judged(str(tmp_path), truth=True, ctr={"lift": 0.01, "ci_low": -0.02, "ci_high": 0.04})
    assert not _decide(str(tmp_path), report, a, cfg).blessed
    report, a = _judged(str(tmp_path), truth=False, ctr={"lift": 0.01, "ci_low": -0.02, "ci_high": 0.04})
    assert _decide(str(tmp_path), report, a, cfg).blessed


def _diagnostic(status: str, name: str = "position_variation", policy: str | None = None) -> dict:
    return {"name": name, "status": status, "value": 0.01, "threshold": ">= 0.05", "policy": policy,
            "sentence": f"{name} is {status}: the logs have no position variation; randomise the logging"}


def test_a_failed_diagnostic_refuses_a_judgement_without_truth_and_names_its_sentence(tmp_path):
    root = str(tmp_path)
    diag = {"checks": [_diagnostic("pass", "logging_randomness"), _diagnostic("fail")]}
    report, a = _judged(root, diagnostics=diag)
    b = _decide(root, report, a)
    assert not b.blessed and b.verdict == "not blessed"
    assert "cannot judge: position_variation is fail: the logs have no position variation; randomise the " \
           "logging" in b.reasons
    failing = [c for c in b.checks if not c.passed]
    assert [(c.name, c.value, c.threshold) for c in failing] == [
        ("diagnostic position_variation", 0.01, ">= 0.05 (fail)")]
    assert not any("logging_randomness" in c.name for c in b.checks)  # passes are not listed
    # the same report with ground truth judges on the truth: the diagnostic does not block
    report, a = _judged(root, truth=True, diagnostics=diag)
    assert _decide(root, report, a).blessed


def test_a_warning_is_shown_but_never_blocks_and_other_policies_failures_do_not_either(tmp_path):
    root = str(tmp_path)
    diag = {"checks": [_diagnostic("warn"), _diagnostic("fail", "support", policy="oracle")],
            "click_model": {"pbm": -1.0, "cascade": -1.2}}
    report, a = _judged(root, diagnostics=diag)
    b = _decide(root, report, a)
    assert b.blessed, b.reasons
    assert [(c.name, c.passed) for c in b.checks[:2]] == [("diagnostic position_variation", True),
                                                          ("diagnostic support (oracle)", True)]
    # about the candidate itself: refused
    report, a = _judged(root, diagnostics={"checks": [_diagnostic("fail", "support", policy="grade")]})
    b = _decide(root, report, a)
    assert not b.blessed and any(r.startswith("cannot judge: support is fail") for r in b.reasons)
    # an unmeasured value (NaN) reads as null
    report, a = _judged(root, diagnostics={"checks": [{**_diagnostic("warn"), "value": float("nan")}]})
    assert _decide(root, report, a).checks[0].value is None
    # a report written before diagnostics existed has none
    report, a = _judged(root)
    assert _decide(root, report, a).blessed


@pytest.mark.parametrize("diagnostics, field", [
    ([], "diagnostics"), ({}, "checks"), ({"checks": {}}, "checks"), ({"checks": ["x"]}, "checks[0]"),
    ({"checks": [{**_diagnostic("fail"), "status": "failed"}]}, "status"),
    ({"checks": [{k: v for k, v in _diagnostic("fail").items() if k != "sentence"}]}, "sentence"),
    ({"checks": [{**_diagnostic("warn"), "value": "0.1"}]}, "value"),
    ({"checks": [{**_diagnostic("warn"), "policy": 3}]}, "policy"),
])
def test_malformed_diagnostics_are_bad_input_naming_the_field(tmp_path, capsys, diagnostics, field):
    registry = str(tmp_path / "registry")
    a = model_folder(str(tmp_path), "a", 1)
    uri = write_report(str(tmp_path), "r1", a, opm=0.05)
    report = json.loads(Path(uri, "report.json").read_text())
    report["diagnostics"] = diagnostics
    with store.publishing(uri) as staging:
        (staging / "report.json").write_text(json.dumps(report))
    assert cli.run(promote_cli.main, ["--report", uri, "--candidate", a, "--registry", registry]) == 2
    err = capsys.readouterr().err
    assert "diagnostics" in err and field in err and "Traceback" not in err
    assert production_model(registry) is None


def test_too_wide_a_primary_interval_says_how_many_requests_would_decide(tmp_path):
    """Lift +0.05 [-0.01, +0.11] at 3,000 requests with an MDE of 0.10: the SE scales as 1/sqrt(n), so the
    MDE reaches the lift at 3,000 * (0.10 / 0.05)^2 = 12,000 requests."""
    root = str(tmp_path)
    opm = {"lift": 0.05, "ci_low": -0.01, "ci_high": 0.11, "se": 0.0357, "mde": 0.10}
    report, a = _judged(root, opm=opm)
    b = _decide(root, report, a)
    assert not b.blessed
    assert any(r.endswith("not enough evidence: about 12,000 requests needed") for r in b.reasons), b.reasons
    # a min_lift of 0.01 leaves 0.04 to detect: 3,000 * (0.10 / 0.04)^2 = 18,750 -> about 19,000
    b = _decide(root, report, a, PromoteConfig(min_lift=0.01))
    assert any(r.endswith("about 19,000 requests needed") for r in b.reasons), b.reasons
    # decided by the evidence: a lift below the threshold, or an MDE already below the lift
    for entry in ({**opm, "lift": -0.005}, {**opm, "mde": 0.04}, {**opm, "ci_low": -0.03, "ci_high": -0.001}):
        report, a = _judged(root, opm=entry)
        b = _decide(root, report, a)
        assert not b.blessed and not any("not enough evidence" in r for r in b.reasons), entry
    # a report written before the MDE existed: the plain reason
    report, a = _judged(root, opm={k: v for k, v in opm.items() if k not in ("se", "mde")})
    assert not any("not enough evidence" in r for r in _decide(root, report, a).reasons)


def test_the_mde_is_at_the_reports_confidence_and_80_percent_power():
    from grade.value.auction import min_detectable_effect

    assert min_detectable_effect(0.01, 0.95) == pytest.approx(0.01 * (1.959964 + 0.841621), rel=1e-5)
    assert min_detectable_effect(0.01, 0.90) == pytest.approx(0.01 * (1.644854 + 0.841621), rel=1e-5)


def test_the_prior_flavour_and_unknown_guardrail_flavours_are_refused_at_config_time():
    from grade.core.errors import ConfigError

    with pytest.raises(ConfigError, match="promote.primary_flavour: 'prior' is not accepted"):
        PromoteConfig(primary_flavour="prior").validate()
    for key in ("prior/gpm", "estimated/", "replay/ctr"):
        with pytest.raises(ConfigError, match=f"promote.guardrails.{key}: expected a metric or"):
            PromoteConfig(guardrails={key: -0.1}).validate()
    PromoteConfig(guardrails={"true/gpm": -0.01, "ctr": -0.01}).validate()
