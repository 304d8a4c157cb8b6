"""Stage 2: GRPO with adaptive Dirichlet exploration (DESIGN section 7), readable top to bottom.

One training step on a batch of requests:

1. rollout: sample G weight vectors per request from the policy frozen at sampling time (pi_old):
   w ~ Dir(alpha_old(x)), clamped >= eps and renormalised; store log pi_old(w|x) now.
   Gaussian ablation: logistic-normal w = softmax(m(x) + sigma*eps), the action being the logits.
2. rewards: composite reward (grade.reward) of each ranking; group-relative advantages
   A = (R - mean_g R) / (std + eps), exactly 0 in groups whose rewards are all equal. The std is one
   over the whole batch by default (``advantage_norm``), not each group's as in DESIGN section 7:
   per-group scaling cancels the inverse-propensity weights of the logged labels (docs/finetune.md).
3. several update epochs on the same samples: clipped surrogate on the ratio
   rho = exp(clamp(log pi_theta - log pi_old)) plus beta * KL(pi_theta || pi_ref) in closed form
   (Dirichlet-Dirichlet, or Gaussian-Gaussian on the logits), gradient clipping, optimiser step.

Every function takes plain tensors so that a data-parallel wrapper only has to split the batches
(``rank``/``world_size`` in the data iterator) and average gradients
(:class:`grade.distributed.GradientAverager`, which :func:`train_step` applies after every backward pass).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.distributions as D

from grade import distributed
from grade.config import ranged
from grade.policy import PolicyNet
from grade.reward import RewardConfig, reward_terms, weight_entropy


@dataclasses.dataclass
class FinetuneConfig:
    group_size: int = ranged(16, ">= 2")
    """G: weight vectors sampled per request"""
    exploration: Literal["dirichlet", "gaussian"] = "dirichlet"
    """dirichlet (GRADE) or gaussian (logistic-normal ablation: softmax(logits + sigma*eps))"""
    adaptive_kappa: bool = True
    """learn the Dirichlet concentration per request; false = fixed_kappa for every request (ablation)"""
    fixed_kappa: float = ranged(50.0, "> 0")
    """the concentration used when adaptive_kappa is false"""
    gaussian_sigma: float = ranged(0.3, "> 0")
    """std of the logit noise of the gaussian exploration"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """composite reward: coefficients post/prior/format, label and value mix, weight bounds, entropy floor"""
    kl_coef: float = ranged(0.005, ">= 0")
    """beta: weight of KL(pi_theta || pi_stage1) in the loss (a light anchor: 0.02 cost ~2 true OPM on
    the demo)"""
    clip: float = ranged(0.2, "(0, 1)")
    """epsilon of the clipped importance ratio"""
    log_ratio_clip: float = ranged(10.0, "> 0")
    """|log rho| is clamped to this before exp (guards against exploding ratios)"""
    advantage_norm: Literal["group", "batch"] = "batch"
    """divide centred rewards by each group's std (group) or by one std over the batch (batch): per-group
    scaling gives a request with one shallow logged order the same pull as one with a deep
    (inverse-propensity up-weighted) order, which undoes the debiasing and drifts back to the logging
    policy"""
    adv_eps: float = ranged(1e-4, "> 0")
    """added to the std in the advantage denominator"""
    sample_eps: float = ranged(1e-6, "(0, 0.01)")
    """Dirichlet samples are clamped to >= this and renormalised"""
    lr: float = ranged(3e-3, "> 0")
    """Adam learning rate (the first step's, when anneal_lr)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the run: the logged-feedback reward is noisy, and a
    constant rate leaves the last steps (and so the served policy) jumping around the optimum"""
    epochs: int = ranged(3, ">= 0")
    """passes over the train split"""
    max_steps: int = ranged(0, ">= 0")
    """stop after this many steps (0 = run all epochs)"""
    batch_size: int = ranged(256, ">= 1")
    """requests per step (the global batch: each of W processes takes batch_size / W)"""
    update_epochs: int = ranged(2, ">= 1")
    """gradient updates on the same samples per step"""
    max_grad_norm: float = ranged(1.0, "> 0")
    """gradient clipping (global L2 norm)"""
    exposure_depth: int = ranged(10, ">= 1")
    """E: items exposed per request (reward depth and validation depth)"""
    position_bias: float = ranged(1.0, ">= 0")
    """eta of the validation metrics' examination theta_j = 1/(1+j)^eta"""
    eval_every: int = ranged(25, ">= 1")
    """steps between validation points (also evaluated at step 0 and at the end)"""
    eval_max_requests: int = ranged(20000, ">= 0")
    """validation requests used for the curve (the first N of the valid split)"""
    checkpoint_every: int = ranged(50, ">= 1")
    """steps between checkpoints (also one at every epoch end)"""
    seed: int = ranged(0, ">= 0")
    """seed of the data order and of every step's sampling"""
    threads: int = ranged(0, ">= 0")
    """torch intra-op threads (0 = torch's default)"""

    def validate(self, n_objectives: int | None = None) -> None:
        """Checks beyond each field's range (grade.config.check runs those first); with the features'
        number of objectives K, also that the reward's weight bounds fit K."""
        self.reward.validate(n_objectives)


# ------------------------------------------------------------------------------------------------
# The policy as a distribution over weight vectors (Dirichlet, or logistic-normal for the ablation)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PolicyOutput:
    """What one forward pass gives: the exploration distribution and the kappa / mean diagnostics."""

    dist: D.Distribution
    """over the action: weights [B, K] (dirichlet) or logits [B, K] (gaussian)"""
    kappa: torch.Tensor
    """[B] concentration (dirichlet); for gaussian the equivalent 1/sigma^2 is not meaningful: kappa head"""
    mean: torch.Tensor
    """[B, K] mean weights (the serving weights)"""


def policy_output(policy: PolicyNet, num: torch.Tensor, cat: torch.Tensor,
                  cfg: FinetuneConfig) -> PolicyOutput:
    if cfg.exploration == "gaussian":
        logits = policy.logits(num, cat)
        logits = logits - logits.mean(-1, keepdim=True)  # softmax ignores a shift: remove that direction
        mu = torch.softmax(logits, -1)
        dist = D.Independent(D.Normal(logits, torch.full_like(logits, cfg.gaussian_sigma)), 1)
        return PolicyOutput(dist, torch.zeros_like(mu[:, 0]), mu)
    mu, kappa = policy(num, cat)
    alpha = kappa.unsqueeze(-1) * mu + policy.alpha_floor
    return PolicyOutput(D.Dirichlet(alpha), kappa, mu)


def action_to_weights(action: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """Weights on the simplex from a sampled action ([..., K])."""
    if cfg.exploration == "gaussian":
        return torch.softmax(action, -1)
    return action


# ------------------------------------------------------------------------------------------------
# 1. Rollout
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollout:
    actions: torch.Tensor
    """[B, G, K] sampled actions (weights, or logits for gaussian)"""
    weights: torch.Tensor
    """[B, G, K] weight vectors on the simplex"""
    log_prob_old: torch.Tensor
    """[B, G] log pi_old(action | x), stored at sampling time"""


@torch.no_grad()
def rollout(policy: PolicyNet, num: torch.Tensor, cat: torch.Tensor, cfg: FinetuneConfig,
            seed: int) -> Rollout:
    """Sample G actions per request from the current (old) policy; the global RNG is left untouched."""
    out = policy_output(policy, num, cat, cfg)
    sampler, rows = out.dist, None
    if distributed.active():
        # Every rank draws the whole global batch's samples from the shared seed and keeps its own
        # rows: 1 and W processes see the same samples.
        sampler = global_distribution(out.dist)
        rows = distributed.local_rows(sampler.batch_shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        actions = sampler.sample((cfg.group_size,)).transpose(0, 1)  # [B, G, K]
    if rows is not None:
        actions = actions[rows]
    if cfg.exploration == "dirichlet":
        # Tiny float32 samples sit near 1e-38 where log-densities explode; clamp and renormalise.
        actions = actions.clamp_min(cfg.sample_eps)
        actions = actions / actions.sum(-1, keepdim=True)
    log_prob_old = log_prob(out.dist, actions)
    return Rollout(actions, action_to_weights(actions, cfg), log_prob_old)


def global_distribution(dist: D.Distribution) -> D.Distribution:
    """The exploration distribution of the global batch, from every rank's rows (``gather_rows``)."""
    if isinstance(dist, D.Dirichlet):
        return D.Dirichlet(distributed.gather_rows(dist.concentration))
    if isinstance(dist, D.Independent) and isinstance(dist.base_dist, D.Normal):
        base = dist.base_dist
        return D.Independent(D.Normal(distributed.gather_rows(base.loc),
                                      distributed.gather_rows(base.scale)), 1)
    raise TypeError(f"no global form for {type(dist).__name__}")


def log_prob(dist: D.Distribution, actions: torch.Tensor) -> torch.Tensor:
    """log pi(actions) [B, G] for a batch distribution [B] and actions [B, G, K]."""
    return dist.log_prob(actions.transpose(0, 1)).transpose(0, 1)


# ------------------------------------------------------------------------------------------------
# 2. Group-relative advantages
# ------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4,
                     scale: Literal["group", "batch"] = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, G], zero-variance groups [B] bool) from rewards [B, G].

    ``group``: A = (R - mean_g) / (std_g + eps) with the Bessel-corrected std of each group.
    ``batch``: A = (R - mean_g) / (std + eps) with one std of the centred rewards over the whole
    batch (over every process when data-parallel), so a request's advantages keep its reward scale.
    Either way a group whose rewards are all equal carries no signal and gets exactly 0.
    """
    mean = rewards.mean(-1, keepdim=True)
    centred = rewards - mean
    if scale == "batch":
        # float64 sums: the same std on one process and on several (float32 sums differ in the last bits)
        sums = distributed.all_sum(torch.stack([centred.double().pow(2).sum(),
                                                torch.tensor(float(centred.numel()), dtype=torch.float64)]))
        std = (sums[0] / (sums[1] - 1).clamp_min(1)).sqrt().to(rewards.dtype)
    elif rewards.shape[-1] > 1:
        std = rewards.std(-1, keepdim=True, unbiased=True)
    else:
        std = torch.zeros_like(mean)
    constant = (rewards == rewards[..., :1]).all(-1)
    adv = centred / (std + eps)
    adv = torch.where(constant.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv, constant


# ------------------------------------------------------------------------------------------------
# 3. Loss: clipped surrogate + KL to the frozen reference
# ------------------------------------------------------------------------------------------------

def kl_to_reference(current: PolicyOutput, reference: PolicyOutput) -> torch.Tensor:
    """Closed-form KL(pi_theta || pi_ref) per request [B]."""
    return D.kl_divergence(current.dist, reference.dist)


def clipped_surrogate(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip: float,
                      log_ratio_clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(policy loss scalar, stats) of the PPO/GRPO clipped objective, all tensors [B, G]."""
    log_ratio = (new_log_prob - old_log_prob).clamp(-log_ratio_clip, log_ratio_clip)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio": ratio.detach(),
            "clip_frac": ((ratio - 1).abs() > clip).float().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),  # k3 estimate of KL(old || new)
        }
    return loss, stats


