"""Which click model the logs look like: the position-based fit against a DBN-style cascade fit.

Cascade (dynamic Bayesian network without satisfaction, Chapelle and Zhang 2009; Kiyohara et al. 2022
for off-policy evaluation under it): the user examines the top slot; an examined item is clicked
with probability a(x) = sigmoid(f(x)), the same attraction model f as the position-based fit
(:func:`grade.value.examination.click_features`); after slot j she goes on to slot j + 1 with
probability ``continue_click`` if she clicked it, ``continue_skip`` if not. The examination of a slot
then depends on the items above it (:func:`grade.data.fusion.cascade_examination`).

The likelihood of one logged list (items in logged-position order, k the last clicked slot): every
slot down to k was examined, so each clicked slot j <= k contributes a_j (and ``continue_click`` if
j < k), each skipped slot above k contributes (1 - a_j) ``continue_skip``; below k nothing was clicked,
which has probability 1 - s * sum_j e_j a_j, where s is ``continue_click`` (1 without clicks) and e_j
the cascade's examination of the slots below k with ``continue_click`` 0 (no click in between).
Logged positions are taken in order; gaps left by dropped rows are closed up, and no page end is
fitted (slots past one are skips in the fit).

Both models are fitted by maximum likelihood on train and compared on the valid split per logged
request: d_r = log L_cascade(r) - log L_position(r). Vuong's test for non-nested models decides: the
logs look like a cascade when mean(d) / se(d) > 1.96, position-based below -1.96, else undecided.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grade.core.errors import InputError
from grade.data.fusion import cascade_examination
from grade.value import estimators
from grade.value.examination import (
    ExaminationConfig,
    ExaminationEstimate,
    click_features,
    item_log_likelihood,
    logged_items,
)

#: |Vuong z| above which one click model is said to fit the valid clicks better (two-sided 5%)
VUONG_Z = 1.96
LOOKS = ("cascade", "position_based", "undecided")


def sequences(batch: dict[str, torch.Tensor], cfg: ExaminationConfig) -> tuple[torch.Tensor, ...]:
    """The logged lists in logged-position order: features [N, L, F] float64, click [N, L] float64,
    present [N, L] bool, position [N, L] (-1 past the list's end). A seeded subsample of whole requests
    when there are more than ``cfg.max_rows`` logged items."""
    x, pos, click, mask = logged_items(batch, cfg)
    n, width = mask.shape
    full_x = x.new_zeros(n, width, x.shape[-1])
    full_x[mask] = x
    full_pos = torch.full((n, width), -1, dtype=torch.int64)
    full_pos[mask] = pos
    full_click = click.new_zeros(n, width)
    full_click[mask] = click
    key = torch.where(mask, full_pos, torch.iinfo(torch.int64).max)
    order = torch.sort(key, dim=1, stable=True).indices
    rows = torch.arange(n)
    if int(mask.sum()) > cfg.max_rows:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = max(1, cfg.max_rows // max(1, width))
        rows = torch.randperm(n, generator=g)[:keep].sort().values
    order = order[rows]
    take = rows.unsqueeze(1)
    return (full_x[take, order], full_click[take, order], mask[take, order], full_pos[take, order])


def cascade_log_likelihood(logits: torch.Tensor, click: torch.Tensor, present: torch.Tensor,
                           continue_click: torch.Tensor | float, continue_skip: torch.Tensor | float
                           ) -> torch.Tensor:
    """Log-likelihood of each logged list under the cascade: [N].

    logits [N, L]: f of the items in logged order; click [N, L] 0/1; present [N, L] (False after the
    list's end, which must come last)."""
    width = click.shape[1]
    slot = torch.arange(width)
    clicked = (click > 0) & present
    last = torch.where(clicked, slot, -1).max(dim=1).values  # -1: no click
    above_last = slot < last.unsqueeze(1)
    upto = slot <= last.unsqueeze(1)
    log_cc = torch.log(torch.as_tensor(continue_click, dtype=logits.dtype))
    log_cs = torch.log(torch.as_tensor(continue_skip, dtype=logits.dtype))
    head = torch.where(clicked & upto, torch.nn.functional.logsigmoid(logits), 0.0)
    head = head + torch.where(clicked & above_last, log_cc, 0.0)
    head = head + torch.where(~clicked & above_last & present,
                              torch.nn.functional.logsigmoid(-logits) + log_cs, 0.0)
    # the slots below the last click, shifted to the top of each row
    shift = (last.unsqueeze(1) + 1 + slot).clamp(max=width - 1)
    inside = (last.unsqueeze(1) + 1 + slot) < width
    a_tail = torch.where(inside & present.gather(1, shift), torch.sigmoid(logits.gather(1, shift)), 0.0)
    first_click = (cascade_examination(a_tail, 0.0, continue_skip) * a_tail).sum(-1)
    start = torch.where(last >= 0, torch.as_tensor(continue_click, dtype=logits.dtype), 1.0)
    tail = torch.log1p(-(start * first_click).clamp(max=1 - 1e-12))
    return head.sum(-1) + tail


def fit_cascade(x: torch.Tensor, click: torch.Tensor, present: torch.Tensor, init: torch.Tensor,
                cfg: ExaminationConfig) -> dict[str, Any]:
    """Maximum-likelihood cascade on lists from :func:`sequences`: f's params [F+1] (from ``init``, the
    position-based fit's), ``continue_click`` and ``continue_skip`` (from 0.5 and 0.9); full-batch LBFGS
    in float64 with the position-based fit's L2 on f's weights. Returns the params and the mean
    per-request train log-likelihood."""
    w = init[:-1].clone().requires_grad_(True)
    b = init[-1].clone().requires_grad_(True)
    logit_c = torch.tensor([0.0, math.log(9.0)], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b, logit_c], max_iter=cfg.max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)
    n_items = present.sum().clamp_min(1)

    def loss_fn() -> torch.Tensor:
        c = torch.sigmoid(logit_c)
        ll = cascade_log_likelihood(x @ w + b, click, present, c[0], c[1])
        return -ll.sum() / n_items + cfg.l2 * w.pow(2).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        c = torch.sigmoid(logit_c)
        ll = cascade_log_likelihood(x @ w + b, click, present, c[0], c[1])
        grad_norm = max(float(p.grad.abs().max()) for p in (w, b, logit_c))
    n_iter = opt.state[w].get("n_iter", 0)
    return {"params": torch.cat([w.detach(), b.detach().reshape(1)]), "continue_click": float(c[0]),
            "continue_skip": float(c[1]), "log_likelihood": float(ll.mean()),
            "converged": grad_norm < 1e-5 or n_iter < cfg.max_iter}


def position_log_likelihood(est: ExaminationEstimate, params: torch.Tensor, x: torch.Tensor,
                            click: torch.Tensor, present: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each logged list under the position-based fit (``est``'s curve, f ``params``):
    [N]."""
    table = est.table(int(pos.max()) + 1 if pos.numel() else 1).clamp_min(1e-300)
    log_theta = torch.log(table)[pos.clamp_min(0)]
    ll = item_log_likelihood(log_theta, x @ params[:-1] + params[-1], click)
    return torch.where(present, ll, 0.0).sum(-1)


def compare_click_models(train: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
                         cfg: ExaminationConfig, est: ExaminationEstimate, fits: dict[str, torch.Tensor]
                         ) -> dict[str, Any]:
    """Fit the cascade on ``train`` and compare it with ``est`` (the position-based curve in use, f from
    ``fits[est.method]``) on ``valid``, per logged request: the detail recorded as the estimate's
    ``click_model`` (JSON-ready)."""
    x, click, present, _ = sequences(train, cfg)
    cascade = fit_cascade(x, click, present, fits["power"], cfg)
    vx, vclick, vpresent, vpos = sequences(valid, cfg)
    keep = vpresent.any(-1)
    vx, vclick, vpresent, vpos = vx[keep], vclick[keep], vpresent[keep], vpos[keep]
    with torch.no_grad():
        p = cascade["params"]
        ll_cascade = cascade_log_likelihood(vx @ p[:-1] + p[-1], vclick, vpresent, cascade["continue_click"],
                                            cascade["continue_skip"])
        ll_position = position_log_likelihood(est, fits[est.method], vx, vclick, vpresent, vpos)
    d = ll_cascade - ll_position
    n = len(d)
    se = float(d.std() / math.sqrt(n)) if n > 1 else math.inf
    mean = float(d.mean()) if n else 0.0
    z = mean / se if se > 0 else 0.0
    looks = "cascade" if z > VUONG_Z else "position_based" if z < -VUONG_Z else "undecided"
    return {"looks_like": looks, "log_lr_per_request": round(mean, 6), "log_lr_se": round(se, 6),
            "vuong_z": round(z, 4), "n_valid_requests": n,
            "position_based": {"form": est.method,
                               "log_likelihood_valid": round(float(ll_position.mean()), 6) if n else None},
            "cascade": {"attraction": [float(v) for v in cascade["params"]], "interactions": cfg.interactions,
                        "continue_click": round(cascade["continue_click"], 6),
                        "continue_skip": round(cascade["continue_skip"], 6),
                        "log_likelihood_train": round(cascade["log_likelihood"], 6),
                        "log_likelihood_valid": round(float(ll_cascade.mean()), 6) if n else None,
                        "converged": cascade["converged"]}}


def cascade_inputs(est: ExaminationEstimate, batch: dict[str, torch.Tensor], models: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[float, float]]:
    """What a cascade estimator reads on ``batch`` (pred, z, num, mask): the cascade fit's attraction
    a(x) per item [N, L] float64 (0 at padding); the outcome model's item values ``models`` (key ->
    [N, L], "clicks" its P(click | examined)) with their click probability replaced by a(x), i.e. scaled
    by a / P(click | examined) (what a click is worth is the outcome model's; how often an examined item
    is clicked is the cascade's, fitted with the examination it implies); and (continue_click,
    continue_skip). InputError when ``est`` holds no cascade fit."""
    fit = est.click_model.get("cascade", {})
    if "attraction" not in fit:
        raise InputError("a cascade estimator needs a value model with a cascade fit (one fitted with a "
                         "valid split and an estimated theta, by this version); refit it with "
                         "components.outcome or choose another estimator")
    mask = batch["mask"].bool()
    x = click_features(batch["pred"].float(), batch["z"].float(), batch["num"].float(), mask,
                       fit["interactions"]).double()
    params = torch.tensor(fit["attraction"], dtype=torch.float64)
    a = torch.sigmoid(x @ params[:-1] + params[-1]) * mask
    scale = a / models["clicks"].double().clamp_min(1e-12)
    return a, {k: v * scale for k, v in models.items()}, (fit["continue_click"], fit["continue_skip"])


def logged_examination(attraction: torch.Tensor, position: torch.Tensor, mask: torch.Tensor,
                       continuation: tuple[float, float]) -> torch.Tensor:
    """Each logged item's examination under the cascade in its logged list: [N, L] float64 (0 at padding).

    attraction [N, L] (e.g. :func:`cascade_inputs`'), position [N, L] logged positions, mask [N, L].
    Items are taken in logged-position order with gaps closed up, as the fit takes them."""
    key = torch.where(mask, position, torch.iinfo(torch.int64).max)
    order = torch.sort(key, dim=1, stable=True).indices
    a = (attraction.double() * mask).gather(1, order)
    exam = cascade_examination(a, *continuation) * mask.gather(1, order)
    return torch.zeros_like(exam).scatter(1, order, exam)


def click_model_detail(est: ExaminationEstimate) -> dict[str, Any] | None:
    """report["diagnostics"]["click_model"]: the likelihoods of the fitted click forms (None when the
    value model holds no comparison: an assumed eta, or no valid split)."""
    if not est.click_model:
        return None
    return {"examination": {"form": est.method, "selected_by": est.selected_by,
                            "log_likelihood_valid": dict(est.log_likelihood_valid)},
            **est.click_model}


def click_model_check(est: ExaminationEstimate, estimator_name: str) -> dict[str, Any] | None:
    """The diagnostics check ``click_model``: which click model the valid clicks look like, against the
    one the estimator in use assumes. "warn" when they look like a cascade and the estimator is
    position-based (its lifts are then biased by an unknown amount; the logs still rank policies, so it
    is no "fail"); "pass" otherwise. None when the value model holds no comparison."""
    cm = est.click_model
    if not cm:
        return None
    cascade_aware = estimators.needs_cascade(estimator_name)
    z = cm["vuong_z"]
    if cm["looks_like"] == "cascade" and not cascade_aware:
        status = "warn"
        sentence = (f"the clicks look like a cascade (users stop scanning after a click or a skip), not the "
                    f"position-based model the estimator '{estimator_name}' assumes (Vuong z = {z:.1f}): "
                    "its lifts may be biased; evaluate with evaluate.estimator: cascade_dr to compare")
    elif cm["looks_like"] == "cascade":
        status, sentence = "pass", (f"the clicks look like a cascade (Vuong z = {z:.1f}) and the estimator "
                                    f"'{estimator_name}' models one")
    elif cm["looks_like"] == "position_based":
        status, sentence = "pass", (f"the clicks fit the position-based model better than a cascade "
                                    f"(Vuong z = {z:.1f})")
    else:
        status, sentence = "pass", (f"neither the position-based model nor a cascade fits the valid clicks "
                                    f"better (Vuong z = {z:.1f})")
    return {"name": "click_model", "status": status, "value": float(cm["log_lr_per_request"]),
            "threshold": f"cascade minus position-based valid log-likelihood per request: not above 0 "
                         f"(Vuong z <= {VUONG_Z})",
            "sentence": sentence, "policy": None}
