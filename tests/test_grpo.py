"""GRPO pieces: advantages, importance ratios, clipping, closed-form KL, gradients, extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributions as D

from grade.core import config
from grade.core.errors import InputError
from grade.model.policy import PolicyConfig, PolicyNet
from grade.train.grpo import (
    FinetuneConfig,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    kl_to_reference,
    policy_output,
    rollout,
    train_step,
)
from grade.value.reward import RewardConfig

OBJECTIVES = ["ctr", "cvr", "gmv"]


def make_policy(seed: int = 0, **kw) -> PolicyNet:
    torch.manual_seed(seed)
    cfg = PolicyConfig(n_numeric=3, cat_sizes=[4], n_objectives=3, hidden=[16], **kw)
    policy = PolicyNet(cfg)
    with torch.no_grad():
        policy.mu_head.weight.normal_(0, 0.5)  # a mean that differs per request
        policy.kappa_head.weight.normal_(0, 0.5)
    return policy


def make_batch(b: int = 32, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length).unsqueeze(0) < torch.randint(2, length + 1, (b, 1), generator=gen)
    pred = torch.rand(b, length, 3, generator=gen) * torch.tensor([0.3, 0.3, 50.0]) + 1e-3
    return {"z": torch.randn(b, length, 3, generator=gen) * mask.unsqueeze(-1),
            "pred": pred * mask.unsqueeze(-1), "mask": mask, "num": torch.randn(b, 3, generator=gen),
            "cat": torch.randint(0, 4, (b, 1), generator=gen),
            "click": (torch.rand(b, length, generator=gen) < 0.3).float() * mask,
            "order": (torch.rand(b, length, generator=gen) < 0.1).float() * mask,
            "gmv": torch.zeros(b, length)}


def clone(policy: PolicyNet, **cfg_changes) -> PolicyNet:
    import dataclasses

    other = PolicyNet(dataclasses.replace(policy.cfg, **cfg_changes))
    other.load_state_dict(policy.state_dict())
    return other


# ------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------

def test_advantages_by_hand_and_constant_groups_are_zero():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [0.0, 0.0, 4.0]])
    adv, constant = group_advantages(rewards, eps=0.0)
    # Group 1: mean 2, Bessel std 1. Group 3: mean 4/3, std sqrt(16/3).
    s = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-4 / 3 / s, -4 / 3 / s, 8 / 3 / s]])
    torch.testing.assert_close(adv, expected)
    assert constant.tolist() == [False, True, False]


def test_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.rand(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    rewards[5] = 0.7  # a constant group
    adv, constant = group_advantages(rewards, eps=1e-4)
    live = ~constant
    assert constant.sum() == 1 and torch.equal(adv[5], torch.zeros(16))
    torch.testing.assert_close(adv[live].mean(-1), torch.zeros(63), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[live].std(-1), torch.ones(63), atol=1e-3, rtol=0)


def test_batch_advantages_keep_each_request_reward_scale():
    """Group scaling gives both requests the same advantages; batch scaling keeps the 10x larger spread."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, 10.0], [3.0, 3.0]])
    group, _ = group_advantages(rewards, eps=0.0, scale="group")
    torch.testing.assert_close(group[0], group[1])
    batch, constant = group_advantages(rewards, eps=0.0, scale="batch")
    # centred: (-0.5, 0.5), (-5, 5), (0, 0); one std over the 6 values: sqrt(2 * (0.25 + 25) / 5)
    s = math.sqrt(2 * (0.25 + 25.0) / 5)
    torch.testing.assert_close(batch, torch.tensor([[-0.5, 0.5], [-5.0, 5.0], [0.0, 0.0]]) / s)
    assert constant.tolist() == [False, False, True]


