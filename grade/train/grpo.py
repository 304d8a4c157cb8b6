"""Stage 2: GRPO with adaptive Dirichlet exploration (docs/finetune.md), readable top to bottom.

One training step on a batch of requests:

1. rollout: sample G weight vectors per request from the policy frozen at sampling time (pi_old):
   w ~ Dir(alpha_old(x)), clamped >= eps and renormalised; store log pi_old(w|x) now.
   Gaussian ablation: logistic-normal w = softmax(m(x) + sigma*eps), the action being the logits.
2. rewards: composite reward (grade.value.reward) of each ranking; group-relative advantages
   A = (R - mean_g R) / (std + eps), exactly 0 in groups whose rewards are all equal. The std is one
   over the whole batch by default (``advantage_norm``), not each group's as in the textbook form:
   per-group scaling cancels the inverse-propensity weights of the logged labels (docs/finetune.md).
3. several update epochs on the same samples: clipped surrogate on the ratio
   rho = exp(clamp(log pi_theta - log pi_old)) plus beta * KL(pi_theta || pi_ref) in closed form
   (Dirichlet-Dirichlet, or Gaussian-Gaussian on the logits), plus lambda * mean log kappa (adaptive
   kappa with a target), gradient clipping, optimiser step.
   lambda comes from a PI controller on gap = (mean log kappa at sampling) - log kappa_target.

Every function takes plain tensors so that a data-parallel wrapper only has to split the batches
(``rank``/``world_size`` in the data iterator) and average gradients
(:class:`grade.core.distributed.GradientAverager`, which :func:`train_step` applies after every backward
pass).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import torch
import torch.distributions as D

from grade.core import distributed
from grade.core.config import SEED_RANGE, ranged, setting
from grade.core.errors import ConfigError
from grade.model.policy import PolicyNet
from grade.value.reward import RewardConfig, reward_terms, weight_entropy


@dataclasses.dataclass
class FinetuneConfig:
    group_size: int = ranged(16, "[2, 4096]")
    """G: weight vectors sampled per request"""
    exploration: Literal["dirichlet", "gaussian"] = setting("dirichlet", derived="ablation.exploration")
    """dirichlet (GRADE) or gaussian (logistic-normal ablation: softmax(logits + sigma*eps))"""
    adaptive_kappa: bool = setting(True, derived="ablation.adaptive_kappa")
    """learn the Dirichlet concentration per request; false = fixed_kappa for every request (ablation)"""
    kappa_min: float = ranged(10.0, "> 0")
    """lower bound of the Dirichlet concentration (the policy's kappa head is built with it in Stage 1)"""
    kappa_max: float = ranged(400.0, "> 0")
    """upper bound of the Dirichlet concentration"""
    kappa_init: float = ranged(50.0, "> 0")
    """initial concentration (sets the kappa head's bias in Stage 1)"""
    fixed_kappa: float = ranged(150.0, "> 0", retired=True)
    """the concentration used when adaptive_kappa is false (the adaptive default's target, so the ablation
    changes only who gets how much exploration)"""
    kappa_target: float = ranged(150.0, ">= 0")
    """adaptive kappa: a Lagrange multiplier holds the batch's geometric-mean kappa here, so the surrogate
    only decides which requests get more or less of it; 150 chosen on the valid splits of four simulated
    markets (docs/finetune.md); 0 = unconstrained"""
    kappa_dual_kp: float = ranged(5.0, ">= 0", retired=True)
    """proportional gain: lambda = integral + kappa_dual_kp * (mean log kappa - log kappa_target) now"""
    kappa_dual_lr: float = ranged(0.2, "> 0", retired=True)
    """integral gain: the integral grows by this per step per nat of mean log kappa above the target"""
    gaussian_sigma: float = ranged(0.3, "> 0", retired=True)
    """std of the logit noise of the gaussian exploration"""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """composite reward: coefficients post/prior/format, label and value mix, weight bounds, entropy floor"""
    kl_coef: float = ranged(0.005, ">= 0")
    """beta: weight of KL(pi_theta || pi_stage1) in the loss (a light anchor: a heavier one holds the
    policy near Stage 1's, docs/finetune.md)"""
    clip: float = ranged(0.2, "(0, 1)")
    """epsilon of the clipped importance ratio"""
    log_ratio_clip: float = ranged(10.0, "> 0", retired=True)
    """|log rho| is clamped to this before exp (guards against exploding ratios)"""
    advantage_norm: Literal["group", "batch"] = setting("batch", retired=True)
    """divide centred rewards by each group's std (group) or by one std over the batch (batch): per-group
    scaling gives a request with one shallow logged order the same pull as one with a deep
    (inverse-propensity up-weighted) order, which undoes the debiasing and drifts back to the logging
    policy"""
    adv_eps: float = ranged(1e-4, "> 0", retired=True)
    """added to the std in the advantage denominator"""
    sample_eps: float = ranged(1e-6, "(0, 0.01)", retired=True)
    """Dirichlet samples are clamped to >= this and renormalised"""
    lr: float = ranged(3e-3, "> 0")
    """Adam learning rate (the first step's, when anneal_lr)"""
    anneal_lr: bool = setting(True, retired=True)
    """decay the learning rate linearly to 0 over the run: the logged-feedback reward is noisy, and a
    constant rate leaves the last steps (and so the served policy) jumping around the optimum"""
    epochs: int = ranged(3, "[0, 10000]")
    """passes over the train split"""
    max_steps: int = ranged(0, "[0, 1e9]")
    """stop after this many steps (0 = run all epochs)"""
    batch_size: int = ranged(256, "[1, 1e7]")
    """requests per step (the global batch: each of W processes takes batch_size / W)"""
    update_epochs: int = ranged(2, "[1, 1000]")
    """gradient updates on the same samples per step"""
    max_grad_norm: float = ranged(1.0, "> 0", retired=True)
    """gradient clipping (global L2 norm)"""
    exposure_depth: int = ranged(10, "[1, 1000]", derived="shared.exposure_depth")
    """E: items exposed per request (reward depth and validation depth)"""
    position_bias: float = ranged(1.0, "[0, 10]", derived="shared.eta")
    """eta of the validation metrics' examination theta_j = 1/(1+j)^eta"""
    eval_every: int = ranged(25, "[1, 1e9]")
    """steps between validation points (also evaluated at step 0 and at the end)"""
    eval_max_requests: int = ranged(20000, "[0, 1e8]", retired=True)
    """validation requests used for the curve (the first N of the valid split)"""
    checkpoint_every: int = ranged(50, "[1, 1e9]", retired=True)
    """steps between checkpoints (also one at every epoch end)"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:finetune")
    """seed of the data order and of every step's sampling"""
    threads: int = ranged(0, "[0, 1024]")
    """torch intra-op threads (0 = torch's default)"""
    value_cache_max_mb: float = ranged(1024.0, "[0, 1e6]")
    """the value fields of every train request are computed once and held in memory up to this size (MB;
    1 + 3 + 3 values x list size x 4 bytes per request), else per batch; 0 = always per batch"""

    def validate(self, n_objectives: int | None = None) -> None:
        """Checks beyond each field's range (grade.core.config.check runs those first); with the features'
        number of objectives K, also that the reward's weight bounds fit K."""
        if not self.kappa_min <= self.kappa_init <= self.kappa_max or self.kappa_min == self.kappa_max:
            raise ConfigError(f"finetune.kappa_min, kappa_init, kappa_max: expected kappa_min <= "
                              f"kappa_init <= kappa_max and kappa_min < kappa_max, got {self.kappa_min}, "
                              f"{self.kappa_init}, {self.kappa_max}")
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
    kappa_logit: torch.Tensor | None = None
    """[B] the kappa head's output before its sigmoid (dirichlet only)"""


def policy_output(policy: PolicyNet, num: torch.Tensor, cat: torch.Tensor,
                  cfg: FinetuneConfig) -> PolicyOutput:
    if cfg.exploration == "gaussian":
        logits = policy.logits(num, cat)
        logits = logits - logits.mean(-1, keepdim=True)  # softmax ignores a shift: remove that direction
        mu = torch.softmax(logits, -1)
        dist = D.Independent(D.Normal(logits, torch.full_like(logits, cfg.gaussian_sigma)), 1)
        return PolicyOutput(dist, torch.zeros_like(mu[:, 0]), mu)
    mu, kappa, kappa_logit = policy.heads(policy.hidden(num, cat))
    alpha = kappa.unsqueeze(-1) * mu + policy.alpha_floor
    return PolicyOutput(D.Dirichlet(alpha), kappa, mu, kappa_logit)


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
    kappa: torch.Tensor
    """[B] concentration at sampling time (zeros for gaussian)"""
    mean: torch.Tensor
    """[B, K] the policy's mean weights at sampling time: the weights it serves before this step's update"""


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
        torch.default_generator.manual_seed(seed)   # the CPU generator fork_rng restores, nothing else
        actions = sampler.sample((cfg.group_size,)).transpose(0, 1)  # [B, G, K]
    if rows is not None:
        actions = actions[rows]
    if cfg.exploration == "dirichlet":
        # Tiny float32 samples sit near 1e-38 where log-densities explode; clamp and renormalise.
        actions = actions.clamp_min(cfg.sample_eps)
        actions = actions / actions.sum(-1, keepdim=True)
    log_prob_old = log_prob(out.dist, actions)
    return Rollout(actions, action_to_weights(actions, cfg), log_prob_old, out.kappa, out.mean)


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


def kappa_is_targeted(cfg: FinetuneConfig) -> bool:
    """Whether the loss carries the Lagrangian term on kappa (adaptive Dirichlet with a target)."""
    return cfg.exploration == "dirichlet" and cfg.adaptive_kappa and cfg.kappa_target > 0


def kappa_penalty(out: PolicyOutput, multiplier: float) -> torch.Tensor:
    """The Lagrangian term lambda * mean(kappa logit) (scalar) that holds kappa at its target.

    Why a constraint at all: near the mean's optimum the reward is concave in w, so any spread costs
    expected reward and the surrogate's kappa gradient points up for nearly every request; nothing but
    the ceiling stops it. Fixing the batch's mean log kappa leaves the surrogate to decide only how
    kappa is shared out: high where narrowing gains most reward, low where the reward is flat.
    The term acts on the logit, not on log kappa: through the sigmoid its pull would vanish on
    requests that sit at kappa_min or kappa_max, and the multiplier would wind up without effect.
    """
    return multiplier * out.kappa_logit.mean()


def kappa_gap(kappa: torch.Tensor, cfg: FinetuneConfig) -> float:
    """mean log kappa - log kappa_target over every process's requests (kappa [B]); 0 when untargeted.

    All processes get the same gap and so hold the same lambda (the loss term needs no such sum: the
    gradient averager makes the local means' gradients the global one's).
    """
    if not kappa_is_targeted(cfg):
        return 0.0
    with torch.no_grad():
        sums = distributed.all_sum(torch.stack([kappa.double().log().sum(),
                                                torch.tensor(float(kappa.numel()), dtype=torch.float64)]))
    return float(sums[0] / sums[1]) - math.log(cfg.kappa_target)


def kappa_controller(integral: float, kappa: torch.Tensor, cfg: FinetuneConfig) -> tuple[float, float, float]:
    """(lambda for this step's loss, the next integral, gap) from the sampling-time kappa [B]: a PI
    controller.

    lambda = integral + kappa_dual_kp * gap and the integral grows by kappa_dual_lr * gap; all three are 0
    when kappa is not targeted. The proportional part damps: with the integral alone (plain dual ascent)
    kappa swings between its bounds, since Adam moves the kappa head at its own pace whatever lambda's size.
    """
    if not kappa_is_targeted(cfg):
        return 0.0, 0.0, 0.0
    gap = kappa_gap(kappa, cfg)
    return integral + cfg.kappa_dual_kp * gap, integral + cfg.kappa_dual_lr * gap, gap


def kappa_diagnostics(kappa: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
    """kappa's spread over requests from kappa [B] and rewards [B, G]: deciles, the std of log kappa
    and the correlation of log kappa with each request's reward std over its group (0 if either is
    constant, e.g. fixed kappa)."""
    log_kappa, spread = kappa.double().log(), rewards.double().std(-1)
    q = torch.quantile(kappa.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    corr = 0.0
    if kappa.numel() > 1 and float(log_kappa.std()) > 1e-9 and float(spread.std()) > 1e-12:
        corr = float(torch.corrcoef(torch.stack([log_kappa, spread]))[0, 1])
    return {"policy/kappa_p10": float(q[0]), "policy/kappa_p50": float(q[1]), "policy/kappa_p90": float(q[2]),
            "policy/log_kappa_std": float(log_kappa.std()) if kappa.numel() > 1 else 0.0,
            "policy/kappa_reward_spread_corr": corr}


def grpo_loss(policy: PolicyNet, reference_out: PolicyOutput, num: torch.Tensor, cat: torch.Tensor,
              roll: Rollout, adv: torch.Tensor, cfg: FinetuneConfig,
              kappa_multiplier: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts for one update epoch (``kappa_multiplier``: lambda of the kappa target)."""
    out = policy_output(policy, num, cat, cfg)
    new_lp = log_prob(out.dist, roll.actions)
    policy_loss, stats = clipped_surrogate(new_lp, roll.log_prob_old, adv, cfg.clip, cfg.log_ratio_clip)
    kl = kl_to_reference(out, reference_out).mean()
    loss = policy_loss + cfg.kl_coef * kl
    if kappa_is_targeted(cfg):
        loss = loss + kappa_penalty(out, kappa_multiplier)
    stats.update(policy_loss=policy_loss.detach(), kl=kl.detach(), out=out)
    return loss, stats


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------

class StepResult(NamedTuple):
    """What one training step gives back: its diagnostics and the controller state the next step needs."""

    diagnostics: dict[str, float]
    """the step's diagnostics under namespaced keys (the train log's line)"""
    kappa_integral: float
    """the integral part of the kappa target's multiplier for the next step (0 when kappa is untargeted)"""


def train_step(policy: PolicyNet, reference: PolicyNet, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], objectives: list[str], cfg: FinetuneConfig,
               seed: int, gmv_unit: float = 1.0,
               averager: distributed.GradientAverager | None = None,
               theta: torch.Tensor | None = None, kappa_integral: float = 0.0,
               roll: Rollout | None = None) -> StepResult:
    """Rollout, rewards, advantages and ``update_epochs`` clipped updates on one batch.

    Returns the step's diagnostics and the kappa controller's next integral. ``seed`` fixes this step's
    samples;
    ``gmv_unit`` scales pgmv in the prior (see :func:`grade.value.reward.gmv_unit_of`); ``averager``
    averages gradients over data-parallel ranks (default: one for the current process group);
    ``theta``: the estimated examination curve the posterior estimators need
    (grade.value.reward.reward_terms).
    ``kappa_integral`` is the integral part of the kappa target's lambda (the previous step's
    :attr:`StepResult.kappa_integral`). ``roll``: this step's rollout when the caller has drawn it already
    (with
    :func:`rollout` and ``seed``), e.g. to read the guardrails at its served weights before the reward.
    """
    averager = averager or distributed.GradientAverager()
    num, cat = batch["num"], batch["cat"]
    policy.train()
    roll = roll if roll is not None else rollout(policy, num, cat, cfg, seed)
    with torch.no_grad():
        terms = reward_terms(roll.weights, batch, objectives, cfg.reward, cfg.exposure_depth, gmv_unit,
                             sync=True, theta=theta)
        adv, constant = group_advantages(terms["total"], cfg.adv_eps, cfg.advantage_norm)
        reference_out = policy_output(reference, num, cat, cfg)
    kappa_multiplier, next_integral, gap = kappa_controller(kappa_integral, roll.kappa, cfg)

    first_ratio_mean = float("nan")
    for epoch in range(cfg.update_epochs):
        loss, stats = grpo_loss(policy, reference_out, num, cat, roll, adv, cfg, kappa_multiplier)
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
        **(kappa_diagnostics(kappa, terms["total"]) if cfg.exploration == "dirichlet" else {}),
        "kappa/gap": gap,
        "kappa/multiplier": kappa_multiplier,
        "kappa/integral": next_integral,
        "grad/norm": float(grad_norm),
    }
    for k in range(mean_w.shape[-1]):
        diag[f"policy/w{k}_mean"] = float(mean_w[:, k].mean())
    bad = [k for k, v in diag.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite diagnostics {bad} (lower lr or raise alpha_floor)")
    return StepResult(diag, next_integral)
