"""The evaluation's verdicts: lifts with paired CIs, segments, the frontier, the headroom and the checks.

:func:`build_report` turns the computed policies (:class:`grade.evaluate.policies.PolicyRuns`) into the
:class:`Report` (report.json). Every verdict judges the declared primary metric
(``business.primary_metric``) on the primary flavour.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from grade.core.config import to_dict
from grade.data import dataset
from grade.data.fusion import ClickModel, simplex_grid
from grade.evaluate import diagnostics, estimator_check
from grade.evaluate.held_out import (
    HeldOut,
    content_hash_of,
    estimator_inputs,
    has_logged_feedback,
    primary_flavour,
    true_segment_labels,
)
from grade.evaluate.policies import PolicyRuns, truth_world
from grade.value import auction, click_model, estimators

if TYPE_CHECKING:
    from grade.evaluate.evaluation import EvaluateConfig

log = logging.getLogger("grade.evaluate.evaluation")


@dataclasses.dataclass
class Report:
    """The evaluation's result; ``to_json()`` is report.json (see docs/evaluation.md for every key)."""

    n_requests: int
    """held-out requests evaluated"""
    split: str
    """the held-out split"""
    primary_metric: str
    """the metric of the declared business value (business.primary_metric): the headline and the gate's"""
    primary_flavour: str
    """the flavour the verdicts, tables and KFP metrics use (first available of PRIMARY_FLAVOURS)"""
    has_ground_truth: bool
    """whether the data has simulator ground truth (true flavour, oracle)"""
    objectives: list[str]
    """the fused objectives, in weight order"""
    exposure_depth: int
    """E: items exposed per request"""
    policies: dict[str, Any]
    """policy -> flavour -> metric -> value"""
    lift_vs_static: dict[str, Any]
    """policy -> flavour -> metric -> {lift, ci_low, ci_high} relative to static"""
    models: dict[str, dict[str, Any]]
    """named model (and incumbent) -> uri, content_hash (and version)"""
    weights: dict[str, list[float]]
    """global weight vector of each baseline that has one (static, best_static)"""
    best_static_search: dict[str, Any] | None
    """the best_static search (objective, value, static_value, n_requests, history), or None"""
    headroom_captured: dict[str, float]
    """policy -> share of the oracle's headroom over static on the true primary metric"""
    lift_vs: dict[str, Any]
    """paired baseline (evaluate.paired_baselines) -> lifts of every other policy"""
    comparisons: dict[str, Any]
    """per named model: beats_* and <primary metric>_lift_vs_*; oracle_above_all"""
    headroom_sentence: str
    """the headroom share in words"""
    segments: dict[str, Any]
    """feature, mean_weights (policy -> segment -> [K]) and by_segment breakdown"""
    frontier: dict[str, Any]
    """the static-weights trade-off frontier ({} when not computable)"""
    config: dict[str, Any]
    """the evaluate config"""
    features: dict[str, Any]
    """uri and content_hash of the features"""
    elapsed_s: float | None
    """wall time from loading to the finished report"""
    lift_vs_incumbent: dict[str, Any] | None = None
    """lifts relative to the registry's production model (key absent without one)"""
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    """baseline -> why it could not be run (keys '<name>_unavailable')"""
    value_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """theta-hat and where it came from: uri (or "fitted" and where), content_hash, eta, method, theta"""
    estimator_check: dict[str, Any] = dataclasses.field(default_factory=dict)
    """estimated vs true per policy and per-segment grid picks of each estimator ({} without truth)"""
    business: dict[str, float] = dataclasses.field(default_factory=dict)
    """the declared business value (clicks, orders, gmv per impression) the primary metric measures"""
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """{"checks": [...]}: the logs checked against what the estimated flavour assumes
    (grade.evaluate.diagnostics)"""
    weight_level: dict[str, Any] | None = None
    """the weight-level estimator's values and lifts (grade.value.weight_ips; key absent unless the
    held-out logs carry served weights and propensities)"""

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("lift_vs_incumbent", "unavailable", "weight_level")}
        if self.lift_vs_incumbent is not None:
            out["lift_vs_incumbent"] = self.lift_vs_incumbent
        if self.weight_level is not None:
            out["weight_level"] = self.weight_level
        out.update({f"{name}_unavailable": why for name, why in self.unavailable.items()})
        return out


