"""The estimator check: how far the estimated flavour is from the truth, on data that has both.

Two views, both for simulated data only (they need the ground truth):

- per policy (:func:`policy_check`): the estimated and true value of the primary metric and of its
  lift vs static, whether the true lift lies in the estimated lift's CI, the share of covered lifts,
  and whether the estimated flavour orders every pair of policies as the truth does wherever their
  true values differ by more than ``order_margin`` (relative);
- per true segment (:func:`segment_picks`): the weight vector of a simplex grid each estimator would
  pick for the segment, its TRUE value, and that as a share of the segment's truly best vector: what
  a search or a reward driven by the estimator would find (:func:`grid_values` computes the values).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grade.data.fusion import ClickModel, fuse, top_e
from grade.value.auction import EstimatorInputs, exposure_sums
from grade.value.estimators import ranking_value


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def policy_check(policies: dict[str, Any], lift_vs_static: dict[str, Any], metric: str,
                 order_margin: float = 0.02) -> dict[str, Any]:
    """Estimated vs true ``metric`` of every policy (report.json's policies and lift_vs_static).

    Returns {"metric", "policies": {name: {true, estimated, true_lift, estimated_lift, ci_low, ci_high,
    covered}}, "covered_share", "ordering": {"pairs", "agreeing", "disagreements", "agrees"}}.
    """
    rows: dict[str, dict[str, Any]] = {}
    for name, flavours in policies.items():
        true, est = flavours.get("true", {}).get(metric), flavours.get("estimated", {}).get(metric)
        if not (_finite(true) and _finite(est)):
            continue
        row: dict[str, Any] = {"true": true, "estimated": est}
        lifts = lift_vs_static.get(name, {})
        t_lift, e_lift = lifts.get("true", {}).get(metric), lifts.get("estimated", {}).get(metric)
        if t_lift and e_lift and _finite(t_lift["lift"]) and _finite(e_lift["ci_low"]):
            row.update(true_lift=t_lift["lift"], estimated_lift=e_lift["lift"], ci_low=e_lift["ci_low"],
                       ci_high=e_lift["ci_high"],
                       covered=bool(e_lift["ci_low"] <= t_lift["lift"] <= e_lift["ci_high"]))
        rows[name] = row
    covered = [r["covered"] for r in rows.values() if "covered" in r]
    return {"metric": metric, "policies": rows,
            "covered_share": sum(covered) / len(covered) if covered else None,
            "ordering": ordering(rows, order_margin)}


def add_weight_level(check: dict[str, Any], weight_level: dict[str, Any] | None,
                     lift_vs_static: dict[str, Any], metric: str) -> None:
    """Adds the weight-level forms (report.json's ``weight_level``, grade.evaluate.weight_level) to the
    check in place: per policy row, each form's lift vs static, its CI and whether the true lift lies in
    it (a lift marked unsupported, its kernel outside the logs' support, only with its estimate);
    ``weight_level_covered_share``: per form, the share of covered lifts among the supported ones.
    Nothing without truth or propensities."""
    if not check or not weight_level:
        return
    shares = {}
    for form, lifts in weight_level["lift_vs_static"].items():
        covered = []
        for name, row in check["policies"].items():
            est = lifts.get(name)
            true = lift_vs_static.get(name, {}).get("true", {}).get(metric)
            if name == "static" or not (est and true and _finite(true["lift"]) and _finite(est["ci_low"])):
                continue
            if est.get("unsupported"):
                row[form] = {"estimated_lift": est["lift"], "unsupported": True}
                continue
            row[form] = {"estimated_lift": est["lift"], "ci_low": est["ci_low"], "ci_high": est["ci_high"],
                         "covered": bool(est["ci_low"] <= true["lift"] <= est["ci_high"])}
            covered.append(row[form]["covered"])
        shares[form] = sum(covered) / len(covered) if covered else None
    check["weight_level_covered_share"] = shares


def ordering(rows: dict[str, dict[str, Any]], margin: float) -> dict[str, Any]:
    """Whether "estimated" orders each pair as "true" does, over pairs whose true values differ by
    > margin."""
    names = sorted(rows)
    pairs, disagreements = 0, []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = rows[a]["true"], rows[b]["true"]
            if abs(ta - tb) <= margin * max(abs(ta), abs(tb)):
                continue
            pairs += 1
            if (ta > tb) != (rows[a]["estimated"] > rows[b]["estimated"]):
                disagreements.append([a, b])
    return {"margin": margin, "pairs": pairs, "agreeing": pairs - len(disagreements),
            "disagreements": disagreements, "agrees": not disagreements}


@torch.no_grad()
def grid_values(data: dict[str, torch.Tensor], grid: torch.Tensor, segment: torch.Tensor, n_segments: int,
                estimators: dict[str, EstimatorInputs], value_weights: tuple[float, float, float],
                depth: int, eta: ClickModel | float, chunk_elems: int = 4_000_000) -> dict[str, torch.Tensor]:
    """Per segment, the total value of each global vector of ``grid`` [G, K]: name -> [S, G] float64.

    ``estimators``: name -> inputs on ``data``'s requests (label and model key "value": the declared
    value per item); "true" is added from the ground truth (true_ctr, true_cvr, price) with
    ``value_weights`` (the declared value's prices for raw GMV, BusinessConfig.prices) under the world's
    click model ``eta`` (an eta = position-based, theta_j = (1+j)^-eta).
    segment [N] holds ids in 0..n_segments-1. Requests are processed in chunks (SNIPS normalises per chunk).
    """
    n, length = data["mask"].shape
    g = grid.shape[0]
    e = min(depth, length)
    out = {name: torch.zeros(n_segments, g, dtype=torch.float64) for name in [*estimators, "true"]}
    chunk = max(1, chunk_elems // max(1, g * length))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = data["mask"][sl]
        weights = grid.to(data["z"].dtype).unsqueeze(0).expand(m.shape[0], g, -1)
        idx = top_e(fuse(data["z"][sl], weights, m), e)
        seg = segment[sl]
        for name, est in estimators.items():
            model = None if est.models is None else est.models["value"][sl]
            v = ranking_value(est.name, idx, est.theta[:e], est.logged_theta[sl], est.labels["value"][sl],
                              model, max_weight=est.max_weight).value
            out[name].index_add_(0, seg, v.to(torch.float64))
        sums = exposure_sums(idx, m, eta, data["true_ctr"][sl], data["true_cvr"][sl], data["price"][sl])
        true = sum(w * sums[k] for w, k in zip(value_weights, ("clicks", "orders", "gmv"), strict=True))
        out["true"].index_add_(0, seg, true)
    return out


def segment_picks(values: dict[str, torch.Tensor], grid: torch.Tensor,
                  labels: dict[int, str]) -> dict[str, Any]:
    """Per segment: the truly best vector and, per estimator, its pick's weights, true value and share.

    values: name -> [S, G] (with "true"), from :func:`grid_values`; grid [G, K]; labels: segment id -> name
    (segments without a label, or without requests, are left out). share = true value of the pick /
    true value of the segment's best vector.
    """
    true = values["true"]
    out: dict[str, Any] = {}
    for sid, label in sorted(labels.items()):
        if sid >= true.shape[0] or not bool(true[sid].abs().sum() > 0):
            continue
        best = int(true[sid].argmax())
        best_value = float(true[sid, best])
        row: dict[str, Any] = {"best": {"weights": [round(float(x), 4) for x in grid[best]],
                                        "true_value": best_value}}
        for name, v in values.items():
            if name == "true":
                continue
            pick = int(v[sid].argmax())
            picked = float(true[sid, pick])
            row[name] = {"weights": [round(float(x), 4) for x in grid[pick]], "true_value": picked,
                         "share": picked / best_value if best_value > 0 else None}
        out[label] = row
    return out