def grpo_loss(policy: PolicyNet, reference_out: PolicyOutput, num: torch.Tensor, cat: torch.Tensor,
              roll: Rollout, adv: torch.Tensor,
              cfg: FinetuneConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts for one update epoch."""
    out = policy_output(policy, num, cat, cfg)
    new_lp = log_prob(out.dist, roll.actions)
    policy_loss, stats = clipped_surrogate(new_lp, roll.log_prob_old, adv, cfg.clip, cfg.log_ratio_clip)
    kl = kl_to_reference(out, reference_out).mean()
    loss = policy_loss + cfg.kl_coef * kl
    stats.update(policy_loss=policy_loss.detach(), kl=kl.detach(), out=out)
    return loss, stats


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------

def train_step(policy: PolicyNet, reference: PolicyNet, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], objectives: list[str], cfg: FinetuneConfig,
               seed: int, gmv_unit: float = 1.0,
               averager: distributed.GradientAverager | None = None,
               theta: torch.Tensor | None = None) -> dict[str, float]:
    """Rollout, rewards, advantages and ``update_epochs`` clipped updates on one batch.

    Returns the step's diagnostics under namespaced keys. ``seed`` fixes this step's samples;
    ``gmv_unit`` scales pgmv in the prior (see :func:`grade.reward.gmv_unit_of`); ``averager``
    averages gradients over data-parallel ranks (default: one for the current process group);
    ``theta``: the estimated examination curve the posterior estimators need (grade.reward.reward_terms).
    """
    averager = averager or distributed.GradientAverager()
    num, cat = batch["num"], batch["cat"]
    policy.train()
    roll = rollout(policy, num, cat, cfg, seed)
    with torch.no_grad():
        terms = reward_terms(roll.weights, batch, objectives, cfg.reward, cfg.exposure_depth, gmv_unit,
                             sync=True, theta=theta)
        adv, constant = group_advantages(terms["total"], cfg.adv_eps, cfg.advantage_norm)
        reference_out = policy_output(reference, num, cat, cfg)

    first_ratio_mean = float("nan")
    for epoch in range(cfg.update_epochs):
        loss, stats = grpo_loss(policy, reference_out, num, cat, roll, adv, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        averager(policy)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if epoch == 0:
            first_ratio_mean = float(stats["ratio"].mean())

    out = stats["out"]
    with torch.no_grad():
        entropy = out.dist.entropy()
        kappa = out.kappa.detach()
        mean_w = out.mean.detach()
    diag = {
        "reward/total": float(terms["total"].mean()),
        "reward/post": float(terms["post"].mean()),
        "reward/prior": float(terms["prior"].mean()),
        "reward/format": float(terms["format"].mean()),
        "reward/group_std": float(terms["total"].std(-1).mean()),
        "adv/std": float(adv.std()),
        "loss/policy": float(stats["policy_loss"]),
        "loss/kl": float(stats["kl"]),
        "loss/total": float(loss.detach()),
        "grpo/clip_frac": float(stats["clip_frac"]),
        "grpo/ratio_mean": float(stats["ratio"].mean()),
        "grpo/ratio_max": float(stats["ratio"].max()),
        "grpo/ratio_first_epoch": first_ratio_mean,
        "grpo/approx_kl_old": float(stats["approx_kl"]),
        "grpo/zero_var_groups": float(constant.float().mean()),
        "policy/entropy": float(entropy.mean()),
        "policy/weight_entropy": float(weight_entropy(mean_w).mean()),
        "policy/kappa_mean": float(kappa.mean()),
        "policy/kappa_min": float(kappa.min()),
        "policy/kappa_max": float(kappa.max()),
        "grad/norm": float(grad_norm),
    }
    for k in range(mean_w.shape[-1]):
        diag[f"policy/w{k}_mean"] = float(mean_w[:, k].mean())
    bad = [k for k, v in diag.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite diagnostics {bad} (lower lr or raise alpha_floor)")
    return diag
