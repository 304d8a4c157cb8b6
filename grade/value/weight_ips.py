"""The weight-level estimator: importance sampling over served weight vectors.

When the logs carry the weights each request was served (``served_w``) and their log-density under the
logging policy (``served_log_propensity``, grade.model.exploration), a new policy's value can be
estimated without any click model: the logged ranking is what the served weights produced, so its
realised value R_i (the declared value of the logged clicks, orders and GMV in the top E of the logged
request) is a draw of the value of those weights, and

    V_IPS   = (1 / n) sum_i rho_i R_i,                       rho_i = pi_new(w_i | x_i) / q(w_i | x_i)
    V_SNIPS = sum_i rho_i R_i / sum_i rho_i
    V_DR    = (1 / n) sum_i [ DM_new(x_i) + rho_i (R_i - DM(w_i, x_i)) ]

over the n *explored* requests, with rho clipped at ``clip`` (SNIPS and DR then shrink the bias
clipping adds). q is the served Dirichlet's density; the explored requests are a uniform sample of the
traffic (serving decides to explore by a hash of the request id alone), so conditioning on them changes
nothing but the sample size. Requests served the mean have no density (a point mass) and a continuous
new policy gives their single point probability 0: they carry no weight.

The new policy's density. A policy that serves its mean is deterministic: its density at a logged
weight vector is 0 almost surely, so the ratio is degenerate. The estimator therefore values the new
policy's *exploring* serving distribution, Dir(min(kappa, kappa_cap) mu + alpha_floor), the same
distribution serving draws from, with the policy's own kappa: that is the policy the next round of
logs would come from, its density is exact (no kernel bandwidth to choose) and it concentrates on the
mean as kappa grows. A static or fixed policy has no kappa: it is compared by the direct method, or
given a narrow Dirichlet around its weights (kappa = kappa_cap) at the price of a high variance.

Shapes: B logged requests, K objectives, L candidates. Pure functions of tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from grade.model.exploration import log_density, served_alpha


class WeightEstimate(NamedTuple):
    ips: float
    snips: float
    dr: float | None
    """None without direct-method values"""
    n_explored: int
    clipped_share: float
    """share of the explored requests whose ratio was clipped"""


def realised_value(item_value: torch.Tensor, position: torch.Tensor, depth: int) -> torch.Tensor:
    """R [B]: the sum of item values [B, L] at logged positions [B, L] (-1: padding) 0..depth-1."""
    shown = (position >= 0) & (position < depth)
    return torch.where(shown, item_value, torch.zeros_like(item_value)).sum(-1)


def policy_log_density(mu: torch.Tensor, kappa: torch.Tensor, alpha_floor: float, kappa_cap: float,
                       weights: torch.Tensor) -> torch.Tensor:
    """log pi_new(w) [B] (float64): the density of the policy's exploring serving distribution (mean mu
    [B, K], concentration kappa [B]) at served weights [B, K]."""
    mu_, kappa_ = mu.detach().double().numpy(), kappa.detach().double().numpy()
    alpha = served_alpha(mu_, kappa_, alpha_floor, kappa_cap)
    return torch.from_numpy(log_density(alpha, weights.detach().double().numpy()))


def density_ratios(log_new: torch.Tensor, log_logged: torch.Tensor, clip: float = math.inf
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho [B] clipped at ``clip``, explored [B] bool, clipped [B] bool) from the new policy's log-density
    [B] and the logged log-propensity [B] at the served weights (NaN: served the mean; rho 0 there)."""
    explored = torch.isfinite(log_logged)
    raw = torch.where(explored, (log_new.double() - torch.nan_to_num(log_logged.double())).exp(),
                      torch.zeros_like(log_new, dtype=torch.float64))
    clipped = raw > clip
    return raw.clamp(max=clip), explored, clipped


