"""Diagnostics from the logs: each check on a small simulated market built to trip it and one built to pass
it; report.json, report.html and the terminal summary carry them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grade.data.fusion import fuse, top_e
from grade.data.simulator import SimulatorConfig
from grade.evaluate import diagnostics as d
from grade.value.examination import ExaminationConfig, ExaminationEstimate, estimate_examination
from tests.sim_tensors import simulated_batch

E = 10
CFG = d.DiagnosticsConfig()
SMALL = dict(n_requests=600, n_users=200, n_items=2000, seed=0)


def static_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The static weights in z space (sim_tensors standardises the log predictions by their own std)."""
    s = batch["pred"].log().std((0, 1))
    return s / s.sum()


def relogged(batch: dict[str, torch.Tensor], weights: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same requests logged by the deterministic ranking of ``weights`` ([K] or [N, K]); clicks drawn
    again from the truth at theta_j = 1 / (1 + j)."""
    n = batch["mask"].shape[0]
    scores = fuse(batch["z"], weights.expand(n, -1), batch["mask"])
    position = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    click = torch.rand(position.shape, generator=gen) < batch["true_ctr"] / (1.0 + position.float())
    return {**batch, "position": position, "click": click.float()}


@pytest.fixture(scope="module")
def randomised():
    """The simulator's default logging: static weights with per-request Dirichlet noise (concentration 30)."""
    return simulated_batch(SimulatorConfig(**SMALL))


@pytest.fixture(scope="module")
def deterministic():
    return simulated_batch(SimulatorConfig(**SMALL, logging_concentration=1e7))


def test_position_variation_passes_randomised_and_fails_deterministic_logging(randomised, deterministic):
    for batch, status in ((randomised, "pass"), (deterministic, "fail")):
        ref = d.reference_ranking(batch, static_of(batch), {}, 2 * E)
        got = d.position_variation(batch, ref, E, CFG.min_position_variation, theta_estimated=True)
        assert got["status"] == status, got
        assert got["name"] == "position_variation" and got["policy"] is None
    assert got["value"] < CFG.min_position_variation / 2
    assert "not identified" in got["sentence"] and "shared.eta_mode: fixed" in got["sentence"]
    # with theta assumed rather than estimated the estimators need no variation: a warning only
    ref = d.reference_ranking(deterministic, static_of(deterministic), {}, 2 * E)
    assert d.position_variation(deterministic, ref, E, CFG.min_position_variation, False)["status"] == "warn"


def test_logs_written_by_a_policys_own_ranking_are_found_and_fail_position_variation(randomised):
    """A model in production logs its mean ranking (per-request weights): no fixed score reproduces the logs,
    the model's own ranking does."""
    gen = torch.Generator().manual_seed(1)
    draws = -torch.rand(2, randomised["mask"].shape[0], 3, generator=gen).log()   # Dirichlet(1) weights
    own, other = draws / draws.sum(-1, keepdim=True)
    logs = relogged(randomised, own)
    static = static_of(logs)
    without = d.reference_ranking(logs, static, {}, 2 * E)
    assert d.position_variation(logs, without, E, CFG.min_position_variation, True)["status"] == "pass"
    found = d.reference_ranking(logs, static, {"other": other, "grade": own}, 2 * E)
    assert found[0] == "grade's ranking" and torch.equal(found[1], own)
    got = d.position_variation(logs, found, E, CFG.min_position_variation, True)
    assert got["status"] == "fail" and got["value"] == 0.0 and "grade's ranking" in got["sentence"]


def test_logging_randomness_warns_on_near_deterministic_logging(randomised, deterministic):
    for batch, status in ((randomised, "pass"), (deterministic, "warn")):
        ref = d.reference_ranking(batch, static_of(batch), {}, 2 * E)
        got = d.logging_randomness(batch, ref, E, CFG.min_logging_randomness)
        assert got["status"] == status and got["name"] == "logging_randomness", got
    assert got["value"] < CFG.min_logging_randomness


def truncated(batch: dict[str, torch.Tensor], depth: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The requests ``rows`` (bool [N]) keep only the items logged at positions < depth."""
    drop = rows.unsqueeze(1) & (batch["position"] >= depth)
    return {**batch, "mask": batch["mask"] & ~drop, "position": batch["position"].masked_fill(drop, -1)}


def test_truncated_lists(randomised):
    n = randomised["mask"].shape[0]
    assert d.truncated_lists(randomised["mask"], E, CFG.max_truncated_share)["status"] == "pass"
    every = truncated(randomised, E, torch.ones(n, dtype=torch.bool))
    got = d.truncated_lists(every["mask"], E, CFG.max_truncated_share)
    assert got["status"] == "fail" and got["value"] == 1.0 and "truncated" in got["sentence"]
    a_third = truncated(randomised, E, torch.arange(n) % 3 == 0)
    got = d.truncated_lists(a_third["mask"], E, CFG.max_truncated_share)
    assert got["status"] == "warn" and got["value"] == pytest.approx(1 / 3, abs=0.01)
    # lists longer than E pass, however few items they have beyond it
    assert d.truncated_lists(truncated(randomised, E + 1, torch.ones(n, dtype=torch.bool))["mask"], E,
                             CFG.max_truncated_share)["status"] == "pass"


@pytest.fixture(scope="module")
def fitted(randomised):
    """theta-hat of the market as the value model fits it, and of the same logs with the clicks kept
    only at the top two positions (what a log of top-slot clicks looks like to the fit)."""
    exam_cfg = ExaminationConfig(max_rows=15000, interactions=False)
    top = randomised["click"] * (randomised["position"] < 2)
    return (estimate_examination(randomised, exam_cfg),
            estimate_examination({**randomised, "click": top}, exam_cfg))


def test_theta_degenerate(fitted):
    proper, top_only = fitted
    got = d.theta_degenerate(proper, E, CFG.theta_floor)
    assert got["status"] == "pass"
    assert got["value"] == pytest.approx(float(proper.theta_at(torch.tensor([E - 1]))[0]))
    got = d.theta_degenerate(top_only, E, CFG.theta_floor)
    assert got["status"] == "fail" and got["value"] < CFG.theta_floor and "degenerate" in got["sentence"]
    # the case: every click at position 0 gave eta 23 (the fit now refuses such logs outright)
    steep = dataclasses.replace(proper, eta=23.0, theta=ExaminationEstimate.fixed(23.0, 20).theta)
    assert d.theta_degenerate(steep, E, CFG.theta_floor)["status"] == "fail"
    assert d.theta_degenerate(dataclasses.replace(proper, eta=-0.2), E, CFG.theta_floor)["status"] == "fail"
    unsure = dataclasses.replace(proper, converged={"power": False, "free": True})
    assert d.theta_degenerate(unsure, E, CFG.theta_floor)["status"] == "warn"
    assert d.theta_degenerate(ExaminationEstimate.fixed(1.0, 20), E, CFG.theta_floor)["status"] == "pass"


def support_share(logs: dict[str, torch.Tensor], weights: torch.Tensor) -> float:
    """low_support_share of the ranking by ``weights`` with the simulator's theta and true order rates."""
    n = logs["mask"].shape[0]
    idx = top_e(fuse(logs["z"], weights.expand(n, -1), logs["mask"]), E)
    theta = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
    logged = torch.where(logs["mask"] & (logs["position"] >= 0), 1.0 / (1.0 + logs["position"].double()), 0.0)
    return d.low_support_share(idx, theta, logged, logs["true_ctr"] * logs["true_cvr"], logs["mask"],
                               CFG.support_floor)


def test_low_support_of_static_on_logs_of_another_ranking(randomised):
    static = static_of(randomised)
    share = support_share(randomised, static)
    got = d.low_support("static", share, CFG.max_low_support_share, CFG.support_floor, judged=True)
    assert got["status"] == "pass" and got["policy"] == "static"
    # logs written by a GMV-only ranking: static's top items were logged deep
    share = support_share(relogged(randomised, torch.tensor([0.0, 0.0, 1.0])), static)
    got = d.low_support("static", share, CFG.max_low_support_share, CFG.support_floor, judged=True)
    assert got["status"] == "fail" and "static" in got["sentence"], got
    # a baseline the gate does not compare only warns
    got = d.low_support("oracle", share, CFG.max_low_support_share, CFG.support_floor, judged=False)
    assert got["status"] == "warn"


def test_low_support_counts_unlogged_items_and_nothing_else():
    """Two requests by hand: the share is the value on items logged below the floor or not at all."""
    idx = torch.tensor([[0, 1], [2, 0]])
    theta = torch.tensor([1.0, 0.5], dtype=torch.float64)
    logged = torch.tensor([[1.0, 0.01, 0.5], [0.0, 0.5, 1.0]])  # item 1 deep; request 2's item 0 unlogged
    value = torch.tensor([[2.0, 4.0, 1.0], [3.0, 1.0, 1.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # values: request 1: 1*2 (ok) + 0.5*4 (low); request 2: 1*1 (ok) + 0.5*3 (unlogged)
    assert d.low_support_share(idx, theta, logged, value, mask, 0.05) == pytest.approx(3.5 / 6.5)
    # a padded slot (mask False) counts for nothing
    mask[1, 0] = False
    assert d.low_support_share(idx, theta, logged, value, mask, 0.05) == pytest.approx(2.0 / 5.0)


def test_section_takes_extra_checks_and_refuses_a_malformed_one():
    mine = [d.check("truncated_lists", "pass", 0.0, "<= 0.5", "fine")]
    extra = [d.check("click_model", "fail", 12.5, "likelihood ratio <= 4", "the logs look like a cascade")]
    section = d.diagnostics_section(mine, extra, click_model={"pbm": -0.4, "cascade": -0.3})
    assert [c["name"] for c in section["checks"]] == ["truncated_lists", "click_model"]
    assert section["click_model"] == {"pbm": -0.4, "cascade": -0.3}
    assert set(d.diagnostics_section(mine)) == {"checks"}
    assert [c["name"] for c in d.failed(section)] == ["click_model"] and d.failed(None) == []
    with pytest.raises(ValueError, match="expected the keys"):
        d.diagnostics_section(mine, [{"name": "x", "status": "fail"}])
    with pytest.raises(ValueError, match="status"):
        d.check("x", "bad", None, "", "")


def test_click_profile_counts_clicks_per_logged_position():
    data = {"position": torch.tensor([[0, 1, 2, -1], [1, 0, 2, 3]]),
            "mask": torch.tensor([[1, 1, 1, 0], [1] * 4]).bool(),
            "click": torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])}
    rates = d.click_profile(data, 5)
    assert rates[:4] == [1.0, 0.5, 0.5, 0.0] and rates[4] != rates[4]


@pytest.fixture(scope="module")
def evaluated_truncated(tmp_path_factory):
    """A truth-free evaluation of logs whose lists hold no more than E items (the synthetic features of
    test_evaluate with 4 to 5 candidates and E = 5)."""
    from grade.core import store
    from grade.evaluate.evaluation import run_evaluation
    from grade.value.outcome import OutcomeConfig
    from grade.value.value_model import ValueModelConfig
    from tests.test_evaluate import make_features, make_model, small_config

    root = tmp_path_factory.mktemp("diag")
    features = make_features(root / "features", n_train=300, n_test=200, length=5, truth=False)
    out = str(root / "out")
    report = run_evaluation(features, {"grade": make_model(root / "model")}, out,
                            small_config(static_search_iterations=0, bootstrap_samples=20),
                            value_model_cfg=ValueModelConfig(outcome=OutcomeConfig(members=1, epochs=2)))
    return report, store.read_bytes(store.join(out, "report.html")).decode()


def test_report_json_html_and_summary_carry_the_checks(evaluated_truncated):
    from grade.evaluate.summary import format_table

    report, page = evaluated_truncated
    checks = report["diagnostics"]["checks"]
    assert set(report["diagnostics"]) == {"checks", "click_model"}  # the value model was fitted with valid
    assert all(set(c) == set(d.CHECK_KEYS) and c["status"] in d.STATUSES for c in checks)
    names = [c["name"] for c in checks]
    assert names[:4] == ["position_variation", "theta_degenerate", "logging_randomness", "truncated_lists"]
    assert {c["policy"] for c in checks if c["name"] == "low_support"} == {"static", "logged", "grade"}
    truncated_check = checks[3]
    assert truncated_check["status"] == "fail" and truncated_check["value"] == 1.0
    assert report["config"]["diagnostics"] == dataclasses.asdict(CFG)
    # the page: the table with the status colours and the support figure
    assert "<h2>Diagnostics</h2>" in page and "<td class='neg'>FAIL</td>" in page
    assert 'alt="share of value on low-support items per policy"' in page
    # the terminal: one line per check that did not pass
    lines = [x for x in format_table(report).splitlines() if x.startswith("diagnostic ")]
    assert len(lines) == sum(c["status"] != "pass" for c in checks) >= 1
    assert any(x.startswith("diagnostic FAIL truncated_lists: 1 (needs <= 0.5).") for x in lines)


def test_logging_randomness_counts_only_requests_with_a_choice(randomised):
    """A list of at most E items has one top-E set whatever the ranking: such requests say nothing."""
    n = randomised["mask"].shape[0]
    ref = d.reference_ranking(randomised, static_of(randomised), {}, 2 * E)
    whole = d.logging_randomness(randomised, ref, E, CFG.min_logging_randomness)
    half = truncated(randomised, E, torch.arange(n) % 2 == 0)
    got = d.logging_randomness(half, ref, E, CFG.min_logging_randomness)
    long_rows = torch.arange(n) % 2 == 1
    alone = d.logging_randomness({k: v[long_rows] for k, v in randomised.items()},
                                 (ref[0], ref[1]), E, CFG.min_logging_randomness)
    assert got["value"] == alone["value"] and whole["status"] == got["status"] == "pass"
    every = truncated(randomised, E, torch.ones(n, dtype=torch.bool))
    got = d.logging_randomness(every, ref, E, CFG.min_logging_randomness)
    assert got["status"] == "warn" and got["value"] is None


def test_thresholds_are_keys_of_evaluate_diagnostics():
    from grade.core import config
    from grade.core.errors import ConfigError

    cfg = config.load(None, {"evaluate.diagnostics.max_truncated_share": 0.8})["evaluate"]
    assert cfg.diagnostics.max_truncated_share == 0.8 and cfg.diagnostics.theta_floor == CFG.theta_floor
    with pytest.raises(ConfigError, match=r"diagnostics\.support_floor: expected a value in \[0, 1\)"):
        config.load(None, {"evaluate.diagnostics.support_floor": 1.5})
    with pytest.raises(ConfigError, match=r"evaluate\.diagnostics: unknown key\(s\) \['floor'\]"):
        config.load(None, {"evaluate.diagnostics.floor": 0.1})


def test_auto_estimator_judges_cascade_looking_logs_with_the_cascade_estimator():
    from types import SimpleNamespace

    from grade.evaluate.held_out import pick_estimator

    def model(looks_like):
        exam = SimpleNamespace(click_model={"looks_like": looks_like} if looks_like else {})
        return SimpleNamespace(examination=exam), {}

    assert pick_estimator("auto", model("cascade")) == "cascade_dr"
    assert pick_estimator("auto", model("position_based")) == "ips"
    assert pick_estimator("auto", model("undecided")) == "ips"
    assert pick_estimator("auto", model(None)) == "ips"
    assert pick_estimator("auto", None) == "ips"
    assert pick_estimator("snips", model("cascade")) == "snips", "a named estimator is used as named"
    # cascade_dr clips its inverse logged examination at its own key, the others at the IPS weights' clip
    from grade.evaluate.evaluation import EvaluateConfig
    from grade.evaluate.held_out import max_weight_of
    assert max_weight_of(EvaluateConfig(estimator="cascade_dr", cascade_max_weight=7.0)) == 7.0
    assert max_weight_of(EvaluateConfig(estimator="cascade_dm", estimator_max_weight=50.0)) == 50.0


def test_served_exploration_fails_on_a_models_own_deterministic_ranking():
    from grade.evaluate.diagnostics import served_exploration

    n = 40
    data = {"mask": torch.ones(n, 5, dtype=torch.bool), "served_w": torch.full((n, 3), 1 / 3)}
    assert served_exploration({"mask": data["mask"]}) is None, "static logs say nothing of serving"
    mean_only = served_exploration({**data, "served_log_propensity": torch.full((n,), float("nan"))})
    assert mean_only["status"] == "fail" and mean_only["value"] == 0.0
    some = torch.full((n,), float("nan"))
    some[:1] = -2.0
    assert served_exploration({**data, "served_log_propensity": some})["status"] == "warn"
    some[:10] = -2.0
    checked = served_exploration({**data, "served_log_propensity": some})
    assert checked["status"] == "pass" and checked["value"] == 0.25
