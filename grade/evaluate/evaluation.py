"""A whole offline evaluation: every policy on the same held-out requests, report.json/html, KFP metrics.

Policies: ``static`` (production default), ``best_static`` (CEM on train), ``logged``, ``oracle``
(with ground truth), every named model (serving weights = the policy mean), and ``incumbent`` (the
registry's production model, when a registry is given and has one). Lifts are relative to
``static`` (and to ``incumbent`` when present) with paired bootstrap CIs; see :mod:`grade.value.auction`.

The stages, a module each: the inputs (:mod:`grade.evaluate.held_out`), the policies
(:mod:`grade.evaluate.policies`), the verdicts (:mod:`grade.evaluate.verdicts`), then here the HTML and
the atomic publication (with :mod:`grade.evaluate.summary`'s KFP metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from grade.core import config, store
from grade.core.config import SEED_RANGE, ranged, setting
from grade.core.errors import InputError
from grade.evaluate import estimator_check, weight_level
from grade.evaluate.diagnostics import DiagnosticsConfig, click_profile
from grade.evaluate.held_out import (
    AUTO_ESTIMATOR,
    FITTED_VALUE_MODEL,
    HeldOut,
    load_inputs,
    obtain_value_model,
)
from grade.evaluate.policies import PolicyRuns, check_model_names, compute_policies, named_models
from grade.evaluate.report import render_html
from grade.evaluate.summary import kfp_metrics, read_training_curves, write_json
from grade.evaluate.verdicts import Report, build_report
from grade.model.registry import DEFAULT_MODEL
from grade.value import auction, baselines, estimators
from grade.value.business import BusinessConfig
from grade.value.reward import RewardConfig
from grade.value.value_model import ValueModelConfig

log = logging.getLogger("grade.evaluate.evaluation")


@dataclasses.dataclass
class EvaluateConfig:
    split: str = "test"
    """held-out split every policy is evaluated on"""
    max_requests: int = ranged(0, "[0, 1e8]")
    """evaluate only the first N held-out requests (0 = all)"""
    exposure_depth: int = ranged(10, "[1, 1000]", derived="shared.exposure_depth")
    """E: items exposed per request (top-E of each ranking)"""
    position_bias: float = ranged(1.0, "[0, 10]", derived="shared.eta")
    """eta of the examination probability theta_j = 1/(1+j)^eta the estimators assume; the truth is computed
    under the world's click model, which the features record from simulated logs (this eta only for
    features without it)"""
    bootstrap_samples: int = ranged(1000, "[0, 1e6]")
    """paired bootstrap resamples of requests for the lift CIs"""
    confidence: float = ranged(0.95, "(0, 1)")
    """confidence level of the lift intervals"""
    interval: str = "percentile"
    """how a lift's CI is read from the paired resamples: percentile, bca or studentized (bootstrap-t of the
    log lift; grade.value.auction.INTERVALS, docs/evaluation.md)"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:evaluate")
    """seed of the bootstrap, the best_static search and the oracle"""
    segment_feature: str = ""
    """breakdown feature: '' = true segment when present else the first categorical feature; or a c_* name"""
    max_segments: int = ranged(8, "[1, 1000]", retired=True)
    """largest number of segments in the breakdown (the most frequent values)"""
    estimator: str = "auto"
    """estimator of the 'estimated' flavour (grade.value.estimators.ESTIMATORS: ips, snips, dm, switch,
    shrunk, cascade_dm, cascade_dr), or auto: cascade_dr where the value model's click_model check says
    the valid clicks look like a cascade, else ips (the report records the one used)"""
    estimator_max_weight: float = ranged(100.0, ">= 1")
    """importance weights of the 'estimated' flavour (and the estimated best_static search) are clipped
    here"""
    cascade_max_weight: float = ranged(5.0, ">= 1", retired=True)
    """cascade_dr's inverse logged examination is clipped here instead (chosen by the coverage of true
    lifts on cascade markets, docs/estimators.md)"""
    static_search_objective: str = "estimated"
    """best_static objective on train: estimated (the declared business value by static_search_estimator),
    posterior (Stage 2's posterior reward, the finetune.reward label mix) or ndcg_order, ndcg_click,
    ndcg_gmv (per-request replay NDCG@E of one logged label)"""
    static_search_estimator: str = "dm"
    """estimator of the 'estimated' best_static search (dm needs the value model's outcome model)"""
    static_search_iterations: int = ranged(10, "[0, 1000]", retired=True)
    """cross-entropy-method iterations of the best_static search"""
    paired_baselines: list[str] = setting(["best_static", "stage1"], retired=True)
    """policies every other one is also compared with by paired bootstrap (report key lift_vs), when
    present"""
    static_search_population: int = ranged(32, "[1, 100000]", retired=True)
    """weight vectors sampled per CEM iteration"""
    static_search_elite_fraction: float = ranged(0.25, "(0, 1]", retired=True)
    """share of the population kept as the elite each iteration"""
    static_search_max_requests: int = ranged(20000, "[0, 1e8]", retired=True)
    """train requests (with a positive label) the search scores on"""
    oracle_value: str = "declared"
    """what the oracle maximises per request: declared (the business section's value) or clicks, orders,
    gmv"""
    oracle_candidates: int = ranged(512, "[1, 100000]", retired=True)
    """weight vectors the oracle tries per request"""
    frontier_steps: int = ranged(12, "[1, 200]", retired=True)
    """grid resolution of the static-weights sweep over the simplex (trade-off frontier)"""
    registry_model_name: str = setting(DEFAULT_MODEL, derived="shared.model_name")
    """model name in the registry whose production alias is the incumbent (an alias of shared.model_name)"""
    batch_size: int = ranged(16384, "[1, 1e7]", retired=True)
    """requests per chunk in ranking and policy inference"""
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    """thresholds of the checks of the logs against what the estimated flavour assumes (docs/estimators.md)"""

    def validate(self) -> None:
        if self.interval not in auction.INTERVALS:
            raise InputError(f"evaluate.interval: expected one of {list(auction.INTERVALS)}, "
                             f"got {self.interval!r}")
        if self.static_search_objective not in baselines.SEARCH_OBJECTIVES:
            raise InputError(f"evaluate.static_search_objective: expected one of "
                             f"{list(baselines.SEARCH_OBJECTIVES)}, got {self.static_search_objective!r}")
        for key, extra in (("estimator", [AUTO_ESTIMATOR]), ("static_search_estimator", [])):
            if getattr(self, key) not in [*estimators.ESTIMATORS, *extra]:
                raise InputError(f"evaluate.{key}: expected one of {[*estimators.ESTIMATORS, *extra]}, "
                                 f"got {getattr(self, key)!r}")
        if self.oracle_value not in ("declared", "clicks", "orders", "gmv"):
            raise InputError(f"evaluate.oracle_value: expected declared, clicks, orders or gmv, "
                             f"got {self.oracle_value!r}")


