"""Examination curve theta_j estimated from the logs by the position-based click likelihood.

Position-based model: an item at logged position j (0-based) is examined with probability theta_j and,
if examined, clicked with probability sigmoid(f(x)) that does not depend on the position:

    P(click | position j, x) = theta_j * sigmoid(f(x)),   theta_0 = 1 (fixes the scale).

f is a logistic model on the item's standardised log predictions z, its standardised log(1 - p) for
probability-valued objectives (so that f can represent logit p), the request's numeric user features
and their products with the item terms. Both f and theta are fitted together by maximum likelihood
over every logged item (the position-based likelihood that regression EM maximises, Wang et al. 2018;
here with a parametric f and full-batch LBFGS instead of EM steps). Two curves are fitted:

- ``power``: theta_j = (1 + j)^-eta, one parameter over every logged position (the default, and the
  form the reward and the evaluation use);
- ``free``: theta_1..theta_{D-1} free (log theta_j = -softplus(a_j) keeps it <= 1) on the items logged
  above depth D; items logged deeper are left out of that fit. Beyond D it continues as a power law
  through theta_{D-1} with the exponent ``eta_tail`` of the free curve's lower half (a log-log least
  squares slope), so it is defined at every position a new ranking can use.

``method: auto`` fits both on train and reports the one with the higher click likelihood on the valid
split (every valid logged item, each curve as ``theta_at`` extends it); both valid likelihoods and the
choice are recorded. A cascade fit of the same logs (:mod:`grade.value.click_model`) is recorded beside
them when a valid split is given.

Identification comes from the logging policy's per-request noise: the same kind of item (same x) is
logged at different positions, so its click-rate ratio across positions is theta's ratio. If the logs
never move items across positions (a deterministic logging ranking), theta is not identified and the
fit returns whatever the features cannot explain; ``n_clicks`` and the free curve show how much support
there is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

import torch

from grade.core.config import SEED_RANGE, ranged
from grade.core.errors import InputError

METHODS = ("power", "free", "auto")


@dataclasses.dataclass
class ExaminationConfig:
    method: Literal["power", "free", "auto"] = "power"
    """curve reported as ``theta`` (both are always fitted): power law (1+j)^-eta, free per position, or
    auto: the one with the higher click likelihood on the valid split"""
    depth: int = ranged(20, "[2, 1000]")
    """D: positions of the reported curve, of the free fit and of the outcome model's fit (items logged
    at >= D leave both; the power law reads every position)"""
    interactions: bool = True
    """add the products of item terms and user features to f (user-dependent click models)"""
    max_rows: int = ranged(250_000, "[1, 1e9]")
    """largest number of logged items the curve and cascade fits use; a seeded subsample above it (their
    time grows with it; 250k items estimate eta within about 0.02, docs/estimators.md)"""
    max_iter: int = ranged(200, "[1, 100000]", retired=True)
    """LBFGS iterations per fit"""
    l2: float = ranged(1e-4, ">= 0", retired=True)
    """L2 penalty on f's weights (per item, relative to the mean log-likelihood)"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:examination")
    """seed of the subsample: the same logs, config and seed give the same estimate"""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"examination.method: expected one of {list(METHODS)}, got {self.method!r}")