# ------------------------------------------------------------------------------------------------
# Ratios and clipping
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exploration", ["dirichlet", "gaussian"])
def test_ratio_is_exactly_one_on_the_first_update_epoch(exploration):
    policy, batch = make_policy(), make_batch()
    cfg = FinetuneConfig(exploration=exploration)
    roll = rollout(policy, batch["num"], batch["cat"], cfg, seed=3)
    reference_out = policy_output(clone(policy), batch["num"], batch["cat"], cfg)
    adv = torch.randn(roll.log_prob_old.shape)
    _, stats = grpo_loss(policy, reference_out, batch["num"], batch["cat"], roll, adv, cfg)
    assert torch.equal(stats["ratio"], torch.ones_like(stats["ratio"]))
    assert float(stats["clip_frac"]) == 0.0
    # ...and the KL to an identical reference is 0.
    torch.testing.assert_close(stats["kl"], torch.tensor(0.0), atol=1e-5, rtol=0)


def test_train_step_reports_ratio_one_first_then_moves():
    policy, batch = make_policy(), make_batch()
    reference = clone(policy)
    cfg = FinetuneConfig(update_epochs=3, lr=1e-2, reward=RewardConfig(post_estimator="dcg_ips"))
    diag = train_step(policy, reference, torch.optim.Adam(policy.parameters(), lr=cfg.lr), batch, OBJECTIVES,
                      cfg, seed=0).diagnostics
    assert diag["grpo/ratio_first_epoch"] == 1.0
    assert diag["grpo/ratio_mean"] != 1.0  # the last epoch sees updated parameters
    expected_keys = {"reward/total", "reward/post", "reward/prior", "reward/format", "adv/std", "loss/policy",
                     "loss/kl", "grpo/clip_frac", "grpo/ratio_mean", "policy/entropy", "policy/kappa_mean",
                     "policy/kappa_min", "policy/kappa_max", "grpo/zero_var_groups", "grad/norm"}
    assert expected_keys <= set(diag)
    assert all(math.isfinite(v) for v in diag.values())


def test_clipping_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = clipped_surrogate(new, old, adv, clip=0.2, log_ratio_clip=10.0)
    loss.backward()
    # ratio 1.5 with A>0: clipped, no push further. ratio 1.5 with A<0: pessimistic term, gradient flows.
    # ratio 0.5 with A<0: clipped. ratio 1.1 inside the region: gradient -A*ratio/n.
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5 / 4, 0.0, -1.1 / 4]))
    assert float(stats["clip_frac"]) == 0.75
    # Loss by hand: -mean(min(r A, clip(r) A)) = -(1.2 - 1.5 - 0.8 + 1.1) / 4
    torch.testing.assert_close(loss, torch.tensor(-(1.2 - 1.5 - 0.8 + 1.1) / 4))


def test_log_ratio_is_clamped_before_exp():
    old = torch.zeros(2)
    new = torch.tensor([500.0, -500.0])
    _, stats = clipped_surrogate(new, old, torch.ones(2), clip=0.2, log_ratio_clip=10.0)
    torch.testing.assert_close(stats["ratio"], torch.tensor([math.exp(10.0), math.exp(-10.0)]))


def test_policy_gets_no_gradient_once_every_sample_left_the_trust_region():
    """Samples pushed past 1 +- clip in their advantage's direction stop pulling on the policy."""
    policy, batch = make_policy(), make_batch()

    def grad_sum(clip: float) -> float:
        cfg = FinetuneConfig(clip=clip, kl_coef=0.0)
        roll = rollout(policy, batch["num"], batch["cat"], cfg, seed=0)
        adv = torch.randn(roll.log_prob_old.shape, generator=torch.Generator().manual_seed(0))
        # As if earlier epochs had moved every ratio to exp(+-0.5) in the direction of its advantage.
        roll.log_prob_old = roll.log_prob_old - 0.5 * adv.sign()
        with torch.no_grad():
            ref = policy_output(clone(policy), batch["num"], batch["cat"], cfg)
        policy.zero_grad()
        loss, stats = grpo_loss(policy, ref, batch["num"], batch["cat"], roll, adv, cfg)
        loss.backward()
        assert float(stats["clip_frac"]) == (1.0 if clip < math.exp(0.5) - 1 else 0.0)
        return sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)

    assert grad_sum(0.2) == 0.0
    assert grad_sum(0.9) > 0.0


