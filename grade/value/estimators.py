"""Counterfactual value of new rankings of logged requests under position-based examination (and one
under a cascade, :func:`cascade_dm`).

Shapes (B requests, L candidates, G rankings per request, E exposure depth):

- idx [B, G, E]: a new ranking pi per request and group member, indices into the L candidates, best
  first (``grade.data.fusion.top_e`` of fused scores);
- theta [E]: examination probability of the new positions 0..E-1;
- logged_theta [B, L]: theta at each candidate's logged position p(i) (0 where the item was not
  logged: padding), e.g. ``ExaminationEstimate.theta_at(position)``;
- y [B, L]: a logged label (click, order, order value); m [B, L]: an outcome model's expected label of
  an examined item (P(click | examined) for clicks, etc.);
- returns: per-request values [B, G] (an :class:`Estimate` with the clipped share where weights are
  clipped).

Position-based model: the label of item i shown at position j has expectation theta_j * r_i, where r_i
is the expected label of the examined item. The logged y_i has expectation theta_{p(i)} * r_i, so
y_i / theta_{p(i)} is unbiased for r_i, and a new ranking's value sum_j theta_j r_{pi(j)} is estimated
by IPS with the ratio weights w_j = theta_j / theta_{p(pi(j))}.

Doubly robust collapses here. The item-level DR estimate of r_i is m_i + (y_i - theta_{p(i)} m_i) /
theta_{p(i)} = y_i / theta_{p(i)}: the model term cancels exactly. DR helps in bandits because the
model covers the actions the logging policy did *not* take; here every candidate of a request was
logged at some position (the whole list is logged), so there is no unlogged action left for the model
to fill in and DR is IPS, with IPS's variance. The direct method, SWITCH and shrunk weights trade
variance for bias; :func:`shrunk_dr` with ``lam = inf`` is exactly that collapsed DR.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from grade.data.fusion import cascade_examination, gather_items


class Estimate(NamedTuple):
    value: torch.Tensor
    """per-request value estimates [B, G]"""
    clipped_share: torch.Tensor
    """0-dim: share of the logged slots of the rankings whose weight was clipped (0 without clipping)"""


def ratio_weights(idx: torch.Tensor, theta: torch.Tensor, logged_theta: torch.Tensor,
                  max_weight: float = math.inf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance weights w_j = theta_j / theta_{p(pi(j))}, clipped at ``max_weight``.

    idx [B, G, E], theta [E], logged_theta [B, L] -> (w [B, G, E] (0 at unlogged items), logged [B, G, E]
    bool, clipped_share 0-dim).
    """
    lt = gather_items(logged_theta, idx)
    logged = lt > 0
    raw = torch.where(logged, theta / lt.clamp_min(1e-12), torch.zeros_like(lt))
    clipped = raw > max_weight
    share = clipped.sum() / logged.sum().clamp_min(1)
    return raw.clamp(max=max_weight), logged, share.to(raw.dtype)


def ips(y: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor, logged_theta: torch.Tensor,
        max_weight: float = math.inf) -> Estimate:
    """Examination IPS: V[b, g] = sum_j w_bgj * y[b, pi_bg(j)], w = theta_j / theta_{p(pi(j))} clipped.

    y, logged_theta [B, L]; idx [B, G, E]; theta [E] -> value [B, G]. Unbiased without clipping (every
    candidate has a logged position and theta is right); clipping bounds the variance from items
    logged deep and shown high, at the cost of underestimating them.
    """
    w, _, share = ratio_weights(idx, theta, logged_theta, max_weight)
    return Estimate((w * gather_items(y.to(w.dtype), idx)).sum(-1), share)