@dataclasses.dataclass
class ExaminationEstimate:
    method: str
    """the curve ``theta`` follows: "power" or "free" (or "fixed" for an assumed eta)"""
    eta: float
    """exponent of the power-law fit theta_j = (1+j)^-eta"""
    theta: list[float]
    """theta_0..theta_{D-1} of ``method`` (theta_0 = 1)"""
    theta_power: list[float]
    """the power-law curve at positions 0..D-1"""
    theta_free: list[float]
    """the free per-position curve at positions 0..D-1 (empty for "fixed")"""
    n_rows: int
    """logged items used by the power-law fit"""
    n_clicks: int
    """clicks among them"""
    log_likelihood: dict[str, float]
    """mean per-item log-likelihood of each fit ("power", "free")"""
    converged: dict[str, bool]
    """whether LBFGS met its tolerance within max_iter for each fit"""
    eta_tail: float | None = None
    """exponent of the free curve's continuation beyond its depth (None: the power law's eta)"""
    log_likelihood_valid: dict[str, float] = dataclasses.field(default_factory=dict)
    """mean per-item log-likelihood of each fit on the valid split (empty without one)"""
    selected_by: str = "config"
    """"config" (``method`` as configured) or "valid_likelihood" (``method: auto``)"""
    click_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the cascade fit against the position-based one (grade.value.click_model.compare_click_models)"""

    @classmethod
    def fixed(cls, eta: float, depth: int) -> ExaminationEstimate:
        """An assumed power law (no estimation): the option for logs that cannot identify theta."""
        curve = power_curve(depth, eta).tolist()
        return cls("fixed", float(eta), curve, curve, [], 0, 0, {}, {})

    def theta_at(self, position: torch.Tensor) -> torch.Tensor:
        """theta at logged positions ``position`` [...] (int, -1 = not logged -> 0), as float32 [...].

        The free curve holds for positions < D; deeper positions, and the power/fixed methods, use the
        power law, which is defined at every position.
        """
        pos = position.to(torch.int64)
        depth = int(pos.max()) + 1 if pos.numel() else 1
        theta = self.table(max(depth, 1)).to(torch.float32)[pos.clamp_min(0)]
        return torch.where(pos >= 0, theta, torch.zeros_like(theta))

    def table(self, depth: int) -> torch.Tensor:
        """theta at positions 0..depth-1 [depth] float64 (a table indexed by position, so that a position
        gets the same theta in every batch)."""
        if self.method != "free":
            return power_curve(depth, self.eta)
        if self.eta_tail is None:  # written before the tail fit: the power law's own values beyond the depth
            table = power_curve(depth, self.eta)
            free = torch.tensor(self.theta_free[:depth], dtype=torch.float64)
            table[:len(free)] = free
            return table
        return free_table(self.theta_free, depth, self.eta_tail)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("theta", "theta_power", "theta_free"):
            out[key] = [round(x, 6) for x in out[key]]
        for key in ("eta", "eta_tail"):
            out[key] = None if out[key] is None else round(out[key], 6)
        return json.loads(json.dumps(out))


def power_curve(depth: int, eta: float) -> torch.Tensor:
    """theta_j = (1 + j)^-eta for 0-based j < depth: [depth] float64.

    One scalar pow per position, not a vectorised pow: its SIMD and scalar paths differ in the last
    bit, so a position's theta would depend on how many positions were asked for."""
    return torch.tensor([(j + 1.0) ** -eta for j in range(depth)], dtype=torch.float64)


def free_table(free: list[float], depth: int, eta_tail: float) -> torch.Tensor:
    """The free curve at positions 0..depth-1 [depth] float64: its own values inside its depth D, then
    theta_{D-1} ((1 + j) / D)^-eta_tail (continuous at D-1)."""
    d = len(free)
    tail = power_curve(depth, eta_tail)
    table = tail * (free[-1] / float(tail[d - 1])) if depth > d else tail
    table[:min(d, depth)] = torch.tensor(free[:depth], dtype=torch.float64)
    return table


