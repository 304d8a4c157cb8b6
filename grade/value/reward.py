"""The composite reward of Stage 2: posterior, prior and format terms for groups of weight vectors.

For B requests and a group of G weight vectors per request (``w`` [B, G, K]), each ranking is
pi_w = argsort of S(w) = sum_k w_k z_k, exposed to depth E with DCG discounts d_j = 1/log2(j + 2):

- **posterior** R_post: NDCG@E of pi_w against the logged labels, a configurable mix of click, order
  and gmv NDCG, each label weighted by 1/theta(logged position). Unbiased but sparse: a request
  without a positive label gives 0 to every member. By default the DCG is divided by the batch's
  mean ideal DCG rather than each request's own: with one positive per request (the usual case) the
  per-request NDCG cancels the inverse-propensity weight, and the reward drifts back towards the
  logging policy (docs/finetune.md measures both forms).
- **prior** R_prior: sum_j d_j value(pi_w(j)) / ideal, with value = pctr (v_click + pcvr (v_order +
  v_gmv pgmv)) from the raw MTL predictions. Dense but inherits the MTL model's biases: maximising it
  alone reward-hacks (the prior metrics go up, the true ones down).
- **format** R_fmt = -(sum_k violation of [w_min_k, w_max_k] + entropy deficit below a floor): rules
  that forbid degenerate weights such as all the mass on GMV.

R = post * R_post + prior * R_prior + format * R_fmt. Every term is returned separately for logging.
Everything is vectorised over requests and group members: one fused scoring, one sort.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from grade.core import distributed
from grade.core.config import ranged, setting
from grade.core.errors import InputError
from grade.data.fusion import dcg_discounts, fuse, gather_items, top_e
from grade.data.transform import objective_index
from grade.value import estimators
from grade.value.business import BusinessConfig

#: the posteriors an ablation can name (pipeline.params.ABLATIONS): every registered position-based
#: estimator of the declared value (grade.value.estimators.ESTIMATORS), then dcg_ips, the reward's own
#: discounted mix of logged labels
POSTERIORS = (*(n for n in estimators.ESTIMATORS if not estimators.needs_cascade(n)), "dcg_ips")
#: the posterior that follows the click model the logs look like (:func:`resolve_posterior`)
AUTO = "auto"
#: what ``auto`` becomes: the direct method under the click model the value model's comparison names
AUTO_CHOICES = {"cascade": "cascade_dm", "position_based": "dm"}
#: every value finetune.reward.post_estimator takes
POST_ESTIMATORS = (*POSTERIORS, *(n for n in estimators.ESTIMATORS if estimators.needs_cascade(n)), AUTO)


@dataclasses.dataclass
class RewardConfig:
    post: float = ranged(1.0, ">= 0")
    """lambda_post: coefficient of the posterior (logged-label NDCG@E) term; 0 switches it off"""
    prior: float = ranged(0.1, ">= 0")
    """lambda_prior: coefficient of the prior (MTL-predicted discounted value) term; 0 switches it off.
    Small by default: the MTL model is global, so its prior pulls every user towards the same weights"""
    format: float = ranged(1.0, ">= 0")
    """lambda_fmt: coefficient of the format (weight bounds + entropy floor) penalty; 0 switches it off"""
    post_estimator: str = "dm"
    """estimator of the declared business value (section ``business``) of each ranking, from
    grade.value.estimators with the value model: dm (outcome model and theta; the default, chosen by the
    estimator check in docs/estimators.md), auto (cascade_dm where the value model's click-model
    comparison says the valid clicks look like a cascade, else dm: more of a cascade's headroom, but on
    6,000-request cascade markets CTR fell below static's, docs/finetune.md), cascade_dm (outcome
    model under the fitted cascade), ips, switch, shrunk, snips; dcg_ips prices no declared value
    (DCG-discounted, 1/theta-weighted mix of the post_click/post_order/post_gmv labels)"""
    post_max_weight: float = ranged(20.0, "> 0")
    """largest importance weight theta_j / theta_p(i) of the ips, switch and snips estimators"""
    post_switch_tau: float = ranged(0.1, "[0, 1]", retired=True)
    """switch: IPS for items logged where theta >= tau, the outcome model below"""
    post_shrink_lambda: float = ranged(1.0, "> 0", retired=True)
    """shrunk: lambda of the shrunk importance weights lambda w / (w^2 + lambda)"""
    guard_clicks: float = ranged(0.05, ">= 0", derived="guard_price:clicks")
    """guard_mode price: value of a click added to the declared business value in the posterior: a small
    weight on each guardrail metric, so that maximising the declared value does not trade the guardrails
    away. Chosen on the valid splits of three simulated markets (docs/finetune.md): with clicks 0.05 and
    gmv 0.2 the direct method's best weights keep their true orders and gain GPM and CTR against static"""
    guard_gmv: float = ranged(0.2, ">= 0", derived="guard_price:gmv")
    """guard_mode price: value of one train mean order value of GMV added to the declared value in the
    posterior (see guard_clicks)"""
    guard_mode: Literal["price", "constraint"] = setting("constraint", derived="ablation.guard_mode")
    """how the posterior keeps the guardrails CTR and GPM (grade.value.guardrails): constraint prices each
    guardrail by a multiplier that a controller raises while the served weights' estimated CTR (GPM) on
    the batch is below static's times (1 + guard_margin) and returns to 0 where it holds (the default,
    chosen on the valid splits of four simulated markets, docs/finetune.md); price adds the fixed
    guard_clicks and guard_gmv instead (ablation.guard_mode). Neither applies to dcg_ips, whose posterior is
    its own label mix, not the declared value"""
    guard_margin: float = ranged(0.0, "[-0.5, 0.5]")
    """constraint: the floor of each guardrail relative to static's estimate (0.01: 1% above static)"""
    guard_dual_kp: float = ranged(2.0, ">= 0", retired=True)
    """constraint: proportional gain, lambda = integral + guard_dual_kp * relative shortfall now"""
    guard_dual_lr: float = ranged(0.5, "> 0", retired=True)
    """constraint: integral gain, the integral grows by this per step per unit of relative shortfall"""
    post_click: float = ranged(0.25, ">= 0", retired=True)
    """share of click NDCG in the posterior term (dcg_ips only)"""
    post_order: float = ranged(1.0, ">= 0", retired=True)
    """share of order NDCG in the posterior term (dcg_ips only)"""
    post_gmv: float = ranged(1.0, ">= 0", retired=True)
    """share of gmv NDCG (linear gain) in the posterior term (dcg_ips only)"""
    post_debias: bool = setting(True, retired=True)
    """weight logged labels by 1/theta(logged position): clicks were only possible where users looked,
    so without it the posterior favours whatever the logging policy put on top"""
    post_debias_eta: float = ranged(1.0, "[0, 10]", derived="shared.eta")
    """eta of the examination model theta_j = 1/(1+j)^eta used for the debiasing"""
    post_debias_clip: float = ranged(20.0, "> 0", retired=True)
    """largest inverse-propensity weight (bounds the variance from clicks at deep positions)"""
    post_normalise: Literal["request", "batch"] = setting("batch", retired=True)
    """divide each request's DCG by its own ideal DCG (request: NDCG) or by the batch's mean ideal DCG
    (batch): NDCG cancels the inverse-propensity weight of a request's single positive, so it drifts
    back to the logging policy; the batch form keeps it and estimates the new ranking's true value"""
    v_click: float = ranged(0.0, ">= 0")
    """value of a click in the prior item value pctr*(v_click + pcvr*(v_order + v_gmv*pgmv))"""
    v_order: float = ranged(1.0, ">= 0")
    """value of an order in the prior item value"""
    v_gmv: float = ranged(1.0, ">= 0")
    """value of an order per unit of pgmv / gmv_unit (gmv_unit: the train geometric mean of pgmv in a run)"""
    w_min: list[float] = ranged([0.0], "[0, 1]")
    """lower bound per objective (one value for all, or K values in the features' objective order); 0 by
    default because a zero weight can be right (bargain hunters: none on GMV); w_max and the entropy floor
    already forbid degenerate weights"""
    w_max: list[float] = ranged([0.8], "[0, 1]")
    """upper bound per objective (one value for all, or K values)"""
    entropy_floor: float = ranged(0.4, ">= 0")
    """minimum Shannon entropy (nats) of a weight vector; ln K is the uniform maximum. 0.4 admits the best
    weights of a market with one kind of user, (0.79, 0.20, 0.01) at 0.55 nats, which 0.6 kept out of
    reach (docs/finetune.md)"""

    def validate(self, n_objectives: int | None = None) -> None:
        """Checks beyond each field's range (grade.core.config.check runs those first); with the features'
        number of objectives K, also that the weight bounds fit K."""
        if self.post_estimator not in POST_ESTIMATORS:
            raise InputError(f"finetune.reward.post_estimator: expected one of {list(POST_ESTIMATORS)}, "
                             f"got {self.post_estimator!r}")
        if self.post > 0 and self.post_estimator == "dcg_ips" and \
                self.post_click + self.post_order + self.post_gmv <= 0:
            raise InputError("finetune.reward: post > 0 needs a positive post_click, post_order or post_gmv")
        if self.prior > 0 and self.v_click + self.v_order + self.v_gmv <= 0:
            raise InputError("finetune.reward: prior > 0 needs a positive v_click, v_order or v_gmv")
        if n_objectives is not None:
            lo, hi = self.bounds(n_objectives)
            if bool((lo > hi).any()) or float(lo.sum()) > 1 or float(hi.sum()) < 1:
                raise InputError(f"finetune.reward: bounds w_min={self.w_min}, w_max={self.w_max} admit no "
                                 "weight vector on the simplex "
                                 "(need w_min <= w_max, sum w_min <= 1 <= sum w_max)")

    def bounds(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_min [K], w_max [K]): one value broadcast to every objective, or one per objective."""
        out = []
        for name in ("w_min", "w_max"):
            v = list(getattr(self, name))
            if len(v) == 1:
                v = v * k
            if len(v) != k:
                raise InputError(f"finetune.reward.{name}: expected 1 or {k} values (one per objective), "
                                 f"got {len(v)}")
            out.append(torch.tensor(v, dtype=torch.float32))
        return out[0], out[1]


    @property
    def estimator(self) -> str:
        """The posterior's estimator: ``post_estimator``, with ``auto`` the position-based direct method
        until a run resolves it by the value model's click-model comparison (:func:`resolve_posterior`,
        grade.train.finetune)."""
        return resolve_posterior(self.post_estimator, None)

    @property
    def needs_value_model(self) -> bool:
        """Whether the posterior needs the value model (theta-hat, and the outcome model for
        dm/switch/shrunk)."""
        return self.post > 0 and self.estimator in estimators.ESTIMATORS


def resolve_posterior(name: str, click_model: dict | None) -> str:
    """The posterior estimator a run uses: ``name``, or for ``auto`` the direct method under the click model
    the value model's comparison (``ExaminationEstimate.click_model``: ``looks_like``) names, the
    position-based one when it names none (no comparison, or undecided)."""
    if name != AUTO:
        return name
    return AUTO_CHOICES.get((click_model or {}).get("looks_like", ""), AUTO_CHOICES["position_based"])


def default_posteriors() -> set[str]:
    """The posteriors the default reward can use (its name and what it resolves to): an ablation of one
    of them would train the default model again."""
    default = RewardConfig().post_estimator
    return {default, *AUTO_CHOICES.values()} if default == AUTO else {default}


def cascade_args(fields: dict[str, torch.Tensor]) -> dict:
    """:func:`grade.value.estimators.ranking_value`'s cascade arguments from the value fields
    (``attraction`` [B, L], ``continuation`` [B, 2], the same pair on every row); none without them."""
    if "attraction" not in fields:
        return {}
    pair = fields["continuation"][0]
    return {"attraction": fields["attraction"], "continuation": (float(pair[0]), float(pair[1]))}


def prior_value(cfg: RewardConfig) -> BusinessConfig:
    """The value the prior term prices the MTL predictions at (``v_click``, ``v_order``, ``v_gmv``), priced
    like the declared value (:meth:`BusinessConfig.prices`)."""
    return BusinessConfig(clicks=cfg.v_click, orders=cfg.v_order, gmv=cfg.v_gmv)


def prior_item_value(pred: torch.Tensor, mask: torch.Tensor, objectives: list[str], cfg: RewardConfig,
                     gmv_unit: float = 1.0) -> torch.Tensor:
    """MTL-predicted value of every item [B, L]: pctr*(v_click + pcvr*(v_order + v_gmv*pgmv/gmv_unit));
    0 at padding.

    ``gmv_unit`` makes v_gmv scale-free (an order of a typical value is worth v_order + v_gmv).
    Objectives missing from the features drop out (no cvr: value = v_click*pctr; no gmv: no v_gmv term).
    """
    obj = objective_index(objectives)
    if "ctr" not in obj:
        raise InputError(f"finetune.reward.prior: needs a 'ctr' objective, the features have {objectives}")
    v_click, v_order, v_gmv = prior_value(cfg).prices(gmv_unit)
    pctr = pred[..., obj["ctr"]]
    inner = torch.full_like(pctr, v_order)
    if "gmv" in obj and v_gmv:
        inner = inner + v_gmv * pred[..., obj["gmv"]]
    after_click = pred[..., obj["cvr"]] * inner if "cvr" in obj else torch.zeros_like(pctr)
    value = pctr * (v_click + after_click)
    return value.masked_fill(~mask, 0.0)


def examination_ips(batch: dict[str, torch.Tensor], cfg: RewardConfig) -> torch.Tensor:
    """Inverse examination propensity 1/theta(logged position) per item [B, L], clipped; 0 at padding."""
    pos = batch["position"].to(torch.float32)
    ips = (pos + 1.0).pow(cfg.post_debias_eta).clamp(max=cfg.post_debias_clip)
    return torch.where((pos >= 0) & batch["mask"], ips, torch.zeros_like(ips))


def _ndcg_from_ranking(gains: torch.Tensor, idx: torch.Tensor, disc: torch.Tensor,
                       normalise: str = "request", sync: bool = False) -> torch.Tensor:
    """NDCG [B, G] of ranked indices ``idx`` [B, G, E] for per-item gains [B, L].

    ``request``: DCG / the request's ideal DCG (0 where there is no ideal). ``batch``: DCG / the mean
    ideal DCG of the batch (of the global batch over every process when ``sync``), 0 when it has no
    positive gain.
    """
    dcg = (gather_items(gains, idx) * disc).sum(-1)
    ideal = torch.sort(gains, dim=-1, descending=True).values[..., : idx.shape[-1]]
    idcg = (ideal * disc).sum(-1, keepdim=True)
    if normalise == "batch":
        mean_idcg = batch_mean(idcg, sync).to(dcg.dtype)
        return dcg / mean_idcg if mean_idcg > 0 else torch.zeros_like(dcg)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), torch.zeros_like(dcg))


def batch_mean(x: torch.Tensor, sync: bool = False) -> torch.Tensor:
    """Mean over the rows of ``x`` [B, ...] (of the global batch over every process when ``sync``), 0-dim.

    float64 sums, so that one process and several get the same normaliser.
    """
    sums = torch.stack([x.double().sum(), torch.tensor(float(x.shape[0]), dtype=torch.float64)])
    sums = distributed.all_sum(sums) if sync else sums
    return sums[0] / sums[1].clamp_min(1)


def estimated_value(idx: torch.Tensor, batch: dict[str, torch.Tensor], theta: torch.Tensor, cfg: RewardConfig,
                    sync: bool = False) -> torch.Tensor:
    """The posterior [B, G]: the declared value of rankings idx [B, G, E] by ``cfg.estimator``,
    over the batch's mean value of the ideal ranking (so that it is about 1 and comparable with the prior).

    batch: ``label_value`` [B, L] (the logged label of the declared value), ``logged_theta`` [B, L] and,
    for dm/switch/shrunk, ``model_value`` [B, L] (see :func:`grade.value.value_model.value_fields`); for
    cascade_dm also ``attraction`` [B, L] and ``continuation`` [B, 2] (grade.value.value_fields), with
    ``model_value`` the outcome model's value at the cascade's attraction;
    theta [E]: the estimated examination of the new positions (unused under the cascade).
    """
    model_value = batch.get("model_value")
    cascade = cascade_args(batch) if estimators.needs_cascade(cfg.estimator) else {}
    est = estimators.ranking_value(cfg.estimator, idx, theta, batch["logged_theta"],
                                   batch["label_value"], model_value, max_weight=cfg.post_max_weight,
                                   tau=cfg.post_switch_tau, lam=cfg.post_shrink_lambda, **cascade).value
    # the ideal ranking's value by the model, or by the (clipped) inverse-propensity labels without one
    gains = model_value if model_value is not None else \
        batch["label_value"] * torch.where(batch["logged_theta"] > 0, 1.0 / batch["logged_theta"].clamp_min(
            1.0 / cfg.post_max_weight), torch.zeros_like(batch["logged_theta"]))
    if cascade:   # the cascade examines the model's order by the items above, not by theta
        ideal_idx = torch.sort(gains, dim=-1, descending=True).indices[..., None, : idx.shape[-1]]
        ideal_value = estimators.cascade_dm(gains.to(est.dtype), cascade["attraction"], ideal_idx,
                                            *cascade["continuation"])[:, 0]
    else:
        ideal = torch.sort(gains.to(theta.dtype), dim=-1, descending=True).values[..., : idx.shape[-1]]
        ideal_value = (ideal * theta).sum(-1)
    norm = batch_mean(ideal_value, sync).to(est.dtype)
    return est / norm if norm > 0 else torch.zeros_like(est)


def rewarded_value(business: BusinessConfig, cfg: RewardConfig) -> BusinessConfig:
    """The value Stage 2's posterior maximises: the declared business value plus the reward's small
    guardrail weights on clicks and GMV. best_static's estimated search maximises the same value, so
    the two answer one question (globally and per request); the report and the gate judge the declared
    value alone."""
    return business.plus(clicks=cfg.guard_clicks, gmv=cfg.guard_gmv)


def gmv_unit_of(spec: dict) -> float:
    """The train geometric mean of the gmv prediction, exp(pred_log_mean[gmv]) (1 without a gmv objective)."""
    obj = objective_index(spec["objectives"])
    if "gmv" not in obj:
        return 1.0
    return float(torch.tensor(float(spec["pred_log_mean"][obj["gmv"]])).exp())


def weight_entropy(w: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of weight vectors along the last axis."""
    return -(w * w.clamp_min(1e-12).log()).sum(-1)