def estimate(rho: torch.Tensor, explored: torch.Tensor, realised: torch.Tensor,
             dm_new: torch.Tensor | None = None, dm_logged: torch.Tensor | None = None,
             clipped: torch.Tensor | None = None) -> WeightEstimate:
    """IPS, SNIPS and (with the direct method's values of the new policy dm_new [B] and of the logged
    weights dm_logged [B]) DR over the explored requests (the module docstring's formulas)."""
    e = explored
    n = int(e.sum())
    if n == 0:
        return WeightEstimate(math.nan, math.nan, None, 0, 0.0)
    r, w = realised.double()[e], rho.double()[e]
    ips = float((w * r).sum() / n)
    snips = float((w * r).sum() / w.sum()) if float(w.sum()) > 0 else math.nan
    dr = None
    if dm_new is not None and dm_logged is not None:
        dr = float((dm_new.double()[e] + w * (r - dm_logged.double()[e])).sum() / n)
    share = float(clipped[e].double().mean()) if clipped is not None else 0.0
    return WeightEstimate(ips, snips, dr, n, share)


def per_request_terms(rho: torch.Tensor, explored: torch.Tensor, realised: torch.Tensor) -> np.ndarray:
    """[n_explored, 2] float64: (rho_i R_i, rho_i) of the explored requests, the columns whose totals
    give IPS (first / n) and SNIPS (first / second); resampling rows gives bootstrap intervals."""
    e = explored
    return torch.stack([rho[e].double() * realised[e].double(), rho[e].double()], dim=1).numpy()


def has_propensities(data: dict[str, torch.Tensor]) -> bool:
    """Whether held-out tensors carry served weights with at least one explored request's log-propensity."""
    logp = data.get("served_log_propensity")
    return "served_w" in data and logp is not None and bool(torch.isfinite(logp).any())


def lift_interval(terms: np.ndarray, realised: np.ndarray, n_resamples: int, confidence: float, seed: int
                  ) -> dict[str, float]:
    """Lift of IPS (terms [n, 2] of :func:`per_request_terms`) over the logging policy's own value (the
    mean realised value [n] of the explored requests, rho = 1), with a paired percentile bootstrap over
    the requests."""
    def lift(rows: np.ndarray) -> float:
        return float(terms[rows, 0].sum() / max(realised[rows].sum(), 1e-12) - 1.0)

    n = len(realised)
    rng = np.random.default_rng(seed)
    draws = np.array([lift(rng.integers(0, n, n)) for _ in range(n_resamples)])
    tail = (1.0 - confidence) / 2 * 100
    low, high = (np.percentile(draws, [tail, 100 - tail]) if len(draws) else (math.nan, math.nan))
    return {"lift": lift(np.arange(n)), "ci_low": float(low), "ci_high": float(high)}


def report_section(data: dict[str, torch.Tensor], models: dict[str, str], item_value: torch.Tensor,
                   depth: int, kappa_cap: float, clip: float, n_resamples: int, confidence: float,
                   seed: int, batch_size: int = 4096) -> dict | None:
    """report.json's ``weight_level`` section (None unless the held-out logs carry propensities): each
    model's IPS and SNIPS value of its exploring Dirichlet, and its IPS lift over the logging policy
    with a bootstrap interval, from the explored requests alone (no click model). ``item_value`` [B, L]:
    the declared value of each logged item's labels."""
    from grade.data.transform import clamp_unseen
    from grade.model.policy import load_published_policy

    if not has_propensities(data):
        return None
    realised = realised_value(item_value, data["position"], depth)
    log_logged = data["served_log_propensity"].double()
    out = {"estimator": "weight_ips", "kappa_cap": kappa_cap, "clip": clip, "policies": {}}
    for name, uri in models.items():
        policy = load_published_policy(uri)
        cat = clamp_unseen(data["cat"], policy.cfg.cat_sizes)
        with torch.inference_mode():
            parts = [policy(data["num"][s:s + batch_size], cat[s:s + batch_size])
                     for s in range(0, cat.shape[0], batch_size)]
        mu, kappa = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        log_new = policy_log_density(mu, kappa, policy.alpha_floor, kappa_cap, data["served_w"])
        rho, explored, clipped = density_ratios(log_new, log_logged, clip)
        est = estimate(rho, explored, realised, clipped=clipped)
        terms = per_request_terms(rho, explored, realised)
        out["n_explored"] = est.n_explored
        out["logging_value"] = float(realised[explored].double().mean())
        out["policies"][name] = {"ips": est.ips, "snips": est.snips, "clipped_share": est.clipped_share,
                                 "lift_vs_logging": lift_interval(terms, realised[explored].double().numpy(),
                                                                  n_resamples, confidence, seed)}
    return out
