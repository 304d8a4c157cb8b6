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

A Dirichlet target (a policy's exploring serving distribution, Dir(min(kappa, kappa_cap) mu +
alpha_floor)) has an exact density (:func:`policy_log_density`). A deterministic one (static, a model's
mean: a point mass) has none: :func:`kernel_log_density` smooths it with the Dirichlet kernel
Dir(1 + c t) whose mode is its weights t, and :func:`policy_columns` / :func:`lifts_vs` give the
smoothed IPS, SNIPS, DR (the direct method at t itself, the kernel only on the residual) and
self-normalised DR values and lifts vs static (docs/estimators.md, "Lifts vs static").

Shapes: B logged requests, K objectives, L candidates. Pure functions of tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from grade.model.exploration import log_density, served_alpha
from grade.value.auction import bootstrap_totals, percentile_ci


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
    give IPS (first / n) and SNIPS (first / second)."""
    e = explored
    return torch.stack([rho[e].double() * realised[e].double(), rho[e].double()], dim=1).numpy()


def has_propensities(data: dict[str, torch.Tensor]) -> bool:
    """Whether held-out tensors carry served weights with at least one explored request's log-propensity."""
    logp = data.get("served_log_propensity")
    return "served_w" in data and logp is not None and bool(torch.isfinite(logp).any())


# ------------------------------------------------------------------------------------------------
# Deterministic targets: kernel-smoothed ratios, lifts vs static
# ------------------------------------------------------------------------------------------------

#: the forms of a deterministic policy's value over weight vectors: (reads the direct method,
#: self-normalised); docs/estimators.md
FORMS = {"weight_ips": (False, False), "weight_snips": (False, True), "weight_dr": (True, False),
         "weight_sndr": (True, True)}


def on_standardised(served_w: torch.Tensor, log_q: torch.Tensor, on_log_predictions: torch.Tensor,
                    log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Served weights [N, K] and their log-propensities [N] in the space the evaluated policies' weights
    live in (weights on the standardised predictions z = (log p - m) / s), float64.

    Rows ``on_log_predictions`` [N] bool were served weights v on the log-predictions (the static fusion):
    the same ranking has the weights w = s v / (s . v), and the density moves with the map's Jacobian,
    log q_z(w) = log q_v(v) - sum_k log s_k - K log(sum_k w_k / s_k). ``log_std`` [K]: s (feature_spec
    pred_log_std). The other rows are kept (a model's weights on its z; its spec's s is assumed the
    features' own, as both are fitted on the same market's predictions)."""
    w, lq = served_w.double().clone(), log_q.double().clone()
    rows = on_log_predictions
    if bool(rows.any()):
        s = log_std.double()
        v = w[rows]
        z = v * s / (v * s).sum(-1, keepdim=True)
        w[rows] = z
        lq[rows] = lq[rows] - s.log().sum() - w.shape[1] * (z / s).sum(-1).log()
    return w, lq


def kernel_log_density(target: torch.Tensor, weights: torch.Tensor, concentration: float) -> torch.Tensor:
    """log K(w | t) [N] (float64): the smoothing kernel of a deterministic policy with weights ``target``
    [N, K] (or [K]) at ``weights`` [N, K]: Dir(1 + concentration * t), whose mode is t itself and whose
    spread shrinks as 1 / concentration."""
    t = target.double().expand_as(weights)
    alpha = 1.0 + concentration * t
    return torch.from_numpy(log_density(alpha.numpy(), weights.double().numpy()))


def policy_columns(log_kernel: torch.Tensor, log_q: torch.Tensor, realised: torch.Tensor, clip: float,
                   dm_new: torch.Tensor | None = None, dm_logged: torch.Tensor | None = None
                   ) -> tuple[np.ndarray, float]:
    """([N, 5] float64 per-request columns, clipped share) of one policy: the direct method's value of
    its ranking (0 without one), e_i rho_i R_i, e_i rho_i DM(w_i), e_i (explored) and e_i rho_i, rho the
    kernel's ratio to the logged propensity clipped at ``clip``; their totals give every form of
    :data:`FORMS` (:func:`form_values`), so resampling rows gives paired bootstrap intervals."""
    rho, explored, clipped = density_ratios(log_kernel, log_q, clip)
    e = explored.double()
    zero = torch.zeros_like(e)
    dm = zero if dm_new is None else dm_new.double()
    base = zero if dm_logged is None else dm_logged.double()
    cols = torch.stack([dm, rho * realised.double(), rho * base, e, rho], dim=1)
    share = float(clipped[explored].double().mean()) if bool(explored.any()) else 0.0
    return cols.numpy(), share


def support(columns: np.ndarray) -> dict[str, float]:
    """How much of the logs a policy's kernel sees, from its :func:`policy_columns`: the mean ratio over
    the explored requests (1 in expectation when the logging policy covers the kernel; far below 1:
    the kernel lies where nothing was logged) and the ratios' effective sample size (sum rho)^2 /
    sum rho^2."""
    rho, e = columns[:, 4], columns[:, 3]
    total, squares = float(rho.sum()), float((rho * rho).sum())
    ess = total * total / squares if squares else 0.0
    return {"mean_ratio": total / max(float(e.sum()), 1.0), "ess": ess}


def form_values(totals: np.ndarray, n: int | np.ndarray, form: str) -> np.ndarray:
    """The value of ``form`` from column totals [..., 5] of :func:`policy_columns` over n requests:
    (1/n) sum DM + sum e rho (R - DM(w)) / (n_explored, or sum e rho when self-normalised)."""
    reads_dm, normalised = FORMS[form]
    dm, r, base, e, rho = (totals[..., i] for i in range(5))
    norm = rho if normalised else e
    with np.errstate(invalid="ignore", divide="ignore"):
        if reads_dm:
            return dm / n + (r - base) / norm
        return r / norm


def lifts_vs(columns: dict[str, np.ndarray], reference: str, forms: list[str], n_resamples: int,
             confidence: float, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """{form: {policy: {value, lift, ci_low, ci_high}}}: each policy's value and its lift over
    ``reference`` with a paired percentile bootstrap over the requests (the same resamples for every
    policy and form). ``columns``: policy -> [N, 5] of :func:`policy_columns`."""
    names = list(columns)
    stacked = np.stack([columns[p] for p in names])                               # [P, N, 5]
    n_policies, n, n_cols = stacked.shape
    matrix = torch.from_numpy(np.ascontiguousarray(stacked.transpose(1, 0, 2)).reshape(n, -1))
    boot = bootstrap_totals(matrix, n_resamples, seed).numpy()                      # [B, P * 5]
    boot = boot.reshape(-1, n_policies, n_cols).transpose(1, 0, 2)                  # [P, B, 5]
    full = stacked.sum(axis=1)                                                     # [P, 5]
    ref = names.index(reference)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for form in forms:
        point, draws = form_values(full, n, form), form_values(boot, n, form)
        lift, lift_draws = point / point[ref] - 1.0, draws / draws[ref] - 1.0
        lift_draws = np.where(np.isfinite(lift_draws), lift_draws, np.nan)
        out[form] = {}
        for i, p in enumerate(names):
            low, high = percentile_ci(torch.from_numpy(lift_draws[i]), confidence) if n_resamples \
                else (math.nan, math.nan)
            out[form][p] = {"value": float(point[i]), "lift": float(lift[i]), "ci_low": float(low),
                            "ci_high": float(high)}
    return out
