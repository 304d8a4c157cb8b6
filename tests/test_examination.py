"""Examination estimation: recovers the simulator's position bias; the result's shape and helpers; the
choice of the curve by valid likelihood; the cascade fit and which click model the logs look like."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grade.core.errors import InputError
from grade.data.simulator import SimulatorConfig
from grade.value.click_model import (
    cascade_inputs,
    cascade_log_likelihood,
    click_model_check,
    click_model_detail,
    compare_click_models,
    logged_examination,
)
from grade.value.examination import (
    ExaminationConfig,
    ExaminationEstimate,
    estimate_examination,
    fit_curves,
    free_table,
    tail_exponent,
)
from tests.sim_tensors import simulated_batch


@pytest.mark.parametrize("eta", [0.6, 1.0, 1.4])
def test_power_law_eta_is_recovered_from_simulated_logs(eta):
    batch = simulated_batch(SimulatorConfig(seed=3, n_requests=1500, n_users=400, position_bias=eta))
    est = estimate_examination(batch, ExaminationConfig(depth=8))
    assert abs(est.eta - eta) <= 0.1, est.to_json()
    assert est.converged["power"] and est.n_clicks == int(batch["click"].sum())
    # the free curve follows the same law: theta_3 = 4^-eta within the noise of ~1500 requests
    assert abs(est.theta_free[3] - 4.0 ** -eta) < 0.1, est.theta_free
    assert est.theta[0] == 1.0 and est.theta == est.theta_power


def test_free_method_reports_the_free_curve_and_is_deterministic():
    batch = simulated_batch(SimulatorConfig(seed=1, n_requests=300, n_users=100, position_bias=1.0))
    cfg = ExaminationConfig(method="free", depth=5, max_rows=10_000, seed=4)
    a, b = estimate_examination(batch, cfg), estimate_examination(batch, cfg)
    assert a.to_json() == b.to_json()
    assert a.theta == a.theta_free and len(a.theta) == 5 and a.n_rows == 10_000
    assert all(0 < t <= 1 for t in a.theta) and math.isfinite(a.log_likelihood["free"])


def test_theta_at_uses_the_free_table_inside_the_depth_and_the_power_law_beyond():
    est = ExaminationEstimate("free", 1.0, [1.0, 0.4], [1.0, 0.5], [1.0, 0.4], 0, 0, {}, {})
    got = est.theta_at(torch.tensor([[0, 1, 3, -1]]))
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.4, 0.25, 0.0]]))
    fixed = ExaminationEstimate.fixed(2.0, 3)
    assert fixed.theta == [1.0, 0.25, 1.0 / 9.0] and fixed.method == "fixed"
    torch.testing.assert_close(fixed.theta_at(torch.tensor([1, 4])), torch.tensor([0.25, 0.04]))


def test_logs_without_clicks_are_refused():
    batch = simulated_batch(SimulatorConfig(seed=0, n_requests=20, n_users=10))
    batch["click"] = torch.zeros_like(batch["click"])
    with pytest.raises(InputError, match="need clicks"):
        estimate_examination(batch)


def test_clicks_at_one_position_only_are_refused_naming_it_and_the_way_out():
    """Every click at the top: theta below it would be fitted to ~0 (eta in the tens), not estimated."""
    batch = simulated_batch(SimulatorConfig(seed=0, n_requests=300, n_users=100))
    batch["click"] = torch.where(batch["position"] == 0, batch["click"], torch.zeros_like(batch["click"]))
    assert int(batch["click"].sum()) > 0
    with pytest.raises(InputError, match="every logged click is at position 0.*eta_mode: fixed"):
        estimate_examination(batch)


def test_bad_config_is_refused():
    with pytest.raises(InputError, match="examination.method"):
        ExaminationConfig(method="cascade").validate()


# ------------------------------------------------------------------------------------------------
# The curve chosen by valid likelihood; the cascade against the position-based model
# ------------------------------------------------------------------------------------------------

def cascade_clicks(batch: dict[str, torch.Tensor], continue_click: float, continue_skip: float, seed: int
                   ) -> dict[str, torch.Tensor]:
    """The batch with its clicks redrawn by a DBN-style cascade walk down the logged positions: an examined
    item is clicked with its true_ctr; the walk goes on with ``continue_click`` after a click,
    ``continue_skip`` after a skip."""
    g = torch.Generator().manual_seed(seed)
    order = torch.sort(torch.where(batch["mask"], batch["position"], 10**9), dim=1, stable=True).indices
    a = (batch["true_ctr"].double() * batch["mask"]).gather(1, order)
    seen = torch.ones(a.shape[0], dtype=torch.bool)
    clicks = torch.zeros_like(a)
    for j in range(a.shape[1]):
        c = seen & (torch.rand(a.shape[0], generator=g, dtype=torch.float64) < a[:, j])
        clicks[:, j] = c.double()
        seen &= torch.rand(a.shape[0], generator=g, dtype=torch.float64) < torch.where(
            c, continue_click, continue_skip)
    return {**batch, "click": torch.zeros_like(clicks).scatter_(1, order, clicks).float()}


def position_clicks(batch: dict[str, torch.Tensor], theta: list[float], seed: int) -> dict[str, torch.Tensor]:
    """The batch with its clicks redrawn by the position-based model with the examination ``theta``."""
    g = torch.Generator().manual_seed(seed)
    exam = torch.tensor(theta, dtype=torch.float64)[batch["position"].clamp(0, len(theta) - 1)]
    p = exam * batch["true_ctr"].double() * batch["mask"]
    return {**batch, "click": (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).float()}


def halves(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    n = batch["mask"].shape[0] * 2 // 3
    return {k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}


@pytest.fixture(scope="module")
def market() -> dict[str, torch.Tensor]:
    return simulated_batch(SimulatorConfig(seed=5, n_requests=2400, n_users=600, list_size=30,
                                           position_bias=1.0))


def test_cascade_likelihood_of_a_three_slot_list_by_hand():
    """a = 0.5, 0.2, 0.4; continue 0.6 after a click, 0.9 after a skip."""
    logits = torch.logit(torch.tensor([[0.5, 0.2, 0.4]], dtype=torch.float64)).expand(9, -1)
    patterns = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)] + [[1, 0, 0]],
                            dtype=torch.float64)
    present = torch.ones(9, 3, dtype=torch.bool)
    present[8, 2] = False                                     # a list of two items
    got = cascade_log_likelihood(logits, patterns, present, 0.6, 0.9).exp()
    # no click: 1 - (0.5 + 0.5 * 0.9 * 0.2 + 0.5 * 0.9 * 0.8 * 0.9 * 0.4)
    assert got[0].item() == pytest.approx(0.2804)
    # skip, click, then nothing: 0.5 * 0.9 * 0.2 * (1 - 0.6 * 0.4)
    assert got[2].item() == pytest.approx(0.45 * 0.2 * 0.76)
    # click, skip, click: 0.5 * 0.6 * 0.8 * 0.9 * 0.4
    assert got[5].item() == pytest.approx(0.5 * 0.6 * 0.72 * 0.4)
    # the two-item list: click, then no click below: 0.5 * (1 - 0.6 * 0.2)
    assert got[8].item() == pytest.approx(0.44)
    # the eight click patterns of the full list are every outcome
    assert got[:8].sum().item() == pytest.approx(1.0)


def test_the_cascade_examination_of_logged_items_follows_the_logged_order():
    """Candidates stored out of logged order, with a gap in the positions and a padded slot: each item is
    examined with the product of a c_click + (1 - a) c_skip over the items logged above it."""
    a = torch.tensor([[0.4, 0.5, 0.9, 0.2]], dtype=torch.float64)
    position = torch.tensor([[3, 0, -1, 1]])                      # logged order: item 1, 3, 0; item 2 padding
    mask = torch.tensor([[True, True, False, True]])
    got = logged_examination(a, position, mask, (0.6, 0.9))
    step1, step3 = 0.5 * 0.6 + 0.5 * 0.9, 0.2 * 0.6 + 0.8 * 0.9
    torch.testing.assert_close(got, torch.tensor([[step1 * step3, 1.0, 0.0, step1]], dtype=torch.float64))


def test_the_free_curve_continues_past_its_depth_as_the_power_law_of_its_tail():
    free = [1.0, 0.6, 0.45, 0.3, 0.2]
    table = free_table(free, 8, 2.0)
    torch.testing.assert_close(table[:5], torch.tensor(free, dtype=torch.float64))
    # continuous at D - 1 = 4 and then theta_4 ((1 + j) / 5)^-2
    torch.testing.assert_close(table[5:], free[4] * (torch.arange(6, 9, dtype=torch.float64) / 5) ** -2.0)
    # a power law's tail exponent is its own
    assert tail_exponent([(1 + j) ** -1.3 for j in range(10)]) == pytest.approx(1.3)
    est = ExaminationEstimate("free", 1.0, free, [], free, 0, 0, {}, {}, eta_tail=2.0)
    got = est.theta_at(torch.tensor([6, -1]))
    torch.testing.assert_close(got, torch.tensor([free[4] * 1.4 ** -2.0, 0.0]))


def test_auto_picks_the_power_law_when_the_truth_is_one_and_free_when_it_is_not(market):
    cfg = ExaminationConfig(method="auto", depth=8, max_iter=100)
    train, valid = halves(market)
    est = fit_curves(train, cfg, valid)[0]
    assert est.selected_by == "valid_likelihood"
    assert est.method == "power", est.log_likelihood_valid
    assert est.theta == est.theta_power
    # a step: the top three positions look alike, the rest far less (no power law through theta_0 = 1)
    step = [1.0, 0.95, 0.9, 0.3, 0.25, 0.2, 0.18, 0.16] + [0.15] * 22
    train, valid = halves(position_clicks(market, step, seed=2))
    est = fit_curves(train, cfg, valid)[0]
    assert est.method == "free", est.log_likelihood_valid
    assert est.log_likelihood_valid["free"] > est.log_likelihood_valid["power"]
    assert est.theta == est.theta_free and abs(est.theta[2] - 0.9) < 0.1 and abs(est.theta[4] - 0.25) < 0.1
    # without a valid split, auto keeps the power law and says why
    alone = fit_curves(train, cfg)[0]
    assert (alone.method, alone.selected_by, alone.log_likelihood_valid) == ("power", "no_valid_split", {})


def test_the_click_model_check_tells_position_based_logs_from_a_cascade(market):
    cfg = ExaminationConfig(method="auto", depth=10, max_iter=100)
    looks = {}
    for name, batch in (("pbm", market), ("cascade", cascade_clicks(market, 0.6, 0.85, seed=1))):
        train, valid = halves(batch)
        est, fits = fit_curves(train, cfg, valid)
        est.click_model = compare_click_models(train, valid, cfg, est, fits)
        looks[name] = est
    pbm, cascade = looks["pbm"].click_model, looks["cascade"].click_model
    assert pbm["looks_like"] == "position_based" and pbm["log_lr_per_request"] < 0, pbm
    assert cascade["looks_like"] == "cascade" and cascade["log_lr_per_request"] > 0, cascade
    # the cascade's continuation probabilities are recovered from 1,600 train lists
    assert abs(cascade["cascade"]["continue_click"] - 0.6) < 0.1 and abs(cascade["cascade"]["continue_skip"]
                                                                        - 0.85) < 0.05, cascade
    check = click_model_check(looks["cascade"], "ips")
    assert (check["name"], check["status"], check["policy"]) == ("click_model", "warn", None)
    assert "cascade" in check["sentence"] and check["value"] == cascade["log_lr_per_request"]
    assert click_model_check(looks["cascade"], "cascade_dm")["status"] == "pass"
    assert click_model_check(looks["pbm"], "ips")["status"] == "pass"
    assert set(check) == {"name", "status", "value", "threshold", "sentence", "policy"}
    detail = click_model_detail(looks["cascade"])
    assert detail["examination"]["form"] == looks["cascade"].method and detail["vuong_z"] > 1.96
    # the estimate with its comparison is JSON and loads back as the value model reads it
    loaded = ExaminationEstimate(**json.loads(json.dumps(looks["cascade"].to_json())))
    assert loaded.click_model == cascade and loaded.method == looks["cascade"].method
    torch.testing.assert_close(loaded.theta_at(torch.arange(40)), looks["cascade"].theta_at(torch.arange(40)),
                               atol=1e-5, rtol=1e-5)
    assert click_model_check(ExaminationEstimate.fixed(1.0, 5), "ips") is None
    # cascade_dm's inputs: the cascade's own attraction, and the outcome model's values at that click rate
    models = {"clicks": torch.full(market["mask"].shape, 0.5, dtype=torch.float64)}
    models["orders"] = models["clicks"] * 0.2
    a, scaled, continuation = cascade_inputs(loaded, market, models)
    assert continuation == (cascade["cascade"]["continue_click"], cascade["cascade"]["continue_skip"])
    assert bool(((a > 0) & (a < 1)).all()) and a.shape == market["mask"].shape
    torch.testing.assert_close(scaled["clicks"], a)
    torch.testing.assert_close(scaled["orders"], a * 0.2)
    with pytest.raises(InputError, match="needs a value model with a cascade fit"):
        cascade_inputs(ExaminationEstimate.fixed(1.0, 5), market, models)
