"""A whole offline evaluation: every policy on the same held-out requests, report.json/html, KFP metrics.

Policies: ``static`` (production default), ``best_static`` (CEM on train), ``logged``, ``oracle``
(with ground truth), every named model (serving weights = the policy mean), and ``incumbent`` (the
registry's production model, when a registry is given and has one). Lifts are relative to
``static`` (and to ``incumbent`` when present) with paired bootstrap CIs; see :mod:`grade.value.auction`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grade.core import config, store
from grade.core.config import SEED_RANGE, ranged, setting, to_dict
from grade.core.errors import InputError
from grade.data.transform import FeatureTransform, clamp_unseen
from grade.model.registry import DEFAULT_MODEL
from grade.value import auction, baselines, estimators
from grade.value.business import BusinessConfig
from grade.value.reward import RewardConfig, rewarded_value
from grade.value.value_model import ValueModel, ValueModelConfig

log = logging.getLogger(__name__)

MAIN_METRICS = ("ctr", "cvr", "opm", "gpm", "vpm")

#: the report folder's subfolder holding the value model the evaluation fitted itself (no --outcome)
FITTED_VALUE_MODEL = "value_model"


@dataclasses.dataclass
class EvaluateConfig:
    split: str = "test"
    """held-out split every policy is evaluated on"""
    max_requests: int = ranged(0, "[0, 1e8]")
    """evaluate only the first N held-out requests (0 = all)"""
    exposure_depth: int = ranged(10, "[1, 1000]", derived="shared.exposure_depth")
    """E: items exposed per request (top-E of each ranking)"""
    position_bias: float = ranged(1.0, "[0, 10]", derived="shared.eta")
    """eta of the examination probability theta_j = 1/(1+j)^eta"""
    bootstrap_samples: int = ranged(1000, "[0, 1e6]")
    """paired bootstrap resamples of requests for the lift CIs"""
    confidence: float = ranged(0.95, "(0, 1)")
    """confidence level of the percentile intervals"""
    seed: int = ranged(0, SEED_RANGE, derived="seed:evaluate")
    """seed of the bootstrap, the best_static search and the oracle"""
    segment_feature: str = ""
    """breakdown feature: '' = true segment when present else the first categorical feature; or a c_* name"""
    max_segments: int = ranged(8, "[1, 1000]", retired=True)
    """largest number of segments in the breakdown (the most frequent values)"""
    estimator: str = "ips"
    """estimator of the 'estimated' flavour (grade.value.estimators.ESTIMATORS: ips, snips, dm, switch,
    shrunk)"""
    estimator_max_weight: float = ranged(100.0, ">= 1")
    """importance weights of the 'estimated' flavour (and the estimated best_static search) are clipped
    here"""
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

    def validate(self) -> None:
        if self.static_search_objective not in baselines.SEARCH_OBJECTIVES:
            raise InputError(f"evaluate.static_search_objective: expected one of "
                             f"{list(baselines.SEARCH_OBJECTIVES)}, got {self.static_search_objective!r}")
        for key in ("estimator", "static_search_estimator"):
            if getattr(self, key) not in estimators.ESTIMATORS:
                raise InputError(f"evaluate.{key}: expected one of {list(estimators.ESTIMATORS)}, "
                                 f"got {getattr(self, key)!r}")
        if self.oracle_value not in ("declared", "clicks", "orders", "gmv"):
            raise InputError(f"evaluate.oracle_value: expected declared, clicks, orders or gmv, "
                             f"got {self.oracle_value!r}")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def load_held_out(features_uri: str, cfg: EvaluateConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    from grade.data import dataset

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


def true_segment_labels() -> dict[int, str]:
    """The simulator's segment names by id ({} when the simulator is not installed)."""
    try:
        from grade.data.simulator import SEGMENTS
    except ImportError:
        return {}
    return dict(enumerate(SEGMENTS))


