"""A whole offline evaluation: every policy on the same held-out requests, report.json/html, KFP metrics.

Policies: ``static`` (production default), ``best_static`` (CEM on train), ``logged``, ``oracle``
(with ground truth), every named model (serving weights = the policy mean), and ``incumbent`` (the
registry's production model, when a registry is given and has one). Lifts are relative to
``static`` (and to ``incumbent`` when present) with paired bootstrap CIs; see :mod:`grade.auction`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from grade import auction, baselines, config, store
from grade.config import ranged, to_dict
from grade.errors import InputError
from grade.registry import DEFAULT_MODEL
from grade.reward import RewardConfig

log = logging.getLogger(__name__)

BASELINES = ("static", "best_static", "logged", "oracle")
MAIN_METRICS = ("ctr", "cvr", "opm", "gpm")


@dataclasses.dataclass
class EvaluateConfig:
    split: str = "test"
    """held-out split every policy is evaluated on"""
    max_requests: int = ranged(0, ">= 0")
    """evaluate only the first N held-out requests (0 = all)"""
    exposure_depth: int = ranged(10, ">= 1")
    """E: items exposed per request (top-E of each ranking)"""
    position_bias: float = ranged(1.0, ">= 0")
    """eta of the examination probability theta_j = 1/(1+j)^eta"""
    bootstrap_samples: int = ranged(1000, ">= 0")
    """paired bootstrap resamples of requests for the lift CIs"""
    confidence: float = ranged(0.95, "(0, 1)")
    """confidence level of the percentile intervals"""
    seed: int = ranged(0, ">= 0")
    """seed of the bootstrap, the best_static search and the oracle"""
    segment_feature: str = ""
    """breakdown feature: '' = true segment when present else the first categorical feature; or a c_* name"""
    max_segments: int = ranged(8, ">= 1")
    """largest number of segments in the breakdown (the most frequent values)"""
    static_search_objective: str = "posterior"
    """best_static objective on train: posterior (Stage 2's posterior reward, the finetune.reward label mix)
    or ndcg_order, ndcg_click, ndcg_gmv (per-request replay NDCG@E of one logged label)"""
    static_search_iterations: int = ranged(10, ">= 0")
    """cross-entropy-method iterations of the best_static search"""
    paired_baselines: list[str] = dataclasses.field(default_factory=lambda: ["best_static", "stage1"])
    """policies every other one is also compared with by paired bootstrap (report key lift_vs), when present"""
    static_search_population: int = ranged(32, ">= 1")
    """weight vectors sampled per CEM iteration"""
    static_search_elite_fraction: float = ranged(0.25, "(0, 1]")
    """share of the population kept as the elite each iteration"""
    static_search_max_requests: int = ranged(20000, ">= 0")
    """train requests (with a positive label) the search scores on"""
    oracle_value: str = "orders"
    """what the oracle maximises per request (passed to grade.simulator.oracle_weights)"""
    oracle_candidates: int = ranged(512, ">= 1")
    """weight vectors the oracle tries per request"""
    frontier_steps: int = ranged(12, ">= 1")
    """grid resolution of the static-weights sweep over the simplex (trade-off frontier)"""
    registry_model_name: str = DEFAULT_MODEL
    """model name in the registry whose production alias is the incumbent (an alias of shared.model_name)"""
    batch_size: int = ranged(16384, ">= 1")
    """requests per chunk in ranking and policy inference"""

    def validate(self) -> None:
        if self.static_search_objective not in baselines.SEARCH_OBJECTIVES:
            raise InputError(f"evaluate.static_search_objective: expected one of {list(baselines.SEARCH_OBJECTIVES)},"
                             f" got {self.static_search_objective!r}")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def load_held_out(features_uri: str, cfg: EvaluateConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    from grade import dataset

    spec = dataset.load_spec(features_uri)
    if cfg.split not in spec.get("splits", {}):
        raise InputError(f"{features_uri}: no split '{cfg.split}' in feature_spec.json "
                         f"(has {sorted(spec.get('splits', {}))})")
    data = dataset.load_split(features_uri, cfg.split)
    n = int(data["mask"].shape[0])
    if n == 0:
        raise InputError(f"{features_uri}: split '{cfg.split}' has no requests; expected at least 1")
    if cfg.max_requests and n > cfg.max_requests:
        data = {k: v[: cfg.max_requests] for k, v in data.items()}
    return spec, data


def segment_ids(spec: dict, data: dict[str, torch.Tensor], feature: str) -> tuple[str, torch.Tensor, dict[int, str]]:
    """(feature name, ids [N], id -> label) of the breakdown feature."""
    cats = spec.get("categorical", [])
    if not feature:
        if "segment" in data:
            return "segment", data["segment"].long(), {}
        if not cats:
            return "", torch.zeros(data["mask"].shape[0], dtype=torch.long), {}
        feature = cats[0]["name"]
    if feature == "segment":
        if "segment" not in data:
            raise InputError("evaluate.segment_feature: 'segment' asked for but the features have no true segment")
        return "segment", data["segment"].long(), {}
    names = [c["name"] for c in cats]
    for j, c in enumerate(cats):
        if feature in (c["name"], c["name"].removeprefix("c_"), f"c_{c['name']}"):
            labels = {i + 1: str(v) for i, v in enumerate(c.get("vocab", []))}
            labels[0] = "(other)"
            return c["name"], data["cat"][:, j].long(), labels
    raise InputError(f"evaluate.segment_feature: unknown feature {feature!r}; expected 'segment' or one of {names}")


def read_training_curves(uri: str) -> dict[str, Any]:
    """metrics.json and train_log.jsonl of a model folder, when present (for the report's curves)."""
    out: dict[str, Any] = {}
    try:
        out["metrics"] = store.read_json(store.join(uri, "metrics.json"))
    except (store.NotFound, ValueError):
        pass
    try:
        lines = store.read_bytes(store.join(uri, "train_log.jsonl")).decode().splitlines()
        out["train_log"] = [json.loads(x) for x in lines if x.strip()]
    except (store.NotFound, ValueError):
        pass
    return out


def model_weights(uri: str, data: dict[str, torch.Tensor], spec: dict, batch_size: int) -> torch.Tensor:
    """Serving weights [N, K] of the policy at ``uri`` on the held-out requests."""
    from grade.policy import load_policy

    policy = load_policy(uri)
    k = data["z"].shape[-1]
    if policy.cfg.n_objectives != k or policy.cfg.n_numeric != data["num"].shape[1] \
            or len(policy.cfg.cat_sizes) != data["cat"].shape[1]:
        raise InputError(f"{uri}: policy expects K={policy.cfg.n_objectives}, {policy.cfg.n_numeric} numeric and "
                         f"{len(policy.cfg.cat_sizes)} categorical features; the features have K={k}, "
                         f"{data['num'].shape[1]} numeric and {data['cat'].shape[1]} categorical")
    try:
        model_spec = store.read_json(store.join(uri, "feature_spec.json"))
        if list(model_spec.get("objectives", [])) != list(spec["objectives"]):
            raise InputError(f"{store.join(uri, 'feature_spec.json')}: objectives {model_spec.get('objectives')} "
                             f"differ from the features' {spec['objectives']}")
    except store.NotFound:
        pass
    cat = data["cat"].clamp(min=0)
    sizes = torch.tensor(policy.cfg.cat_sizes)
    cat = torch.where(cat < sizes, cat, torch.zeros_like(cat))  # unseen ids -> OOV 0
    with torch.inference_mode():
        out = [policy.mean_weights(data["num"][s:s + batch_size], cat[s:s + batch_size])
               for s in range(0, cat.shape[0], batch_size)]
    return torch.cat(out).float()


def incumbent_model(registry_uri: str, model_name: str) -> tuple[str, str] | None:
    """(version, uri) of the registry's production model, or None (no alias / registry not available)."""
    try:
        from grade import registry
    except ImportError:
        log.warning("grade.registry is not available: no incumbent is evaluated")
        return None
    return registry.production_model(registry_uri, model_name)


def _content_hash(uri: str) -> str | None:
    try:
        return store.content_hash(uri)
    except store.NotPublished:
        return None


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def run_evaluation(features_uri: str, models: dict[str, str], out_uri: str, cfg: EvaluateConfig | None = None,
                   registry_uri: str | None = None, reward: RewardConfig | None = None) -> dict[str, Any]:
    """Evaluate the baselines, every named model and the incumbent; publish report.json/html, metrics.json.

    ``reward``: Stage 2's reward config, whose posterior label mix the ``posterior`` best_static
    search maximises (default: ``RewardConfig()``).

    Returns the report (the content of report.json).
    """
    cfg = config.check(cfg or EvaluateConfig())
    for name in models:
        if name in (*BASELINES, "incumbent") or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
            raise InputError(f"--model {name}=...: invalid or reserved model name; use letters, digits, _ or - "
                             f"and none of {[*BASELINES, 'incumbent']}")
    t0 = time.monotonic()
    spec, data = load_held_out(features_uri, cfg)
    objectives = list(spec["objectives"])
    n = int(data["mask"].shape[0])
    truth = auction.has_ground_truth(data)
    depth, eta = cfg.exposure_depth, cfg.position_bias
    log.info("evaluating on %d %s requests (ground truth: %s)", n, cfg.split, truth)

    table = auction.SumsTable(auction.shared_sums(data, depth, eta))
    weights: dict[str, torch.Tensor] = {}

    def add(name: str, *, w: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> None:
        t = time.monotonic()
        table.add_policy(name, auction.policy_sums(data, objectives, weights=w, scores=scores, depth=depth,
                                                   eta=eta, chunk=cfg.batch_size))
        log.info("policy %s ranked in %.1fs (%.0f requests/s)", name, time.monotonic() - t,
                 n / max(time.monotonic() - t, 1e-9))
        if w is not None:
            weights[name] = w.expand(n, -1) if w.dim() == 1 else w

    static_w = baselines.static_weights(spec)
    add("static", w=static_w)

    from grade import dataset

    search = None
    if cfg.static_search_iterations > 0 and "train" in spec.get("splits", {}):
        train = dataset.load_split(features_uri, "train", fields=["z", "mask", "click", "order", "gmv", "position"])
        search = baselines.best_static(
            train, spec, depth=depth, objective=cfg.static_search_objective,
            iterations=cfg.static_search_iterations, population=cfg.static_search_population,
            elite_fraction=cfg.static_search_elite_fraction, max_requests=cfg.static_search_max_requests,
            seed=cfg.seed, reward=reward)
        del train
        add("best_static", w=search.weights)
    if "position" in data:
        add("logged", scores=baselines.logged_scores(data))
    oracle_error = None
    if truth:
        try:
            t = time.monotonic()
            ow = baselines.oracle_weights(data, depth=depth, eta=eta, value=cfg.oracle_value,
                                          n_candidates=cfg.oracle_candidates, seed=cfg.seed)
            log.info("oracle weights in %.1fs", time.monotonic() - t)
            add("oracle", w=ow)
        except ImportError as e:
            oracle_error = f"grade.simulator.oracle_weights unavailable: {e}"
            log.warning("no oracle: %s", oracle_error)

    model_info: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, Any]] = {}
    named = dict(models)
    if registry_uri:
        inc = incumbent_model(registry_uri, cfg.registry_model_name)
        if inc is not None:
            named["incumbent"] = inc[1]
            model_info["incumbent"] = {"version": inc[0]}
        else:
            log.info("registry %s has no production model '%s': no incumbent", registry_uri, cfg.registry_model_name)
    for name, uri in named.items():
        w = model_weights(uri, data, spec, cfg.batch_size)
        add(name, w=w)
        model_info.setdefault(name, {}).update({"uri": uri, "content_hash": _content_hash(uri)})
        curves[name] = read_training_curves(uri)

    baseline_names = ["static"] + (["incumbent"] if "incumbent" in table.policies else [])
    paired = [b for b in cfg.paired_baselines if b in table.policies and b not in baseline_names]
    baseline_names += paired
    t = time.monotonic()
    overall = auction.compare(table, baseline_names, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    log.info("bootstrap: %d resamples of %d requests x %d columns in %.1fs", cfg.bootstrap_samples, n,
             len(table.columns), time.monotonic() - t)

    seg_name, seg, seg_labels = segment_ids(spec, data, cfg.segment_feature)
    segments = segment_breakdown(table, seg, seg_labels, cfg) if seg_name else {}
    primary_flavour = "true" if truth else "prior"
    mean_w = {p: {lab: [float(x) for x in w[seg == sid].mean(0)] for sid, lab in _segment_values(seg, seg_labels, cfg)}
              for p, w in weights.items()} if seg_name else {}

    frontier = static_frontier(data, objectives, cfg, primary_flavour)
    policies = overall["policies"]
    headroom = headroom_shares(policies, primary_flavour)
    report: dict[str, Any] = {
        "n_requests": n,
        "split": cfg.split,
        "primary_metric": "opm",
        "primary_flavour": primary_flavour,
        "has_ground_truth": truth,
        "objectives": objectives,
        "exposure_depth": depth,
        "policies": policies,
        "lift_vs_static": overall["lifts"]["static"],
        "models": model_info,
        "weights": {"static": [float(x) for x in static_w],
                    **({"best_static": [float(x) for x in search.weights]} if search else {})},
        "best_static_search": None if search is None else {
            "objective": cfg.static_search_objective, "value": search.objective,
            "static_value": search.static_objective, "n_requests": search.n_requests, "history": search.history},
        "headroom_captured": headroom,
        "lift_vs": {b: overall["lifts"][b] for b in paired},
        "comparisons": comparisons(policies, primary_flavour, list(named),
                                   {b: overall["lifts"][b] for b in paired}),
        "headroom_sentence": headroom_sentence(headroom, policies, primary_flavour, list(models)),
        "segments": {"feature": seg_name, "mean_weights": mean_w, "by_segment": segments},
        "frontier": frontier,
        "config": to_dict(cfg),
        "features": {"uri": features_uri, "content_hash": _content_hash(features_uri)},
        "elapsed_s": None,
    }
    if "incumbent" in overall["lifts"]:
        report["lift_vs_incumbent"] = overall["lifts"]["incumbent"]
    if oracle_error:
        report["oracle_unavailable"] = oracle_error
    report["elapsed_s"] = round(time.monotonic() - t0, 2)

    from grade.report import render_html

    html = render_html(report, weights=weights, segments=(seg_name, seg, seg_labels), curves=curves)
    with store.publishing(out_uri) as staging:
        _write_json(staging / "report.json", report)
        (staging / "report.html").write_text(html, encoding="utf-8")
        _write_json(staging / "metrics.json", kfp_metrics(report))
        _write_json(staging / "config.json", to_dict(cfg))
    log.info("evaluation published to %s in %.1fs", out_uri, time.monotonic() - t0)
    return report


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n")


def _finite(obj: Any) -> Any:
    """NaN/inf -> None: report.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _segment_values(seg: torch.Tensor, labels: dict[int, str], cfg: EvaluateConfig) -> list[tuple[int, str]]:
    """The ``max_segments`` most frequent segment ids (ties by id), with display labels, in id order."""
    ids, counts = torch.unique(seg, return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: (-t[1], t[0]))[: cfg.max_segments]
    return [(i, labels.get(i, str(i))) for i, _ in sorted(order)]


def segment_breakdown(table: auction.SumsTable, seg: torch.Tensor, labels: dict[int, str],
                      cfg: EvaluateConfig) -> dict[str, Any]:
    """Per segment: n_requests, metrics of every policy and lifts vs static with paired CIs."""
    out = {}
    for sid, label in _segment_values(seg, labels, cfg):
        res = auction.compare(table, ["static"], cfg.bootstrap_samples, cfg.confidence, cfg.seed + 1 + sid,
                              rows=seg == sid)
        out[label] = {"n_requests": res["n_requests"], "policies": res["policies"],
                      "lift_vs_static": res["lifts"].get("static", {})}
    return out


def static_frontier(data: dict[str, torch.Tensor], objectives: list[str], cfg: EvaluateConfig,
                    flavour: str) -> dict[str, Any]:
    """CTR and GPM of global weight vectors over the simplex (the static trade-off frontier)."""
    k = data["z"].shape[-1]
    steps = cfg.frontier_steps if k <= 3 else max(2, min(cfg.frontier_steps, 6))
    grid = auction.simplex_grid(k, steps)
    if flavour == "prior" and "ctr" not in auction.objective_index(objectives):
        return {}
    sweep = auction.sweep_global_weights(data, objectives, grid, cfg.exposure_depth, cfg.position_bias,
                                         flavour=flavour, chunk=max(1, cfg.batch_size // 8))
    return {"flavour": flavour, "weights": grid.tolist(),
            **{m: [float(x) for x in v] for m, v in sweep.items()}}


def headroom_shares(policies: dict[str, Any], flavour: str = "true") -> dict[str, float]:
    """(policy - static) / (oracle - static) on OPM for every policy but static/oracle (needs the oracle)."""
    if "oracle" not in policies or flavour != "true":
        return {}
    s = policies["static"]["true"]["opm"]
    o = policies["oracle"]["true"]["opm"]
    if not o > s:
        return {}
    return {p: (v["true"]["opm"] - s) / (o - s) for p, v in policies.items() if p not in ("static", "oracle")}


def comparisons(policies: dict[str, Any], flavour: str, models: list[str],
                lift_vs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per named model: its OPM against every other policy's (beats_*), with the paired lift and CI
    (opm_lift_vs_*) for the baselines of ``lift_vs``; and whether the oracle bounds all."""
    out: dict[str, Any] = {}
    for m in models:
        mine = policies[m][flavour].get("opm")
        if mine is None:
            continue
        out[m] = {f"beats_{p}": bool(mine > v[flavour]["opm"]) for p, v in policies.items()
                  if p not in (m, "oracle") and v.get(flavour, {}).get("opm") is not None}
        for b, lifts in (lift_vs or {}).items():
            lift = lifts.get(m, {}).get(flavour, {}).get("opm")
            if b != m and lift:
                out[m][f"opm_lift_vs_{b}"] = lift
    if "oracle" in policies and flavour == "true":
        o = policies["oracle"]["true"]
        out["oracle_above_all"] = {metric: all(o[metric] >= v["true"][metric] for p, v in policies.items()
                                               if p != "oracle") for metric in ("opm", "gpm")}
    return out


def headroom_sentence(headroom: dict[str, float], policies: dict[str, Any], flavour: str, models: list[str]) -> str:
    if not headroom:
        if flavour != "true":
            return "No ground truth on this data, so no oracle: the headroom share is not available."
        return "No oracle result (the oracle is unavailable or not above static): the headroom share is not available."
    s, o = policies["static"]["true"]["opm"], policies["oracle"]["true"]["opm"]
    focus = "grade" if "grade" in headroom else (models[-1] if models and models[-1] in headroom else None)
    parts = []
    if focus:
        parts.append(f"{focus} captures {100 * headroom[focus]:.1f}% of the oracle's true-OPM headroom over static "
                     f"(static {s:.3f}, {focus} {policies[focus]['true']['opm']:.3f}, oracle {o:.3f} orders per "
                     f"1000 impressions).")
    others = ", ".join(f"{p} {100 * v:.1f}%" for p, v in headroom.items() if p != focus)
    if others:
        parts.append(f"Other policies: {others}.")
    return " ".join(parts)


def kfp_metrics(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """KFP v2 metrics JSON: the primary flavour's metrics and lifts vs static of every policy."""
    flavour = report["primary_flavour"]
    out = []

    def put(name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            out.append({"name": re.sub(r"[^A-Za-z0-9_-]", "-", name)[:63], "numberValue": float(value),
                        "format": "RAW"})

    for p, flav in report["policies"].items():
        for m in MAIN_METRICS:
            put(f"{p}-{flavour}-{m}", flav.get(flavour, {}).get(m))
    for p, flav in report["lift_vs_static"].items():
        for m in MAIN_METRICS:
            lift = flav.get(flavour, {}).get(m)
            if lift:
                put(f"{p}-lift-{m}", lift["lift"])
                put(f"{p}-lift-{m}-ci-low", lift["ci_low"])
                put(f"{p}-lift-{m}-ci-high", lift["ci_high"])
    for p, v in report.get("headroom_captured", {}).items():
        put(f"{p}-headroom-share", v)
    put("n-requests", float(report["n_requests"]))
    return {"metrics": out}


def _verdict(comparison: dict[str, Any], other: str, higher: bool) -> str:
    """'best_static higher (+1.90% [+0.80, +3.00])': the paired lift and CI when there is one."""
    lift = comparison.get(f"opm_lift_vs_{other}")
    ci = "" if not lift else f" ({100 * lift['lift']:+.2f}% [{100 * lift['ci_low']:+.2f}, {100 * lift['ci_high']:+.2f}])"
    return f"{other} {'higher' if higher else 'NOT higher'}{ci}"


def format_table(report: dict[str, Any]) -> str:
    """A readable terminal table: metrics of every policy and lifts vs static with CIs."""
    flavour = report["primary_flavour"]
    lifts = report["lift_vs_static"]
    metrics = [m for m in MAIN_METRICS if any(m in v.get(flavour, {}) for v in report["policies"].values())]
    head = f"{'policy':<16}" + "".join(f"{m.upper():>10}" for m in metrics) + \
        "".join(f"  {m.upper() + ' lift vs static [CI]':<31}" for m in ("opm", "gpm", "ctr") if m in metrics)
    lines = [f"{report['n_requests']} {report['split']} requests, {flavour} metrics, top-{report['exposure_depth']} "
             f"exposure, {report['config']['confidence']:.0%} paired bootstrap CIs "
             f"({report['config']['bootstrap_samples']} resamples)", head, "-" * len(head)]

    def fmt(v: float | None) -> str:
        return "       n/a" if v is None or not math.isfinite(v) else f"{v:>10.4f}"

    for p, flav in report["policies"].items():
        row = f"{p:<16}" + "".join(fmt(flav.get(flavour, {}).get(m)) for m in metrics)
        for m in ("opm", "gpm", "ctr"):
            if m not in metrics:
                continue
            lift = lifts.get(p, {}).get(flavour, {}).get(m)
            cell = "(reference)" if p == "static" else "n/a" if not lift else \
                f"{100 * lift['lift']:+7.2f}% [{100 * lift['ci_low']:+6.2f}, {100 * lift['ci_high']:+6.2f}]"
            row += f"  {cell:<31}"
        lines.append(row)
    for m, c in report.get("comparisons", {}).items():
        if m == "oracle_above_all":
            lines.append("oracle above every policy: " + ", ".join(f"{k.upper()} {'yes' if v else 'NO'}"
                                                                 for k, v in c.items()))
        else:
            lines.append(f"{m} {flavour} OPM vs: " + ", ".join(_verdict(c, k.removeprefix("beats_"), v)
                                                             for k, v in c.items() if k.startswith("beats_")))
    lines.append(report["headroom_sentence"])
    return "\n".join(lines)
