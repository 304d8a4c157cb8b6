"""The evaluation's weight-level section: every weight policy's lift vs static, estimated over the served
weights (grade.value.weight_ips), when the held-out logs carry served weights and their propensities.

Each policy is deterministic (its weights per request), so its density ratio is kernel-smoothed:
Dir(1 + concentration * w) around its weights (docs/estimators.md, "Lifts vs static at the weight
level"); the doubly robust form takes the deterministic part from the direct method (the value model's,
``cascade_dm`` where the evaluation judges with it) and only the residual from the smoothed ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import pyarrow as pa
import torch

from grade.data.fusion import fuse, top_e
from grade.data.raw_logs import hash_strings
from grade.data.served import STATIC_VERSION
from grade.evaluate.held_out import HeldOut, estimator_inputs, value_unit
from grade.value import baselines, weight_ips
from grade.value.estimators import cascade_kwargs, ranking_value

#: the kernel's concentration around a deterministic policy's weights (chosen on the valid splits of
#: the coverage measurement, docs/estimators.md)
TARGET_CONCENTRATION = 25.0
#: ratios are clipped here (DR then leans on the direct method where a kernel reaches past the logs;
#: chosen with the concentration)
RATIO_CLIP = 20.0
#: the form the estimator check reads
FORM = "weight_dr"
#: a policy's kernel is supported when its mean ratio over the explored requests (1 in expectation under
#: overlap) lies within these bounds and its ratios' effective sample size reaches MIN_ESS: otherwise
#: its lift is marked unsupported and the estimator check leaves it out (chosen on the valid splits,
#: docs/estimators.md)
MEAN_RATIO_BOUNDS = (0.8, 1.25)
MIN_ESS = 50.0


def supported(support: dict[str, float]) -> bool:
    """Whether a policy's kernel lies where the logging policy drew (:data:`MEAN_RATIO_BOUNDS`,
    :data:`MIN_ESS`)."""
    low, high = MEAN_RATIO_BOUNDS
    return low <= support["mean_ratio"] <= high and support["ess"] >= MIN_ESS


@functools.lru_cache(maxsize=1)
def static_version_hash() -> int:
    """The model_version tensor's value of requests served by the static fusion."""
    return int(hash_strings(pa.array([STATIC_VERSION]))[0])


def _dm_values(held: HeldOut, inputs, idx: torch.Tensor) -> torch.Tensor:
    """The direct method's declared value [N] of rankings idx [N, E]."""
    out = []
    for s in range(0, idx.shape[0], held.cfg.batch_size):
        rows = slice(s, s + held.cfg.batch_size)
        est = ranking_value(inputs.name, idx[rows].unsqueeze(1), inputs.theta, inputs.logged_theta[rows],
                            inputs.labels["value"][rows], inputs.models["value"][rows],
                            **cascade_kwargs(inputs.cascade, rows))
        out.append(est.value[:, 0].double())
    return torch.cat(out)


def _ranked(data: dict[str, torch.Tensor], weights: torch.Tensor, depth: int) -> torch.Tensor:
    w = weights.to(data["z"].dtype).expand(data["mask"].shape[0], -1)
    return top_e(fuse(data["z"], w, data["mask"]), depth)


def served_in_z(held: HeldOut) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out served weights and log-propensities in the policies' weight space (on z)."""
    d = held.data
    version = d.get("model_version")
    static_rows = (version == static_version_hash()) if version is not None else \
        torch.zeros(d["served_w"].shape[0], dtype=torch.bool)
    log_std = torch.tensor([float(x) for x in held.spec["pred_log_std"]], dtype=torch.float64)
    return weight_ips.on_standardised(d["served_w"], d["served_log_propensity"], static_rows, log_std)


@dataclasses.dataclass
class Inputs:
    """What every kernel and clip reads: the logs' side and the direct method's values of each policy."""

    realised: torch.Tensor
    """[N] the declared value of the logged labels in the top E"""
    served_w: torch.Tensor
    """[N, K] the served weights on z"""
    log_q: torch.Tensor
    """[N] their log-propensities on z (NaN: served the mean)"""
    dm_name: str | None
    """the direct method (dm or cascade_dm), None without a value model"""
    dm_logged: torch.Tensor | None
    """[N] its value of the logged ranking"""
    dm_new: dict[str, torch.Tensor]
    """policy -> [N] its value of the policy's ranking"""


def inputs_of(held: HeldOut, weights: dict[str, torch.Tensor]) -> Inputs:
    d, cfg = held.data, held.cfg
    depth = min(cfg.exposure_depth, d["mask"].shape[1])
    item_value = held.business.item_value(d["click"].double(), d["order"].double(), d["gmv"].double(),
                                          value_unit(held))
    served_w, log_q = served_in_z(held)
    out = Inputs(weight_ips.realised_value(item_value, d["position"], depth), served_w, log_q, None, None, {})
    if held.value_model is not None:
        name = "cascade_dm" if cfg.estimator == "cascade_dm" else "dm"
        est = estimator_inputs(d, held.value_model, held.business, name, math.inf, depth, cfg.batch_size)
        logged = top_e(baselines.logged_scores(d).masked_fill(~d["mask"], float("-inf")), depth)
        out.dm_name, out.dm_logged = name, _dm_values(held, est, logged)
        out.dm_new = {p: _dm_values(held, est, _ranked(d, w, depth)) for p, w in weights.items()}
    return out


def section(held: HeldOut, weights: dict[str, torch.Tensor], concentration: float = TARGET_CONCENTRATION,
            clip: float = RATIO_CLIP, inputs: Inputs | None = None) -> dict[str, Any] | None:
    """report.json's ``weight_level``: every form's value and lift vs static of each weight policy
    (``weights``: name -> [N, K], static among them), None unless the logs carry propensities.
    ``inputs``: :func:`inputs_of` (computed here when not given)."""
    d, cfg = held.data, held.cfg
    if not weight_ips.has_propensities(d) or "static" not in weights:
        return None
    x = inputs or inputs_of(held, weights)
    columns, clipped = {}, {}
    for policy, w in weights.items():
        log_kernel = weight_ips.kernel_log_density(w, x.served_w, concentration)
        columns[policy], clipped[policy] = weight_ips.policy_columns(log_kernel, x.log_q, x.realised, clip,
                                                                      x.dm_new.get(policy), x.dm_logged)
    forms = [f for f, (reads_dm, _) in weight_ips.FORMS.items() if x.dm_name is not None or not reads_dm]
    explored = torch.isfinite(x.log_q)
    support = {p: weight_ips.support(c) for p, c in columns.items()}
    lifts = weight_ips.lifts_vs(columns, "static", forms, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    for by_policy in lifts.values():
        for p, lift in by_policy.items():
            # a lift is a ratio to static's value: both kernels must lie where the logs are
            if p != "static" and not (supported(support[p]) and supported(support["static"])):
                lift["unsupported"] = True
    return {"estimator": FORM if FORM in forms else forms[0], "concentration": concentration, "clip": clip,
            "direct_method": x.dm_name, "n_explored": int(explored.sum()),
            "explored_share": float(explored.double().mean()), "clipped_share": clipped,
            "support": support, "lift_vs_static": lifts}
