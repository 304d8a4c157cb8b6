"""The guardrails of Stage 2's reward: CTR and GPM may not be traded away for the declared value.

The posterior maximises the declared business value (:mod:`grade.value.business`); clicks and GMV are its
guardrails (the promotion gate checks CTR and GPM against static). ``finetune.reward.guard_mode``
decides how the reward keeps them:

- ``price`` (fixed prices): ``guard_clicks`` per click and ``guard_gmv`` per unit of GMV are added to
  the declared value (:func:`grade.value.reward.rewarded_value`). Simple, but a price is paid where the
  guardrail would hold anyway and may be too low where it would not.
- ``constraint``: a Lagrangian relaxation. Each guardrail k carries a multiplier lambda_k >= 0; the
  reward values a guardrail's amount at price_k = lambda_k * V_static / A_k,static (V: the declared
  value, A_k: the guardrail's amount, both the static weights' estimates on the batch), so lambda is
  dimensionless: lambda_k = 1 prices a 1% change of guardrail k like a 1% change of the declared value.
  A PI controller (as the kappa target's, grade.train.grpo.kappa_controller) sets lambda_k from the
  guardrail's relative shortfall at the policy's served weights,
  gap_k = (1 + guard_margin) - A_k(policy mean) / A_k(static): it grows while the guardrail is below
  its floor and returns to 0 where it holds, so the reward is the declared value alone wherever the
  guardrails are not binding.

Amounts are estimated on each training batch with the posterior's own estimator and theta-hat, so
the controller needs no ground truth.
"""

from __future__ import annotations

import dataclasses

import torch

from grade.core import distributed
from grade.data.fusion import fuse, top_e
from grade.value import estimators
from grade.value.business import KINDS, BusinessConfig
from grade.value.estimators import ranking_value
from grade.value.reward import RewardConfig, cascade_args

#: the guarded kinds of value (grade.value.business.KINDS), in the order of the multipliers
GUARDED = ("clicks", "gmv")


@dataclasses.dataclass(frozen=True)
class GuardState:
    """The batch's guardrail reading and the multipliers it sets."""

    multipliers: tuple[float, ...]
    """lambda_k for this step's reward, one per :data:`GUARDED` kind"""
    integral: tuple[float, ...]
    """the integral parts carried to the next step"""
    ratios: tuple[float, ...]
    """A_k(policy mean) / A_k(static) on this batch"""
    prices: tuple[float, ...]
    """price_k added to the declared value: lambda_k * V_static / A_k,static"""


def request_amounts(weights: torch.Tensor, batch: dict[str, torch.Tensor], fields: dict[str, torch.Tensor],
                    theta: torch.Tensor, reward: RewardConfig, depth: int) -> torch.Tensor:
    """Estimated amounts [B, P, 3] (clicks, orders, gmv in order-value units) of each request's ranking
    under each of P weight vectors per request ``weights`` [B, P, K].

    ``fields``: :func:`grade.value.value_fields.batch_value_fields` of the batch (``label_kinds``,
    ``model_kinds`` [B, L, 3], ``logged_theta``; the cascade's for cascade_dm); ``theta`` [>= E]; the
    estimator and its clipping are the posterior's (``reward.estimator``, ``post_max_weight``...).
    """
    idx = top_e(fuse(batch["z"], weights.to(batch["z"].dtype), batch["mask"]), depth)
    th = theta[: idx.shape[-1]].to(torch.float32)
    model = fields.get("model_kinds")
    cascade = cascade_args(fields) if estimators.needs_cascade(reward.estimator) else {}
    return torch.stack([
        ranking_value(reward.estimator, idx, th, fields["logged_theta"], fields["label_kinds"][..., k],
                      None if model is None else model[..., k], max_weight=reward.post_max_weight,
                      tau=reward.post_switch_tau, lam=reward.post_shrink_lambda, **cascade).value
        for k in range(len(KINDS))], dim=-1)