def segment_ids(spec: dict, data: dict[str, torch.Tensor],
                feature: str) -> tuple[str, torch.Tensor, dict[int, str]]:
    """(feature name, ids [N], id -> label) of the breakdown feature (true segments by their names)."""
    cats = spec.get("categorical", [])
    if not feature:
        if "segment" in data:
            return "segment", data["segment"].long(), true_segment_labels()
        if not cats:
            return "", torch.zeros(data["mask"].shape[0], dtype=torch.long), {}
        feature = cats[0]["name"]
    if feature == "segment":
        if "segment" not in data:
            raise InputError("evaluate.segment_feature: 'segment' asked for but the features have no true "
                             "segment")
        return "segment", data["segment"].long(), true_segment_labels()
    names = [c["name"] for c in cats]
    for j, c in enumerate(cats):
        if feature in (c["name"], c["name"].removeprefix("c_"), f"c_{c['name']}"):
            labels = {i + 1: str(v) for i, v in enumerate(c.get("vocab", []))}
            labels[0] = "(other)"
            return c["name"], data["cat"][:, j].long(), labels
    raise InputError(f"evaluate.segment_feature: unknown feature {feature!r}; expected 'segment' or one of "
                     f"{names}")


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
    """Serving weights [N, K] of the policy at ``uri`` on the held-out requests.

    Only a published model folder is read, every file checked against its manifest (exit 2 otherwise).
    """
    from grade.model.policy import load_policy, published_model

    with published_model(uri) as folder:
        policy = load_policy(folder)
        FeatureTransform.from_spec(spec).check_policy(policy.cfg, uri)
        if (folder / "feature_spec.json").is_file():
            model_spec = json.loads((folder / "feature_spec.json").read_bytes())
            if list(model_spec.get("objectives", [])) != list(spec["objectives"]):
                raise InputError(f"{store.join(uri, 'feature_spec.json')}: objectives "
                                 f"{model_spec.get('objectives')} differ from the features' "
                                 f"{spec['objectives']}")
    cat = clamp_unseen(data["cat"], policy.cfg.cat_sizes)
    with torch.inference_mode():
        out = [policy.mean_weights(data["num"][s:s + batch_size], cat[s:s + batch_size])
               for s in range(0, cat.shape[0], batch_size)]
    return torch.cat(out).float()


def incumbent_model(registry_uri: str, model_name: str) -> tuple[str, str] | None:
    """(version, uri) of the registry's production model, or None (no alias / registry not available)."""
    try:
        from grade.model import registry
    except ImportError:
        log.warning("grade.model.registry is not available: no incumbent is evaluated")
        return None
    return registry.production_model(registry_uri, model_name)


def _content_hash(uri: str) -> str | None:
    try:
        return store.content_hash(uri)
    except store.NotPublished:
        return None


# ------------------------------------------------------------------------------------------------
# The value model and the estimated flavour's inputs
# ------------------------------------------------------------------------------------------------

def obtain_value_model(features_uri: str, outcome_uri: str | None, cfg: ValueModelConfig,
                       scratch: Path) -> tuple[ValueModel, dict[str, Any], Path | None]:
    """(value model, report.json's value_model entry, folder to copy into the report or None).

    With ``outcome_uri`` the published value model is read; without it one is fitted on the features'
    train split into ``scratch`` and later published in the report folder's ``value_model/``.
    """
    from grade.value.value_model import build_value_model, load_value_model

    if outcome_uri:
        vm = load_value_model(outcome_uri)
        info = {"uri": outcome_uri, "content_hash": _content_hash(outcome_uri)}
        folder = None
    else:
        folder = scratch / FITTED_VALUE_MODEL
        t = time.monotonic()
        build_value_model(features_uri, str(folder), cfg)
        log.info("value model fitted on the train split in %.1fs (no --outcome given)", time.monotonic() - t)
        vm = load_value_model(str(folder))
        info = {"uri": "fitted", "where": f"{FITTED_VALUE_MODEL}/ in this report's folder",
                "content_hash": _content_hash(str(folder))}
    exam = vm.examination
    info.update({"eta": exam.eta, "method": exam.method, "theta": [round(x, 6) for x in exam.theta],
                 "order_value_unit": vm.order_value_unit})
    return vm, info, folder