def compare_policies(table: auction.SumsTable, cfg: EvaluateConfig,
                     n: int) -> tuple[dict[str, Any], list[str]]:
    """auction.compare of every policy vs static, the incumbent and the paired baselines; the paired ones."""
    references = ["static"] + (["incumbent"] if "incumbent" in table.policies else [])
    paired = [b for b in cfg.paired_baselines if b in table.policies and b not in references]
    t = time.monotonic()
    overall = auction.compare(table, references + paired, cfg.bootstrap_samples, cfg.confidence, cfg.seed,
                              interval=cfg.interval)
    log.info("bootstrap (%s): %d resamples of %d requests x %d columns in %.1fs", cfg.interval,
             cfg.bootstrap_samples, n, len(table.columns), time.monotonic() - t)
    return overall, paired


def segment_mean_weights(runs: PolicyRuns, held: HeldOut) -> dict[str, dict[str, list[float]]]:
    """policy -> segment label -> mean serving weights [K] over the segment's requests."""
    name, seg, labels = held.segment
    if not name:
        return {}
    values = top_segments(seg, labels, held.cfg)
    return {p: {lab: [float(x) for x in w[seg == sid].mean(0)] for sid, lab in values}
            for p, w in runs.weights.items()}


#: estimators whose per-segment grid picks the estimator check compares ("prior": the direct method on
#: the MTL predictions)
CHECKED_ESTIMATORS = (*(n for n, e in estimators.ESTIMATORS.items() if e.checked), "prior")


def segment_estimator_picks(held: HeldOut) -> dict[str, Any]:
    """Per true segment of the VALID split: each estimator's grid pick and its true value (needs truth)."""
    cfg, vm = held.cfg, held.value_model
    if vm is None or "valid" not in held.spec.get("splits", {}):
        return {}
    valid = dataset.load_split(held.features_uri, "valid")
    if not (auction.has_ground_truth(valid) and "segment" in valid and has_logged_feedback(valid)):
        return {}
    valid = {k: v[: cfg.static_search_max_requests or None] for k, v in valid.items()}
    inputs = {name: estimator_inputs(valid, vm, held.business, name, cfg.estimator_max_weight,
                                     cfg.exposure_depth, cfg.batch_size) for name in CHECKED_ESTIMATORS[:-1]}
    obj = auction.objective_index(held.objectives)
    if {"ctr", "cvr", "gmv"} <= set(obj):
        p = valid["pred"].double()
        c, o = p[..., obj["ctr"]], p[..., obj["ctr"]] * p[..., obj["cvr"]]
        prior_value = (held.business.item_value(c, o, o * p[..., obj["gmv"]], vm.order_value_unit)
                       * valid["mask"])
        inputs["prior"] = dataclasses.replace(inputs["dm"], models={"value": prior_value})
    k = valid["z"].shape[-1]
    grid = simplex_grid(k, cfg.frontier_steps if k <= 3 else max(2, min(cfg.frontier_steps, 6)))
    seg = valid["segment"].long()
    values = estimator_check.grid_values(valid, grid, seg, int(seg.max()) + 1, inputs,
                                         held.business.prices(vm.order_value_unit),
                                         cfg.exposure_depth, truth_world(held))
    labels = {int(i): true_segment_labels().get(int(i), str(int(i))) for i in torch.unique(seg).tolist()}
    return estimator_check.segment_picks(values, grid, labels)


def estimator_report(held: HeldOut, policies: dict[str, Any], lifts: dict[str, Any],
                     metric: str) -> dict[str, Any]:
    """report.json's estimator_check: estimated vs true per policy and per-segment grid picks ({} without
    truth)."""
    if not auction.has_ground_truth(held.data) or held.estimator is None:
        return {}
    t = time.monotonic()
    out = {"estimator": held.cfg.estimator, **estimator_check.policy_check(policies, lifts, metric),
           "segments": segment_estimator_picks(held)}
    log.info("estimator check in %.1fs", time.monotonic() - t)
    return out


def segment_distances(report_weights: dict[str, Any], best: dict[str, list[float]],
                      models: list[str]) -> dict[str, dict[str, Any]]:
    """Per named model and segment: its mean learned weights, the segment's best weights and their L1
    distance."""
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        learned = report_weights.get(m, {})
        rows = {seg: {"learned": learned[seg], "best": w,
                      "l1": sum(abs(a - b) for a, b in zip(learned[seg], w, strict=True))}
                for seg, w in best.items() if seg in learned}
        if rows:
            out[m] = {**rows, "mean_l1": sum(r["l1"] for r in rows.values()) / len(rows)}
    return out


