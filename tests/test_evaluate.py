"""End to end evaluation on a small synthetic features folder built by the contract in
docs/architecture.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grade.core import store
from grade.core.errors import InputError
from grade.evaluate.evaluation import EvaluateConfig, run_evaluation
from grade.evaluate.summary import format_table
from grade.model.policy import PolicyConfig, PolicyNet, save_policy

OBJECTIVES = ["ctr", "cvr", "gmv"]
HAS_SIMULATOR = importlib.util.find_spec("grade.data.simulator") is not None


def _requests(n: int, length: int, gen: torch.Generator, truth: bool) -> dict[str, torch.Tensor]:
    """Synthetic marketplace requests: 3 segments with different price sensitivity."""
    segment = torch.randint(0, 3, (n,), generator=gen)
    n_items = torch.randint(length - 4, length + 1, (n,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < n_items.unsqueeze(1)
    price = torch.exp(torch.randn(n, length, generator=gen) * 0.8 + 3.0)
    quality = torch.randn(n, length, generator=gen)
    sensitivity = torch.tensor([0.2, 0.6, 1.0])[segment].unsqueeze(1)
    true_ctr = torch.sigmoid(-2.5 + 0.8 * quality - sensitivity * (price.log() - 3.0))
    true_cvr = torch.sigmoid(-2.0 + 0.5 * quality - 1.5 * sensitivity * (price.log() - 3.0))
    # The MTL model misses the per-segment price sensitivity (global average 0.6).
    pred_ctr = torch.sigmoid(-2.5 + 0.8 * quality - 0.6 * (price.log() - 3.0)
                             + 0.2 * torch.randn(n, length, generator=gen))
    pred_cvr = torch.sigmoid(-2.0 + 0.5 * quality - 0.9 * (price.log() - 3.0)
                             + 0.2 * torch.randn(n, length, generator=gen))
    pred = torch.stack([pred_ctr, pred_cvr, price], -1) * mask.unsqueeze(-1)
    # Logged order: static ranking (product of predictions) with noise; clicks under position bias.
    logged_score = (pred.clamp_min(1e-12).log().sum(-1) + 0.5 * torch.randn(n, length, generator=gen))
    logged_score = logged_score.masked_fill(~mask, float("-inf"))
    order = torch.argsort(logged_score, dim=-1, descending=True, stable=True)
    position = torch.argsort(order, dim=-1).masked_fill(~mask, -1)
    examine = 1.0 / (1.0 + position.clamp_min(0).float())
    click = ((torch.rand(n, length, generator=gen) < true_ctr * examine) & mask).float()
    buy = ((torch.rand(n, length, generator=gen) < true_cvr) & (click > 0)).float()
    out = {
        "pred": pred.float(), "mask": mask, "click": click, "order": buy, "gmv": buy * price * mask,
        "position": position.long(),
        "num": torch.stack([sensitivity[:, 0] + 0.1 * torch.randn(n, generator=gen),
                            torch.randn(n, generator=gen)], -1),
        "cat": torch.stack([segment + 1, torch.randint(0, 3, (n,), generator=gen)], -1).long(),
        "event_time": torch.arange(n, dtype=torch.int64), "request_id": torch.arange(n, dtype=torch.int64),
    }
    if truth:
        out.update({"true_ctr": true_ctr * mask, "true_cvr": true_cvr * mask, "price": price * mask,
                    "segment": segment.long()})
    return out


def make_features(root: Path, n_train: int = 600, n_test: int = 500, length: int = 12, seed: int = 0,
                  truth: bool = True) -> str:
    """A published features folder: feature_spec.json + {train,valid,test}/part-00000.safetensors."""
    gen = torch.Generator().manual_seed(seed)
    splits = {"train": _requests(n_train, length, gen, truth=False),
              "valid": _requests(max(1, n_test // 4), length, gen, truth),
              "test": _requests(n_test, length, gen, truth)}
    train = splits["train"]
    logp = train["pred"].clamp_min(1e-12).log()[train["mask"]]
    m, s = logp.mean(0), logp.std(0)
    spec = {"objectives": OBJECTIVES, "pred_log_mean": m.tolist(), "pred_log_std": s.tolist(),
            "numeric": [{"name": "u_sensitivity", "mean": 0.0, "std": 1.0},
                        {"name": "u_noise", "mean": 0.0, "std": 1.0}],
            "categorical": [{"name": "c_segment_hint", "vocab": [10, 20, 30], "size": 4},
                            {"name": "c_device", "vocab": [0, 1], "size": 3}],
            "list_size": length, "splits": {},
            "ground_truth": ["true_ctr", "true_cvr", "price", "segment"] if truth else []}
    with store.publishing(str(root)) as staging:
        for name, t in splits.items():
            t["z"] = (((t["pred"].clamp_min(1e-12).log() - m) / s) * t["mask"].unsqueeze(-1)).float()
            (staging / name).mkdir()
            save_file({k: v.contiguous() for k, v in t.items()},
                      str(staging / name / "part-00000.safetensors"))
            spec["splits"][name] = {"n_requests": int(t["mask"].shape[0]), "n_rows": int(t["mask"].sum()),
                                    "shards": [f"{name}/part-00000.safetensors"],
                                    "shard_requests": [int(t["mask"].shape[0])], "time_min": 0, "time_max": 1}
        (staging / "feature_spec.json").write_text(json.dumps(spec))
    return str(root)


def make_model(root: Path, seed: int = 0, steps: int = 5) -> str:
    """A published policy folder with a train_log.jsonl and metrics.json (like Stage 1/2 outputs)."""
    torch.manual_seed(seed)
    model = PolicyNet(PolicyConfig(n_numeric=2, cat_sizes=[4, 3], n_objectives=3, hidden=[8]))
    with torch.no_grad():
        model.mu_head.weight.normal_(0, 1.0)  # weights that differ per request
    with store.publishing(str(root)) as staging:
        save_policy(model, staging)
        rows = [{"step": i, "pretrain/loss": 1.0 / (i + 1), "pretrain/ndcg": 0.1 * i} for i in range(steps)]
        (staging / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (staging / "metrics.json").write_text(json.dumps({"valid_ndcg_order": 0.4}))
    return str(root)


def small_config(**kw) -> EvaluateConfig:
    base = {"bootstrap_samples": 200, "static_search_iterations": 3, "static_search_population": 12,
            "oracle_candidates": 16, "frontier_steps": 5, "exposure_depth": 5}
    base.update(kw)
    return EvaluateConfig(**base)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    features = make_features(root / "features")
    model = make_model(root / "model")
    out = str(root / "out")
    report = run_evaluation(features, {"grade": model}, out, small_config())
    return features, model, out, report


def test_report_shape_and_outputs(evaluated):
    features, model, out, report = evaluated
    assert store.is_published(out)
    names = set(store.read_manifest(out)["files"])
    assert {"report.json", "report.html", "metrics.json", "config.json"} <= names
    on_disk = store.read_json(store.join(out, "report.json"))
    assert on_disk["n_requests"] == 500 and on_disk["primary_metric"] == "opm" and on_disk["has_ground_truth"]
    expected = {"static", "best_static", "logged", "grade"} | ({"oracle"} if HAS_SIMULATOR else set())
    assert expected <= set(on_disk["policies"])
    for flavour, metrics in (("true", {"ctr", "cvr", "opm", "gpm"}), ("prior", {"ctr", "cvr", "opm", "gpm"}),
                             ("estimated", {"ctr", "cvr", "opm", "gpm"}),
                             ("replay", {"ndcg_click", "ndcg_order", "ndcg_gmv", "gauc"})):
        assert set(on_disk["policies"]["grade"][flavour]) == metrics
    lift = on_disk["lift_vs_static"]["grade"]["true"]["opm"]
    assert lift["ci_low"] <= lift["lift"] <= lift["ci_high"]
    assert "static" not in on_disk["lift_vs_static"]
    assert on_disk["models"]["grade"] == {"uri": model, "content_hash": store.content_hash(model)}
    assert on_disk["config"]["bootstrap_samples"] == 200
    # The lift is the ratio of the two reported metrics.
    p = on_disk["policies"]
    assert lift["lift"] == pytest.approx(p["grade"]["true"]["opm"] / p["static"]["true"]["opm"] - 1)
    # Paired lifts vs best_static too (stage1 is not among these models): the same ratio, its own CI.
    assert set(on_disk["lift_vs"]) == {"best_static"}
    vs_best = on_disk["lift_vs"]["best_static"]["grade"]["true"]["opm"]
    assert vs_best["lift"] == pytest.approx(p["grade"]["true"]["opm"] / p["best_static"]["true"]["opm"] - 1)
    assert vs_best["ci_low"] <= vs_best["lift"] <= vs_best["ci_high"]
    assert on_disk["comparisons"]["grade"]["opm_lift_vs_best_static"] == vs_best
    table = format_table(on_disk)
    assert "best_static higher (" in table or "best_static NOT higher (" in table
    seg = on_disk["segments"]
    names = {"browser", "buyer", "bargain_hunter"} if HAS_SIMULATOR else {"0", "1", "2"}
    assert seg["feature"] == "segment" and set(seg["by_segment"]) == names
    assert sum(v["n_requests"] for v in seg["by_segment"].values()) == 500
    # Mean learned weights per segment are on the simplex.
    for w in seg["mean_weights"]["grade"].values():
        assert sum(w) == pytest.approx(1.0, abs=1e-5)


def test_kfp_metrics_format(evaluated):
    _, _, out, report = evaluated
    metrics = store.read_json(store.join(out, "metrics.json"))["metrics"]
    assert metrics and all(set(m) == {"name", "numberValue", "format"} and m["format"] == "RAW"
                           for m in metrics)
    by = {m["name"]: m["numberValue"] for m in metrics}
    assert by["grade-lift-opm"] == pytest.approx(report["lift_vs_static"]["grade"]["true"]["opm"]["lift"])
    assert by["static-true-ctr"] == pytest.approx(report["policies"]["static"]["true"]["ctr"])
    import re

    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,62}", m["name"]) for m in metrics)


def test_static_and_logged_metrics_match_a_direct_computation(evaluated):
    """The static policy's true OPM recomputed by hand (loops, not the library) on the test split."""
    features, _, _, report = evaluated
    from safetensors.torch import load_file

    t = load_file(str(Path(features) / "test" / "part-00000.safetensors"))
    spec = json.loads((Path(features) / "feature_spec.json").read_text())
    w = torch.tensor(spec["pred_log_std"]) / sum(spec["pred_log_std"])
    orders = impressions = 0.0
    for r in range(t["mask"].shape[0]):
        n = int(t["mask"][r].sum())
        score = (t["z"][r, :n] * w).sum(-1).tolist()
        ranked = sorted(range(n), key=lambda i: (-score[i], i))[:5]
        for j, i in enumerate(ranked):
            impressions += 1 / (1 + j)
            orders += float(t["true_ctr"][r, i] * t["true_cvr"][r, i]) / (1 + j)
    assert report["policies"]["static"]["true"]["opm"] == pytest.approx(1000 * orders / impressions, rel=1e-5)
    # logged: position order
    clicks = 0.0
    for r in range(t["mask"].shape[0]):
        for i in range(t["mask"].shape[1]):
            pos = int(t["position"][r, i])
            if 0 <= pos < 5:
                clicks += float(t["true_ctr"][r, i]) / (1 + pos)
    assert report["policies"]["logged"]["true"]["ctr"] == pytest.approx(clicks / impressions, rel=1e-5)


