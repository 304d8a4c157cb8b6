"""Registry and promotion gate on both backends: blessing, CAS alias, races, crashes, rollback, history."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from components import promote as promote_cli
from grade import cli, store
from grade.policy import PolicyConfig, PolicyNet, save_policy
from grade.promotion import PromoteConfig, promote
from grade.registry import Registry, production_model


def model_folder(root: str, name: str, seed: int) -> str:
    """A published model folder holding a real (tiny) policy."""
    torch.manual_seed(seed)
    uri = store.join(root, "models", name)
    with store.publishing(uri) as staging:
        save_policy(PolicyNet(PolicyConfig(n_numeric=2, cat_sizes=[3], n_objectives=3)), staging)
        (staging / "metrics.json").write_text("{}\n")
    return uri


def lift(v: float, lo: float | None = None) -> dict:
    return {"lift": v, "ci_low": v - 0.01 if lo is None else lo, "ci_high": v + 0.01}


def write_report(root: str, name: str, candidate_uri: str, opm: float, gpm: float = 0.01, ctr: float = 0.0,
                 incumbent: tuple[str, float] | None = None, include_candidate: bool = True) -> str:
    """A report.json of the evaluation's shape: the candidate's lifts vs static (and vs the incumbent)."""
    metrics = {"opm": lift(opm), "gpm": lift(gpm), "ctr": lift(ctr), "cvr": lift(0.0)}
    report = {"n_requests": 1000, "primary_metric": "opm", "has_ground_truth": True,
              "policies": {"static": {"true": {}}},
              "lift_vs_static": {},
              "models": {}}
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


@pytest.fixture
def reg_root(store_root):
    return store_root


def test_first_promotion_vs_static_then_better_replaces_and_worse_does_not(reg_root):
    registry = store.join(reg_root, "registry")
    cfg = PromoteConfig()
    a = model_folder(reg_root, "a", 1)
    b1 = promote(write_report(reg_root, "r1", a, opm=0.05), a, registry, cfg)
    assert b1["baseline"] == "static" and b1["blessed"] and b1["promoted"]
    v1 = b1["version"]
    assert production_model(registry)[0] == v1

    b = model_folder(reg_root, "b", 2)
    b2 = promote(write_report(reg_root, "r2", b, opm=0.05, incumbent=(v1, 0.03)), b, registry, cfg)
    assert b2["baseline"] == "incumbent" and b2["promoted"]
    v2 = b2["version"]
    assert production_model(registry)[0] == v2 != v1

    c = model_folder(reg_root, "c", 3)
    b3 = promote(write_report(reg_root, "r3", c, opm=0.05, incumbent=(v2, -0.02)), c, registry, cfg)
    assert not b3["blessed"] and not b3["promoted"]
    assert any("lift CI low" in r for r in b3["reasons"])
    assert production_model(registry)[0] == v2

    # the promoted version holds exactly what was evaluated
    reg = Registry(registry)
    assert reg.lineage(v2)["content_hash"] == store.content_hash(b)
    assert store.content_hash(reg.model_uri(v2)) == store.content_hash(b)
    assert [m["version"] for m in reg.history()] == [v1, v2]


def test_guardrail_and_missing_candidate_fail_closed(reg_root):
    registry = store.join(reg_root, "registry")
    a = model_folder(reg_root, "a", 1)
    b = promote(write_report(reg_root, "r1", a, opm=0.05, ctr=-0.02), a, registry, PromoteConfig())
    assert not b["blessed"] and any("guardrail true/ctr" in r for r in b["reasons"])
    b = promote(write_report(reg_root, "r2", a, opm=0.05, include_candidate=False), a, registry, PromoteConfig())
    assert not b["blessed"] and any("no metrics for candidate" in r for r in b["reasons"])
    b = promote(write_report(reg_root, "r3", a, opm=0.05), a, registry,
                PromoteConfig(min_lift=None, guardrails={}))
    assert not b["blessed"] and any("no thresholds" in r for r in b["reasons"])
    assert production_model(registry) is None


def test_candidate_that_differs_from_the_evaluated_content_is_not_blessed(reg_root):
    registry = store.join(reg_root, "registry")
    a, other = model_folder(reg_root, "a", 1), model_folder(reg_root, "other", 9)
    b = promote(write_report(reg_root, "r1", a, opm=0.05), other, registry, PromoteConfig())
    assert not b["blessed"] and any("not what the report evaluated" in r for r in b["reasons"])


def test_report_against_an_old_incumbent_is_not_blessed(reg_root):
    registry = store.join(reg_root, "registry")
    a = model_folder(reg_root, "a", 1)
    v1 = promote(write_report(reg_root, "r1", a, opm=0.05), a, registry, PromoteConfig())["version"]
    b = model_folder(reg_root, "b", 2)
    stale = promote(write_report(reg_root, "r2", b, opm=0.05, incumbent=("v0000-deadbeef", 0.05)), b, registry,
                    PromoteConfig())
    assert not stale["blessed"] and production_model(registry)[0] == v1
    # no incumbent lifts at all in the report: not blessed either
    c = promote(write_report(reg_root, "r3", b, opm=0.05), b, registry, PromoteConfig())
    assert not c["blessed"]


def test_rerun_is_idempotent(reg_root):
    registry = store.join(reg_root, "registry")
    a = model_folder(reg_root, "a", 1)
    report = write_report(reg_root, "r1", a, opm=0.05)
    first = promote(report, a, registry, PromoteConfig())
    again = promote(report, a, registry, PromoteConfig())
    assert again["verdict"] == "already in production" and not again["promoted"]
    reg = Registry(registry)
    assert reg.versions() == [first["version"]] and len(reg.history()) == 1


def test_racing_promotions_exactly_one_wins(reg_root):
    registry = store.join(reg_root, "registry")
    cands = [model_folder(reg_root, n, s) for n, s in (("a", 1), ("b", 2))]
    reports = [write_report(reg_root, f"r{i}", c, opm=0.05) for i, c in enumerate(cands)]
    barrier = threading.Barrier(2)
    results = [None, None]
    reg = Registry(registry)
    real_production = reg.production

    def run(i):
        results[i] = promote(reports[i], cands[i], registry, PromoteConfig())

    # both read "no alias" before either writes: make both threads decide first
    import grade.registry as registry_mod

    original = registry_mod.Registry.register

    def slow_register(self, *a, **k):
        out = original(self, *a, **k)
        barrier.wait(timeout=30)
        return out

    registry_mod.Registry.register = slow_register
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        registry_mod.Registry.register = original
    verdicts = sorted(r["verdict"] for r in results)
    assert verdicts == ["conflict", "promoted"], verdicts
    winner = next(r for r in results if r["promoted"])
    assert real_production()[0]["version"] == winner["version"]
    assert len(reg.history()) == 1


def test_rollback_restores_the_previous_version(reg_root):
    registry = store.join(reg_root, "registry")
    a, b = model_folder(reg_root, "a", 1), model_folder(reg_root, "b", 2)
    v1 = promote(write_report(reg_root, "r1", a, opm=0.05), a, registry, PromoteConfig())["version"]
    v2 = promote(write_report(reg_root, "r2", b, opm=0.05, incumbent=(v1, 0.04)), b, registry,
                 PromoteConfig())["version"]
    assert cli.run(promote_cli.main, ["rollback", "--registry", registry]) == 0
    assert production_model(registry)[0] == v1
    hist = Registry(registry).history()
    assert [(h["action"], h["version"]) for h in hist] == [("promote", v1), ("promote", v2), ("rollback", v1)]


_KILLED_WRITER = """
import os, sys
from grade import store
from grade.registry import Registry
reg = Registry(sys.argv[1])
real = store.write_json
def die_before_manifest(uri, obj):
    if uri.endswith(store.MANIFEST) and "/versions/" in uri:
        os._exit(9)   # killed between the version's files and its manifest
    return real(uri, obj)
