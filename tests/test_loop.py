"""The closed loop: each round's config, its record in loop.json, the page, the command line."""

import datetime as dt
import json

import pytest

from pipeline import loop


def _plan(**base):
    return loop.LoopPlan(rounds=3, days_per_round=4, window_days=8, start=dt.date(2026, 1, 1), base=base)


def test_rounds_follow_the_calendar_and_later_rounds_are_served_by_production():
    plan = _plan(simulator={"seed": 3, "n_requests": 100}, promote={"min_lift": 0.0})
    assert plan.round_days(0) == (dt.date(2026, 1, 1), dt.date(2026, 1, 4))
    assert plan.round_days(2) == (dt.date(2026, 1, 9), dt.date(2026, 1, 12))
    first = loop.round_config(plan, 0, None)
    assert first["simulator"] == {"seed": 3, "n_requests": 100, "start_date": "2026-01-01", "n_days": 4}
    # the gate judges without truth
    assert first["promote"] == {"min_lift": 0.0, "primary_flavour": "estimated"}
    later = loop.round_config(plan, 2, "/reg/grade-mtf/versions/v0002")
    assert later["simulator"]["stream"] == 2
    assert later["simulator"]["logging"] == "/reg/grade-mtf/versions/v0002"
    assert later["simulator"]["start_date"] == "2026-01-09"
    assert plan.base["simulator"] == {"seed": 3, "n_requests": 100}, "the base config is not changed"


def _cells(lift):
    return {m: {"lift": lift, "ci_low": lift - 0.05, "ci_high": lift + 0.05} for m in ("opm", "gpm", "ctr")}


def _report(with_incumbent):
    truth = lambda opm: {"true": {"opm": opm, "gpm": 10 * opm, "ctr": opm / 100}}  # noqa: E731
    policies = {"static": truth(50.0), "grade": truth(60.0)}
    if with_incumbent:
        policies["incumbent"] = truth(55.0)
    return {"n_requests": 300, "policies": policies, "headroom_captured": {"grade": 0.7},
            "lift_vs_static": {"grade": {"true": _cells(0.2), "estimated": _cells(0.3)},
                               "incumbent": {"true": _cells(0.1)}}}


def test_a_round_record_names_what_serves_after_it():
    days = (dt.date(2026, 1, 5), dt.date(2026, 1, 8))
    promoted = loop.round_record(1, _report(True), {"blessed": True, "verdict": "promoted", "reasons": []},
                                 "v0002", days)
    assert promoted["production_policy"] == "grade" and promoted["production_true"]["opm"] == 60.0
    assert promoted["candidate_true_lift"]["opm"]["lift"] == 0.2
    assert promoted["estimated_lift"]["gpm"]["lift"] == 0.3 and promoted["capture"] == 0.7
    refused = loop.round_record(1, _report(True), {"blessed": False, "verdict": "NOT BLESSED",
                                                   "reasons": ["cannot judge"]}, "v0001", days)
    assert refused["production_policy"] == "incumbent" and refused["production_true"]["opm"] == 55.0
    assert refused["reasons"] == ["cannot judge"]
    first = loop.round_record(0, _report(False), {"blessed": False, "verdict": "NOT BLESSED"}, None, days)
    assert first["production_policy"] == "static" and first["production_true"]["opm"] == 50.0


