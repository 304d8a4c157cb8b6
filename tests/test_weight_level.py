"""The evaluation's weight-level section on a small static-logged simulated market (propensities logged)."""

from __future__ import annotations

import math

import pytest

from grade.core import store
from grade.data import simulator
from grade.data.features import FeaturesConfig, extract_features
from grade.evaluate.evaluation import EvaluateConfig, run_evaluation
from grade.evaluate.weight_level import MEAN_RATIO_BOUNDS
from grade.value.outcome import OutcomeConfig
from grade.value.value_model import ValueModelConfig
from tests.sim_tensors import publish_random_policy


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight-level")
    logs, feats, model, out = (str(root / x) for x in ("logs", "feats", "model", "out"))
    cfg = simulator.SimulatorConfig(n_requests=800, n_users=300, list_size=16, n_items=1000, n_categories=10,
                                    n_days=3, seed=4)
    simulator.write_logs(cfg, logs)
    extract_features(logs, feats, FeaturesConfig())
    publish_random_policy(feats, model, seed=3)
    cfg = EvaluateConfig(bootstrap_samples=200, static_search_iterations=2, static_search_population=8,
                         oracle_candidates=16, frontier_steps=4, exposure_depth=5)
    # a quick value model: the section's direct method only needs one, not a good one
    vm = ValueModelConfig(outcome=OutcomeConfig(epochs=2, members=1))
    run_evaluation(feats, {"grade": model}, out, cfg, value_model_cfg=vm)
    return store.read_json(store.join(out, "report.json")), store.read_bytes(store.join(out, "report.html"))


def test_static_logs_give_lifts_vs_static_for_every_weight_policy(report):
    doc, _ = report
    section = doc["weight_level"]
    assert section["n_explored"] == doc["n_requests"] and section["explored_share"] == 1.0
    assert section["direct_method"] in ("dm", "cascade_dm") and section["estimator"] == "weight_dr"
    policies = set(section["lift_vs_static"]["weight_dr"])
    assert {"static", "grade", "best_static"} <= policies
    assert set(section["lift_vs_static"]) == {"weight_ips", "weight_snips", "weight_dr", "weight_sndr"}
    for form in section["lift_vs_static"].values():
        assert form["static"]["lift"] == 0.0
        for p, lift in form.items():
            assert math.isfinite(lift["value"]), (p, lift)
    # static's own kernel sits where the static market draws: a mean ratio near 1, a fair share of the
    # requests effective (the market is too small for MIN_ESS)
    st = section["support"]["static"]
    assert MEAN_RATIO_BOUNDS[0] <= st["mean_ratio"] <= MEAN_RATIO_BOUNDS[1]
    assert st["ess"] >= 0.2 * section["n_explored"]


def test_the_estimator_check_and_the_page_carry_the_weight_level_column(report):
    doc, html = report
    check = doc["estimator_check"]
    assert set(check["weight_level_covered_share"]) == set(doc["weight_level"]["lift_vs_static"])
    row = check["policies"]["grade"]["weight_dr"]
    assert ("covered" in row) != bool(row.get("unsupported"))
    assert b"weight_dr lift [CI]" in html