def tail_exponent(free: list[float]) -> float:
    """The power-law exponent of the free curve's lower half: the least-squares slope of -log theta_j on
    log(1 + j) over j >= D/2, clamped to [0, 10] (the range of an assumed eta)."""
    j = torch.arange(max(1, len(free) // 2), len(free), dtype=torch.float64)
    if len(j) < 2:
        return 1.0
    x = torch.log1p(j)
    y = -torch.log(torch.tensor(free, dtype=torch.float64)[j.long()].clamp_min(1e-12))
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(slope.clamp(0.0, 10.0))


def click_features(pred: torch.Tensor, z: torch.Tensor, num: torch.Tensor, mask: torch.Tensor,
                   interactions: bool = True) -> torch.Tensor:
    """Inputs of the click model f per item: [N, L, F].

    pred, z: [N, L, K] raw and standardised log predictions; num: [N, U] standardised user features;
    mask: [N, L]. Item terms: z, plus the standardised log(1 - p) of every objective whose predictions
    all lie in (0, 1) (z and log(1 - p) together span logit p). Then the user features and, with
    ``interactions``, every product of an item term and a user feature.
    """
    items = [z]
    real = pred[mask]
    in_unit = (real > 0) & (real < 1)
    probs = [k for k in range(pred.shape[-1]) if len(real) and bool(in_unit[:, k].all())]
    if probs:
        log_rest = torch.log1p(-pred[..., probs].clamp(max=1 - 1e-6))
        m = log_rest[mask]
        items.append((log_rest - m.mean(0)) / m.std(0).clamp_min(1e-6))
    item = torch.cat(items, dim=-1)
    user = num.unsqueeze(1).expand(-1, pred.shape[1], -1)
    parts = [item, user]
    if interactions and num.shape[-1]:
        parts.append((item.unsqueeze(-1) * user.unsqueeze(-2)).flatten(-2))
    return torch.cat(parts, dim=-1)


def _rows(batch: dict[str, torch.Tensor], cfg: ExaminationConfig) -> tuple[torch.Tensor, ...]:
    """Logged items as rows: features [R, F], position [R] (int64), click [R] (float64)."""
    x, pos, click, _ = logged_items(batch, cfg)
    if len(pos) > cfg.max_rows:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(pos), generator=g)[: cfg.max_rows].sort().values
        x, pos, click = x[keep], pos[keep], click[keep]
    return x, pos, click


def logged_items(batch: dict[str, torch.Tensor], cfg: ExaminationConfig) -> tuple[torch.Tensor, ...]:
    """Every logged item as rows: features [R, F] float64, position [R], click [R] float64, and the mask
    [N, L] of the logged items they come from (row r is the r-th True of the mask)."""
    for name in ("position", "mask", "click", "pred", "z", "num"):
        if name not in batch:
            raise InputError(f"examination: the feature tensors lack '{name}'")
    mask = batch["mask"].bool() & (batch["position"] >= 0)
    x = click_features(batch["pred"].float(), batch["z"].float(), batch["num"].float(), mask,
                       cfg.interactions)
    click = batch["click"].double()
    bad = ((click != 0) & (click != 1))[mask]
    if bool(bad.any()):
        raise InputError(f"examination: column 'click', item {int(bad.nonzero()[0])}: expected 0 or 1, got "
                         f"{float(click[mask][bad][0])}")
    return x[mask].double(), batch["position"][mask].long(), click[mask], mask


def item_log_likelihood(log_theta: torch.Tensor, logits: torch.Tensor, click: torch.Tensor) -> torch.Tensor:
    """Position-based log-likelihood of each item: click ~ Bernoulli(theta * sigmoid(logit)); inputs [...]."""
    log_p = (log_theta + torch.nn.functional.logsigmoid(logits)).clamp(max=-1e-9)
    log_not = torch.log(-torch.expm1(log_p))
    return click * log_p + (1 - click) * log_not


def _log_likelihood(log_theta: torch.Tensor, logits: torch.Tensor, click: torch.Tensor) -> torch.Tensor:
    """Mean position-based log-likelihood over rows [R]."""
    return item_log_likelihood(log_theta, logits, click).mean()


def _fit(x: torch.Tensor, pos: torch.Tensor, click: torch.Tensor, curve: str, depth: int,
         cfg: ExaminationConfig, init: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, float, float, bool, torch.Tensor]:
    """One maximum-likelihood fit: (theta at 0..depth-1 [depth], eta, mean log-lik, converged, f's params).

    ``curve`` "power": one exponent over every row (eta starts at 1); "free": log theta_j = -softplus(a_j)
    for 1 <= j < depth (starting at theta_j = 1/(1+j)); eta is NaN for the free curve. ``init``: f's
    weights and bias [F+1] to start from (the power fit's, for the free fit), else zeros and the
    click-rate logit. f's params are returned as [F+1]. Deterministic: full batch, float64.
    """
    if init is None:
        rate = float(click.mean().clamp(1e-6, 1 - 1e-6))
        init = torch.cat([torch.zeros(x.shape[1], dtype=torch.float64),
                          torch.tensor([math.log(rate / (1 - rate)) + 1.0], dtype=torch.float64)])
    w = init[:-1].clone().requires_grad_(True)
    b = init[-1].clone().requires_grad_(True)
    if curve == "power":
        a = torch.ones(1, dtype=torch.float64, requires_grad=True)
    else:  # softplus^-1(log(1 + j)) gives theta_j = 1 / (1 + j)
        start = torch.log1p(torch.arange(1, depth, dtype=torch.float64))
        a = torch.log(torch.expm1(start)).requires_grad_(True)

    def log_theta() -> torch.Tensor:
        if curve == "power":
            return -a[0] * torch.log1p(pos.double())
        table = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.nn.functional.softplus(a)])
        return table[pos]

    opt = torch.optim.LBFGS([w, b, a], max_iter=cfg.max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -_log_likelihood(log_theta(), x @ w + b, click) + cfg.l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ll = float(_log_likelihood(log_theta(), x @ w + b, click))
        grad_norm = max(float(p.grad.abs().max()) for p in (w, b, a))
        n_iter = opt.state[w].get("n_iter", 0)  # LBFGS keeps its state on the first parameter
        if curve == "power":
            eta, theta = float(a[0]), power_curve(depth, float(a[0]))
        else:
            eta = math.nan
            free = torch.exp(-torch.nn.functional.softplus(a))
            theta = torch.cat([torch.ones(1, dtype=torch.float64), free])
    params = torch.cat([w.detach(), b.detach().reshape(1)])
    return theta, eta, ll, grad_norm < 1e-5 or n_iter < cfg.max_iter, params


def estimate_examination(batch: dict[str, torch.Tensor], cfg: ExaminationConfig | None = None,
                         valid: dict[str, torch.Tensor] | None = None) -> ExaminationEstimate:
    """theta from logged requests (``batch`` as :func:`grade.data.dataset.load_split` returns it).

    Uses position [N, L] (-1 = padding), mask [N, L], click [N, L], pred and z [N, L, K], num [N, U].
    Fits the power law on every logged item and the free curve on the items logged above ``cfg.depth``;
    with ``valid`` (the same tensors of the valid split), both curves' valid likelihoods, by which
    ``method: auto`` chooses.
    """
    return fit_curves(batch, cfg or ExaminationConfig(), valid)[0]


def fit_curves(batch: dict[str, torch.Tensor], cfg: ExaminationConfig,
               valid: dict[str, torch.Tensor] | None = None
               ) -> tuple[ExaminationEstimate, dict[str, torch.Tensor]]:
    """:func:`estimate_examination` and each curve's f (weights and bias [F+1], by curve name)."""
    cfg.validate()
    x, pos, click = _rows(batch, cfg)
    n_clicks = int(click.sum())
    if n_clicks == 0 or len(torch.unique(pos)) < 2:
        raise InputError("examination: the logs need clicks and items at more than one position "
                         "to estimate theta")
    clicked = torch.unique(pos[click > 0])
    if len(clicked) < 2:
        # theta below the one clicked position would be fitted to ~0 (an eta in the tens): not an estimate
        raise InputError(f"examination: every logged click is at position {int(clicked[0])}, so theta at "
                         "other positions cannot be estimated from these logs; set shared.eta_mode: fixed "
                         "with the shared.eta you trust, or log clicks at more positions")
    power, eta, ll_power, ok_power, params = _fit(x, pos, click, "power", cfg.depth, cfg)
    shallow = pos < cfg.depth
    free, _, ll_free, ok_free, free_params = _fit(x[shallow], pos[shallow], click[shallow], "free", cfg.depth,
                                                  cfg, init=params)
    est = ExaminationEstimate(
        method="free" if cfg.method == "free" else "power", eta=eta, theta=[], theta_power=power.tolist(),
        theta_free=free.tolist(), n_rows=len(pos), n_clicks=n_clicks,
        log_likelihood={"power": ll_power, "free": ll_free}, converged={"power": ok_power, "free": ok_free},
        eta_tail=tail_exponent(free.tolist()))
    fits = {"power": params, "free": free_params}
    if valid is not None:
        est.log_likelihood_valid = valid_log_likelihoods(est, fits, valid, cfg)
    if cfg.method == "auto" and est.log_likelihood_valid:
        ll = est.log_likelihood_valid
        est.method, est.selected_by = ("free" if ll["free"] > ll["power"] else "power"), "valid_likelihood"
    elif cfg.method == "auto":
        est.selected_by = "no_valid_split"  # the power law, the form that needs the least support
    est.theta = est.table(cfg.depth).tolist()
    return est, fits


def valid_log_likelihoods(est: ExaminationEstimate, fits: dict[str, torch.Tensor],
                          valid: dict[str, torch.Tensor], cfg: ExaminationConfig) -> dict[str, float]:
    """Mean per-item log-likelihood of each fitted curve (and its f) on every logged item of ``valid``,
    each curve as ``theta_at`` extends it beyond its depth."""
    x, pos, click, _ = logged_items(valid, cfg)
    if not len(pos):
        return {}
    out = {}
    for name, params in fits.items():
        curve = dataclasses.replace(est, method=name)
        log_theta = torch.log(curve.table(int(pos.max()) + 1).clamp_min(1e-300))[pos]
        out[name] = float(_log_likelihood(log_theta, x @ params[:-1] + params[-1], click))
    return out