store.write_json = die_before_manifest
reg.register(sys.argv[2])
"""


def test_writer_killed_mid_upload_leaves_no_visible_version(reg_root):
    registry = store.join(reg_root, "registry")
    a = model_folder(reg_root, "a", 1)
    import os

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, registry, a], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    reg = Registry(registry)
    assert reg.versions() == [] and reg.production() is None
    assert store.list_prefix(reg.versions_root), "the writer did upload files (and a claim) before dying"
    # a later promotion works and takes a fresh version id
    b = promote(write_report(reg_root, "r1", a, opm=0.05), a, registry, PromoteConfig())
    assert b["promoted"] and reg.versions() == [b["version"]]


def test_cli_bad_report_is_exit_2_and_status_history(tmp_path, capsys):
    registry = str(tmp_path / "registry")
    a = model_folder(str(tmp_path), "a", 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.run(promote_cli.main, ["--report", str(bad), "--candidate", a, "--registry", registry]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    report = write_report(str(tmp_path), "r1", a, opm=0.05)
    blessing = tmp_path / "blessing.json"
    assert cli.run(promote_cli.main, ["--report", report, "--candidate", a, "--registry", registry,
                                      "--blessing", str(blessing)]) == 0
    assert json.loads(blessing.read_text())["promoted"] is True
    assert cli.run(promote_cli.main, ["status", "--registry", registry]) == 0
    assert cli.run(promote_cli.main, ["history", "--registry", registry]) == 0
    out = capsys.readouterr().out
    assert "grade-mtf/production -> v0001" in out and "None -> v0001" in out
    assert Path(registry, "grade-mtf", "versions").is_dir()