def estimator_inputs(data: dict[str, torch.Tensor], vm: ValueModel, business: BusinessConfig, name: str,
                     max_weight: float, depth: int, batch_size: int) -> auction.EstimatorInputs:
    """The estimated flavour's inputs on ``data``: theta-hat, logged labels and the outcome model's values.

    Labels: clicks, orders, gmv and the declared value per item; the outcome model's expectations of
    the same are computed (in chunks of ``batch_size`` requests) only for estimators that use them.
    """
    e = min(depth, data["mask"].shape[1])
    unit = vm.order_value_unit
    f64 = {k: data[k].to(torch.float64) for k in ("click", "order", "gmv")}
    labels = {"clicks": f64["click"], "orders": f64["order"], "gmv": f64["gmv"],
              "value": business.item_value(f64["click"], f64["order"], f64["gmv"], unit)}
    models = None
    if name in ("dm", "switch", "shrunk"):
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in labels}
        for s in range(0, data["mask"].shape[0], batch_size):
            kinds = vm.item_kinds({k: data[k][s:s + batch_size] for k in ("z", "pred", "mask", "num", "cat")})
            c, order, gmv = kinds.double().unbind(-1)
            for k, v in (("clicks", c), ("orders", order), ("gmv", gmv),
                         ("value", business.item_value(c, order, gmv, unit))):
                parts[k].append(v)
        models = {k: torch.cat(v) for k, v in parts.items()}
    return auction.EstimatorInputs(
        name=name, theta=vm.examination.theta_at(torch.arange(e)).double(),
        logged_theta=vm.examination.theta_at(data["position"]).double() * data["mask"],
        labels=labels, models=models, max_weight=max_weight)


def declared_value_weights(business: BusinessConfig, unit: float) -> tuple[float, float, float]:
    """(v_click, v_order, v_gmv per raw GMV unit) of the declared value."""
    v_click, v_order, v_gmv = business.weights()
    return v_click, v_order, v_gmv / unit


# ------------------------------------------------------------------------------------------------
# Flavours and baselines: one entry each, so a new flavour or baseline is a local change
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrimaryFlavour:
    """A metric flavour the report can be judged on (its metrics are grade.value.auction.METRICS[name])."""

    name: str
    """the flavour's key in report.json's policies/lifts"""
    available: Callable[[dict[str, torch.Tensor]], bool]
    """whether the held-out data supports it (e.g. simulator ground truth for 'true')"""


def has_logged_feedback(data: dict[str, torch.Tensor]) -> bool:
    """Whether the logs carry what the estimated flavour needs: positions and click/order/gmv labels."""
    return all(k in data for k in ("position", "click", "order", "gmv"))


#: The report's primary flavour is the first available one, in this order. The prior (the MTL model's
#: own predictions) is never primary: a policy can exploit it (see docs/evaluation.md).
PRIMARY_FLAVOURS = (PrimaryFlavour("true", auction.has_ground_truth),
                    PrimaryFlavour("estimated", has_logged_feedback))


def primary_flavour(data: dict[str, torch.Tensor]) -> str:
    for f in PRIMARY_FLAVOURS:
        if f.available(data):
            return f.name
    raise InputError("evaluation: the held-out split has neither ground truth nor logged positions and "
                     "click/order/gmv labels; expected at least one to judge policies on")


@dataclasses.dataclass
class HeldOut:
    """The held-out requests and what every stage of the evaluation reads from them."""

    features_uri: str
    """the features folder"""
    spec: dict[str, Any]
    """its feature_spec.json"""
    data: dict[str, torch.Tensor]
    """the held-out split's tensors (first cfg.max_requests requests)"""
    cfg: EvaluateConfig
    """the evaluation config"""
    reward: RewardConfig | None
    """Stage 2's reward config (the posterior best_static search's label mix)"""
    segment: tuple[str, torch.Tensor, dict[int, str]]
    """breakdown feature name ('' = none), ids [N] and id -> label"""
    business: BusinessConfig = dataclasses.field(default_factory=BusinessConfig)
    """the declared business value (primary metric, oracle, best_static's search)"""
    value_model: ValueModel | None = None
    """theta-hat, the outcome model and the GMV unit (the estimated flavour, the estimated search)"""
    value_model_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """report.json's value_model: uri (or "fitted" and where), content_hash, eta, method"""
    estimator: auction.EstimatorInputs | None = None
    """the estimated flavour's inputs on the held-out requests (None without logged feedback)"""

    @property
    def objectives(self) -> list[str]:
        return list(self.spec["objectives"])

    @property
    def n_requests(self) -> int:
        return int(self.data["mask"].shape[0])


