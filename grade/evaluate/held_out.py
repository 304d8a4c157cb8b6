"""The evaluation's inputs: the held-out requests, the declared value, the value model, the flavours.

:func:`load_inputs` reads what every later stage of :mod:`grade.evaluate.evaluation` works on (a
:class:`HeldOut`): the held-out split, its breakdown segments, the declared business value and, given a
value model, the estimated flavour's inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grade.core import config, store
from grade.core.errors import InputError
from grade.data import dataset
from grade.data.simulator import SEGMENTS
from grade.value import auction, click_model, estimators
from grade.value.business import BusinessConfig
from grade.value.reward import RewardConfig
from grade.value.value_model import ValueModel, ValueModelConfig, build_value_model, load_value_model

if TYPE_CHECKING:
    from grade.evaluate.evaluation import EvaluateConfig

#: evaluate.estimator's value that picks the estimator from the logs (:func:`pick_estimator`)
AUTO_ESTIMATOR = "auto"

log = logging.getLogger("grade.evaluate.evaluation")


#: the report folder's subfolder holding the value model the evaluation fitted itself (no --outcome)
FITTED_VALUE_MODEL = "value_model"


def load_held_out(features_uri: str, cfg: EvaluateConfig) -> tuple[dict, dict[str, torch.Tensor]]:

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
    """The simulator's segment names by id."""
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


def content_hash_of(uri: str) -> str | None:
    try:
        return store.content_hash(uri)
    except store.NotPublished:
        return None


def obtain_value_model(features_uri: str, outcome_uri: str | None, cfg: ValueModelConfig,
                       scratch: Path) -> tuple[ValueModel, dict[str, Any], Path | None]:
    """(value model, report.json's value_model entry, folder to copy into the report or None).

    With ``outcome_uri`` the published value model is read; without it one is fitted on the features'
    train split into ``scratch`` and later published in the report folder's ``value_model/``.
    """
    if outcome_uri:
        vm = load_value_model(outcome_uri)
        info = {"uri": outcome_uri, "content_hash": content_hash_of(outcome_uri)}
        folder = None
    else:
        folder = scratch / FITTED_VALUE_MODEL
        t = time.monotonic()
        build_value_model(features_uri, str(folder), cfg)
        log.info("value model fitted on the train split in %.1fs (no --outcome given)", time.monotonic() - t)
        vm = load_value_model(str(folder))
        info = {"uri": "fitted", "where": f"{FITTED_VALUE_MODEL}/ in this report's folder",
                "content_hash": content_hash_of(str(folder))}
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
    if estimators.needs_model(name):
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in labels}
        for s in range(0, data["mask"].shape[0], batch_size):
            kinds = vm.item_kinds({k: data[k][s:s + batch_size] for k in ("z", "pred", "mask", "num", "cat")})
            c, order, gmv = kinds.double().unbind(-1)
            for k, v in (("clicks", c), ("orders", order), ("gmv", gmv),
                         ("value", business.item_value(c, order, gmv, unit))):
                parts[k].append(v)
        models = {k: torch.cat(v) for k, v in parts.items()}
    cascade = None
    if estimators.needs_cascade(name):
        attraction, models, continuation = click_model.cascade_inputs(vm.examination, data, models)
        cascade = estimators.CascadeInputs(attraction, continuation)
        if estimators.reads_logged_clicks(name):
            mask = data["mask"].bool()
            cascade = cascade._replace(
                logged_examination=click_model.logged_examination(attraction, data["position"], mask,
                                                                  continuation),
                click=f64["click"] * mask)
    return auction.EstimatorInputs(
        name=name, theta=vm.examination.theta_at(torch.arange(e)).double(),
        logged_theta=vm.examination.theta_at(data["position"]).double() * data["mask"],
        labels=labels, models=models, max_weight=max_weight, cascade=cascade)


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


def value_unit(held: HeldOut) -> float:
    """The GMV unit of the declared value: the value model's (train mean order value), else 1."""
    return held.value_model.order_value_unit if held.value_model is not None else 1.0


def pick_estimator(name: str, value_model: tuple[ValueModel, dict[str, Any]] | None) -> str:
    """The estimated flavour's estimator: ``name``, or for ``auto`` cascade_dr where the value model's
    comparison of click models says the valid clicks look like a cascade (grade.value.click_model), else
    ips (also without a value model or a comparison)."""
    if name != AUTO_ESTIMATOR:
        return name
    compared = {} if value_model is None else (value_model[0].examination.click_model or {})
    return "cascade_dr" if compared.get("looks_like") == "cascade" else "ips"


def max_weight_of(cfg: EvaluateConfig) -> float:
    """The weight clip of the estimated flavour's estimator: the inverse logged examination's of the
    estimators that read the logged clicks under the cascade (cascade_dr), else the IPS weights'."""
    cascade = estimators.reads_logged_clicks(cfg.estimator)
    return cfg.cascade_max_weight if cascade else cfg.estimator_max_weight


def load_inputs(features_uri: str, cfg: EvaluateConfig, reward: RewardConfig | None,
                business: BusinessConfig | None = None,
                value_model: tuple[ValueModel, dict[str, Any]] | None = None) -> HeldOut:
    """The held-out requests with the declared value and (given a value model) the estimated flavour's
    inputs."""
    spec, data = load_held_out(features_uri, cfg)
    business = config.check(business or BusinessConfig(), "business")
    held = HeldOut(features_uri, spec, data, cfg, reward, segment_ids(spec, data, cfg.segment_feature),
                   business)
    held.cfg = dataclasses.replace(cfg, estimator=pick_estimator(cfg.estimator, value_model))
    if value_model is not None:
        held.value_model, held.value_model_info = value_model
        if has_logged_feedback(data):
            held.estimator = estimator_inputs(data, held.value_model, business, held.cfg.estimator,
                                              max_weight_of(held.cfg), cfg.exposure_depth, cfg.batch_size)
    return held