# ------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------

def test_closed_form_dirichlet_kl_agrees_with_monte_carlo():
    torch.manual_seed(0)
    p = D.Dirichlet(torch.tensor([[2.0, 5.0, 1.5], [30.0, 10.0, 4.0]]))
    q = D.Dirichlet(torch.tensor([[3.0, 3.0, 3.0], [25.0, 15.0, 2.0]]))
    closed = kl_to_reference(policy_output_of(p), policy_output_of(q))
    x = p.sample((200_000,)).clamp_min(1e-12)
    terms = p.log_prob(x) - q.log_prob(x)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(x.shape[0])
    assert ((closed - mc).abs() < 4 * se + 1e-3).all(), (closed, mc, se)
    assert (closed > 0.01).all()


def test_closed_form_gaussian_kl_agrees_with_monte_carlo():
    torch.manual_seed(0)
    p = D.Independent(D.Normal(torch.tensor([[0.2, -0.1, 0.0]]), 0.3), 1)
    q = D.Independent(D.Normal(torch.tensor([[0.0, 0.3, -0.2]]), 0.3), 1)
    closed = kl_to_reference(policy_output_of(p), policy_output_of(q))
    torch.testing.assert_close(closed, torch.tensor([(0.04 + 0.16 + 0.04) / (2 * 0.09)]))
    x = p.sample((200_000,))
    mc = (p.log_prob(x) - q.log_prob(x)).mean(0)
    torch.testing.assert_close(closed, mc, atol=0.02, rtol=0)