def format_penalty(w: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Penalty >= 0 [...]: total bound violation plus the entropy deficit below the floor."""
    lo, hi = cfg.bounds(w.shape[-1])
    lo, hi = lo.to(w), hi.to(w)
    bounds = (torch.relu(lo - w) + torch.relu(w - hi)).sum(-1)
    return bounds + torch.relu(cfg.entropy_floor - weight_entropy(w))


def reward_terms(w: torch.Tensor, batch: dict[str, torch.Tensor], objectives: list[str], cfg: RewardConfig,
                 depth: int, gmv_unit: float = 1.0, sync: bool = False,
                 theta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Reward terms [B, G] for weight groups ``w`` [B, G, K] on ``batch`` (z, pred, mask, click, order, gmv).

    ``sync``: the batch is one process's share of a data-parallel batch and every process calls this
    together (training steps): batch-level normalisers are then summed over the processes.
    ``theta`` [>= E]: the estimated examination curve, needed by every posterior estimator but dcg_ips
    (with the value fields of :func:`estimated_value` in ``batch``).

    Returns {"post", "prior", "format", "total"}; a term whose coefficient is 0 is all zeros (not computed).
    """
    if w.dim() != 3:
        raise ValueError(f"weights must be [B, G, K], got shape {tuple(w.shape)}")
    mask = batch["mask"]
    zeros = torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
    out = {"post": zeros, "prior": zeros, "format": zeros}
    if cfg.post > 0 or cfg.prior > 0:
        idx = top_e(fuse(batch["z"], w, mask), depth)
        disc = dcg_discounts(idx.shape[-1], device=w.device, dtype=w.dtype)
    if cfg.needs_value_model:
        if theta is None:
            raise ValueError(f"the {cfg.estimator} posterior needs the examination curve theta")
        out["post"] = estimated_value(idx, batch, theta[: idx.shape[-1]].to(w.dtype), cfg, sync)
    elif cfg.post > 0:
        mix = {"click": cfg.post_click, "order": cfg.post_order, "gmv": cfg.post_gmv}
        total = sum(mix.values())
        post = zeros
        ips = examination_ips(batch, cfg).to(w.dtype) if cfg.post_debias and "position" in batch else None
        for label, share in mix.items():
            if share <= 0:
                continue
            y = batch[label].masked_fill(~mask, 0.0).to(w.dtype)
            gains = y if label == "gmv" else torch.pow(2.0, y) - 1.0
            if ips is not None:
                gains = gains * ips
            post = post + (share / total) * _ndcg_from_ranking(gains, idx, disc, cfg.post_normalise, sync)
        out["post"] = post
    if cfg.prior > 0:
        value = prior_item_value(batch["pred"].to(w.dtype), mask, objectives, cfg, gmv_unit)
        out["prior"] = _ndcg_from_ranking(value, idx, disc)
    if cfg.format > 0:
        out["format"] = -format_penalty(w, cfg)
    out["total"] = cfg.post * out["post"] + cfg.prior * out["prior"] + cfg.format * out["format"]
    return out