def render(report: Report, runs: PolicyRuns, held: HeldOut) -> str:
    """report.html (grade.evaluate.report.render_html) with the weights, segments and training curves."""
    curves = {name: read_training_curves(info["uri"]) for name, info in report.models.items()}
    return render_html(report.to_json(), weights=runs.weights, segments=held.segment, curves=curves,
                       click_rates=click_profile(held.data, len(report.value_model.get("theta", []))))


def publish(report: Report, out_uri: str, html: str, value_model_folder: Path | None = None) -> None:
    """report.json, report.html, KFP metrics.json and config.json (and the fitted value model in
    ``value_model/``), published atomically to ``out_uri``."""
    doc = report.to_json()
    with store.publishing(out_uri) as staging:
        if value_model_folder is not None:
            shutil.copytree(value_model_folder, staging / FITTED_VALUE_MODEL)
        write_json(staging / "report.json", doc)
        (staging / "report.html").write_text(html, encoding="utf-8")
        write_json(staging / "metrics.json", kfp_metrics(doc))
        write_json(staging / "config.json", report.config)


def run_evaluation(features_uri: str, models: dict[str, str], out_uri: str, cfg: EvaluateConfig | None = None,
                   registry_uri: str | None = None, reward: RewardConfig | None = None,
                   business: BusinessConfig | None = None, outcome_uri: str | None = None,
                   value_model_cfg: ValueModelConfig | None = None) -> dict[str, Any]:
    """Evaluate the baselines, every named model and the incumbent; publish report.json/html, metrics.json.

    ``reward``: Stage 2's reward config, whose posterior label mix the ``posterior`` best_static
    search maximises (default: ``RewardConfig()``). ``business``: the declared value (primary metric,
    oracle, estimated search). ``outcome_uri``: a published value model (components.outcome); without
    it one is fitted on the features' train split with ``value_model_cfg`` and published in the
    report folder's ``value_model/``.

    Returns the report (the content of report.json).
    """
    cfg = config.check(cfg or EvaluateConfig())
    check_model_names(models)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grade-eval-") as scratch:
        vm, vm_info, vm_folder = obtain_value_model(features_uri, outcome_uri,
                                                    value_model_cfg or ValueModelConfig(), Path(scratch))
        held = load_inputs(features_uri, cfg, reward, business, (vm, vm_info))
        log.info("evaluating on %d %s requests (ground truth: %s)", held.n_requests, cfg.split,
                 auction.has_ground_truth(held.data))
        named, info = named_models(models, registry_uri, cfg)
        runs = compute_policies(held, named, info)
        report = build_report(held, runs, list(models), t0)
        report.weight_level = weight_level.section(held, runs.weights)
        estimator_check.add_weight_level(report.estimator_check, report.weight_level, report.lift_vs_static,
                                         report.primary_metric)
        publish(report, out_uri, render(report, runs, held), vm_folder)
    log.info("evaluation published to %s in %.1fs", out_uri, time.monotonic() - t0)
    return report.to_json()