def static_fields(static: torch.Tensor, batch: dict[str, torch.Tensor], fields: dict[str, torch.Tensor],
                  theta: torch.Tensor, reward: RewardConfig, depth: int) -> dict[str, torch.Tensor]:
    """``{"static_kinds": [B, 3]}``: the static weights' (``static`` [K]) amounts per request, a value field
    like the others (fixed for a run, so computed once with them); empty where the estimator's value of a
    request depends on its batch (``per_batch``, e.g. snips), which :func:`read_guardrails` then estimates
    per batch."""
    if estimators.estimator(reward.estimator).per_batch:
        return {}
    b = batch["z"].shape[0]
    weights = static.to(batch["z"].dtype).expand(b, 1, -1)
    return {"static_kinds": request_amounts(weights, batch, fields, theta, reward, depth)[:, 0]}


def guard_controller(integral: tuple[float, ...], amounts: torch.Tensor, business: BusinessConfig,
                     margin: float, kp: float, lr: float) -> GuardState:
    """One PI update from ``amounts`` [2, 3] (row 0 the policy mean's, row 1 static's, as
    summed over a batch by :func:`read_guardrails`):
    lambda_k = max(0, I_k + kp gap_k), I_k <- max(0, I_k + lr gap_k)."""
    policy, static = amounts[0], amounts[1]
    declared = torch.tensor(business.prices(), dtype=torch.float64)
    v_static = float((declared * static).sum())
    multipliers, nxt, ratios, prices = [], [], [], []
    for k, name in enumerate(GUARDED):
        j = KINDS.index(name)
        base = float(static[j])
        ratio = float(policy[j]) / base if base > 0 else 1.0
        gap = (1.0 + margin) - ratio
        multipliers.append(max(0.0, integral[k] + kp * gap))
        nxt.append(max(0.0, integral[k] + lr * gap))
        ratios.append(ratio)
        prices.append(multipliers[-1] * v_static / base if base > 0 else 0.0)
    return GuardState(tuple(multipliers), tuple(nxt), tuple(ratios), tuple(prices))


def read_guardrails(mean_weights: torch.Tensor, static: torch.Tensor, batch: dict[str, torch.Tensor],
                    fields: dict[str, torch.Tensor], theta: torch.Tensor, business: BusinessConfig,
                    reward: RewardConfig, depth: int, integral: tuple[float, ...]) -> GuardState:
    """This step's multipliers from the batch: the amounts at the policy's served weights
    ``mean_weights`` [B, K] and at the static weights ``static`` [K] (read from the fields'
    ``static_kinds`` when :func:`static_fields` put them there), summed over every process's share,
    then one :func:`guard_controller` update with ``reward``'s margin and gains."""
    if "static_kinds" in fields:
        policy = request_amounts(mean_weights.unsqueeze(1), batch, fields, theta, reward, depth)[:, 0]
        per_request = torch.stack([policy, fields["static_kinds"].to(policy.dtype)], dim=1)
    else:
        pair = torch.stack([mean_weights, static.to(mean_weights).expand_as(mean_weights)], dim=1)
        per_request = request_amounts(pair, batch, fields, theta, reward, depth)
    amounts = distributed.all_sum(per_request.double().sum(0))
    return guard_controller(integral, amounts, business, reward.guard_margin, reward.guard_dual_kp,
                            reward.guard_dual_lr)


def guarded_value(business: BusinessConfig, state: GuardState) -> BusinessConfig:
    """The value this step's reward maximises: the declared value plus each guardrail's price."""
    return business.plus(**dict(zip(GUARDED, state.prices, strict=True)))


def diagnostics(state: GuardState) -> dict[str, float]:
    """The step's guardrail diagnostics under ``guard/``."""
    out = {}
    for k, name in enumerate(GUARDED):
        out[f"guard/{name}_ratio"] = state.ratios[k]
        out[f"guard/{name}_multiplier"] = state.multipliers[k]
        out[f"guard/{name}_price"] = state.prices[k]
    return out
