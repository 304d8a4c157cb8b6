"""Counterfactual estimators: every function by hand on one or two tiny requests, then unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from grade.data.fusion import cascade_examination, examination
from grade.value.business import BusinessConfig, in_value_units
from grade.value.estimators import (
    ESTIMATORS,
    Estimate,
    cascade_dm,
    cascade_dr,
    direct_method,
    ips,
    needs_cascade,
    needs_model,
    ranking_value,
    ratio_weights,
    shrunk_dr,
    snips,
    switch,
)

# One request, 3 candidates logged at positions 0, 1, 2 (theta = 1, 1/2, 1/3 with eta = 1).
LOGGED_THETA = torch.tensor([[1.0, 0.5, 1.0 / 3.0]])
Y = torch.tensor([[1.0, 0.0, 1.0]])
M = torch.tensor([[0.2, 0.4, 0.6]])
THETA = torch.tensor([1.0, 0.5])
# G = 2 rankings of depth 2: A shows items 2, 0 (item 2 promoted from the last position);
# B is the logged order.
IDX = torch.tensor([[[2, 0], [0, 1]]])
# The cascade estimators' inputs: P(click | examined) per candidate, (continue_click, continue_skip).
ATTRACTION = torch.tensor([[0.3, 0.5, 0.4]])
CONTINUATION = (0.5, 0.8)
# cascade_dr's: each candidate's cascade examination in the logged list (1, 0.3 * 0.5 + 0.7 * 0.8, then
# times 0.5 * 0.5 + 0.5 * 0.8) and the logged clicks (Y is a label no larger than them, e.g. orders).
LOGGED_EXAM = torch.tensor([[1.0, 0.71, 0.71 * 0.65]])
CLICK = torch.tensor([[1.0, 1.0, 1.0]])


def test_ratio_weights_and_ips_by_hand():
    w, logged, share = ratio_weights(IDX, THETA, LOGGED_THETA)
    torch.testing.assert_close(w, torch.tensor([[[3.0, 0.5], [1.0, 1.0]]]))
    assert bool(logged.all()) and float(share) == 0.0
    # A: 3 * 1 + 0.5 * 1; B: 1 * 1 + 1 * 0
    torch.testing.assert_close(ips(Y, IDX, THETA, LOGGED_THETA).value, torch.tensor([[3.5, 1.0]]))


def test_ips_clips_weights_and_reports_the_clipped_share():
    est = ips(Y, IDX, THETA, LOGGED_THETA, max_weight=2.0)
    torch.testing.assert_close(est.value, torch.tensor([[2.5, 1.0]]))
    assert float(est.clipped_share) == pytest.approx(0.25)  # one of four logged slots


def test_unlogged_items_get_no_weight():
    lt = torch.tensor([[1.0, 0.5, 0.0]])  # item 2 is padding
    est = ips(Y, IDX, THETA, lt)
    torch.testing.assert_close(est.value, torch.tensor([[0.5, 1.0]]))


def test_snips_normalises_each_slot_by_the_batch_mean_weight():
    # request 2: the same candidates logged at positions 2, 0, 1
    lt = torch.cat([LOGGED_THETA, torch.tensor([[1.0 / 3.0, 1.0, 0.5]])])
    y = torch.cat([Y, torch.tensor([[1.0, 1.0, 0.0]])])
    idx = torch.tensor([[[2, 0]], [[2, 0]]])
    # weights: request 1 (3, 0.5), request 2 (2, 1.5); slot means 2.5 and 1
    torch.testing.assert_close(ips(y, idx, THETA, lt).value, torch.tensor([[3.5], [1.5]]))
    torch.testing.assert_close(snips(y, idx, THETA, lt).value, torch.tensor([[3 / 2.5 + 0.5], [1.5]]))


def test_snips_equals_ips_for_the_logged_ranking_and_pools_groups_on_request():
    logged_order = IDX[:, 1:]
    torch.testing.assert_close(snips(Y, logged_order, THETA, LOGGED_THETA).value,
                               ips(Y, logged_order, THETA, LOGGED_THETA).value)
    # pooled over A and B: slot means (3 + 1) / 2 = 2 and (0.5 + 1) / 2 = 0.75
    pooled = snips(Y, IDX, THETA, LOGGED_THETA, over="batch_and_group").value
    torch.testing.assert_close(pooled, torch.tensor([[3 / 2 + 0.5 / 0.75, 1 / 2]]))


def test_direct_method_by_hand():
    # A: 1 * 0.6 + 0.5 * 0.2; B: 1 * 0.2 + 0.5 * 0.4
    torch.testing.assert_close(direct_method(M, IDX, THETA), torch.tensor([[0.7, 0.4]]))


def test_switch_uses_the_model_for_items_logged_below_tau():
    # A: item 2 was logged at theta 1/3 < 0.5 -> DM 1 * 0.6; item 0 -> IPS 0.5 * 1. B: IPS throughout.
    torch.testing.assert_close(switch(Y, M, IDX, THETA, LOGGED_THETA, tau=0.5).value,
                               torch.tensor([[1.1, 1.0]]))
    torch.testing.assert_close(switch(Y, M, IDX, THETA, LOGGED_THETA, tau=0.0).value,
                               ips(Y, IDX, THETA, LOGGED_THETA).value)
    torch.testing.assert_close(switch(Y, M, IDX, THETA, LOGGED_THETA, tau=1.1).value,
                               direct_method(M, IDX, THETA))


def test_shrunk_dr_by_hand():
    est = shrunk_dr(Y, M, IDX, THETA, LOGGED_THETA, lam=1.0)
    # A: w 3 -> 0.3, residual 1 - 0.6/3 = 0.8: 0.6 + 0.24; w 0.5 -> 0.4, residual 0.8: 0.1 + 0.32
    # B: w 1 -> 0.5, residual 0.8: 0.2 + 0.4; w 1 -> 0.5, residual 0 - 0.5 * 0.4: 0.2 - 0.1
    torch.testing.assert_close(est.value, torch.tensor([[1.26, 0.7]]))
    assert float(est.clipped_share) == 1.0


def test_doubly_robust_collapses_to_ips_whatever_the_model():
    g = torch.Generator().manual_seed(0)
    for m in (M, torch.rand(1, 3, generator=g), torch.zeros(1, 3)):
        torch.testing.assert_close(shrunk_dr(Y, m, IDX, THETA, LOGGED_THETA, lam=math.inf).value,
                                   ips(Y, IDX, THETA, LOGGED_THETA).value)


def test_the_declared_value_prices_gmv_in_order_value_units():
    value = BusinessConfig(clicks=0.1, orders=1.0, gmv=2.0)
    assert value.prices() == (0.1, 1.0, 2.0)
    assert value.prices(60.0) == (0.1, 1.0, 2.0 / 60.0)
    v = value.item_value(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([30.0]), 60.0)
    torch.testing.assert_close(v, torch.tensor([0.2 + 0.5 + 1.0]))
    amounts = in_value_units(torch.tensor([[2.0, 0.5, 30.0]]), 60.0)
    torch.testing.assert_close(amounts, torch.tensor([[2.0, 0.5, 0.5]]))
    # amounts in value units at unit prices price alike with raw amounts at the unit's prices
    torch.testing.assert_close(amounts @ torch.tensor(value.prices()), v)
    with pytest.raises(ValueError, match="GMV unit"):
        value.prices(0.0)


EXPECTED = {"ips": lambda: ips(Y, IDX, THETA, LOGGED_THETA, 2.0),
            "snips": lambda: snips(Y, IDX, THETA, LOGGED_THETA, 2.0, over="batch_and_group"),
            "dm": lambda: Estimate(direct_method(M, IDX, THETA), THETA.new_zeros(())),
            "switch": lambda: switch(Y, M, IDX, THETA, LOGGED_THETA, 0.4, 2.0),
            "shrunk": lambda: shrunk_dr(Y, M, IDX, THETA, LOGGED_THETA, 0.5),
            "cascade_dm": lambda: Estimate(cascade_dm(M, ATTRACTION, IDX, *CONTINUATION),
                                           THETA.new_zeros(())),
            "cascade_dr": lambda: cascade_dr(Y, M, ATTRACTION, IDX, *CONTINUATION, LOGGED_EXAM, CLICK, 2.0)}
CASCADE = {"attraction": ATTRACTION, "continuation": CONTINUATION, "logged_examination": LOGGED_EXAM,
           "click": CLICK}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_registered_estimator_is_ranking_value_by_its_name(name):
    """A new entry in ESTIMATORS needs its expected computation here (and reaches the reward, the
    evaluation, the estimator check and the pipeline's ablations through the registry)."""
    got = ranking_value(name, IDX, THETA, LOGGED_THETA, Y, M, max_weight=2.0, tau=0.4, lam=0.5, **CASCADE)
    want = EXPECTED[name]()
    torch.testing.assert_close(got.value, want.value)
    torch.testing.assert_close(got.clipped_share, want.clipped_share)
    assert needs_model(name) == ESTIMATORS[name].needs_model
    # a per-batch estimator's value of the first request changes with a second one logged elsewhere
    other = torch.tensor([[1.0 / 3.0, 1.0, 0.5]])
    pair = ranking_value(name, IDX.repeat(2, 1, 1), THETA, torch.cat([LOGGED_THETA, other]), Y.repeat(2, 1),
                         M.repeat(2, 1), max_weight=2.0, tau=0.4, lam=0.5,
                         attraction=ATTRACTION.repeat(2, 1), continuation=CONTINUATION,
                         logged_examination=LOGGED_EXAM.repeat(2, 1), click=CLICK.repeat(2, 1))
    assert torch.equal(pair.value[:1], got.value) != ESTIMATORS[name].per_batch
    if needs_model(name):
        with pytest.raises(ValueError, match="needs the outcome model"):
            ranking_value(name, IDX, THETA, LOGGED_THETA, Y, None, **CASCADE)
    else:
        ranking_value(name, IDX, THETA, LOGGED_THETA, Y, None)
    if needs_cascade(name):
        with pytest.raises(ValueError, match="needs the items' attraction and the fitted cascade"):
            ranking_value(name, IDX, THETA, LOGGED_THETA, Y, M)
    if ESTIMATORS[name].reads_logged_clicks:
        with pytest.raises(ValueError, match="needs each item's cascade examination in its logged list"):
            ranking_value(name, IDX, THETA, LOGGED_THETA, Y, M, attraction=ATTRACTION,
                          continuation=CONTINUATION)


def test_cascade_dm_by_hand():
    """Slot 1's examination is a c_click + (1 - a) c_skip of the item above it (a its attraction)."""
    got = cascade_dm(M, ATTRACTION, IDX, *CONTINUATION)
    # A: items 2 (a = 0.4), 0 -> 0.6 + (0.4 * 0.5 + 0.6 * 0.8) * 0.2; B: items 0 (a = 0.3), 1
    torch.testing.assert_close(got, torch.tensor([[0.6 + 0.68 * 0.2, 0.2 + 0.71 * 0.4]]))
    # continuing whatever happens is the direct method with theta = 1 at every slot
    torch.testing.assert_close(cascade_dm(M, ATTRACTION, IDX, 1.0, 1.0), direct_method(M, IDX, torch.ones(2)))


def test_cascade_dr_by_hand():
    """Each item's value m + (y - click m / a) / x, then cascade_dm of those; clicks alone are cascade_dm."""
    dr = M + (Y - CLICK * M / ATTRACTION) / LOGGED_EXAM
    want = cascade_dm(dr, ATTRACTION, IDX, *CONTINUATION)
    got = cascade_dr(Y, M, ATTRACTION, IDX, *CONTINUATION, LOGGED_EXAM, CLICK)
    torch.testing.assert_close(got.value, want)
    assert float(got.clipped_share) == 0.0
    # for the click label the correction is 0 whatever the logged clicks: the estimate is cascade_dm's
    clicks = cascade_dr(Y, ATTRACTION, ATTRACTION, IDX, *CONTINUATION, LOGGED_EXAM, Y).value
    torch.testing.assert_close(clicks, cascade_dm(ATTRACTION, ATTRACTION, IDX, *CONTINUATION))
    # the inverse examination 1 / 0.4615 of the third item is clipped at 2: one of three clicked items
    clipped = cascade_dr(Y, M, ATTRACTION, IDX, *CONTINUATION, LOGGED_EXAM, CLICK, max_weight=2.0)
    weight = torch.tensor([[1.0, 1 / 0.71, 2.0]])
    item_values = M + weight * (Y - CLICK * M / ATTRACTION)
    torch.testing.assert_close(clipped.value, cascade_dm(item_values, ATTRACTION, IDX, *CONTINUATION))
    assert float(clipped.clipped_share) == pytest.approx(1 / 3)
    # a padded item (x = 0) takes the model's value
    x = torch.tensor([[1.0, 0.71, 0.0]])
    pad = cascade_dr(Y, M, ATTRACTION, IDX, *CONTINUATION, x, CLICK)
    dr_pad = torch.cat([dr[:, :2], M[:, 2:]], 1)
    torch.testing.assert_close(pad.value, cascade_dm(dr_pad, ATTRACTION, IDX, *CONTINUATION))


def test_cascade_dr_is_unbiased_with_a_wrong_outcome_model_where_cascade_dm_is_not():
    """Logged lists in random orders, clicks by a cascade walk (true attraction and continuation known),
    orders ~ Bernoulli(cvr) after a click. The outcome model's order value per click is wrong (half the
    true cvr plus 0.1): cascade_dm with it is biased, cascade_dr with the same model is not."""
    g = torch.Generator().manual_seed(11)
    draws, n, c_click, c_skip = 40000, 5, 0.4, 0.85
    a = torch.tensor([[0.6, 0.3, 0.5, 0.2, 0.4]], dtype=torch.float64)
    cvr = torch.tensor([[0.1, 0.6, 0.3, 0.8, 0.2]], dtype=torch.float64)
    idx = torch.tensor([[[3, 1, 2], [0, 4, 2]]])
    truth = cascade_dm(a * cvr, a, idx, c_click, c_skip)[0]
    m = a * (0.5 * cvr + 0.1)
    position = torch.argsort(torch.rand(draws, n, generator=g), -1)
    order = torch.argsort(position, -1)                     # item at each logged slot
    seen = torch.ones(draws, dtype=torch.bool)
    click = torch.zeros(draws, n, dtype=torch.float64)
    for j in range(n):
        item = order[:, j]
        c = seen & (torch.rand(draws, generator=g, dtype=torch.float64) < a[0, item])
        click[torch.arange(draws), item] = c.double()
        seen &= torch.rand(draws, generator=g, dtype=torch.float64) < torch.where(c, c_click, c_skip)
    orders = click * (torch.rand(draws, n, generator=g, dtype=torch.float64) < cvr).double()
    x = torch.zeros(draws, n, dtype=torch.float64).scatter(
        1, order, cascade_examination(a[0][order], c_click, c_skip))
    rep = lambda t: t.expand(draws, *t.shape[1:])  # noqa: E731 - one request per draw
    est = cascade_dr(orders, rep(m), rep(a), rep(idx), c_click, c_skip, x, click).value
    se = est.std(0) / math.sqrt(draws)
    assert bool(((est.mean(0) - truth).abs() < 4 * se).all()), (est.mean(0), truth, se)
    dm = cascade_dm(m, a, idx, c_click, c_skip)[0]
    assert float((dm - truth).abs().max()) > 10 * float(se.max()), (dm, truth, se)


def test_cascade_dm_is_exact_and_position_based_dm_biased_on_cascade_logs():
    """Sequential cascade walks over random orders: the mean clicks of a ranking match cascade_dm with the
    true attraction; the position-based direct method with the logs' average theta does not."""
    g = torch.Generator().manual_seed(3)
    draws, n, c_click, c_skip = 40000, 5, 0.3, 0.9
    ctr = torch.tensor([[0.7, 0.6, 0.1, 0.05, 0.5]], dtype=torch.float64)
    idx = torch.tensor([[[0, 1, 4, 2, 3], [2, 3, 0, 1, 4]]])                    # good items first / last
    seen = torch.ones(draws, 2, dtype=torch.bool)
    clicks = torch.zeros(draws, 2, dtype=torch.float64)
    for j in range(n):
        c = seen & (torch.rand(draws, 2, generator=g, dtype=torch.float64) < ctr[0, idx[0, :, j]])
        clicks += c
        seen &= torch.rand(draws, 2, generator=g, dtype=torch.float64) < torch.where(c, c_click, c_skip)
    se = clicks.std(0) / math.sqrt(draws)
    want = cascade_dm(ctr, ctr, idx, c_click, c_skip)[0]
    assert bool(((clicks.mean(0) - want).abs() < 4 * se).all()), (clicks.mean(0), want, se)
    # one theta per slot cannot see that a click above ends most scans: the average theta is biased
    theta = cascade_examination(ctr[0, idx[0]], c_click, c_skip).mean(0)
    dm = direct_method(ctr, idx, theta)[0]
    assert float((dm - want).abs().max()) > 10 * float(se.max()), (dm, want)


def test_an_unknown_estimator_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown estimator 'nope'.*'ips'"):
        ranking_value("nope", IDX, THETA, LOGGED_THETA, Y, M)
    assert not needs_model("dcg_ips")


def test_the_reward_and_the_pipeline_read_the_registry():

    from grade.core.config import preset_keys
    from grade.core.errors import InputError
    from grade.value.reward import POST_ESTIMATORS, POSTERIORS, RewardConfig, default_posteriors
    from pipeline.params import ABLATIONS

    # an ablation names a position-based posterior; the reward also takes the cascade's and auto
    assert POSTERIORS == (*(n for n in ESTIMATORS if ESTIMATORS[n].click_model != "cascade"), "dcg_ips")
    assert set(POST_ESTIMATORS) == {*ESTIMATORS, "dcg_ips", "auto"}
    for name in POST_ESTIMATORS:
        RewardConfig(post_estimator=name).validate()
    with pytest.raises(InputError, match="post_estimator"):
        RewardConfig(post_estimator="not_registered").validate()
    # the default (dm) is not an ablation, which would train it again
    assert default_posteriors() == {"dm"}
    ablated = {preset_keys(name)["finetune.reward.post_estimator"] for name in ABLATIONS
               if "finetune.reward.post_estimator" in preset_keys(name)}
    assert ablated == set(POSTERIORS) - default_posteriors()


def test_ips_is_unbiased_and_the_true_model_dm_is_exact_on_synthetic_logs():
    """Random logging orders, clicks ~ Bernoulli(theta_p ctr), orders ~ Bernoulli(cvr) after a click."""
    g = torch.Generator().manual_seed(7)
    draws, b, n, e = 4000, 8, 6, 4
    ctr = 0.05 + 0.45 * torch.rand(b, n, generator=g, dtype=torch.float64)
    cvr = 0.1 + 0.3 * torch.rand(b, n, generator=g, dtype=torch.float64)
    theta_all = examination(n, 1.0, dtype=torch.float64)
    theta = theta_all[:e]
    best = torch.sort(ctr, -1, descending=True).indices[:, :e]
    worst = torch.sort(ctr, -1).indices[:, :e]
    idx = torch.stack([best, worst], 1)                                          # [b, 2, e]
    truth = direct_method(ctr, idx, theta)                                       # exact by definition
    torch.testing.assert_close(truth, (theta * gather(ctr, idx)).sum(-1))
    position = torch.argsort(torch.rand(draws, b, n, generator=g), -1)           # a random order per draw
    lt = theta_all[position]
    click = torch.rand(draws, b, n, generator=g, dtype=torch.float64) < lt * ctr
    order = click & (torch.rand(draws, b, n, generator=g, dtype=torch.float64) < cvr)
    flat = lambda x: x.reshape(draws * b, *x.shape[2:])  # noqa: E731 - draws as more requests
    idx_r = flat(idx.expand(draws, -1, -1, -1))
    for label, expected in ((click, truth), (order, direct_method(ctr * cvr, idx, theta))):
        value = ips(flat(label.double()), idx_r, theta, flat(lt)).value
        est = value.reshape(draws, b, 2).sum(1)                                  # [draws, 2]
        se = est.std(0) / math.sqrt(draws)
        gap = (est.mean(0) - expected.sum(0)).abs()
        assert bool((gap < 4 * se).all()), (est.mean(0), expected.sum(0), se)
        assert bool((se < 0.05 * expected.sum(0)).all())  # the test has the power to see a 20% bias


def gather(x, idx):
    return torch.gather(x.unsqueeze(1).expand(-1, idx.shape[1], -1), 2, idx)


def test_the_evaluation_judges_by_cascade_dm_by_name(tmp_path):
    """evaluate.estimator: cascade_dm runs through the evaluation with the value model it fits (a cascade
    fit needs its valid split); its estimated flavour is the cascade direct method's, not IPS's."""
    from grade.evaluate.evaluation import run_evaluation
    from grade.value.outcome import OutcomeConfig
    from grade.value.value_model import ValueModelConfig
    from tests.test_evaluate import make_features, make_model, small_config

    features = make_features(tmp_path / "features", n_train=400, n_test=200)
    model = make_model(tmp_path / "model")
    quick = ValueModelConfig(outcome=OutcomeConfig(epochs=2, members=1))
    reports = {name: run_evaluation(features, {"grade": model}, str(tmp_path / name),
                                    small_config(estimator=name, static_search_iterations=0,
                                                 bootstrap_samples=20), value_model_cfg=quick)
               for name in ("cascade_dm", "cascade_dr", "ips")}
    est = reports["cascade_dm"]["policies"]["static"]["estimated"]
    assert est and all(math.isfinite(v) for v in est.values() if isinstance(v, float)), est
    assert est != reports["ips"]["policies"]["static"]["estimated"]
    dr = reports["cascade_dr"]["policies"]["static"]["estimated"]
    assert dr and all(math.isfinite(v) for v in dr.values() if isinstance(v, float)), dr
    assert dr["ctr"] == pytest.approx(est["ctr"]), "cascade_dr corrects what a click is worth, not the ctr"
    assert dr["opm"] != est["opm"]
    # report.json's diagnostics hold the click_model check against the estimator in use, and its detail
    for name, report in reports.items():
        checks = [c for c in report["diagnostics"]["checks"] if c["name"] == "click_model"]
        detail = report["diagnostics"]["click_model"]
        looks = detail["looks_like"]
        assert len(checks) == 1 and checks[0]["value"] == detail["log_lr_per_request"], checks
        want = "warn" if looks == "cascade" and name == "ips" else "pass"
        assert checks[0]["status"] == want and checks[0]["policy"] is None