@dataclasses.dataclass
class Ranking:
    """What ranks one policy's items: serving weights [K] or [N, K], or item scores [N, L]."""

    weights: torch.Tensor | None = None
    """global [K] or per-request [N, K] fusion weights"""
    scores: torch.Tensor | None = None
    """per-item scores [N, L] when the policy is not a weight vector (logged order)"""
    details: dict[str, Any] | None = None
    """what the report records about how the policy was built (the best_static search)"""
    unavailable: str | None = None
    """why the policy could not be run (report key '<name>_unavailable'); nothing is ranked"""


def _static(held: HeldOut) -> Ranking:
    return Ranking(weights=baselines.static_weights(held.spec))


def _best_static(held: HeldOut) -> Ranking | None:
    from grade.data import dataset

    cfg = held.cfg
    if cfg.static_search_iterations <= 0 or "train" not in held.spec.get("splits", {}):
        return None
    objective = cfg.static_search_objective
    fields = ["z", "mask", "click", "order", "gmv", "position"]
    estimated, details, guard_margin = None, {}, None
    if objective == "estimated":
        train = dataset.load_split(held.features_uri, "train", fields=[*fields, "pred", "num", "cat"])
        gen = torch.Generator().manual_seed(int(cfg.seed))
        n = train["mask"].shape[0]
        if cfg.static_search_max_requests and n > cfg.static_search_max_requests:
            keep = torch.randperm(n, generator=gen)[:cfg.static_search_max_requests].sort().values
            train = {k: v[keep] for k, v in train.items()}
        # without an outcome model the model-based estimators cannot run: IPS needs only the logs
        name = cfg.static_search_estimator if held.value_model is not None else "ips"
        reward = held.reward or RewardConfig()
        if reward.guard_mode == "constraint":   # what Stage 2 maximises, under the same guardrails
            searched, guard_margin = held.business, reward.guard_margin
        else:
            searched, guard_margin = rewarded_value(held.business, reward), None
        estimated = estimator_inputs(train, held.value_model, searched, name, cfg.estimator_max_weight,
                                     cfg.exposure_depth, cfg.batch_size)
        details = {"estimator": name, "declared_value": dataclasses.asdict(held.business),
                   "searched_value": dataclasses.asdict(searched),
                   **({"guard_margin": guard_margin} if guard_margin is not None else {})}
    else:
        train = dataset.load_split(held.features_uri, "train", fields=fields)
    search = baselines.best_static(
        train, held.spec, depth=cfg.exposure_depth, objective=objective,
        iterations=cfg.static_search_iterations, population=cfg.static_search_population,
        elite_fraction=cfg.static_search_elite_fraction, max_requests=cfg.static_search_max_requests,
        seed=cfg.seed, reward=held.reward, estimated=estimated, guard_margin=guard_margin)
    return Ranking(weights=search.weights, details={
        **details, "objective": objective, "value": search.objective,
        "static_value": search.static_objective, "n_requests": search.n_requests, "history": search.history})


def _logged(held: HeldOut) -> Ranking | None:
    return Ranking(scores=baselines.logged_scores(held.data)) if "position" in held.data else None


def _oracle(held: HeldOut) -> Ranking | None:
    cfg = held.cfg
    if not auction.has_ground_truth(held.data):
        return None
    try:
        t = time.monotonic()
        w = baselines.oracle_weights(held.data, depth=cfg.exposure_depth, eta=cfg.position_bias,
                                     value=oracle_value(held), n_candidates=cfg.oracle_candidates,
                                     seed=cfg.seed)
        log.info("oracle weights in %.1fs", time.monotonic() - t)
        return Ranking(weights=w)
    except ImportError as e:
        reason = f"grade.data.simulator.oracle_weights unavailable: {e}"
        log.warning("no oracle: %s", reason)
        return Ranking(unavailable=reason)