def test_results_are_written_whole_with_a_page(tmp_path):
    days = (dt.date(2026, 1, 1), dt.date(2026, 1, 4))
    refused = {"blessed": False, "verdict": "NOT BLESSED"}
    rounds = [loop.round_record(0, _report(False), {"blessed": True, "verdict": "promoted"}, "v0001", days),
              loop.round_record(1, _report(True), refused, "v0001", days)]
    loop.publish_results(tmp_path, _plan(), rounds)
    doc = json.loads((tmp_path / loop.LOOP_FILE).read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1] and doc["plan"]["window_days"] == 8
    page = (tmp_path / loop.PAGE_FILE).read_text()
    assert "<img" in page and "NOT BLESSED" in page
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds"),
    (["--rounds", "2", "--days-per-round", "-1"], "--days-per-round"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, capsys, argv, message):
    from grade.core import cli

    code = cli.run(loop.main, [*argv, "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err


# A tiny market and short fits: the loop's wiring, not its numbers (docs/loop.md has those); a round
# costs a whole pipeline run, so the test runs one, starting from a model already in production.
TINY = {
    "simulator": {"seed": 3, "n_requests": 600, "n_users": 300, "n_items": 3000, "list_size": 12,
                  "n_days": 2},
    "value_model": {"outcome": {"epochs": 1, "members": 1}},
    "pretrain": {"epochs": 1, "batch_size": 256, "threads": 1},
    "finetune": {"epochs": 1, "group_size": 4, "batch_size": 128},
    "evaluate": {"bootstrap_samples": 50, "oracle_candidates": 16, "frontier_steps": 2,
                 "static_search_iterations": 1, "static_search_population": 4,
                 "static_search_max_requests": 200},
    "promote": {"min_lift": -1.0, "guardrails": {"ctr": -1.0, "cvr": -1.0, "gpm": -1.0}},
    "serve": {"explore": {"share": 0.5}},
}


def _production_model(tmp_path, sim: dict, registry_root: str) -> str:
    """A registered production version: a policy with random personalised weights on the features of a
    static market of the loop's world (what a first promotion would leave behind)."""
    from grade.data import simulator
    from grade.data.features import FeaturesConfig, extract_features
    from grade.model.registry import Registry
    from tests.sim_tensors import publish_random_policy

    logs, feats, model = (str(tmp_path / name) for name in ("static-logs", "static-feats", "model"))
    simulator.write_logs(simulator.SimulatorConfig(**sim), logs)
    extract_features(logs, feats, FeaturesConfig())
    publish_random_policy(feats, model, seed=3)
    registry = Registry(registry_root, "grade-mtf")
    version, _ = registry.register(model)
    registry.set_production(version, "the loop's starting point", expected_etag=None)
    return version


@pytest.mark.slow
def test_a_round_is_served_by_production_with_logged_exploration_and_judged_against_it(tmp_path):
    """With a model in production, a round's days are served by it (half the requests exploring, with
    logged propensities), the pipeline retrains on them and the gate judges the candidate against it."""
    import pyarrow.parquet as pq
    import yaml

    from grade.core import store

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "loop"
    version = _production_model(tmp_path, TINY["simulator"], str(out / "_work" / "store" / "registry"))
    assert loop.main(["--rounds", "1", "--config", str(cfg), "--out", str(out)]) == 0
    (first,) = json.loads((out / loop.LOOP_FILE).read_text())["rounds"]
    day = out / "_work" / "store" / "days" / f"day={first['days'][0]}"
    assert store.read_manifest(str(day))["producer"] == "pipeline.loop"
    table = pq.read_table(next(day.glob("*.parquet")))
    assert set(table["model_version"].to_pylist()) == {version}
    explored = table["served_log_propensity"].is_valid().to_numpy()
    assert 0.2 < explored.mean() < 0.8
    report = json.loads((out / "round-0" / "report.json").read_text())
    assert report["models"]["incumbent"]["version"] == version, "judged against production"
    assert set(first["exploration_cost"]) == {"opm", "gpm", "ctr"}
    promoted = first["verdict"] == "promoted"
    assert (first["production_version"] != version) == promoted, "production moves only on a promotion"
    assert (out / loop.PAGE_FILE).is_file()


def test_set_values_nest_into_the_config_every_round_starts_from(tmp_path):
    cfg = tmp_path / "base.yaml"
    cfg.write_text("simulator:\n  seed: 4\nserve:\n  explore:\n    kappa_cap: 50\n")
    args = loop.build_parser().parse_args(["--rounds", "1", "--out", str(tmp_path / "o"), "--config",
                                           str(cfg), "--set", "serve.explore.share=0.2",
                                           "--set", "simulator.n_days=3"])
    assert loop.base_config(args) == {"simulator": {"seed": 4, "n_days": 3},
                                      "serve": {"explore": {"kappa_cap": 50, "share": 0.2}}}
