"""The evaluation's policies: the baselines, the named models and the incumbent rank the held-out requests.

Each baseline is one entry of :data:`BASELINES` (a function of the :class:`grade.evaluate.held_out.HeldOut`
inputs to a :class:`Ranking`); :func:`compute_policies` ranks with all of them and every named model and
keeps their per-request sums for the paired bootstrap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from grade.core import store
from grade.core.errors import InputError
from grade.data import dataset
from grade.data.fusion import ClickModel, truth_click_model
from grade.data.transform import FeatureTransform, clamp_unseen
from grade.evaluate.held_out import HeldOut, estimator_inputs, true_segment_labels, value_unit
from grade.model import registry
from grade.model.policy import load_policy, published_model
from grade.value import auction, baselines
from grade.value.reward import RewardConfig, rewarded_value

if TYPE_CHECKING:
    from grade.evaluate.evaluation import EvaluateConfig

log = logging.getLogger("grade.evaluate.evaluation")


def model_weights(uri: str, data: dict[str, torch.Tensor], spec: dict, batch_size: int) -> torch.Tensor:
    """Serving weights [N, K] of the policy at ``uri`` on the held-out requests.

    Only a published model folder is read, every file checked against its manifest (exit 2 otherwise).
    """
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
    return registry.production_model(registry_uri, model_name)


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


def truth_world(held: HeldOut) -> ClickModel:
    """The click model every true metric is computed under: the world's, as the features recorded it from
    the simulated logs (the config's eta, what the estimators assume, only for features without it)."""
    return truth_click_model(held.spec, held.cfg.position_bias)


def _static(held: HeldOut) -> Ranking:
    return Ranking(weights=baselines.static_weights(held.spec))


def _best_static(held: HeldOut) -> Ranking | None:

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
    t = time.monotonic()
    w = baselines.oracle_weights(held.data, depth=cfg.exposure_depth, eta=truth_world(held),
                                 value=oracle_value(held), n_candidates=cfg.oracle_candidates, seed=cfg.seed)
    log.info("oracle weights in %.1fs", time.monotonic() - t)
    return Ranking(weights=w)


def oracle_value(held: HeldOut) -> str | tuple[float, float, float]:
    """What the oracle maximises: the declared value (price in raw units) or one named kind."""
    if held.cfg.oracle_value != "declared":
        return held.cfg.oracle_value
    return held.business.prices(value_unit(held))


def _segment_best(held: HeldOut) -> Ranking | None:
    """Best static weights per true segment, searched with the truth on VALID (a ceiling diagnostic)."""
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
                                          held.business.prices(value_unit(held)),
                                          cfg.exposure_depth, truth_world(held), cfg.frontier_steps)
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
    world = truth_world(held)
    runs = PolicyRuns(auction.SumsTable(auction.shared_sums(data, cfg.exposure_depth, world, held.estimator)),
                      {}, {}, model_info)
    mix = held.business.primary_metric == "vpm"
    value_weights = held.business.prices(value_unit(held)) if mix else None
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
            eta=world, chunk=cfg.batch_size, estimator=estimator, value_weights=value_weights))
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
