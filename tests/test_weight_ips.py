"""The weight-level estimator (grade.value.weight_ips): IPS, SNIPS and DR by hand on three requests, and
unbiased for a second Dirichlet policy on a simulated case whose logging density is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grade.model.exploration import ExploreConfig, explore, served_alpha
from grade.value.weight_ips import (
    FORMS,
    density_ratios,
    estimate,
    form_values,
    kernel_log_density,
    lifts_vs,
    on_standardised,
    policy_columns,
    policy_log_density,
    realised_value,
    support,
)


def test_realised_value_sums_the_items_shown_in_the_top_e():
    value = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 5.0, 0.0, 0.0]])
    position = torch.tensor([[0, 2, 1, 3], [1, 0, -1, -1]])
    assert realised_value(value, position, depth=2).tolist() == [5.0, 8.0]


def test_ips_snips_and_dr_by_hand_on_three_requests():
    # request 0: explored, ratio e^0.5 / e^0 ; request 1: explored, ratio e^-1 ; request 2: served the mean
    log_new = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    log_logged = torch.tensor([0.0, 0.0, math.nan], dtype=torch.float64)
    realised = torch.tensor([2.0, 4.0, 100.0])
    rho, explored, clipped = density_ratios(log_new, log_logged)
    r0, r1 = math.exp(0.5), math.exp(-1.0)
    assert rho.tolist() == pytest.approx([r0, r1, 0.0]) and explored.tolist() == [True, True, False]
    dm_new = torch.tensor([1.0, 3.0, 50.0])
    dm_logged = torch.tensor([1.5, 2.0, 60.0])
    est = estimate(rho, explored, realised, dm_new, dm_logged, clipped)
    assert est.n_explored == 2 and est.clipped_share == 0.0
    assert est.ips == pytest.approx((r0 * 2 + r1 * 4) / 2)
    assert est.snips == pytest.approx((r0 * 2 + r1 * 4) / (r0 + r1))
    assert est.dr == pytest.approx(((1.0 + r0 * (2 - 1.5)) + (3.0 + r1 * (4 - 2.0))) / 2)
    # clipped at 1.2: request 0's ratio e^0.5 = 1.65 becomes 1.2
    rho_c, _, clipped_c = density_ratios(log_new, log_logged, clip=1.2)
    est_c = estimate(rho_c, explored, realised, clipped=clipped_c)
    assert est_c.ips == pytest.approx((1.2 * 2 + r1 * 4) / 2) and est_c.clipped_share == 0.5
    assert est_c.dr is None


def test_weight_ips_is_unbiased_for_a_second_dirichlet_policy():
    """Logging: serving's exploration (share 0.5) around a mean m0; the outcome of a request is a Bernoulli
    with probability c . w of the served weights w (no click model needed by the estimator). The new
    policy is another Dirichlet; its true value is c . E[w] = c . alpha / sum(alpha). IPS and DR lie within
    4 standard errors of it; SNIPS within 4 SE too (consistent, its bias is O(1/n))."""
    n, c = 60_000, np.array([0.2, 0.5, 0.9])
    rng = np.random.default_rng(0)
    mu0, kappa0 = np.tile([0.5, 0.3, 0.2], (n, 1)), np.full(n, 8.0)
    cfg = ExploreConfig(share=0.5, kappa_cap=100.0, seed=5)
    served = explore(mu0, kappa0, 0.2, np.arange(n), cfg, "v1")
    outcome = (rng.random(n) < served.weights.astype(np.float64) @ c).astype(np.float64)
    mu1, kappa1 = torch.tensor([[0.3, 0.3, 0.4]]).repeat(n, 1), torch.full((n,), 12.0)
    w = torch.from_numpy(served.weights)
    log_new = policy_log_density(mu1, kappa1, 0.2, 100.0, w)
    rho, explored, clipped = density_ratios(log_new, torch.from_numpy(served.log_propensity).double())
    realised = torch.from_numpy(outcome)
    dm = torch.from_numpy(served.weights.astype(np.float64) @ c)          # a (here exact) direct method
    a1 = served_alpha(mu1[:1].double().numpy(), kappa1[:1].double().numpy(), 0.2, 100.0)[0]
    truth = float(c @ (a1 / a1.sum()))
    est = estimate(rho, explored, realised, torch.full((n,), truth), dm, clipped)
    terms = (rho * realised)[explored].numpy()
    se = terms.std() / math.sqrt(explored.sum().item())
    assert abs(est.ips - truth) < 4 * se, (est.ips, truth, se)
    assert abs(est.snips - truth) < 4 * se, (est.snips, truth, se)
    assert abs(est.dr - truth) < 4 * se, (est.dr, truth, se)
    # the logging policy's own value is not the new one's: the test could tell them apart
    a0 = served_alpha(mu0[:1], kappa0[:1], 0.2, 100.0)[0]
    assert abs(float(c @ (a0 / a0.sum())) - truth) > 8 * se


def test_static_fusion_weights_move_to_z_with_the_jacobian():
    """Weights v on the log-predictions drawn from a Dirichlet and mapped to z (w = s v / (s . v)): with the
    Jacobian, the ratio of any density on z to the mapped propensity has mean 1 (within 4 SE); without it,
    the mean is off by many SE (the test could fail)."""
    n, s = 200_000, torch.tensor([0.8, 1.6, 0.5], dtype=torch.float64)
    alpha_v = torch.tensor([4.0, 3.0, 5.0], dtype=torch.float64)
    torch.manual_seed(3)
    v = torch.distributions.Dirichlet(alpha_v).sample((n,))
    log_q = torch.distributions.Dirichlet(alpha_v).log_prob(v)
    w, log_qz = on_standardised(v, log_q, torch.ones(n, dtype=torch.bool), s)
    assert torch.allclose(w.sum(-1), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(w[:, 1] / w[:, 0], v[:, 1] * s[1] / (v[:, 0] * s[0]))  # the same ranking
    target = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    log_k = kernel_log_density(target, w, 20.0)
    ratio = (log_k - log_qz).exp()
    se = float(ratio.std()) / math.sqrt(n)
    assert abs(float(ratio.mean()) - 1.0) < 4 * se, (float(ratio.mean()), se)
    naive = (log_k - log_q).exp()
    assert abs(float(naive.mean()) - 1.0) > 10 * float(naive.std()) / math.sqrt(n)
    # rows served on z are kept as they are
    kept, kept_q = on_standardised(v, log_q, torch.zeros(n, dtype=torch.bool), s)
    assert torch.equal(kept, v) and torch.equal(kept_q, log_q)


def test_the_kernel_peaks_at_the_target_and_narrows_with_its_concentration():
    t = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    near = torch.tensor([[0.2, 0.5, 0.3], [0.25, 0.45, 0.3], [0.1, 0.6, 0.3]], dtype=torch.float64)
    for conc in (20.0, 200.0):
        d = kernel_log_density(t, near, conc)
        assert d[0] > d[1] > d[2]
    assert kernel_log_density(t, near, 200.0)[0] > kernel_log_density(t, near, 20.0)[0]


def test_weight_dr_lifts_vs_static_cover_the_truth_where_the_direct_method_is_biased():
    """Static-fusion-like logging: weights drawn from Dir(10, 10, 10) around the centre; a request's
    outcome is Bernoulli(c . w). Two deterministic targets (the centre, the 'static' reference, and a
    point apart) have true values c . t. The direct method is biased (c . w + 0.5 (w_3 - 1/3)):
    its own lift is off by far more than the DR interval's width, DR's interval covers the true lift,
    and IPS's too; the reference's lift is exactly 0."""
    n, c = 40_000, np.array([0.1, 0.3, 0.6])
    rng = np.random.default_rng(1)
    alpha = np.full(3, 10.0)
    w = rng.dirichlet(alpha, n)
    log_q = torch.distributions.Dirichlet(torch.from_numpy(alpha)).log_prob(torch.from_numpy(w))
    outcome = torch.from_numpy((rng.random(n) < w @ c).astype(np.float64))
    targets = {"static": np.full(3, 1 / 3), "other": np.array([0.2, 0.3, 0.5])}
    dm_bias = lambda x: x @ c + 0.5 * (x[..., 2] - 1 / 3)  # noqa: E731 - a wrong outcome model
    columns = {}
    for name, t in targets.items():
        log_k = kernel_log_density(torch.from_numpy(t), torch.from_numpy(w), 100.0)
        dm_new, dm_logged = torch.full((n,), float(dm_bias(t))), torch.from_numpy(dm_bias(w))
        columns[name], _ = policy_columns(log_k, log_q, outcome, math.inf, dm_new, dm_logged)
    lifts = lifts_vs(columns, "static", list(FORMS), 300, 0.95, 0)
    true_lift = float(targets["other"] @ c) / float(targets["static"] @ c) - 1
    dm_lift = float(dm_bias(targets["other"])) / float(dm_bias(targets["static"])) - 1
    dr = lifts["weight_dr"]["other"]
    assert dr["ci_low"] <= true_lift <= dr["ci_high"], (dr, true_lift)
    assert abs(dm_lift - true_lift) > dr["ci_high"] - dr["ci_low"]
    ips = lifts["weight_ips"]["other"]
    assert ips["ci_low"] <= true_lift <= ips["ci_high"], (ips, true_lift)
    assert lifts["weight_dr"]["static"]["lift"] == 0.0
    assert support(columns["static"])["mean_ratio"] == pytest.approx(1.0, abs=0.05)


def test_form_values_by_hand():
    # sum DM, sum e rho R, sum e rho DM(w), n_explored, sum e rho
    totals = np.array([6.0, 2.0, 1.0, 4.0, 5.0])
    assert form_values(totals, 3, "weight_ips") == pytest.approx(2.0 / 4)
    assert form_values(totals, 3, "weight_snips") == pytest.approx(2.0 / 5)
    assert form_values(totals, 3, "weight_dr") == pytest.approx(6.0 / 3 + 1.0 / 4)
    assert form_values(totals, 3, "weight_sndr") == pytest.approx(6.0 / 3 + 1.0 / 5)
