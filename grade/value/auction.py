"""Offline auction: re-rank held-out requests with any policy and measure it on the top-E exposure.

Every policy re-ranks the same candidates. For each request we keep *per-request sums*
(numerators and denominators of every metric) so that ratio metrics and lifts are ratios of sums
over requests, never means of per-request ratios, and so that a paired bootstrap only has to
resample rows of one [N, Q] matrix.

Exposure: the top E items of the ranking, examined under the world's click model
(:class:`grade.data.fusion.ClickModel`): theta_j = 1/(1+j)^eta position-based, or the cascade's
examination of the ranked slots, which depends on the items above.

- **true** (simulator ground truth): clicks C = sum theta ctr, orders O = sum theta ctr cvr,
  GMV M = sum theta ctr cvr price, impressions I = the click model's policy-independent impressions
  (sum theta under pbm; under the cascade sum continue_skip^j over the shown slots, the examination of
  a list nobody clicks, so a lift of OPM is the lift of orders per request);
  CTR = C/I, CVR = O/C, OPM = 1000 O/I, GPM = 1000 M/I.
- **prior**: the same formulas on the MTL predictions (pred ctr, cvr, gmv as the order value).
- **estimated** (logs only, no truth needed): the same formulas with clicks, orders and GMV of the
  policy's top E estimated from the logged feedback by a counterfactual estimator
  (:func:`grade.value.estimators.ranking_value`, default examination IPS) under the *estimated* examination
  curve theta-hat of a value model; impressions I = sum of theta-hat over the shown slots. ``vpm``
  (value per mille, 1000 V / I) is the declared business value when it mixes kinds. For the logging
  policy IPS returns the logged feedback exactly (every weight is 1).
- **replay**: NDCG@E against the logged click / order / gmv labels (averaged over requests that have
  a positive label) and GAUC of clicks (per-request AUC over the whole list, weighted by list length,
  over requests with both clicked and unclicked items).

Paired bootstrap: the same multinomial resample of request indices is applied to every column of
the matrix, so the lift of A over B is computed on identical requests in every resample.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from grade.data.fusion import ClickModel, fuse, gather_items, ndcg_at, top_e
from grade.data.transform import objective_index
from grade.value.estimators import cascade_kwargs, ranking_value

#: flavour -> metric -> (numerator key, denominator key, scale). Keys name per-request sums; keys
#: without a flavour prefix are policy-independent (shared by every policy).
METRICS: dict[str, dict[str, tuple[str, str, float]]] = {
    "true": {
        "ctr": ("true.clicks", "impressions", 1.0),
        "cvr": ("true.orders", "true.clicks", 1.0),
        "opm": ("true.orders", "impressions", 1000.0),
        "gpm": ("true.gmv", "impressions", 1000.0),
        "vpm": ("true.value", "impressions", 1000.0),
    },
    "estimated": {
        "ctr": ("estimated.clicks", "estimated.impressions", 1.0),
        "cvr": ("estimated.orders", "estimated.clicks", 1.0),
        "opm": ("estimated.orders", "estimated.impressions", 1000.0),
        "gpm": ("estimated.gmv", "estimated.impressions", 1000.0),
        "vpm": ("estimated.value", "estimated.impressions", 1000.0),
    },
    "prior": {
        "ctr": ("prior.clicks", "impressions", 1.0),
        "cvr": ("prior.orders", "prior.clicks", 1.0),
        "opm": ("prior.orders", "impressions", 1000.0),
        "gpm": ("prior.gmv", "impressions", 1000.0),
    },
    "replay": {
        "ndcg_click": ("replay.ndcg_click", "has_click", 1.0),
        "ndcg_order": ("replay.ndcg_order", "has_order", 1.0),
        "ndcg_gmv": ("replay.ndcg_gmv", "has_gmv", 1.0),
        "gauc": ("replay.auc", "auc_weight", 1.0),
    },
}

_REPLAY_LABELS = (("click", "exp2"), ("order", "exp2"), ("gmv", "linear"))


def has_ground_truth(data: dict[str, torch.Tensor]) -> bool:
    return all(k in data for k in ("true_ctr", "true_cvr", "price"))


@dataclasses.dataclass
class EstimatorInputs:
    """What the ``estimated`` flavour needs besides a policy's ranking (N requests, L candidates, E slots)."""

    name: str
    """estimator (one of grade.value.estimators.ESTIMATORS)"""
    theta: torch.Tensor
    """[E] float64: the estimated examination at the new positions 0..E-1"""
    logged_theta: torch.Tensor
    """[N, L] float64: the estimated examination at each candidate's logged position (0 = not logged)"""
    labels: dict[str, torch.Tensor]
    """"clicks", "orders", "gmv" (and "value", the declared value) -> logged label per item [N, L]"""
    models: dict[str, torch.Tensor] | None
    """the same keys -> the outcome model's expected label of an examined item [N, L] (dm/switch/shrunk)"""
    max_weight: float = math.inf
    """importance weights are clipped here"""
    cascade: tuple[torch.Tensor, tuple[float, float]] | None = None
    """the cascade estimators' (attraction [N, L], (continue_click, continue_skip)), or None"""

    def sums(self, idx: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        """Estimated sums [B] float64 of the rankings ``idx`` [B, E] of requests ``rows``, keyed by label."""
        out = {}
        for key, y in self.labels.items():
            m = None if self.models is None else self.models[key][rows]
            est = ranking_value(self.name, idx.unsqueeze(1), self.theta, self.logged_theta[rows], y[rows], m,
                                max_weight=self.max_weight, **cascade_kwargs(self.cascade, rows))
            out[key] = est.value[:, 0].to(torch.float64)
        return out

    def impressions(self, mask: torch.Tensor) -> torch.Tensor:
        """Sum of theta-hat over the shown slots of each request: [N] float64 (policy-independent)."""
        e = self.theta.shape[0]
        shown = torch.arange(e).unsqueeze(0) < mask.sum(-1).unsqueeze(1)
        return (shown * self.theta.to(torch.float64)).sum(-1)


# ------------------------------------------------------------------------------------------------
# Per-request sums
# ------------------------------------------------------------------------------------------------

def exposure_sums(idx: torch.Tensor, mask: torch.Tensor, world: ClickModel | float, ctr: torch.Tensor,
                  cvr: torch.Tensor | None, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Expected clicks, orders and GMV of the exposed items ``idx`` ([B, E] or [B, G, E]).

    ``world``: the click model (an eta = the position-based one); ``ctr`` (the attraction of an examined
    item), ``cvr``, ``value`` are per item [B, L]; padded items (mask False) are never examined.
    Returns float64 tensors [B] or [B, G] keyed "clicks", "orders", "gmv" (orders/gmv only when
    their inputs are given).
    """
    attraction = gather_items(ctr, idx)
    p_click = attraction * ClickModel.of(world).examine(attraction, gather_items(mask.to(ctr.dtype), idx))
    out = {"clicks": p_click.sum(-1, dtype=torch.float64)}
    if cvr is not None:
        p_order = p_click * gather_items(cvr, idx)
        out["orders"] = p_order.sum(-1, dtype=torch.float64)
        if value is not None:
            out["gmv"] = (p_order * gather_items(value, idx)).sum(-1, dtype=torch.float64)
    return out


def auc_per_request(scores: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(AUC [B], valid [B]) of ``scores`` against binary ``labels`` over the real items of each request.

    AUC = P(a positive ranks above a negative); ties are broken by item index like :func:`top_e`.
    ``valid`` is False for requests without both a positive and a negative (their AUC is 0).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.argsort(order, dim=-1).to(torch.float64)  # 0 = best; padding (-inf) ranks last
    pos = (labels > 0) & mask
    n = mask.sum(-1).to(torch.float64)
    n_pos = pos.sum(-1).to(torch.float64)
    n_neg = n - n_pos
    # A positive at rank r has n-1-r real items below it; subtracting the positives below all
    # positives (n_pos (n_pos-1)/2 pairs) leaves the negatives ranked below positives.
    below = torch.where(pos, n.unsqueeze(-1) - 1.0 - rank, torch.zeros_like(rank)).sum(-1)
    valid = (n_pos > 0) & (n_neg > 0)
    auc = (below - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg).clamp_min(1.0)
    return torch.where(valid, auc, torch.zeros_like(auc)), valid


def shared_sums(data: dict[str, torch.Tensor], depth: int, eta: ClickModel | float,
                estimator: EstimatorInputs | None = None) -> dict[str, torch.Tensor]:
    """Policy-independent denominators [N] float64: impressions and the replay normalisers.

    Impressions depend only on how many items a request has (every policy shows its top E) and on the
    world's click model ``eta`` (an eta = position-based): :meth:`ClickModel.impressions`; with an
    ``estimator``, also the estimated impressions (theta-hat instead of theta).
    """
    mask = data["mask"]
    e = min(depth, mask.shape[1])
    n_items = mask.sum(-1)
    shown = torch.arange(e).unsqueeze(0) < n_items.unsqueeze(1)
    out = {"impressions": ClickModel.of(eta).impressions(shown.to(torch.float64))}
    if estimator is not None:
        out["estimated.impressions"] = estimator.impressions(mask)
    for label, _ in _REPLAY_LABELS:
        if label in data:
            out[f"has_{label}"] = ((data[label] > 0) & mask).any(-1).to(torch.float64)
    if "click" in data:
        pos = ((data["click"] > 0) & mask).sum(-1)
        valid = (pos > 0) & (pos < n_items)
        # GAUC weights requests by list length (impressions), among requests where AUC is defined.
        out["auc_weight"] = torch.where(valid, n_items, torch.zeros_like(n_items)).to(torch.float64)
    return out


def policy_sums(data: dict[str, torch.Tensor], objectives: list[str], *, weights: torch.Tensor | None = None,
                scores: torch.Tensor | None = None, depth: int = 10, eta: ClickModel | float = 1.0,
                chunk: int = 16384, estimator: EstimatorInputs | None = None,
                value_weights: tuple[float, float, float] | None = None) -> dict[str, torch.Tensor]:
    """Per-request policy-dependent sums [N] (float64) of one policy, keyed like :data:`METRICS`.

    The policy is either ``weights`` ([K] global or [N, K] per request, fused on ``data["z"]``) or
    precomputed ``scores`` [N, L] (higher ranks first). Flavours whose inputs are missing from
    ``data`` are left out (no ground truth -> no "true.*"; no ``estimator`` -> no "estimated.*").
    ``value_weights`` (the declared value's prices for raw GMV, BusinessConfig.prices) adds the true
    declared value "true.value". ``eta``: the world's click model (an eta = position-based), which the
    true and the prior flavours are computed under.
    """
    if (weights is None) == (scores is None):
        raise ValueError("give exactly one of weights or scores")
    mask = data["mask"]
    n, length = mask.shape
    e = min(depth, length)
    world = ClickModel.of(eta)
    obj = objective_index(objectives)
    truth = has_ground_truth(data)
    pred = data.get("pred")
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = mask[sl]
        if scores is not None:
            s = scores[sl].masked_fill(~m, float("-inf"))
        else:
            w = weights if weights.dim() == 1 else weights[sl]
            w = w.to(data["z"].dtype).expand(m.shape[0], -1) if w.dim() == 1 else w.to(data["z"].dtype)
            s = fuse(data["z"][sl], w, m)
        idx = top_e(s, e)
        out: dict[str, torch.Tensor] = {}
        if truth:
            for k, v in exposure_sums(idx, m, world, data["true_ctr"][sl], data["true_cvr"][sl],
                                      data["price"][sl]).items():
                out[f"true.{k}"] = v
            if value_weights is not None:
                out["true.value"] = sum(v * out[f"true.{k}"] for v, k in
                                        zip(value_weights, ("clicks", "orders", "gmv"), strict=True))
        if estimator is not None:
            out.update({f"estimated.{k}": v for k, v in estimator.sums(idx, sl).items()})
        if pred is not None and "ctr" in obj:
            p = pred[sl]
            cvr = p[..., obj["cvr"]] if "cvr" in obj else None
            value = p[..., obj["gmv"]] if "gmv" in obj else None
            for k, v in exposure_sums(idx, m, world, p[..., obj["ctr"]], cvr, value).items():
                out[f"prior.{k}"] = v
        for label, gain in _REPLAY_LABELS:
            if label in data:
                out[f"replay.ndcg_{label}"] = ndcg_at(s, data[label][sl], m, e, gain=gain).to(torch.float64)
        if "click" in data:
            auc, valid = auc_per_request(s, data["click"][sl], m)
            out["replay.auc"] = auc * torch.where(valid, m.sum(-1), 0).to(torch.float64)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------
# A table of per-request sums for many policies
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SumsTable:
    """Per-request sums of several policies as columns of one [N, Q] matrix.

    Identical columns (e.g. two policies that rank identically) are stored once, so such policies
    get exactly the same resampled totals and a lift of exactly 0.
    """

    shared: dict[str, torch.Tensor]
    columns: list[torch.Tensor] = dataclasses.field(default_factory=list)
    index: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    policies: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for key, col in list(self.shared.items()):
            self.index[("", key)] = self._add(col)

    def _add(self, col: torch.Tensor) -> int:
        col = col.to(torch.float64).contiguous()
        fingerprint = (col.sum().item(), (col * col).sum().item())
        for i, other in enumerate(self.columns):
            if (other.shape == col.shape
                    and (other.sum().item(), (other * other).sum().item()) == fingerprint
                    and torch.equal(other, col)):
                return i
        self.columns.append(col)
        return len(self.columns) - 1

    def add_policy(self, name: str, sums: dict[str, torch.Tensor]) -> None:
        if name in self.policies:
            raise ValueError(f"policy '{name}' already in the table")
        self.policies.append(name)
        for key, col in sums.items():
            self.index[(name, key)] = self._add(col)

    def column(self, policy: str, key: str) -> int | None:
        """Column of ``key`` for ``policy`` (shared keys resolve to the shared column)."""
        if (policy, key) in self.index:
            return self.index[(policy, key)]
        return self.index.get(("", key))

    def metric_columns(self, policy: str) -> dict[str, dict[str, tuple[int, int, float]]]:
        """flavour -> metric -> (numerator column, denominator column, scale) available for ``policy``."""
        out: dict[str, dict[str, tuple[int, int, float]]] = {}
        for flavour, metrics in METRICS.items():
            for metric, (num, den, scale) in metrics.items():
                i, j = self.column(policy, num), self.column(policy, den)
                if i is not None and j is not None:
                    out.setdefault(flavour, {})[metric] = (i, j, scale)
        return out

    def matrix(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[N, Q] float64 (optionally only ``rows``, a bool mask or index tensor)."""
        m = torch.stack(self.columns, dim=1)
        return m if rows is None else m[rows]

    @property
    def n_requests(self) -> int:
        return int(self.columns[0].shape[0]) if self.columns else 0


def _ratio(totals: torch.Tensor, i: int, j: int, scale: float) -> torch.Tensor:
    den = totals[..., j]
    return torch.where(den > 0, scale * totals[..., i] / den.where(den > 0, torch.ones_like(den)),
                       torch.full_like(den, float("nan")))


def metric_values(table: SumsTable, totals: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """policy -> flavour -> metric -> value from column totals [Q] (ratio of sums)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for p in table.policies:
        out[p] = {f: {m: float(_ratio(totals, i, j, s)) for m, (i, j, s) in ms.items()}
                  for f, ms in table.metric_columns(p).items()}
    return out


def bootstrap_totals(matrix: torch.Tensor, n_resamples: int, seed: int,
                     chunk: int | None = None) -> torch.Tensor:
    """Column totals of ``n_resamples`` multinomial resamples of the rows of ``matrix`` [N, Q] -> [R, Q].

    Each resample draws N row indices with replacement; the counts matrix [r, N] of a chunk of
    resamples multiplies the whole matrix at once, so every column (every policy) sees the same
    resampled requests: the bootstrap is paired by construction.
    """
    n, q = matrix.shape
    out = torch.empty(n_resamples, q, dtype=matrix.dtype)
    if n == 0:
        return out.fill_(float("nan"))
    gen = torch.Generator().manual_seed(int(seed))
    chunk = chunk or max(1, min(n_resamples, 4_000_000 // n))
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = torch.randint(0, n, (r, n), generator=gen)
        idx += torch.arange(r).unsqueeze(1) * n
        counts = torch.bincount(idx.view(-1), minlength=r * n).view(r, n).to(matrix.dtype)
        out[start:start + r] = counts @ matrix
    return out


def percentile_ci(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` [R] (NaNs from empty resamples ignored)."""
    lo, hi = (1 - confidence) / 2, (1 + confidence) / 2
    q = torch.nanquantile(samples.to(torch.float64), torch.tensor([lo, hi], dtype=torch.float64))
    return float(q[0]), float(q[1])


#: How a lift's CI is read from the paired resamples (evaluate.interval): percentile, bca (bias-corrected
#: and accelerated) or studentized (bootstrap-t on the log lift: each resample's deviation divided by its
#: own delta-method SE, which widens the interval when a few heavy requests drive both).
INTERVALS = ("percentile", "bca", "studentized")
#: power of the minimum detectable effect reported next to each lift
MDE_POWER = 0.8
_NORMAL = torch.distributions.Normal(*torch.tensor([0.0, 1.0], dtype=torch.float64))


def _z(p: float) -> float:
    return float(_NORMAL.icdf(torch.tensor(p, dtype=torch.float64)))


def min_detectable_effect(se: float, confidence: float, power: float = MDE_POWER) -> float:
    """The smallest true lift a two-sided test at ``confidence`` detects with ``power``, given its SE."""
    return (_z((1 + confidence) / 2) + _z(power)) * se


def influence(matrix: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """[N] each request's share of the log ratio-of-sums sum_n x_i / sum_n x_j (the delta method): its
    square sums to the log ratio's variance, and it sums to 0."""
    num, den = matrix[:, i].sum(), matrix[:, j].sum()
    num, den = num.where(num != 0, torch.ones_like(num)), den.where(den != 0, torch.ones_like(den))
    return matrix[:, i] / num - matrix[:, j] / den


@dataclasses.dataclass
class LiftSpec:
    """One lift the CIs are computed for: policy vs baseline on one flavour/metric, and its columns."""

    policy: str
    baseline: str
    flavour: str
    metric: str
    cols: tuple[int, int, int, int, float]
    """numerator and denominator columns of the policy, then of the baseline, and the scale"""

    def log_influence(self, matrix: torch.Tensor) -> torch.Tensor:
        """[N] influence of the log lift log(metric(policy) / metric(baseline))."""
        i, j, bi, bj, _ = self.cols
        return influence(matrix, i, j) - influence(matrix, bi, bj)


def lift_specs(table: SumsTable, baseline: str, policies: Iterable[str] | None = None) -> list[LiftSpec]:
    """Every (policy, flavour, metric) lift over ``baseline`` the table can compute."""
    base = table.metric_columns(baseline)
    out = []
    for p in policies if policies is not None else table.policies:
        if p == baseline:
            continue
        for flavour, ms in table.metric_columns(p).items():
            for metric, (i, j, s) in ms.items():
                if metric in base.get(flavour, {}):
                    bi, bj, _ = base[flavour][metric]
                    out.append(LiftSpec(p, baseline, flavour, metric, (i, j, bi, bj, s)))
    return out


def _lift(totals: torch.Tensor, cols: tuple[int, int, int, int, float]) -> torch.Tensor:
    i, j, bi, bj, s = cols
    return _ratio(totals, i, j, s) / _ratio(totals, bi, bj, s) - 1


def bca_ci(samples: torch.Tensor, point: float, infl: torch.Tensor, confidence: float) -> tuple[float, float]:
    """BCa interval: the percentile interval's quantile levels moved by the bias z0 (the share of resamples
    below ``point``) and the acceleration (the skew of the influence values ``infl``)."""
    samples = samples[~samples.isnan()]
    share = (samples < point).to(torch.float64) + 0.5 * (samples == point).to(torch.float64)
    below = float(share.mean())
    if not 0 < below < 1:
        return percentile_ci(samples, confidence)
    z0 = _z(below)
    u2 = float((infl * infl).sum())
    accel = float((infl ** 3).sum()) / (6 * u2 ** 1.5) if u2 > 0 else 0.0
    levels = []
    for p in ((1 - confidence) / 2, (1 + confidence) / 2):
        zp = z0 + _z(p)
        levels.append(float(_NORMAL.cdf(torch.tensor(z0 + zp / (1 - accel * zp), dtype=torch.float64))))
    q = torch.quantile(samples, torch.tensor(levels, dtype=torch.float64))
    return float(q[0]), float(q[1])


def studentized_ci(samples: torch.Tensor, point: float, se: float, boot_se: torch.Tensor,
                   confidence: float) -> tuple[float, float]:
    """Bootstrap-t interval of a lift on the log scale: t* = (log(1+L*) - log(1+L)) / se*, per resample
    with its own delta-method SE ``boot_se`` [R]; ``se`` is the full sample's."""
    if not se > 0 or not point > -1:
        return percentile_ci(samples, confidence)
    log_point = math.log1p(point)
    t = (torch.log1p(samples) - log_point) / boot_se
    t = t[t.isfinite()]
    if t.numel() == 0:
        return percentile_ci(samples, confidence)
    q = torch.quantile(t, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    return math.expm1(log_point - float(q[1]) * se), math.expm1(log_point - float(q[0]) * se)


def lift_entry(spec: LiftSpec, totals: torch.Tensor, boot: torch.Tensor, confidence: float,
               interval: str = "percentile", matrix: torch.Tensor | None = None,
               boot_se: torch.Tensor | None = None) -> dict[str, float]:
    """{lift, ci_low, ci_high, se, mde} of one lift: the point on the full data, the CI by ``interval``
    from the paired resamples ``boot`` [R, Q], the resamples' SE and the minimum detectable effect.
    ``bca`` needs the request ``matrix``; ``studentized`` also each resample's log-lift SE ``boot_se``."""
    point = float(_lift(totals, spec.cols))
    if not boot.shape[0]:
        return {"lift": point, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan, "mde": math.nan}
    samples = _lift(boot, spec.cols)
    kept = samples[~samples.isnan()]
    se = float(kept.std()) if kept.numel() > 1 else math.nan
    if interval == "bca" and matrix is not None:
        lo, hi = bca_ci(samples, point, spec.log_influence(matrix), confidence)
    elif interval == "studentized" and matrix is not None and boot_se is not None:
        infl = spec.log_influence(matrix)
        lo, hi = studentized_ci(samples, point, float((infl * infl).sum().sqrt()), boot_se, confidence)
    else:
        lo, hi = percentile_ci(samples, confidence)
    return {"lift": point, "ci_low": lo, "ci_high": hi, "se": se,
            "mde": min_detectable_effect(se, confidence)}


def lift_values(table: SumsTable, totals: torch.Tensor, boot: torch.Tensor, baseline: str,
                confidence: float = 0.95, policies: Iterable[str] | None = None, interval: str = "percentile",
                matrix: torch.Tensor | None = None,
                boot_se: dict[tuple[str, str, str], torch.Tensor] | None = None
                ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """policy -> flavour -> metric -> {lift, ci_low, ci_high, se, mde}: relative lift over ``baseline``.

    lift = metric(policy) / metric(baseline) - 1 on the full data; the CI is read by ``interval``
    (:data:`INTERVALS`) from the same ratio over the paired resamples ``boot`` [R, Q].
    """
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for p in policies if policies is not None else table.policies:
        if p != baseline:
            out[p] = {}
    for spec in lift_specs(table, baseline, policies):
        se_rows = (boot_se or {}).get((spec.policy, spec.flavour, spec.metric))
        out[spec.policy].setdefault(spec.flavour, {})[spec.metric] = lift_entry(
            spec, totals, boot, confidence, interval, matrix, se_rows)
    return out


def studentized_boot(matrix: torch.Tensor, specs: list[LiftSpec], n_resamples: int, seed: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resampled totals [R, Q] and, per lift of ``specs``, each resample's delta-method SE of the log
    lift [R] at the resample's own totals, from the same paired resamples: the products of the columns a
    lift reads ride along with the sums, so se*^2 = g*' (sum_n w_n x_n x_n') g* with g* = (1/T*_i, -1/T*_j,
    -1/T*_bi, 1/T*_bj) from the resample's totals T*."""
    q = matrix.shape[1]
    pairs: dict[tuple[int, int], int] = {}
    for s in specs:
        cols = s.cols[:4]
        for a in range(4):
            for b in range(a, 4):
                pairs.setdefault((min(cols[a], cols[b]), max(cols[a], cols[b])), q + len(pairs))
    left = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    right = torch.tensor([b for _, b in pairs], dtype=torch.long)
    boot = bootstrap_totals(torch.cat([matrix, matrix[:, left] * matrix[:, right]], 1), n_resamples, seed)
    out = []
    for s in specs:
        cols = s.cols[:4]
        tot = boot[:, list(cols)]
        g = torch.stack([1 / tot[:, 0], -1 / tot[:, 1], -1 / tot[:, 2], 1 / tot[:, 3]], 1)
        var = torch.zeros(boot.shape[0], dtype=boot.dtype)
        for a in range(4):
            for b in range(4):
                var += g[:, a] * g[:, b] * boot[:, pairs[(min(cols[a], cols[b]), max(cols[a], cols[b]))]]
        out.append(var.clamp_min(0).sqrt())
    return boot[:, :q], out


def compare(table: SumsTable, baselines: Iterable[str], n_resamples: int = 1000, confidence: float = 0.95,
            seed: int = 0, rows: torch.Tensor | None = None, interval: str = "percentile") -> dict:
    """Metrics of every policy and lifts (with paired bootstrap CIs read by ``interval``) over each baseline.

    ``rows`` restricts everything to a subset of requests (e.g. a user segment). Returns
    {"n_requests", "policies": metric_values, "lifts": {baseline: lift_values}}.
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval: expected one of {list(INTERVALS)}, got {interval!r}")
    matrix = table.matrix(rows)
    totals = matrix.sum(0)
    refs = [b for b in baselines if b in table.policies]
    boot_se: dict[tuple[str, str, str], torch.Tensor] = {}
    if interval == "studentized":
        specs = [s for b in refs for s in lift_specs(table, b)]
        boot, se_rows = studentized_boot(matrix, specs, n_resamples, seed)
        per_base: dict[str, dict[tuple[str, str, str], torch.Tensor]] = {b: {} for b in refs}
        for s, r in zip(specs, se_rows, strict=True):
            per_base[s.baseline][(s.policy, s.flavour, s.metric)] = r
    else:
        boot = bootstrap_totals(matrix, n_resamples, seed)
        per_base = {b: boot_se for b in refs}
    return {
        "n_requests": int(matrix.shape[0]),
        "policies": metric_values(table, totals),
        "lifts": {b: lift_values(table, totals, boot, b, confidence, interval=interval, matrix=matrix,
                                 boot_se=per_base[b]) for b in refs},
    }


# ------------------------------------------------------------------------------------------------
# Global weight sweeps (the static trade-off frontier)
# ------------------------------------------------------------------------------------------------

def sweep_global_weights(data: dict[str, torch.Tensor], objectives: list[str], grid: torch.Tensor,
                         depth: int = 10, eta: ClickModel | float = 1.0, flavour: str = "true",
                         chunk: int = 2048) -> dict[str, torch.Tensor]:
    """CTR, CVR, OPM, GPM [G] of each global weight vector of ``grid`` [G, K] (one fused pass per chunk)
    under the click model ``eta`` (an eta = position-based)."""
    mask = data["mask"]
    n, length = mask.shape
    e = min(depth, length)
    world = ClickModel.of(eta)
    obj = objective_index(objectives)
    if flavour == "true":
        if not has_ground_truth(data):
            raise ValueError("no ground truth in data")
        ctr, cvr, value = data["true_ctr"], data["true_cvr"], data["price"]
    else:
        pred = data["pred"]
        ctr = pred[..., obj["ctr"]]
        cvr = pred[..., obj["cvr"]] if "cvr" in obj else None
        value = pred[..., obj["gmv"]] if "gmv" in obj else None
    g = grid.shape[0]
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = mask[sl]
        w = grid.to(data["z"].dtype).unsqueeze(0).expand(m.shape[0], g, -1)
        idx = top_e(fuse(data["z"][sl], w, m), e)
        sums = exposure_sums(idx, m, world, ctr[sl], None if cvr is None else cvr[sl],
                             None if value is None else value[sl])
        for key, v in sums.items():
            totals[key] = totals.get(key, 0) + v.sum(0)
    impressions = shared_sums(data, depth, world)["impressions"].sum()
    out = {"ctr": totals["clicks"] / impressions}
    if "orders" in totals:
        out["cvr"] = totals["orders"] / totals["clicks"]
        out["opm"] = 1000 * totals["orders"] / impressions
    if "gmv" in totals:
        out["gpm"] = 1000 * totals["gmv"] / impressions
    return out