def value_unit(held: HeldOut) -> float:
    """The GMV unit of the declared value: the value model's (train mean order value), else 1."""
    return held.value_model.order_value_unit if held.value_model is not None else 1.0


def oracle_value(held: HeldOut) -> str | tuple[float, float, float]:
    """What the oracle maximises: the declared value (price in raw units) or one named kind."""
    if held.cfg.oracle_value != "declared":
        return held.cfg.oracle_value
    return declared_value_weights(held.business, value_unit(held))


def _segment_best(held: HeldOut) -> Ranking | None:
    """Best static weights per true segment, searched with the truth on VALID (a ceiling diagnostic)."""
    from grade.data import dataset

    cfg = held.cfg
    if "segment" not in held.data or not auction.has_ground_truth(held.data):
        return None
    if "valid" not in held.spec.get("splits", {}) or held.spec["splits"]["valid"].get("n_requests", 0) == 0:
        return Ranking(unavailable="no valid split to search the per-segment weights on")
    valid = dataset.load_split(held.features_uri, "valid",
                               fields=["z", "mask", "true_ctr", "true_cvr", "price", "segment"])
    if not auction.has_ground_truth(valid) or "segment" not in valid:
        return Ranking(unavailable="the valid split has no ground truth or true segment")
    best = baselines.segment_best_weights(valid, held.objectives, valid["segment"].long(),
                                          declared_value_weights(held.business, value_unit(held)),
                                          cfg.exposure_depth, cfg.position_bias, cfg.frontier_steps)
    seg = held.data["segment"].long()
    static = baselines.static_weights(held.spec)
    weights = static.expand(held.n_requests, -1).clone()
    for sid, w in best.items():
        weights[seg == sid] = w
    labels = true_segment_labels()
    return Ranking(weights=weights, details={
        "searched_on": "valid (ground truth)", "grid_steps": cfg.frontier_steps,
        "weights": {labels.get(sid, str(sid)): [float(x) for x in w] for sid, w in sorted(best.items())}})


#: Baseline policies in report order: name -> how it ranks the held-out requests (None = not applicable).
BASELINES: dict[str, Callable[[HeldOut], Ranking | None]] = {
    "static": _static, "best_static": _best_static, "logged": _logged, "segment_best": _segment_best,
    "oracle": _oracle}


# ------------------------------------------------------------------------------------------------
# The run: compute -> report -> render -> publish
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PolicyRuns:
    """Every policy's per-request sums and what the report and the HTML need besides them."""

    table: auction.SumsTable
    """per-request sums of every policy (columns) for the paired bootstrap"""
    weights: dict[str, torch.Tensor]
    """policy -> serving weights [N, K] (weight-vector policies only)"""
    baselines: dict[str, Ranking]
    """baseline -> its ranking (with details / why it is unavailable)"""
    models: dict[str, dict[str, Any]]
    """named model (and incumbent) -> uri, content_hash (and registry version)"""


def check_model_names(models: dict[str, str]) -> None:
    reserved = [*BASELINES, "incumbent"]
    for name in models:
        if name in reserved or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
            raise InputError(f"--model {name}=...: invalid or reserved model name; use letters, digits, "
                             f"_ or - and none of {reserved}")


def load_inputs(features_uri: str, cfg: EvaluateConfig, reward: RewardConfig | None,
                business: BusinessConfig | None = None,
                value_model: tuple[ValueModel, dict[str, Any]] | None = None) -> HeldOut:
    """The held-out requests with the declared value and (given a value model) the estimated flavour's
    inputs."""
    spec, data = load_held_out(features_uri, cfg)
    business = config.check(business or BusinessConfig(), "business")
    held = HeldOut(features_uri, spec, data, cfg, reward, segment_ids(spec, data, cfg.segment_feature),
                   business)
    if value_model is not None:
        held.value_model, held.value_model_info = value_model
        if has_logged_feedback(data):
            held.estimator = estimator_inputs(data, held.value_model, business, cfg.estimator,
                                              cfg.estimator_max_weight, cfg.exposure_depth, cfg.batch_size)
    return held