def build_report(held: HeldOut, runs: PolicyRuns, model_names: list[str], started: float) -> Report:
    """Bootstrap, segments, frontier and verdicts of the computed policies; ``started``: time.monotonic() at
    the start (for elapsed_s)."""
    cfg = held.cfg
    overall, paired = compare_policies(runs.table, cfg, held.n_requests)
    seg_name, seg, seg_labels = held.segment
    flavour = primary_flavour(held.data)
    metric = held.business.primary_metric
    policies, lifts = overall["policies"], overall["lifts"]
    headroom = headroom_shares(policies, flavour, metric)
    lift_vs = {b: lifts[b] for b in paired}
    search = runs.baselines.get("best_static")
    mean_weights = segment_mean_weights(runs, held)
    seg_best = runs.baselines.get("segment_best")
    best_by_segment = seg_best.details["weights"] if seg_best is not None and seg_best.details else {}
    return Report(
        n_requests=held.n_requests, split=cfg.split, primary_metric=metric, primary_flavour=flavour,
        has_ground_truth=auction.has_ground_truth(held.data), objectives=held.objectives,
        exposure_depth=cfg.exposure_depth, policies=policies, lift_vs_static=lifts["static"],
        models=runs.models,
        weights={b: [float(x) for x in r.weights] for b, r in runs.baselines.items()
                 if r.weights is not None and r.weights.dim() == 1},
        best_static_search=search.details if search else None,
        headroom_captured=headroom, lift_vs=lift_vs,
        comparisons=comparisons(policies, flavour, list(runs.models), lift_vs, metric=metric),
        headroom_sentence=headroom_sentence(headroom, policies, flavour, model_names, metric),
        segments={"feature": seg_name, "mean_weights": mean_weights,
                  "by_segment": segment_breakdown(runs.table, seg, seg_labels, cfg) if seg_name else {},
                  "best_weights": best_by_segment,
                  "l1_to_best": segment_distances(mean_weights, best_by_segment, list(runs.models))},
        frontier=static_frontier(held.data, held.objectives, cfg, flavour, truth_world(held)),
        config=to_dict(cfg),
        features={"uri": held.features_uri, "content_hash": content_hash_of(held.features_uri),
                  "truth_click_model": truth_world(held).to_json()},
        lift_vs_incumbent=lifts.get("incumbent"),
        unavailable={b: r.unavailable for b, r in runs.baselines.items() if r.unavailable},
        value_model=held.value_model_info,
        estimator_check=estimator_report(held, policies, lifts["static"], metric),
        business=dataclasses.asdict(held.business),
        diagnostics=diagnostics_of(held, runs, model_names),
        elapsed_s=round(time.monotonic() - started, 2))


def diagnostics_of(held: HeldOut, runs: PolicyRuns, model_names: list[str]) -> dict[str, Any]:
    """report.json's "diagnostics": the checks of the held-out logs, then the value model's ``click_model``
    check against the estimator in use, with its detail (grade.value.click_model)."""
    exam = None if held.value_model is None else held.value_model.examination
    check = None if exam is None else click_model.click_model_check(exam, held.cfg.estimator)
    detail = None if exam is None else click_model.click_model_detail(exam)
    return diagnostics.diagnostics_section(diagnostics.run_checks(held, runs, model_names),
                                           [check] if check else [], detail)


def top_segments(seg: torch.Tensor, labels: dict[int, str], cfg: EvaluateConfig) -> list[tuple[int, str]]:
    """The ``max_segments`` most frequent segment ids (ties by id), with display labels, in id order."""
    ids, counts = torch.unique(seg, return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True),
                   key=lambda t: (-t[1], t[0]))[: cfg.max_segments]
    return [(i, labels.get(i, str(i))) for i, _ in sorted(order)]


def segment_breakdown(table: auction.SumsTable, seg: torch.Tensor, labels: dict[int, str],
                      cfg: EvaluateConfig) -> dict[str, Any]:
    """Per segment: n_requests, metrics of every policy and lifts vs static with paired CIs."""
    out = {}
    for sid, label in top_segments(seg, labels, cfg):
        res = auction.compare(table, ["static"], cfg.bootstrap_samples, cfg.confidence, cfg.seed + 1 + sid,
                              rows=seg == sid, interval=cfg.interval)
        out[label] = {"n_requests": res["n_requests"], "policies": res["policies"],
                      "lift_vs_static": res["lifts"].get("static", {})}
    return out