def snips(y: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor, logged_theta: torch.Tensor,
          max_weight: float = math.inf, over: Literal["batch", "batch_and_group"] = "batch") -> Estimate:
    """Self-normalised IPS, normalised per slot as OBP's slate SNIPS: w_bgj / mean_b' w_b'gj.

    y, logged_theta [B, L]; idx [B, G, E]; theta [E] -> value [B, G]. The normaliser of slot j is the
    mean of the (clipped) weights at slot j over the batch (``over="batch"``: per group member g, right
    when member g is one policy on every request, as in evaluation) or over the batch and the group
    (``"batch_and_group"``: for training groups whose members differ per request).

    What this means under position-based examination: theta_j cancels, so the batch mean of slot j's
    term is mean(y / theta_p) / mean(1 / theta_p), the estimated examined-item value times the
    *harmonic mean of the logged* examinations of the items shown at j instead of the new theta_j.
    It equals IPS for the logged ranking (all weights 1) and shrinks every other ranking's value
    towards what those items earned where they were logged: lower variance, biased towards the
    logging policy (it underestimates rankings that promote items logged deep).
    """
    w, logged, share = ratio_weights(idx, theta, logged_theta, max_weight)
    dims = (0,) if over == "batch" else (0, 1)
    total = (w * logged).sum(dims, keepdim=True)
    count = logged.to(w.dtype).sum(dims, keepdim=True)
    norm = total / count.clamp_min(1)
    wn = torch.where(norm > 0, w / norm.clamp_min(1e-12), torch.zeros_like(w))
    return Estimate((wn * gather_items(y.to(w.dtype), idx)).sum(-1), share)