def named_models(models: dict[str, str], registry_uri: str | None, cfg: EvaluateConfig
                 ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(name -> uri, name -> info) of the named models plus the registry's incumbent when there is one."""
    named, versions = dict(models), {}
    if registry_uri:
        inc = incumbent_model(registry_uri, cfg.registry_model_name)
        if inc is not None:
            named["incumbent"] = inc[1]
            versions["incumbent"] = {"version": inc[0]}
        else:
            log.info("registry %s has no production model '%s': no incumbent", registry_uri,
                     cfg.registry_model_name)
    # a model folder without a manifest is refused here, before any work (NotPublished: exit 2)
    info = {name: {**versions.get(name, {}), "uri": uri, "content_hash": store.content_hash(uri)}
            for name, uri in named.items()}
    return named, info


def compute_policies(held: HeldOut, models: dict[str, str],
                     model_info: dict[str, dict[str, Any]]) -> PolicyRuns:
    """Rank the held-out requests with every baseline and named model; their per-request sums."""
    cfg, data, n = held.cfg, held.data, held.n_requests
    runs = PolicyRuns(auction.SumsTable(auction.shared_sums(data, cfg.exposure_depth, cfg.position_bias,
                                                            held.estimator)), {}, {}, model_info)
    mix = held.business.primary_metric == "vpm"
    value_weights = declared_value_weights(held.business, value_unit(held)) if mix else None
    estimator = held.estimator
    if estimator is not None and not mix:  # the declared value is one of clicks/orders/gmv: no vpm column
        estimator = dataclasses.replace(estimator,
                                        labels={k: v for k, v in estimator.labels.items() if k != "value"},
                                        models=None if estimator.models is None else
                                        {k: v for k, v in estimator.models.items() if k != "value"})

    def add(name: str, ranking: Ranking) -> None:
        t = time.monotonic()
        runs.table.add_policy(name, auction.policy_sums(
            data, held.objectives, weights=ranking.weights, scores=ranking.scores, depth=cfg.exposure_depth,
            eta=cfg.position_bias, chunk=cfg.batch_size, estimator=estimator, value_weights=value_weights))
        log.info("policy %s ranked in %.1fs (%.0f requests/s)", name, time.monotonic() - t,
                 n / max(time.monotonic() - t, 1e-9))
        w = ranking.weights
        if w is not None:
            runs.weights[name] = w.expand(n, -1) if w.dim() == 1 else w

    for name, make in BASELINES.items():
        ranking = make(held)
        if ranking is not None:
            runs.baselines[name] = ranking
            if ranking.unavailable is None:
                add(name, ranking)
    for name, uri in models.items():
        add(name, Ranking(weights=model_weights(uri, data, held.spec, cfg.batch_size)))
    return runs


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
    """policy -> share of the oracle's true-OPM headroom over static"""
    lift_vs: dict[str, Any]
    """paired baseline (evaluate.paired_baselines) -> lifts of every other policy"""
    comparisons: dict[str, Any]
    """per named model: beats_* and opm_lift_vs_*; oracle_above_all"""
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

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("lift_vs_incumbent", "unavailable")}
        if self.lift_vs_incumbent is not None:
            out["lift_vs_incumbent"] = self.lift_vs_incumbent
        out.update({f"{name}_unavailable": why for name, why in self.unavailable.items()})
        return out