def static_frontier(data: dict[str, torch.Tensor], objectives: list[str], cfg: EvaluateConfig,
                    flavour: str, world: ClickModel) -> dict[str, Any]:
    """CTR and GPM of global weight vectors over the simplex (the static trade-off frontier) under the
    world's click model."""
    k = data["z"].shape[-1]
    steps = cfg.frontier_steps if k <= 3 else max(2, min(cfg.frontier_steps, 6))
    grid = simplex_grid(k, steps)
    if flavour == "prior" and "ctr" not in auction.objective_index(objectives):
        return {}
    sweep = auction.sweep_global_weights(data, objectives, grid, cfg.exposure_depth, world,
                                         flavour=flavour, chunk=max(1, cfg.batch_size // 8))
    return {"flavour": flavour, "weights": grid.tolist(),
            **{m: [float(x) for x in v] for m, v in sweep.items()}}


def headroom_shares(policies: dict[str, Any], flavour: str, metric: str) -> dict[str, float]:
    """(policy - static) / (oracle - static) on the true ``metric`` for every policy but static/oracle
    (needs the oracle)."""
    if "oracle" not in policies or flavour != "true" or metric not in policies["static"].get("true", {}):
        return {}
    s = policies["static"]["true"][metric]
    o = policies["oracle"]["true"][metric]
    if not o > s:
        return {}
    return {p: (v["true"][metric] - s) / (o - s) for p, v in policies.items()
            if p not in ("static", "oracle")}


def comparisons(policies: dict[str, Any], flavour: str, models: list[str],
                lift_vs: dict[str, Any] | None = None, *, metric: str) -> dict[str, Any]:
    """Per named model: its primary ``metric`` against every other policy's (beats_*), with the paired
    lift and CI (<metric>_lift_vs_*) for the baselines of ``lift_vs``; and whether the oracle bounds all
    on the primary metric, OPM and GPM."""
    out: dict[str, Any] = {}
    for m in models:
        mine = policies[m][flavour].get(metric)
        if mine is None:
            continue
        out[m] = {f"beats_{p}": bool(mine > v[flavour][metric]) for p, v in policies.items()
                  if p not in (m, "oracle") and v.get(flavour, {}).get(metric) is not None}
        for b, lifts in (lift_vs or {}).items():
            lift = lifts.get(m, {}).get(flavour, {}).get(metric)
            if b != m and lift:
                out[m][f"{metric}_lift_vs_{b}"] = lift
    if "oracle" in policies and flavour == "true":
        o = policies["oracle"]["true"]
        out["oracle_above_all"] = {k: all(o[k] >= v["true"][k] for p, v in policies.items() if p != "oracle")
                                   for k in dict.fromkeys((metric, "opm", "gpm")) if k in o}
    return out


_UNITS = {"opm": "orders per 1000 impressions", "gpm": "GMV per 1000 impressions",
          "ctr": "clicks per impression", "vpm": "declared value per 1000 impressions"}


def headroom_sentence(headroom: dict[str, float], policies: dict[str, Any], flavour: str, models: list[str],
                      metric: str) -> str:
    """The headroom shares in words: every named model in the order given, then the baselines."""
    if not headroom:
        if flavour != "true":
            return "No ground truth on this data, so no oracle: the headroom share is not available."
        return ("No oracle result (the oracle is unavailable or not above static): the headroom share is not "
                "available.")
    s, o = policies["static"]["true"][metric], policies["oracle"]["true"][metric]
    named = [m for m in models if m in headroom]
    text = (f"Share of the oracle's true-{metric.upper()} headroom over static (static {s:.3f}, oracle "
            f"{o:.3f} {_UNITS[metric]})")
    if named:
        text += ": " + ", ".join(f"{m} {100 * headroom[m]:.1f}% ({policies[m]['true'][metric]:.3f})"
                                 for m in named)
    others = ", ".join(f"{p} {100 * v:.1f}%" for p, v in headroom.items() if p not in named)
    if others:
        text += ("; other policies: " if named else ": ") + others
    return text + "."
