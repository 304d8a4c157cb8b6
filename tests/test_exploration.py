"""Exploration in serving (grade.model.exploration): seeded by the request id, off means the mean, the
logged log-density is the served Dirichlet's, and the draws follow that Dirichlet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grade.model.exploration import ExploreConfig, explore, log_density, served_alpha


def batch(b: int = 64, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.softmax(torch.randn(b, k, generator=g), -1).numpy()
    kappa = (10 + 390 * torch.rand(b, generator=g)).numpy()
    ids = torch.randint(0, 2**62, (b,), generator=g).numpy()
    return mu, kappa, ids


def test_the_same_request_gets_the_same_weights_in_any_batch():
    mu, kappa, ids = batch()
    cfg = ExploreConfig(share=0.5, kappa_cap=100.0, seed=3)
    whole = explore(mu, kappa, 0.2, ids, cfg, "v1")
    order = np.random.default_rng(0).permutation(len(ids))[:20]
    part = explore(mu[order], kappa[order], 0.2, ids[order], cfg, "v1")
    np.testing.assert_array_equal(part.weights, whole.weights[order])
    np.testing.assert_array_equal(part.log_propensity, whole.log_propensity[order])
    assert 10 < whole.explored.sum() < 54  # about half explore
    other_seed = explore(mu, kappa, 0.2, ids, ExploreConfig(share=0.5, kappa_cap=100.0, seed=4), "v1")
    assert not np.array_equal(other_seed.weights, whole.weights)


def test_share_0_or_no_ids_serve_exactly_the_mean():
    mu, kappa, ids = batch()
    for cfg, given in ((ExploreConfig(share=0.0), ids), (ExploreConfig(share=1.0), None)):
        out = explore(mu, kappa, 0.2, given, cfg, "v7")
        np.testing.assert_array_equal(out.weights, mu.astype(np.float32))
        assert np.isnan(out.log_propensity).all() and not out.explored.any() and out.model_version == "v7"


def test_explored_log_density_is_the_dirichlets_log_prob_and_the_rest_are_the_mean():
    mu, kappa, ids = batch(b=256)
    cfg = ExploreConfig(share=0.3, kappa_cap=50.0, seed=1)
    out = explore(mu, kappa, 0.2, ids, cfg, "v1")
    e = out.explored
    assert 0.2 < e.mean() < 0.4
    np.testing.assert_array_equal(out.weights[~e], mu[~e].astype(np.float32))
    assert np.isnan(out.log_propensity[~e]).all()
    alpha = torch.from_numpy(served_alpha(mu[e], kappa[e], 0.2, 50.0))
    expected = torch.distributions.Dirichlet(alpha).log_prob(torch.from_numpy(out.weights[e]).double())
    np.testing.assert_allclose(out.log_propensity[e], expected.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.weights.sum(1), 1.0, atol=1e-6)
    assert (out.weights > 0).all()
    np.testing.assert_allclose(log_density(alpha.numpy(), out.weights[e]), expected.numpy(), rtol=1e-9)


@pytest.mark.parametrize("kappa", [1.0, 30.0])
def test_the_draws_follow_the_served_dirichlet(kappa):
    """Means and variances of 40,000 draws (distinct ids) against the Dirichlet's, within 4 SE; small
    alphas (0.2 + 0.2 * 1) exercise the boosted sampler."""
    n, mean = 40_000, np.array([0.2, 0.3, 0.5])
    mu, kap = np.tile(mean, (n, 1)), np.full(n, kappa)
    out = explore(mu, kap, 0.2, np.arange(n) * 7 + 11, ExploreConfig(share=1.0, kappa_cap=200.0), "v")
    a = served_alpha(mu[:1], kap[:1], 0.2, 200.0)[0]
    a0 = a.sum()
    m, var = a / a0, a * (a0 - a) / (a0 * a0 * (a0 + 1))
    w = out.weights.astype(np.float64)
    assert (np.abs(w.mean(0) - m) < 4 * np.sqrt(var / n)).all(), (w.mean(0), m)
    fourth = ((w - m) ** 4).mean(0)
    assert (np.abs(w.var(0) - var) < 4 * np.sqrt((fourth - var**2) / n)).all(), (w.var(0), var)


def test_the_kappa_cap_widens_the_served_dirichlet():
    mu, kappa, _ = batch()
    capped = served_alpha(mu, kappa, 0.2, 20.0)
    np.testing.assert_allclose(capped.sum(1), np.minimum(kappa, 20.0) + 0.2 * mu.shape[1], rtol=1e-6)


def test_log_density_keeps_leading_dimensions_and_matches_torch():
    g = torch.Generator().manual_seed(2)
    alpha = 0.1 + 5 * torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    w = torch.distributions.Dirichlet(alpha).sample()
    out = log_density(alpha.numpy(), w.numpy())
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out, torch.distributions.Dirichlet(alpha).log_prob(w).numpy(), rtol=1e-9)