def compare_policies(table: auction.SumsTable, cfg: EvaluateConfig,
                     n: int) -> tuple[dict[str, Any], list[str]]:
    """auction.compare of every policy vs static, the incumbent and the paired baselines; the paired ones."""
    references = ["static"] + (["incumbent"] if "incumbent" in table.policies else [])
    paired = [b for b in cfg.paired_baselines if b in table.policies and b not in references]
    t = time.monotonic()
    overall = auction.compare(table, references + paired, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    log.info("bootstrap: %d resamples of %d requests x %d columns in %.1fs", cfg.bootstrap_samples, n,
             len(table.columns), time.monotonic() - t)
    return overall, paired


def segment_mean_weights(runs: PolicyRuns, held: HeldOut) -> dict[str, dict[str, list[float]]]:
    """policy -> segment label -> mean serving weights [K] over the segment's requests."""
    name, seg, labels = held.segment
    if not name:
        return {}
    values = _segment_values(seg, labels, held.cfg)
    return {p: {lab: [float(x) for x in w[seg == sid].mean(0)] for sid, lab in values}
            for p, w in runs.weights.items()}


#: estimators whose per-segment grid picks the estimator check compares ("prior": the direct method on
#: the MTL predictions)
CHECKED_ESTIMATORS = ("ips", "snips", "dm", "switch", "prior")


def segment_estimator_picks(held: HeldOut) -> dict[str, Any]:
    """Per true segment of the VALID split: each estimator's grid pick and its true value (needs truth)."""
    from grade.data import dataset
    from grade.evaluate import estimator_check

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
    grid = auction.simplex_grid(k, cfg.frontier_steps if k <= 3 else max(2, min(cfg.frontier_steps, 6)))
    seg = valid["segment"].long()
    values = estimator_check.grid_values(valid, grid, seg, int(seg.max()) + 1, inputs,
                                         declared_value_weights(held.business, vm.order_value_unit),
                                         cfg.exposure_depth, cfg.position_bias)
    labels = {int(i): true_segment_labels().get(int(i), str(int(i))) for i in torch.unique(seg).tolist()}
    return estimator_check.segment_picks(values, grid, labels)


def estimator_report(held: HeldOut, policies: dict[str, Any], lifts: dict[str, Any],
                     metric: str) -> dict[str, Any]:
    """report.json's estimator_check: estimated vs true per policy and per-segment grid picks ({} without
    truth)."""
    from grade.evaluate.estimator_check import policy_check

    if not auction.has_ground_truth(held.data) or held.estimator is None:
        return {}
    t = time.monotonic()
    out = {"estimator": held.cfg.estimator, **policy_check(policies, lifts, metric),
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
        comparisons=comparisons(policies, flavour, list(runs.models), lift_vs),
        headroom_sentence=headroom_sentence(headroom, policies, flavour, model_names, metric),
        segments={"feature": seg_name, "mean_weights": mean_weights,
                  "by_segment": segment_breakdown(runs.table, seg, seg_labels, cfg) if seg_name else {},
                  "best_weights": best_by_segment,
                  "l1_to_best": segment_distances(mean_weights, best_by_segment, list(runs.models))},
        frontier=static_frontier(held.data, held.objectives, cfg, flavour),
        config=to_dict(cfg),
        features={"uri": held.features_uri, "content_hash": _content_hash(held.features_uri)},
        lift_vs_incumbent=lifts.get("incumbent"),
        unavailable={b: r.unavailable for b, r in runs.baselines.items() if r.unavailable},
        value_model=held.value_model_info,
        estimator_check=estimator_report(held, policies, lifts["static"], metric),
        business=dataclasses.asdict(held.business),
        elapsed_s=round(time.monotonic() - started, 2))


def render(report: Report, runs: PolicyRuns, held: HeldOut) -> str:
    """report.html (grade.evaluate.report.render_html) with the weights, segments and training curves."""
    from grade.evaluate.report import render_html

    curves = {name: read_training_curves(info["uri"]) for name, info in report.models.items()}
    return render_html(report.to_json(), weights=runs.weights, segments=held.segment, curves=curves)


def publish(report: Report, out_uri: str, html: str, value_model_folder: Path | None = None) -> None:
    """report.json, report.html, KFP metrics.json and config.json (and the fitted value model in
    ``value_model/``), published atomically to ``out_uri``."""
    import shutil

    doc = report.to_json()
    with store.publishing(out_uri) as staging:
        if value_model_folder is not None:
            shutil.copytree(value_model_folder, staging / FITTED_VALUE_MODEL)
        _write_json(staging / "report.json", doc)
        (staging / "report.html").write_text(html, encoding="utf-8")
        _write_json(staging / "metrics.json", kfp_metrics(doc))
        _write_json(staging / "config.json", report.config)


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
    import tempfile

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
        publish(report, out_uri, render(report, runs, held), vm_folder)
    log.info("evaluation published to %s in %.1fs", out_uri, time.monotonic() - t0)
    return report.to_json()


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
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True),
                   key=lambda t: (-t[1], t[0]))[: cfg.max_segments]
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


