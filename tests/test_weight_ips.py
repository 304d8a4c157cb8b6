"""The weight-level estimator (grade.value.weight_ips): IPS, SNIPS and DR by hand on three requests, and
unbiased for a second Dirichlet policy on a simulated case whose logging density is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grade.model.exploration import ExploreConfig, explore, served_alpha
from grade.value.weight_ips import density_ratios, estimate, policy_log_density, realised_value


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


def _published_policy(root, seed: int, u: int, sizes: list[int]) -> str:
    from grade.core import store
    from grade.model.policy import PolicyConfig, PolicyNet, save_policy

    torch.manual_seed(seed)
    net = PolicyNet(PolicyConfig(n_numeric=u, cat_sizes=sizes, n_objectives=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    uri = str(root / f"model-{seed}")
    with store.publishing(uri) as staging:
        save_policy(net, staging)
    return uri


def test_the_report_section_values_the_logging_policy_at_its_own_value_and_another_apart(tmp_path):
    """Logs served by policy A with exploration: A's ratios are 1 (lift 0 exactly), B's are not; logs
    without propensities give no section."""
    from grade.model.policy import load_published_policy
    from grade.value.weight_ips import report_section

    n, u, sizes = 3000, 2, [5]
    a, b = _published_policy(tmp_path, 1, u, sizes), _published_policy(tmp_path, 2, u, sizes)
    g = torch.Generator().manual_seed(0)
    num, cat = torch.randn(n, u, generator=g), torch.randint(0, 5, (n, 1), generator=g)
    policy = load_published_policy(a)
    with torch.inference_mode():
        mu, kappa = policy(num, cat)
    served = explore(mu.numpy(), kappa.numpy(), policy.alpha_floor, np.arange(n),
                     ExploreConfig(share=0.5, kappa_cap=100.0), "v1")
    value = torch.rand(n, 4, generator=g) * torch.from_numpy(served.weights[:, :1])  # depends on the weights
    data = {"num": num, "cat": cat, "position": torch.arange(4).repeat(n, 1),
            "served_w": torch.from_numpy(served.weights),
            "served_log_propensity": torch.from_numpy(served.log_propensity)}
    section = report_section(data, {"a": a, "b": b}, value, depth=3, kappa_cap=100.0, clip=math.inf,
                             n_resamples=200, confidence=0.95, seed=0)
    assert section["n_explored"] == int(served.explored.sum())
    lift_a = section["policies"]["a"]["lift_vs_logging"]
    assert abs(lift_a["lift"]) < 1e-4 and lift_a["ci_low"] <= lift_a["lift"] <= lift_a["ci_high"]
    assert section["policies"]["a"]["ips"] == pytest.approx(section["logging_value"], rel=1e-4)
    lift_b = section["policies"]["b"]["lift_vs_logging"]
    assert abs(lift_b["lift"]) > 1e-3 and lift_b["ci_low"] <= lift_b["lift"] <= lift_b["ci_high"]
    no_propensity = {**data, "served_log_propensity": torch.full((n,), math.nan)}
    assert report_section(no_propensity, {"a": a}, value, 3, 100.0, math.inf, 10, 0.95, 0) is None
