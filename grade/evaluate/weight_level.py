"""The evaluation's weight-level section: every weight policy's lift vs static, estimated over the served
weights (grade.value.weight_ips), when the held-out logs carry served weights and their propensities.

Each policy is deterministic (its weights per request), so its density ratio is kernel-smoothed:
Dir(1 + concentration * w) around its weights (docs/estimators.md, "Lifts vs static at the weight
level"); the doubly robust form takes the deterministic part from the direct method (the value model's,
``cascade_dm`` where the evaluation judges with it) and only the residual from the smoothed ratio.
"""

from __future__ import annotations

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
TARGET_CONCENTRATION = 200.0
#: the form the estimator check and the gate read
FORM = "weight_dr"


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


def section(held: HeldOut, weights: dict[str, torch.Tensor], concentration: float = TARGET_CONCENTRATION,
            clip: float = math.inf) -> dict[str, Any] | None:
    """report.json's ``weight_level``: every form's value and lift vs static of each weight policy
    (``weights``: name -> [N, K], static among them), None unless the logs carry propensities."""
    d, cfg = held.data, held.cfg
    if not weight_ips.has_propensities(d) or "static" not in weights:
        return None
    depth = min(cfg.exposure_depth, d["mask"].shape[1])
    unit = value_unit(held)
    item_value = held.business.item_value(d["click"].double(), d["order"].double(), d["gmv"].double(), unit)
    realised = weight_ips.realised_value(item_value, d["position"], depth)
    served_w, log_q = served_in_z(held)
    inputs, dm_logged = None, None
    if held.value_model is not None:
        name = "cascade_dm" if cfg.estimator == "cascade_dm" else "dm"
        inputs = estimator_inputs(d, held.value_model, held.business, name, math.inf, depth, cfg.batch_size)
        logged = top_e(baselines.logged_scores(d).masked_fill(~d["mask"], float("-inf")), depth)
        dm_logged = _dm_values(held, inputs, logged)
    columns, clipped = {}, {}
    for policy, w in weights.items():
        dm_new = None if inputs is None else _dm_values(held, inputs, _ranked(d, w, depth))
        log_kernel = weight_ips.kernel_log_density(w, served_w, concentration)
        columns[policy], clipped[policy] = weight_ips.policy_columns(log_kernel, log_q, realised, clip,
                                                                      dm_new, dm_logged)
    forms = [f for f, (reads_dm, _) in weight_ips.FORMS.items() if inputs is not None or not reads_dm]
    explored = torch.isfinite(d["served_log_propensity"])
    return {"estimator": FORM if FORM in forms else forms[0], "concentration": concentration, "clip": clip,
            "direct_method": None if inputs is None else inputs.name,
            "n_explored": int(explored.sum()), "explored_share": float(explored.double().mean()),
            "clipped_share": clipped, "support": {p: weight_ips.support(c) for p, c in columns.items()},
            "lift_vs_static": weight_ips.lifts_vs(columns, "static", forms, cfg.bootstrap_samples,
                                                  cfg.confidence, cfg.seed)}
