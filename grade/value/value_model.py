"""The value model: everything that says what a ranking of a logged request is worth, in one folder.

``python -m components.outcome --features URI --out URI`` fits it on the train split and publishes

- ``examination.json``: the examination curve theta (estimated from the logs, or an assumed power law);
- ``outcome.safetensors`` + ``outcome.json``: the outcome model (:mod:`grade.value.outcome`);
- ``value.json``: the unit of GMV in the declared business value (the train mean order value);
- ``calibration.json``: the outcome model's calibration on the valid split next to the raw MTL
  predictions' (click and order probabilities at the logged positions);
- ``config.json``, ``metrics.json``, ``train_log.jsonl``.

Fine-tuning's reward, best_static's search and the evaluation's ``estimated`` flavour all read it, so
they agree on theta and on what one unit of value is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import torch

from grade.core import config as config_mod
from grade.core import store
from grade.core.config import ranged
from grade.data import dataset
from grade.data.transform import objective_index
from grade.model import training
from grade.value.business import BusinessConfig, in_value_units
from grade.value.click_model import compare_click_models
from grade.value.examination import ExaminationConfig, ExaminationEstimate, fit_curves
from grade.value.outcome import (
    OutcomeConfig,
    OutcomeMixture,
    OutcomeNet,
    calibration,
    expected_kinds,
    fit_outcomes,
    load_outcome_from,
    mean_order_value,
    save_outcome,
)

log = logging.getLogger(__name__)

@dataclasses.dataclass
class ValueModelConfig:
    examination: ExaminationConfig = dataclasses.field(default_factory=ExaminationConfig)
    """how theta is estimated from the logs (position-based click likelihood)"""
    fixed_eta: float = ranged(0.0, "[0, 10]", derived="eta:fixed")
    """> 0: assume theta_j = (1+j)^-fixed_eta instead of estimating it (logs without position noise); set by
    shared.eta_mode: fixed with shared.eta"""
    outcome: OutcomeConfig = dataclasses.field(default_factory=OutcomeConfig)
    """the outcome model and its training"""
    calibration_max_requests: int = ranged(20000, "[1, 1e8]", retired=True)
    """valid requests used for early stopping and the calibration report"""


@dataclasses.dataclass
class ValueModel:
    """A loaded value model: theta, the outcome model, the GMV unit."""

    examination: ExaminationEstimate
    outcome: OutcomeNet | OutcomeMixture
    order_value_unit: float
    """the train mean order value: GMV in the declared value is counted in this unit"""

    def theta(self, depth: int) -> torch.Tensor:
        """theta-hat of the positions 0..depth-1 [depth] float32."""
        return self.examination.theta_at(torch.arange(depth))

    @torch.no_grad()
    def item_outcomes(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"ctr", "cvr", "value"} per item [B, L] (see :class:`grade.value.outcome.OutcomeNet`)."""
        return self.outcome.item_outcomes(batch)

    @torch.no_grad()
    def item_kinds(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expected clicks, orders and GMV (raw units) of an examined item [B, L, 3]
        (:func:`expected_kinds` of the outcome model)."""
        return expected_kinds(self.item_outcomes(batch))

    @torch.no_grad()
    def item_value(self, batch: dict[str, torch.Tensor], business: BusinessConfig) -> torch.Tensor:
        """The declared value of an examined item [B, L]: v_c ctr + v_o ctr cvr + v_g ctr cvr value / unit."""
        clicks, orders, gmv = self.item_kinds(batch).unbind(-1)
        return business.item_value(clicks, orders, gmv, self.order_value_unit)


def value_fields(batch: dict[str, torch.Tensor], vm: ValueModel, with_model: bool = True
                 ) -> dict[str, torch.Tensor]:
    """What the estimators need per item beyond a feature batch, for any declared value: ``logged_theta``
    [B, L] (theta-hat at the logged position), ``label_kinds`` [B, L, 3] (the logged clicks, orders and GMV
    in units of the train mean order value, 0 at padding) and, ``with_model``, ``model_kinds`` [B, L, 3]
    (the outcome model's expected clicks, orders and GMV of the examined item, same units).
    :func:`priced_fields` turns them into one value per item."""
    mask = batch["mask"]
    unit = vm.order_value_unit
    labels = in_value_units(torch.stack([batch["click"], batch["order"], batch["gmv"]], dim=-1), unit)
    out = {"logged_theta": vm.examination.theta_at(batch["position"]).masked_fill(~mask, 0.0),
           "label_kinds": labels.to(torch.float32).masked_fill(~mask.unsqueeze(-1), 0.0)}
    if with_model:
        out["model_kinds"] = in_value_units(vm.item_kinds(batch), unit)
    return out


def priced_fields(fields: dict[str, torch.Tensor], business: BusinessConfig) -> dict[str, torch.Tensor]:
    """The fields of grade.value.reward.estimated_value [B, L] for one value: ``logged_theta``,
    ``label_value`` and (with ``model_kinds``) ``model_value``: the kinds (GMV in value units) priced by
    ``business``."""
    prices = torch.tensor(business.prices(), dtype=fields["label_kinds"].dtype)
    out = {"logged_theta": fields["logged_theta"], "label_value": fields["label_kinds"] @ prices}
    if "model_kinds" in fields:
        out["model_value"] = fields["model_kinds"] @ prices.to(fields["model_kinds"].dtype)
    return out


def examination_of(train: dict[str, torch.Tensor], cfg: ValueModelConfig,
                   valid: dict[str, torch.Tensor] | None = None) -> ExaminationEstimate:
    """theta: assumed (``fixed_eta`` > 0) or estimated from the train split's clicks; with ``valid``, each
    curve's valid likelihood (``method: auto`` chooses by it) and the cascade fit against the chosen one."""
    if cfg.fixed_eta > 0:
        return ExaminationEstimate.fixed(cfg.fixed_eta, cfg.examination.depth)
    est, fits = fit_curves(train, cfg.examination, valid)
    log.info("examination: eta %.3f from %d clicks (%s fit, by %s; free theta_1..3 %s)", est.eta,
             est.n_clicks, est.method, est.selected_by, [round(t, 3) for t in est.theta_free[1:4]])
    if valid is not None:
        est.click_model = compare_click_models(train, valid, cfg.examination, est, fits)
        cm = est.click_model
        log.info("click model: the valid clicks look %s (cascade minus position-based log-likelihood "
                 "%+.4f per request, Vuong z %.1f; continue after a click %.3f, after a skip %.3f)",
                 cm["looks_like"], cm["log_lr_per_request"], cm["vuong_z"], cm["cascade"]["continue_click"],
                 cm["cascade"]["continue_skip"])
    return est


def calibration_report(model: OutcomeNet | OutcomeMixture, exam: ExaminationEstimate,
                       valid: dict[str, torch.Tensor], objectives: list[str]) -> dict[str, Any]:
    """Click and order calibration at the logged positions: the outcome model next to the raw MTL model."""
    mask = valid["mask"]
    theta = exam.theta_at(valid["position"])
    with torch.no_grad():
        o = model.item_outcomes(valid)
    out: dict[str, Any] = {"n_requests": int(mask.shape[0]), "n_items": int(mask.sum())}
    obj = objective_index(objectives)
    mtl = {}
    if "ctr" in obj:
        mtl["click"] = valid["pred"][..., obj["ctr"]]
        if "cvr" in obj:
            mtl["order"] = mtl["click"] * valid["pred"][..., obj["cvr"]]
    kinds = expected_kinds(o)
    ours = {"click": kinds[..., 0], "order": kinds[..., 1]}
    for label, probs in ours.items():
        out[label] = {"outcome": calibration((theta * probs)[mask], valid[label][mask])}
        if label in mtl:
            out[label]["mtl"] = calibration((theta * mtl[label].clamp(0, 1))[mask], valid[label][mask])
    return out


def fit_value_model(features_uri: str, cfg: ValueModelConfig) -> tuple[ValueModel, dict[str, Any]]:
    """Estimate theta and fit the outcome model on the train split; calibration on valid. (model, metrics)"""
    config_mod.check(cfg, "value_model")
    t0 = time.monotonic()
    spec = dataset.load_spec(features_uri)
    train = dataset.load_split(features_uri, "train")
    valid = None
    if spec["splits"].get("valid", {}).get("n_requests", 0) > 0:
        valid = dataset.load_split(features_uri, "valid")
        valid = {k: v[: cfg.calibration_max_requests] for k, v in valid.items()}
    exam = examination_of(train, cfg, valid)
    model, history = fit_outcomes(train, spec, exam, cfg.outcome, valid)
    unit = mean_order_value(train["gmv"], train["order"], train["mask"])
    metrics: dict[str, Any] = {"examination": exam.to_json(), "order_value_unit": unit,
                               "n_train_requests": int(train["mask"].shape[0]), "history": history}
    del train
    if valid is not None:
        metrics["calibration"] = calibration_report(model, exam, valid, spec["objectives"])
    metrics["elapsed_s"] = round(time.monotonic() - t0, 2)
    return ValueModel(examination=exam, outcome=model, order_value_unit=unit), metrics


def build_value_model(features_uri: str, out_uri: str, cfg: ValueModelConfig) -> dict[str, Any]:
    """:func:`fit_value_model`, then publish the value-model folder at ``out_uri``; the metrics."""
    vm, metrics = fit_value_model(features_uri, cfg)
    spec = dataset.load_spec(features_uri)
    config = {"features": features_uri, "features_content_hash": store.content_hash(features_uri),
              "outcome": dataclasses.asdict(cfg)}
    training.publish_model(out_uri, vm.outcome, spec, config, metrics,
                           [json.dumps(r, sort_keys=True) + "\n" for r in metrics["history"]],
                           save=save_outcome,
                           extra={"examination.json": metrics["examination"],
                                  "value.json": {"order_value_unit": vm.order_value_unit},
                                  "calibration.json": metrics.get("calibration", {})})
    return metrics


def load_value_model(uri: str) -> ValueModel:
    """The value model published at ``uri`` (verified against its manifest; never unpickled)."""
    with store.fetched(uri) as folder:  # an S3 download is removed once the model is in memory
        exam_json = json.loads((folder / "examination.json").read_text())
        fields = {f.name for f in dataclasses.fields(ExaminationEstimate)}
        exam = ExaminationEstimate(**{k: v for k, v in exam_json.items() if k in fields})
        unit = float(json.loads((folder / "value.json").read_text())["order_value_unit"])
        return ValueModel(examination=exam, outcome=load_outcome_from(folder), order_value_unit=unit)