def direct_method(m: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Direct method: V[b, g] = sum_j theta_j * m[b, pi_bg(j)]; m [B, L], idx [B, G, E], theta [E] -> [B, G].

    Exact when m is the true expected label of an examined item; biased as m is.
    """
    return (theta * gather_items(m.to(theta.dtype), idx)).sum(-1)


def switch(y: torch.Tensor, m: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor,
           logged_theta: torch.Tensor, tau: float, max_weight: float = math.inf) -> Estimate:
    """SWITCH (Wang et al. 2017): per slot, IPS where theta at the item's logged position >= tau, DM below.

    y, m, logged_theta [B, L]; idx [B, G, E]; theta [E] -> value [B, G]. Items logged deep (small
    theta_p, large weights) take the model's value; tau = 0 is IPS, tau > 1 is DM.
    """
    w, _, share = ratio_weights(idx, theta, logged_theta, max_weight)
    use_ips = gather_items(logged_theta, idx) >= tau
    ips_term = w * gather_items(y.to(w.dtype), idx)
    dm_term = theta * gather_items(m.to(w.dtype), idx)
    return Estimate(torch.where(use_ips, ips_term, dm_term).sum(-1), share)


def shrunk_dr(y: torch.Tensor, m: torch.Tensor, idx: torch.Tensor, theta: torch.Tensor,
              logged_theta: torch.Tensor, lam: float) -> Estimate:
    """Doubly robust with shrunk weights (Su et al. 2020): sum_j theta_j m + w~_j (y - theta_p m).

    y, m, logged_theta [B, L]; idx [B, G, E]; theta [E] -> value [B, G]; w~ = lam w / (w^2 + lam) with
    w = theta_j / theta_p. lam = inf gives w~ = w and the collapsed DR = IPS exactly; lam -> 0 gives
    the direct method. The clipped share reports the slots whose weight was shrunk by more than 10%.
    """
    w, logged, _ = ratio_weights(idx, theta, logged_theta)
    shrunk = w if math.isinf(lam) else lam * w / (w * w + lam)
    mi = gather_items(m.to(w.dtype), idx)
    residual = gather_items(y.to(w.dtype), idx) - gather_items(logged_theta.to(w.dtype), idx) * mi
    value = (theta * mi + shrunk * residual * logged).sum(-1)
    share = ((shrunk < 0.9 * w) & logged).sum() / logged.sum().clamp_min(1)
    return Estimate(value, share.to(w.dtype))


def cascade_dm(m: torch.Tensor, attraction: torch.Tensor, idx: torch.Tensor, continue_click: float,
               continue_skip: float, page_size: int | None = None) -> torch.Tensor:
    """Direct method under the cascade: V[b, g] = sum_j e_j * m[b, pi_bg(j)], e the cascade's examination
    (:func:`grade.data.fusion.cascade_examination`) of the new ranking's slots given the attraction
    (P(click | examined)) of the items above them.

    m, attraction [B, L]; idx [B, G, E] -> [B, G]. Exact when the logs follow the cascade with these
    continuation probabilities and m and the attraction are right; biased as they are.
    """
    a = gather_items(attraction.to(m.dtype), idx)
    exam = cascade_examination(a, continue_click, continue_skip, page_size)
    return (exam * gather_items(m, idx)).sum(-1)


def cascade_dr(y: torch.Tensor, m: torch.Tensor, attraction: torch.Tensor, idx: torch.Tensor,
               continue_click: float, continue_skip: float, logged_examination: torch.Tensor,
               click: torch.Tensor, max_weight: float = math.inf) -> Estimate:
    """Doubly robust on what a click is worth, direct on how often an item is clicked, under the cascade.

    The value of an examined item is a_i q_i: its attraction a_i times what a click of it is worth,
    q_i = E[y_i | click] (1 for the click label, cvr for orders, cvr * value for GMV). Whatever the
    examination, a logged click of item i reveals y_i - q_i without bias, and item i was clicked with
    probability x_i a_i, x_i its cascade examination in the logged list. So
    m_i + (y_i - click_i q^_i) / x_i, with q^_i = m_i / a_i the model's, has expectation a_i q_i when
    the attraction and the examination are right, whatever the outcome model's q^ is; the ranking's value
    is :func:`cascade_dm` of these item values. For the click label the correction is 0 (the estimate is
    cascade_dm's). The inverse examination 1 / x_i is clipped at ``max_weight``.

    y, m, attraction, logged_examination (x), click [B, L]; idx [B, G, E] -> value [B, G], with the
    share of clicked logged items whose weight was clipped.
    """
    a = attraction.to(m.dtype)
    x = logged_examination.to(m.dtype)
    per_click = torch.where(a > 0, m / a.clamp_min(1e-12), torch.zeros_like(m))
    weight = torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x))
    clicked = (click > 0) & (x > 0)
    share = ((weight > max_weight) & clicked).sum() / clicked.sum().clamp_min(1)
    residual = weight.clamp(max=max_weight) * (y.to(m.dtype) - click.to(m.dtype) * per_click)
    value = cascade_dm(m + residual, attraction, idx, continue_click, continue_skip)
    return Estimate(value, share.to(m.dtype))


class CascadeInputs(NamedTuple):
    """What the cascade estimators read besides the labels, for N requests of L candidates."""

    attraction: torch.Tensor
    """[N, L]: the cascade fit's P(click | examined) of each candidate (0 at padding)"""
    continuation: tuple[float, float]
    """(continue_click, continue_skip) of the fitted cascade"""
    logged_examination: torch.Tensor | None = None
    """[N, L]: each candidate's cascade examination in its logged list (cascade_dr; 0 at padding)"""
    click: torch.Tensor | None = None
    """[N, L]: the logged click of each candidate (cascade_dr)"""


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One estimator of a ranking's value, as the reward, the evaluation and the estimator check name it."""

    name: str
    """its config value (finetune.reward.post_estimator, evaluate.estimator, ...)"""
    value: Callable[[Inputs], Estimate]
    """the value [B, G] of the rankings in the inputs"""
    needs_model: bool
    """whether it reads the outcome model's item values m (the value model's outcome model)"""
    checked: bool = True
    """whether the estimator check (grade.evaluate.estimator_check) compares its per-segment picks"""
    per_batch: bool = False
    """whether a request's value depends on the other requests of its batch (a normaliser over the
    batch), so that it cannot be computed once per request"""
    click_model: str = "position_based"
    """the click model it assumes: "position_based" (theta per position) or "cascade" (it reads the
    items' attraction and the fitted continuation probabilities)"""
    reads_logged_clicks: bool = False
    """whether it also reads each item's cascade examination in its logged list and the logged clicks
    (cascade_dr)"""


class Inputs(NamedTuple):
    """What an estimator reads (shapes in the module docstring); ``m`` None without an outcome model."""

    idx: torch.Tensor
    theta: torch.Tensor
    logged_theta: torch.Tensor
    y: torch.Tensor
    m: torch.Tensor | None
    max_weight: float
    tau: float
    lam: float
    attraction: torch.Tensor | None = None
    """[B, L]: P(click | examined) of each candidate (the outcome model's ctr), for cascade estimators"""
    continuation: tuple[float, float] | None = None
    """(continue_click, continue_skip) of the fitted cascade, for cascade estimators"""
    logged_examination: torch.Tensor | None = None
    """[B, L]: each candidate's cascade examination in its logged list (cascade_dr)"""
    click: torch.Tensor | None = None
    """[B, L]: the logged click of each candidate (cascade_dr)"""


#: Every estimator by name, in the order the reports list them: adding one is one entry here (and its test).
ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("ips", lambda i: ips(i.y, i.idx, i.theta, i.logged_theta, i.max_weight), needs_model=False),
    Estimator("snips", lambda i: snips(i.y, i.idx, i.theta, i.logged_theta, i.max_weight,
                                       over="batch_and_group"), needs_model=False, per_batch=True),
    Estimator("dm", lambda i: Estimate(direct_method(i.m, i.idx, i.theta), i.theta.new_zeros(())),
              needs_model=True),
    Estimator("switch", lambda i: switch(i.y, i.m, i.idx, i.theta, i.logged_theta, i.tau, i.max_weight),
              needs_model=True),
    Estimator("shrunk", lambda i: shrunk_dr(i.y, i.m, i.idx, i.theta, i.logged_theta, i.lam),
              needs_model=True, checked=False),
    Estimator("cascade_dm", lambda i: Estimate(cascade_dm(i.m, i.attraction, i.idx, *i.continuation),
                                               i.m.new_zeros(())),
              needs_model=True, checked=False, click_model="cascade"),
    Estimator("cascade_dr", lambda i: cascade_dr(i.y, i.m, i.attraction, i.idx, *i.continuation,
                                                 i.logged_examination, i.click, i.max_weight),
              needs_model=True, checked=False, click_model="cascade", reads_logged_clicks=True),
)}