def headroom_shares(policies: dict[str, Any], flavour: str = "true", metric: str = "opm") -> dict[str, float]:
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


_UNITS = {"opm": "orders per 1000 impressions", "gpm": "GMV per 1000 impressions",
          "ctr": "clicks per impression", "vpm": "declared value per 1000 impressions"}


def headroom_sentence(headroom: dict[str, float], policies: dict[str, Any], flavour: str, models: list[str],
                      metric: str = "opm") -> str:
    if not headroom:
        if flavour != "true":
            return "No ground truth on this data, so no oracle: the headroom share is not available."
        return ("No oracle result (the oracle is unavailable or not above static): the headroom share is not "
                "available.")
    s, o = policies["static"]["true"][metric], policies["oracle"]["true"][metric]
    focus = "grade" if "grade" in headroom else (models[-1] if models and models[-1] in headroom else None)
    parts = []
    if focus:
        parts.append(f"{focus} captures {100 * headroom[focus]:.1f}% of the oracle's true-{metric.upper()} "
                     f"headroom over static (static {s:.3f}, {focus} {policies[focus]['true'][metric]:.3f}, "
                     f"oracle {o:.3f} {_UNITS[metric]}).")
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
    ci = "" if not lift else (f" ({100 * lift['lift']:+.2f}% "
                              f"[{100 * lift['ci_low']:+.2f}, {100 * lift['ci_high']:+.2f}])")
    return f"{other} {'higher' if higher else 'NOT higher'}{ci}"


def format_table(report: dict[str, Any]) -> str:
    """A readable terminal table: metrics of every policy and lifts vs static with CIs."""
    flavour = report["primary_flavour"]
    lifts = report["lift_vs_static"]
    metrics = [m for m in MAIN_METRICS if any(m in v.get(flavour, {}) for v in report["policies"].values())]
    # next to the truth, the estimated flavour's lift of the primary metric (what a truth-free run would see)
    primary = report.get("primary_metric", "opm")
    estimated = flavour != "estimated" and any(primary in v.get("estimated", {})
                                               for v in report["policies"].values())
    head = f"{'policy':<16}" + "".join(f"{m.upper():>10}" for m in metrics) + \
        "".join(f"  {m.upper() + ' lift vs static [CI]':<31}"
                for m in ("opm", "gpm", "ctr") if m in metrics) + \
        (f"  {'estimated ' + primary.upper() + ' lift [CI]':<31}" if estimated else "")
    lines = [f"{report['n_requests']} {report['split']} requests, {flavour} metrics, "
             f"top-{report['exposure_depth']} exposure, {report['config']['confidence']:.0%} paired "
             f"bootstrap CIs ({report['config']['bootstrap_samples']} resamples)", head, "-" * len(head)]

    def fmt(v: float | None) -> str:
        return "       n/a" if v is None or not math.isfinite(v) else f"{v:>10.4f}"

    def cell(p: str, flav: str, m: str) -> str:
        lift = lifts.get(p, {}).get(flav, {}).get(m)
        text = "(reference)" if p == "static" else "n/a" if not lift else \
            f"{100 * lift['lift']:+7.2f}% [{100 * lift['ci_low']:+6.2f}, {100 * lift['ci_high']:+6.2f}]"
        return f"  {text:<31}"

    for p, flav in report["policies"].items():
        row = f"{p:<16}" + "".join(fmt(flav.get(flavour, {}).get(m)) for m in metrics)
        row += "".join(cell(p, flavour, m) for m in ("opm", "gpm", "ctr") if m in metrics)
        lines.append(row + (cell(p, "estimated", primary) if estimated else ""))
    for m, c in report.get("comparisons", {}).items():
        if m == "oracle_above_all":
            lines.append("oracle above every policy: " + ", ".join(f"{k.upper()} {'yes' if v else 'NO'}"
                                                                 for k, v in c.items()))
        else:
            lines.append(f"{m} {flavour} OPM vs: " + ", ".join(_verdict(c, k.removeprefix("beats_"), v)
                                                             for k, v in c.items() if k.startswith("beats_")))
    lines.append(report["headroom_sentence"])
    return "\n".join(lines)