def test_best_static_is_in_the_report_with_its_search(evaluated):
    report = evaluated[3]
    search = report["best_static_search"]
    assert search["value"] >= search["static_value"]
    assert sum(report["weights"]["best_static"]) == pytest.approx(1.0, abs=1e-5)


def test_same_config_same_report(evaluated, tmp_path):
    features, model, _, report = evaluated
    again = run_evaluation(features, {"grade": model}, str(tmp_path / "again"), small_config())
    assert again["policies"] == report["policies"]
    assert again["lift_vs_static"] == report["lift_vs_static"]


def test_terminal_table(evaluated):
    text = format_table(evaluated[3])
    lines = text.splitlines()
    assert any(line.startswith("grade") and "%" in line and "[" in line for line in lines)
    assert any(line.startswith("static") and "(reference)" in line for line in lines)


def test_html_is_self_contained(evaluated):
    _, _, out, _ = evaluated
    page = Path(out, "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count("<img") >= 4  # lift bars, frontier, weights per segment, training curves
    for heading in ("Metrics", "Lifts vs static", "Trade-off frontier", "Learned weights per segment",
                    "Training curves"):
        assert f"<h2>{heading}</h2>" in page


def test_a_run_with_gmv_declared_judges_every_verdict_on_gpm(evaluated, tmp_path):
    """business {orders: 0, gmv: 1}: the primary metric is GPM and the comparisons, the headroom and the
    table are on GPM, whatever OPM says."""
    from grade.value.business import BusinessConfig

    features, model, _, _ = evaluated
    report = run_evaluation(features, {"grade": model, "other": model}, str(tmp_path / "gpm"),
                            small_config(static_search_iterations=0, bootstrap_samples=20),
                            business=BusinessConfig(orders=0.0, gmv=1.0))
    assert report["primary_metric"] == "gpm" and report["primary_flavour"] == "true"
    true = {p: v["true"] for p, v in report["policies"].items()}
    for p, beats in report["comparisons"]["grade"].items():
        assert beats == (true["grade"]["gpm"] > true[p.removeprefix("beats_")]["gpm"]), p
    s, o = true["static"]["gpm"], true["oracle"]["gpm"]
    assert report["headroom_captured"]["grade"] == pytest.approx((true["grade"]["gpm"] - s) / (o - s))
    assert "true-GPM" in report["headroom_sentence"]
    assert report["headroom_sentence"].index("grade ") < report["headroom_sentence"].index("other ")
    assert "grade true GPM vs:" in format_table(report)


def test_truth_free_run_leads_with_estimated_and_the_gate_decides_as_with_truth(tmp_path):
    """The same logs with and without the ground-truth columns: estimated leads, the gate agrees."""
    from grade.model.registry import Registry
    from grade.release.promotion import PromoteConfig, decide

    model = make_model(tmp_path / "model")
    cfg = small_config(static_search_iterations=0)
    reports = {}
    for truth in (True, False):
        features = make_features(tmp_path / f"f{truth}", n_train=300, n_test=300, truth=truth, seed=3)
        reports[truth] = run_evaluation(features, {"grade": model}, str(tmp_path / f"out{truth}"), cfg)
    free, true = reports[False], reports[True]
    assert not free["has_ground_truth"] and free["primary_flavour"] == "estimated"
    assert true["primary_flavour"] == "true" and free["primary_metric"] == true["primary_metric"] == "opm"
    assert "true" not in free["policies"]["static"] and "oracle" not in free["policies"]
    assert free["segments"]["feature"] == "c_segment_hint"
    assert set(free["segments"]["by_segment"]) <= {"10", "20", "30", "(other)"}
    assert free["headroom_captured"] == {} and free["estimator_check"] == {}
    # the estimated flavour only reads the logs: identical with and without the truth columns
    assert free["policies"]["grade"]["estimated"] == pytest.approx(true["policies"]["grade"]["estimated"])
    assert "estimated OPM lift" in format_table(true)
    blessings = {t: decide(r, model, Registry(str(tmp_path / f"reg{t}"), "m"), PromoteConfig())
                 for t, r in reports.items()}
    assert blessings[False].primary == "estimated/opm" and blessings[True].primary == "true/opm"
    assert [c.name.split("/", 1)[1] for c in blessings[False].checks] == \
        [c.name.split("/", 1)[1] for c in blessings[True].checks]
    assert blessings[False].blessed == blessings[True].blessed
    lift = {t: r["lift_vs_static"]["grade"][r["primary_flavour"]]["opm"]["lift"] for t, r in reports.items()}
    assert (lift[False] > 0) == (lift[True] > 0)


@pytest.mark.skipif(not HAS_SIMULATOR, reason="segment names come from grade.data.simulator")
def test_segment_best_and_the_distance_of_learned_to_best_weights(evaluated):
    _, _, out, report = evaluated
    page = store.read_bytes(store.join(out, "report.html")).decode()
    assert "Estimator check" in page and "<th>L1</th>" in page and "truly best vector" in page
    assert "segment_best" in report["policies"]
    best = report["segments"]["best_weights"]
    assert set(best) == {"browser", "buyer", "bargain_hunter"}
    rows = report["segments"]["l1_to_best"]["grade"]
    for seg, w in best.items():
        learned = report["segments"]["mean_weights"]["grade"][seg]
        assert rows[seg]["l1"] == pytest.approx(sum(abs(a - b) for a, b in zip(learned, w, strict=True)))
    assert rows["mean_l1"] == pytest.approx(sum(rows[s]["l1"] for s in best) / 3)
    # searched with the truth on valid, evaluated on test: never far below the global static weights
    assert (report["policies"]["segment_best"]["true"]["opm"]
            >= 0.95 * report["policies"]["static"]["true"]["opm"])
    check = report["estimator_check"]
    assert check["metric"] == "opm" and 0 <= check["covered_share"] <= 1
    assert set(check["segments"]) == {"browser", "buyer", "bargain_hunter"}
    for row in check["segments"].values():
        assert {"ips", "snips", "dm", "switch", "prior", "best"} <= set(row)
        assert all(0 <= row[k]["share"] <= 1 + 1e-9 for k in ("ips", "dm", "prior"))


def test_logged_policy_estimated_by_ips_is_the_logged_feedback(evaluated):
    """IPS of the logging policy under any theta-hat: the logged clicks and orders of its top E."""
    features, _, _, report = evaluated
    from grade.data import dataset

    test = dataset.load_split(features, "test")
    top = (test["position"] >= 0) & (test["position"] < 5) & test["mask"]
    est = report["policies"]["logged"]["estimated"]
    logged_cvr = float(test["order"][top].double().sum() / test["click"][top].double().sum())
    assert est["cvr"] == pytest.approx(logged_cvr, rel=1e-9)


def test_bad_inputs_raise_input_errors(tmp_path, evaluated):
    features, model, _, _ = evaluated
    with pytest.raises(InputError, match="segment_feature"):
        run_evaluation(features, {}, str(tmp_path / "o1"), small_config(segment_feature="c_nope",
                                                                         static_search_iterations=0))
    with pytest.raises(InputError, match="reserved"):
        run_evaluation(features, {"static": model}, str(tmp_path / "o2"), small_config())
    with pytest.raises(InputError, match="split"):
        run_evaluation(features, {}, str(tmp_path / "o3"), small_config(split="nope"))
    with store.publishing(str(tmp_path / "empty")) as staging:
        (staging / "notes.txt").write_text("no policy here")
    with pytest.raises(InputError, match="not a policy folder"):
        run_evaluation(features, {"m": str(tmp_path / "empty")}, str(tmp_path / "o4"),
                       small_config(static_search_iterations=0))
    assert not store.is_published(str(tmp_path / "o4"))


def test_unpublished_or_changed_model_folder_is_refused(tmp_path, evaluated, capsys):
    """A model folder without its manifest is not evaluated (no report with content_hash None), and
    a published one whose weights changed since fails the manifest's sha256: both exit 2 naming it."""
    import shutil

    import grade.core.cli
    from components import evaluate

    features, model, _, _ = evaluated
    unpublished = tmp_path / "unpublished"
    shutil.copytree(model, unpublished)
    (unpublished / store.MANIFEST).unlink()
    args = ["--features", features, "--model", f"grade={unpublished}", "--out", str(tmp_path / "o"),
            "--set", "evaluate.bootstrap_samples=20"]
    assert grade.core.cli.run(evaluate.main, args) == 2
    assert f"{unpublished}: no {store.MANIFEST}" in capsys.readouterr().err
    assert not store.is_published(str(tmp_path / "o"))
    changed = tmp_path / "changed"
    shutil.copytree(model, changed)
    weights = bytearray((changed / "policy.safetensors").read_bytes())
    weights[-1] ^= 1
    (changed / "policy.safetensors").write_bytes(bytes(weights))
    args[3] = f"grade={changed}"
    assert grade.core.cli.run(evaluate.main, args) == 2
    assert "policy.safetensors: content differs from the manifest" in capsys.readouterr().err


def test_component_cli(evaluated, tmp_path, capsys):
    from components import evaluate

    features, model, _, _ = evaluated
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluate:\n  bootstrap_samples: 50\n  static_search_iterations: 1\n"
                   "  static_search_population: 4\n  oracle_candidates: 8\n  frontier_steps: 3\n")
    out = str(tmp_path / "cli")
    assert evaluate.main(["--features", features, "--model", f"grade={model}", "--out", out,
                          "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}/report.html" in printed and "OPM lift vs static" in printed
    assert store.read_json(store.join(out, "report.json"))["config"]["bootstrap_samples"] == 50
    import grade.core.cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  nonsense: 1\n")
    args = ["--features", features, "--out", out, "--config", str(bad)]
    assert grade.core.cli.run(evaluate.main, args) == 2


def test_incumbent_from_registry(evaluated, tmp_path):
    """With a registry that has a production model, 'incumbent' is evaluated and lifts vs it are reported."""
    from grade.model.registry import Registry

    features, model, _, _ = evaluated
    registry = str(tmp_path / "registry")
    report = run_evaluation(features, {"grade": model}, str(tmp_path / "none"), small_config(),
                            registry_uri=registry)
    assert "incumbent" not in report["policies"] and "lift_vs_incumbent" not in report
    reg = Registry(registry)
    version, _ = reg.register(model)
    reg.set_production(version, "test", expected_etag=None)
    report = run_evaluation(features, {"grade": model}, str(tmp_path / "inc"), small_config(),
                            registry_uri=registry)
    assert report["models"]["incumbent"]["version"] == version
    assert report["models"]["incumbent"]["content_hash"] == report["models"]["grade"]["content_hash"]
    same = report["lift_vs_incumbent"]["grade"]["true"]["opm"]
    # the same model: identical rankings, a lift of exactly 0 with no spread
    assert same == {"lift": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0, "mde": 0.0}


def test_publishes_to_s3(evaluated, s3_env):
    features, model, _, _ = evaluated
    out = f"{s3_env}/reports/run-1"
    report = run_evaluation(features, {"grade": model}, out,
                            small_config(static_search_iterations=0, bootstrap_samples=20))
    assert store.is_published(out)
    assert store.read_json(store.join(out, "report.json"))["n_requests"] == report["n_requests"]
    assert store.read_bytes(store.join(out, "report.html")).startswith(b"<!DOCTYPE html>")


def test_comparisons_by_hand():
    from grade.evaluate.verdicts import comparisons, headroom_shares

    policies = {"static": {"true": {"opm": 10.0, "gpm": 100.0}},
                "best_static": {"true": {"opm": 11.0, "gpm": 90.0}},
                "grade": {"true": {"opm": 12.0, "gpm": 120.0}},
                "oracle": {"true": {"opm": 20.0, "gpm": 110.0}}}
    c = comparisons(policies, "true", ["grade"], metric="opm")
    assert c["grade"] == {"beats_static": True, "beats_best_static": True}
    lift = {"lift": 0.09, "ci_low": 0.02, "ci_high": 0.15}
    c = comparisons(policies, "true", ["grade"], {"best_static": {"grade": {"true": {"opm": lift}},
                                                                  "best_static": {"true": {"opm": lift}}}},
                    metric="opm")
    assert c["grade"]["opm_lift_vs_best_static"] == lift and c["grade"]["beats_best_static"]
    assert c["oracle_above_all"] == {"opm": True, "gpm": False}
    assert headroom_shares(policies, "true", "opm") == pytest.approx({"best_static": 0.1, "grade": 0.2})


def test_a_declared_gpm_is_the_metric_of_every_verdict():
    """With GPM declared, OPM and GPM disagree here: the verdicts, the headroom and the table follow GPM,
    and the sentence names the named models in the order given, none singled out."""
    from grade.evaluate.summary import format_table
    from grade.evaluate.verdicts import comparisons, headroom_sentence, headroom_shares

    policies = {"static": {"true": {"opm": 10.0, "gpm": 100.0}},
                "best_static": {"true": {"opm": 13.0, "gpm": 90.0}},
                "zeta": {"true": {"opm": 12.0, "gpm": 120.0}},
                "grade": {"true": {"opm": 14.0, "gpm": 105.0}},
                "oracle": {"true": {"opm": 20.0, "gpm": 130.0}}}
    lift = {"lift": 0.33, "ci_low": 0.2, "ci_high": 0.4}
    paired = {"best_static": {"zeta": {"true": {"gpm": lift, "opm": {"lift": -0.08, "ci_low": -0.1,
                                                                      "ci_high": -0.05}}}}}
    c = comparisons(policies, "true", ["zeta", "grade"], paired, metric="gpm")
    assert c["zeta"]["beats_best_static"] and c["zeta"]["beats_grade"]      # by OPM it would lose both
    assert c["zeta"]["gpm_lift_vs_best_static"] == lift and "opm_lift_vs_best_static" not in c["zeta"]
    assert not c["grade"]["beats_zeta"]
    shares = headroom_shares(policies, "true", "gpm")
    assert shares == pytest.approx({"best_static": -1 / 3, "zeta": 2 / 3, "grade": 1 / 6})
    sentence = headroom_sentence(shares, policies, "true", ["zeta", "grade"], "gpm")
    assert "true-GPM" in sentence and "OPM" not in sentence
    assert sentence.index("zeta 66.7%") < sentence.index("grade 16.7%") < sentence.index("best_static -33.3%")
    lifts = {p: {"true": {m: lift for m in ("opm", "gpm")}} for p in policies}
    report = {"primary_flavour": "true", "primary_metric": "gpm", "policies": policies,
              "lift_vs_static": lifts, "n_requests": 10, "split": "test", "exposure_depth": 10,
              "config": {"confidence": 0.95, "bootstrap_samples": 10}, "comparisons": c,
              "headroom_sentence": sentence}
    table = format_table(report)
    assert "zeta true GPM vs: static higher, best_static higher (+33.00% [+20.00, +40.00])" in table
    head = table.splitlines()[1]
    assert head.index("GPM lift vs static") < head.index("OPM lift vs static")


REPORT_KEYS = {"n_requests", "split", "primary_metric", "primary_flavour", "has_ground_truth", "objectives",
               "exposure_depth", "policies", "lift_vs_static", "models", "weights", "best_static_search",
               "headroom_captured", "lift_vs", "comparisons", "headroom_sentence", "segments", "frontier",
               "config", "features", "elapsed_s", "value_model", "estimator_check", "business",
               "diagnostics"}


def test_the_stages_compose_to_report_json(evaluated, tmp_path):
    """load -> compute_policies -> build_report gives report.json (the same keys, the same values)."""
    import time

    from grade.evaluate import evaluation, held_out, policies, summary, verdicts

    features, model, out, report = evaluated
    on_disk = store.read_json(store.join(out, "report.json"))
    assert set(on_disk) == REPORT_KEYS and on_disk == json.loads(json.dumps(summary.finite(report)))
    cfg = small_config()
    # the value model the run fitted itself is published in the report folder, with its report entry
    from grade.value.value_model import load_value_model

    assert report["value_model"]["uri"] == "fitted"
    fitted = store.join(out, held_out.FITTED_VALUE_MODEL)
    assert report["value_model"]["content_hash"] == store.content_hash(fitted)
    held = held_out.load_inputs(features, cfg, None,
                                value_model=(load_value_model(fitted), report["value_model"]))
    named, info = policies.named_models({"grade": model}, None, cfg)
    staged = verdicts.build_report(held, policies.compute_policies(held, named, info), ["grade"],
                                   time.monotonic())
    staged.elapsed_s = report["elapsed_s"]
    assert staged.to_json() == report
    evaluation.publish(staged, str(tmp_path / "again"), "<html>")
    assert store.read_json(store.join(str(tmp_path / "again"), "report.json")) == on_disk


def test_a_baseline_or_primary_flavour_is_one_registry_entry(evaluated, tmp_path, monkeypatch):
    """Adding a baseline to BASELINES puts it in every table; an unavailable one is reported, not ranked;
    the primary flavour is the first available entry of PRIMARY_FLAVOURS."""
    from grade.evaluate import held_out, policies

    features, _, _, _ = evaluated
    uniform = torch.full((len(OBJECTIVES),), 1.0 / len(OBJECTIVES))
    monkeypatch.setattr(policies, "BASELINES", {
        **policies.BASELINES, "uniform": lambda held: policies.Ranking(weights=uniform),
        "broken": lambda held: policies.Ranking(unavailable="needs data this run does not have")})
    monkeypatch.setattr(held_out, "PRIMARY_FLAVOURS", (
        held_out.PrimaryFlavour("never", lambda data: False), *held_out.PRIMARY_FLAVOURS[::-1]))
    report = run_evaluation(features, {}, str(tmp_path / "out"),
                            small_config(static_search_iterations=0, bootstrap_samples=20))
    assert "uniform" in report["policies"] and "broken" not in report["policies"]
    assert report["weights"]["uniform"] == pytest.approx(uniform.tolist())
    assert set(report["lift_vs_static"]["uniform"]["prior"]) >= {"ctr", "opm"}
    assert report["broken_unavailable"] == "needs data this run does not have"
    assert report["primary_flavour"] == "estimated"  # 'never' is unavailable; 'estimated' now precedes 'true'
    with pytest.raises(InputError, match="reserved"):
        run_evaluation(features, {"uniform": "x"}, str(tmp_path / "o2"), small_config())


def test_best_static_searches_the_value_stage2_maximises(evaluated):
    """best_static answers GRADE's question globally: by default the declared value under the same
    guardrail constraints as Stage 2 (CTR and GPM at least static's); with guard_mode price, the
    declared value plus the reward's guardrail prices (grade.value.reward.rewarded_value)."""
    from grade.evaluate.held_out import load_inputs
    from grade.evaluate.policies import _best_static
    from grade.value.business import BusinessConfig
    from grade.value.reward import RewardConfig, rewarded_value
    from grade.value.value_model import load_value_model

    features, _, out, report = evaluated
    search = report["best_static_search"]
    assert search["searched_value"] == dataclasses.asdict(BusinessConfig()) and search["guard_margin"] == 0.0
    assert search["declared_value"] == dataclasses.asdict(BusinessConfig())
    vm = load_value_model(store.join(out, "value_model"))
    priced = load_inputs(features, small_config(), RewardConfig(guard_mode="price"), value_model=(vm, {}))
    details = _best_static(priced).details
    assert details["searched_value"] == dataclasses.asdict(rewarded_value(BusinessConfig(), RewardConfig()))
    assert "guard_margin" not in details
    gmv_weight = {}
    for guard in (0.0, 5.0):
        held = load_inputs(features, small_config(),
                           RewardConfig(guard_mode="price", guard_clicks=0.0, guard_gmv=guard),
                           value_model=(vm, {}))
        gmv_weight[guard] = float(_best_static(held).weights[-1])
    assert gmv_weight[5.0] > gmv_weight[0.0] + 0.05