def estimator(name: str) -> Estimator:
    """The registered estimator ``name``; ValueError naming the known ones otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {list(ESTIMATORS)}")
    return ESTIMATORS[name]


def needs_model(name: str) -> bool:
    """Whether the estimator ``name`` reads the outcome model's item values (False for names outside the
    registry, such as the reward's own dcg_ips)."""
    return name in ESTIMATORS and ESTIMATORS[name].needs_model


def needs_cascade(name: str) -> bool:
    """Whether the estimator ``name`` reads the items' attraction and the fitted cascade."""
    return name in ESTIMATORS and ESTIMATORS[name].click_model == "cascade"


def reads_logged_clicks(name: str) -> bool:
    """Whether the estimator ``name`` reads the logged items' cascade examination and clicks."""
    return name in ESTIMATORS and ESTIMATORS[name].reads_logged_clicks


def cascade_kwargs(cascade: tuple | None, rows: slice) -> dict:
    """:func:`ranking_value`'s cascade arguments for requests ``rows`` of a :class:`CascadeInputs` (or
    (attraction [N, L], (continue_click, continue_skip))); none without a cascade."""
    if cascade is None:
        return {}
    c = CascadeInputs(*cascade)
    out = {"attraction": c.attraction[rows], "continuation": c.continuation}
    if c.logged_examination is not None:
        out.update(logged_examination=c.logged_examination[rows], click=c.click[rows])
    return out


def ranking_value(name: str, idx: torch.Tensor, theta: torch.Tensor, logged_theta: torch.Tensor,
                  y: torch.Tensor, m: torch.Tensor | None, *, max_weight: float = math.inf, tau: float = 0.1,
                  lam: float = 1.0, attraction: torch.Tensor | None = None,
                  continuation: tuple[float, float] | None = None,
                  logged_examination: torch.Tensor | None = None, click: torch.Tensor | None = None
                  ) -> Estimate:
    """The value [B, G] of rankings idx [B, G, E] by the estimator ``name`` (one of :data:`ESTIMATORS`).

    y [B, L]: the logged label of the declared value (e.g. v_click click + v_order order + ...);
    m [B, L]: the outcome model's value of an examined item, needed by the estimators that read the model;
    theta [E], logged_theta [B, L] as in the other estimators; the cascade estimators read
    ``attraction`` [B, L] and ``continuation`` (continue_click, continue_skip) instead of theta, and
    cascade_dr also each item's ``logged_examination`` [B, L] and the logged ``click`` [B, L]. Every
    estimator is linear in the label, so the value of a mix of labels is the estimate of the mixed label.
    """
    est = estimator(name)
    if est.needs_model and m is None:
        raise ValueError(f"estimator {name!r} needs the outcome model's item values m")
    if est.click_model == "cascade" and (attraction is None or continuation is None):
        raise ValueError(f"estimator {name!r} needs the items' attraction and the fitted cascade "
                         "(a value model with a click_model fit)")
    if est.reads_logged_clicks and (logged_examination is None or click is None):
        raise ValueError(f"estimator {name!r} needs each item's cascade examination in its logged list "
                         "and the logged clicks")
    return est.value(Inputs(idx, theta, logged_theta, y, m, max_weight, tau, lam, attraction, continuation,
                            logged_examination, click))