def policy_output_of(dist):
    from grade.train.grpo import PolicyOutput

    return PolicyOutput(dist, torch.zeros(1), torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------------
# Gradients and extreme inputs
# ------------------------------------------------------------------------------------------------

def _grads(policy: PolicyNet, cfg: FinetuneConfig) -> dict[str, float]:
    batch = make_batch()
    roll = rollout(policy, batch["num"], batch["cat"], cfg, seed=0)
    ref = policy_output(clone(make_policy(seed=5), fixed_kappa=policy.cfg.fixed_kappa), batch["num"],
                        batch["cat"], cfg)
    adv = torch.randn(roll.log_prob_old.shape, generator=torch.Generator().manual_seed(0))
    loss, _ = grpo_loss(policy, ref, batch["num"], batch["cat"], roll, adv, cfg)
    loss.backward()
    return {name: 0.0 if p.grad is None else float(p.grad.abs().sum())
            for name, p in policy.named_parameters()}


def test_gradients_reach_both_the_mu_and_kappa_heads():
    g = _grads(make_policy(), FinetuneConfig())
    assert g["mu_head.weight"] > 0 and g["kappa_head.weight"] > 0 and g["kappa_head.bias"] > 0
    assert g["trunk.0.weight"] > 0 and g["embeddings.0.weight"] > 0


def test_fixed_kappa_gets_no_kappa_gradient_and_gaussian_ignores_kappa():
    fixed = _grads(make_policy(fixed_kappa=50.0), FinetuneConfig(adaptive_kappa=False))
    assert fixed["mu_head.weight"] > 0 and fixed["kappa_head.weight"] == 0.0
    gauss = _grads(make_policy(), FinetuneConfig(exploration="gaussian"))
    assert gauss["mu_head.weight"] > 0 and gauss["kappa_head.weight"] == 0.0


@pytest.mark.parametrize("exploration", ["dirichlet", "gaussian"])
def test_extreme_inputs_stay_finite(exploration):
    # Tiny alpha: kappa near 0.01 and a floor of 1e-3 put float32 samples near underflow.
    policy = make_policy(kappa_min=0.01, kappa_max=0.02, kappa_init=0.015, alpha_floor=1e-3)
    batch = make_batch(b=16, length=5)
    batch["mask"][:8] = False
    batch["mask"][:8, 0] = True  # one-item lists
    batch["click"].zero_()
    batch["order"].zero_()  # all-zero labels
    batch["z"][8:] *= 1e4
    # No format term: with constant ranking rewards a group then has nothing to tell apart.
    cfg = FinetuneConfig(exploration=exploration, update_epochs=3, lr=0.1,
                         reward=RewardConfig(post_estimator="dcg_ips", format=0.0))
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    ref = clone(policy)
    for step in range(3):
        diag = train_step(policy, ref, opt, batch, OBJECTIVES, cfg, seed=step).diagnostics
        assert all(math.isfinite(v) for v in diag.values()), diag
    assert diag["grpo/zero_var_groups"] >= 0.5  # one-item lists: every weight ranks alike
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_train_step_returns_the_kappa_controllers_next_integral():
    """The controller's state comes back as StepResult.kappa_integral (the diagnostics only log it):
    the integral grows by kappa_dual_lr times the step's gap, and is 0 when kappa is not targeted."""
    policy, batch = make_policy(), make_batch()
    cfg = FinetuneConfig(update_epochs=1, reward=RewardConfig(post_estimator="dcg_ips"), kappa_dual_lr=0.3)
    result = train_step(policy, clone(policy), torch.optim.Adam(policy.parameters(), lr=cfg.lr), batch,
                        OBJECTIVES, cfg, seed=0, kappa_integral=0.5)
    gap = result.diagnostics["kappa/gap"]
    assert gap != 0 and result.kappa_integral == pytest.approx(0.5 + 0.3 * gap)
    fixed = FinetuneConfig(update_epochs=1, reward=cfg.reward, adaptive_kappa=False)
    policy = make_policy()
    result = train_step(policy, clone(policy), torch.optim.Adam(policy.parameters(), lr=cfg.lr), batch,
                        OBJECTIVES, fixed, seed=0, kappa_integral=0.5)
    assert result.kappa_integral == 0.0


def test_dirichlet_samples_are_clamped_and_on_the_simplex():
    policy = make_policy(kappa_min=0.01, kappa_max=0.02, kappa_init=0.015, alpha_floor=1e-3)
    batch = make_batch()
    roll = rollout(policy, batch["num"], batch["cat"], FinetuneConfig(sample_eps=1e-6), seed=0)
    assert roll.weights.min() >= 1e-6 * 0.99
    torch.testing.assert_close(roll.weights.sum(-1), torch.ones(roll.weights.shape[:2]))
    assert torch.isfinite(roll.log_prob_old).all()


def test_rollout_is_seeded_and_leaves_the_global_rng_alone():
    policy, batch = make_policy(), make_batch()
    cfg = FinetuneConfig()
    state = torch.get_rng_state()
    a = rollout(policy, batch["num"], batch["cat"], cfg, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = rollout(policy, batch["num"], batch["cat"], cfg, seed=7)
    c = rollout(policy, batch["num"], batch["cat"], cfg, seed=8)
    assert torch.equal(a.actions, b.actions) and not torch.equal(a.actions, c.actions)
    assert a.actions.shape == (32, cfg.group_size, 3)


@pytest.mark.parametrize("kw, match", [
    ({"group_size": 1}, "group_size"), ({"clip": 1.5}, "clip"), ({"kl_coef": -1.0}, "kl_coef"),
    ({"lr": 0.0}, "lr"), ({"reward": RewardConfig(w_min=[0.6])}, "admit no weight"),
])
def test_invalid_config(kw, match):
    with pytest.raises(InputError, match=match):
        config.check(FinetuneConfig(**kw)).validate(3)
