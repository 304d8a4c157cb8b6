"""Adaptive kappa: the unconstrained surrogate drives kappa up everywhere; the target holds its batch mean
and leaves the surrogate to share kappa out by how much narrowing gains reward."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from grade.core import config
from grade.model.policy import PolicyConfig, PolicyNet
from grade.train.grpo import (
    FinetuneConfig,
    group_advantages,
    grpo_loss,
    kappa_controller,
    kappa_diagnostics,
    policy_output,
    rollout,
)

BEST = torch.tensor([0.5, 0.3, 0.2])


def synthetic_requests(b: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [B, 2], cat [B, 1]): category 1 marks requests whose reward depends on the weights."""
    gen = torch.Generator().manual_seed(seed)
    cat = (torch.arange(b) % 2).unsqueeze(-1)
    return torch.randn(b, 2, generator=gen), cat


def synthetic_reward(weights: torch.Tensor, cat: torch.Tensor, seed: int) -> torch.Tensor:
    """Rewards [B, G] of weights [B, G, K]: sharp around BEST for category 1, pure noise for category 0."""
    gen = torch.Generator().manual_seed(seed)
    sensitive = cat[:, 0].bool().unsqueeze(-1)
    noise = 0.01 * torch.randn(weights.shape[:2], generator=gen)
    return torch.where(sensitive, -20.0 * (weights - BEST).pow(2).sum(-1), 0.0) + noise


def train(cfg: FinetuneConfig, steps: int = 120) -> tuple[PolicyNet, list[float]]:
    """GRPO on the synthetic reward; returns the policy and each step's mean log kappa."""
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig(n_numeric=2, cat_sizes=[2], n_objectives=3, hidden=[16],
                                    init_mean=BEST.tolist(), kappa_init=50.0))
    reference = PolicyNet(policy.cfg)
    reference.load_state_dict(policy.state_dict())
    num, cat = synthetic_requests()
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    integral, mean_log_kappa = 0.0, []
    for step in range(steps):
        roll = rollout(policy, num, cat, cfg, seed=step)
        multiplier, integral, _ = kappa_controller(integral, roll.kappa, cfg)
        mean_log_kappa.append(float(roll.kappa.log().mean()))
        adv, _ = group_advantages(synthetic_reward(roll.weights, cat, step), cfg.adv_eps, cfg.advantage_norm)
        with torch.no_grad():
            reference_out = policy_output(reference, num, cat, cfg)
        for _ in range(cfg.update_epochs):
            loss, _ = grpo_loss(policy, reference_out, num, cat, roll, adv, cfg, multiplier)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return policy, mean_log_kappa


def kappa_by_category(policy: PolicyNet) -> tuple[float, float]:
    num, cat = synthetic_requests(seed=1)
    with torch.no_grad():
        kappa = policy(num, cat)[1]
    return float(kappa[cat[:, 0] == 0].median()), float(kappa[cat[:, 0] == 1].median())


CFG = FinetuneConfig(group_size=16, kl_coef=0.0, lr=1e-2, anneal_lr=False)


def test_without_a_target_kappa_climbs_for_every_request():
    policy, mean_log_kappa = train(dataclasses.replace(CFG, kappa_target=0.0))
    flat, sensitive = kappa_by_category(policy)
    assert torch.tensor(mean_log_kappa[-10:]).mean().exp() > 100.0
    assert sensitive > 150.0


def test_target_holds_mean_log_kappa_and_kappa_follows_reward_sensitivity():
    cfg = dataclasses.replace(CFG, kappa_target=50.0)
    policy, mean_log_kappa = train(cfg)
    held = torch.tensor(mean_log_kappa[-30:]).mean().exp()
    assert abs(float(held) / 50.0 - 1) < 0.15
    flat, sensitive = kappa_by_category(policy)
    assert sensitive > 3 * flat


def test_controller_is_proportional_plus_integral_and_off_when_untargeted():
    kappa = torch.full((8,), 100.0)
    cfg = dataclasses.replace(CFG, kappa_target=50.0, kappa_dual_kp=5.0, kappa_dual_lr=0.2)
    multiplier, integral, gap = kappa_controller(0.3, kappa, cfg)
    assert gap == pytest.approx(math.log(2.0))
    assert (multiplier, integral) == (pytest.approx(0.3 + 5.0 * gap), pytest.approx(0.3 + 0.2 * gap))
    assert kappa_controller(0.3, kappa / 4, cfg)[1] < 0.3
    for off in (dataclasses.replace(cfg, kappa_target=0.0), dataclasses.replace(cfg, adaptive_kappa=False),
                dataclasses.replace(cfg, exploration="gaussian")):
        assert kappa_controller(0.3, kappa, off) == (0.0, 0.0, 0.0)


def test_kappa_diagnostics_deciles_and_correlation():
    kappa = torch.tensor([10.0, 20.0, 40.0, 80.0, 160.0])
    rewards = torch.stack([torch.tensor([0.0, s]) for s in (1.0, 2.0, 3.0, 4.0, 5.0)])
    d = kappa_diagnostics(kappa, rewards)
    assert d["policy/kappa_p50"] == 40.0 and d["policy/kappa_p10"] == pytest.approx(14.0)
    assert d["policy/kappa_reward_spread_corr"] == pytest.approx(1.0)
    assert kappa_diagnostics(torch.full((5,), 50.0), rewards)["policy/kappa_reward_spread_corr"] == 0.0


def test_kappa_target_range_is_declared():
    with pytest.raises(config.ConfigError, match="kappa_target"):
        config.check(FinetuneConfig(kappa_target=-1.0))
