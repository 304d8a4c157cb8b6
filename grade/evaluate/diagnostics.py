"""Diagnostics from the logs: does the held-out data meet what the truth-free judgement assumes?

Each check is one plain function returning a check dict (report.json's ``diagnostics.checks``):

    {"name": str, "status": "pass" | "warn" | "fail", "value": float | None, "threshold": str,
     "sentence": str, "policy": str | None}

A ``fail`` means the estimated flavour cannot be trusted on these logs (the promotion gate then refuses
to judge on it); a ``warn`` is shown and never blocks. What each check measures, its threshold and what
to do when it fails: docs/estimators.md, "Diagnostics". The ideas: θ is identified only where the logging
policy moves comparable items across positions (intervention harvesting, Agarwal et al. 2019; Fang et
al. 2019); an estimate is only as good as the logged support of what the new ranking shows (the overlap
condition of off-policy evaluation, as in OBP).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from grade.core.config import ranged
from grade.data.fusion import fuse, simplex_grid, top_e
from grade.value.examination import ExaminationEstimate

if TYPE_CHECKING:
    from grade.evaluate.held_out import HeldOut
    from grade.evaluate.policies import PolicyRuns

log = logging.getLogger("grade.evaluate.evaluation")

STATUSES = ("pass", "warn", "fail")
CHECK_KEYS = ("name", "status", "value", "threshold", "sentence", "policy")
#: requests the reference ranking score is fitted on (the first ones: deterministic)
REFERENCE_REQUESTS = 1000
#: the primary metric -> the estimator label of its kind
PRIMARY_KIND = {"ctr": "clicks", "opm": "orders", "gpm": "gmv", "vpm": "value"}
#: warn below: share of a served market's logged requests whose weights were drawn (explored)
MIN_EXPLORED_SHARE = 0.05
#: policies a per-policy failure is about: what the gate compares (others can only warn)
JUDGED = ("static", "incumbent")


@dataclasses.dataclass
class DiagnosticsConfig:
    min_position_variation: float = ranged(0.02, "[0, 1]")
    """fail below: share of neighbouring logged items (positions < 2E) in another order than the fixed score
    that best reproduces the logged rankings (theta is identified only if comparable items move)"""
    theta_floor: float = ranged(0.01, "[0, 1)")
    """fail when theta-hat at the last exposed position is below this (a degenerate fit: deep slots unseen)"""
    max_truncated_share: float = ranged(0.5, "[0, 1]")
    """fail above: share of requests whose logged list holds no more than E candidates"""
    support_floor: float = ranged(0.05, "[0, 1)")
    """an item logged where theta-hat is below this (deep or not logged) has little support"""
    max_low_support_share: float = ranged(0.25, "[0, 1]")
    """fail above: share of a judged policy's value (outcome model, primary kind) on low-support items"""
    min_logging_randomness: float = ranged(0.1, "[0, 1]")
    """warn below: share of requests whose logged top-E set differs from the reference score's"""


def check(name: str, status: str, value: float | None, threshold: str, sentence: str,
          policy: str | None = None) -> dict[str, Any]:
    """One check dict of the agreed schema (ValueError on a status outside STATUSES)."""
    if status not in STATUSES:
        raise ValueError(f"diagnostic {name}: status {status!r} not in {STATUSES}")
    return {"name": name, "status": status, "value": None if value is None else float(value),
            "threshold": threshold, "sentence": sentence, "policy": policy}


def graded(low_is_bad: bool, value: float, threshold: float) -> str:
    """fail beyond the threshold, warn within a factor of two of it on the safe side, else pass."""
    if low_is_bad:
        return "fail" if value < threshold else "warn" if value < 2 * threshold else "pass"
    return "fail" if value > threshold else "warn" if value > threshold / 2 else "pass"


# ------------------------------------------------------------------------------------------------
# The logging policy: how far the logged rankings are from one fixed score
# ------------------------------------------------------------------------------------------------

def adjacent_swaps(scores: torch.Tensor, position: torch.Tensor, mask: torch.Tensor,
                   depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(swapped, pairs) [...]: per scoring (scores [N, L] or [N, G, L]), the neighbouring logged pairs
    (positions p, p + 1 < ``depth``) whose logged order the score reverses, and how many pairs there were."""
    logged = mask & (position >= 0) & (position < depth)
    slot = torch.where(logged, position, torch.full_like(position, depth))
    order = torch.argsort(slot, dim=-1, stable=True)[..., :depth]           # items by logged position
    pos = torch.gather(slot, 1, order)
    pair = (pos[:, :-1] + 1 == pos[:, 1:]) & (pos[:, 1:] < depth)            # [N, depth - 1]
    if scores.dim() == 3:
        order = order.unsqueeze(1).expand(-1, scores.shape[1], -1)
        pair = pair.unsqueeze(1)
    s = torch.gather(scores, -1, order)
    swapped = ((s[..., :-1] < s[..., 1:]) & pair).sum((0, -1))
    return swapped, pair.sum((0, -1)).expand_as(swapped)


def swap_share(data: dict[str, torch.Tensor], weights: torch.Tensor, depth: int) -> float:
    """Share of neighbouring logged pairs (positions < ``depth``) that the fused score of ``weights`` ([K] or
    [N, K]) orders the other way (NaN without such pairs)."""
    n = data["mask"].shape[0]
    swapped, pairs = adjacent_swaps(fuse(data["z"], weights.to(data["z"].dtype).expand(n, -1), data["mask"]),
                                    data["position"], data["mask"], depth)
    return float(swapped) / float(pairs) if int(pairs) else float("nan")


def reference_ranking(data: dict[str, torch.Tensor], static: torch.Tensor, policies: dict[str, torch.Tensor],
                      depth: int) -> tuple[str, torch.Tensor]:
    """(what it is, weights [K] or [N, K]) of the scoring closest to the logging policy: of the global
    weights (static and a simplex grid) and the evaluated ``policies`` (name -> weights [N, K]), the one
    that reverses the fewest neighbouring logged pairs (positions < ``depth``) of the first
    REFERENCE_REQUESTS requests. A policy's own logs (a model in production logging its mean ranking)
    are reproduced by that policy."""
    k, n = static.shape[0], min(REFERENCE_REQUESTS, data["mask"].shape[0])
    head = {key: data[key][:n] for key in ("z", "mask", "position")}
    grid = torch.cat([static.unsqueeze(0), simplex_grid(k, 20 if k <= 3 else 6)])
    swapped, _ = adjacent_swaps(fuse(head["z"], grid.unsqueeze(0).expand(n, -1, -1), head["mask"]),
                                head["position"], head["mask"], depth)
    best = grid[int(torch.argmin(swapped))]  # the first best: static wins ties
    found = ("one fixed ranking score", best, swap_share(head, best, depth))
    for name, w in policies.items():
        share = swap_share(head, w[:n], depth)
        if share < found[2]:
            found = (f"{name}'s ranking", w, share)
    return found[0], found[1]


def position_variation(data: dict[str, torch.Tensor], reference: tuple[str, torch.Tensor], exposure: int,
                       threshold: float, theta_estimated: bool) -> dict[str, Any]:
    """Share of neighbouring logged items (positions < 2E) that the reference ranking (what it is, weights
    [K] or [N, K]: :func:`reference_ranking`) orders the other way.

    Near 0, the logging ranking is a fixed function of the item scores: position and item are collinear
    and theta cannot be identified from clicks (fail, when theta is estimated; with an assumed theta a
    warning: the estimators themselves need only theta, not the variation)."""
    what, weights = reference
    value = swap_share(data, weights, 2 * exposure)
    if value != value:
        return check("position_variation", "warn", None, f">= {threshold:g}",
                     "No neighbouring logged positions in the held-out requests: position variation cannot "
                     "be measured.")
    status = graded(True, value, threshold)
    if status == "fail" and not theta_estimated:
        status = "warn"
    sentence = (f"{value:.1%} of neighbouring logged items are in another order than {what} gives them, so "
                f"comparable items do move across positions and theta can be estimated."
                if status == "pass" else
                f"Only {value:.2%} of neighbouring logged items are in another order than {what} gives them: "
                f"the logging ranking is (nearly) deterministic, so the examination curve theta is "
                f"{'not ' if status == 'fail' else 'barely '}identified by the logged clicks; randomise the "
                f"logging ranking (per-request weight noise) or assume theta with shared.eta_mode: fixed and "
                f"an eta measured elsewhere.")
    return check("position_variation", status, value, f">= {threshold:g}", sentence)


def logging_randomness(data: dict[str, torch.Tensor], reference: tuple[str, torch.Tensor], exposure: int,
                       threshold: float) -> dict[str, Any]:
    """Share of the requests with more than E candidates whose logged top-E items (as a set) differ from
    the reference ranking's top E; warns when near-deterministic (never fails: position_variation judges
    identification)."""
    what, weights = reference
    mask, position = data["mask"], data["position"]
    e = min(exposure, mask.shape[1])
    ref = top_e(fuse(data["z"], weights.to(data["z"].dtype).expand(mask.shape[0], -1), mask), e)
    logged = mask & (position >= 0) & (position < e)
    in_ref = torch.zeros_like(mask).scatter_(1, ref, True) & mask
    choice = mask.sum(-1) > e  # a list of at most E items has one top-E set whatever the ranking
    if not bool(choice.any()):
        return check("logging_randomness", "warn", None, f">= {threshold:g}",
                     f"No request logs more than {e} candidates: the logging's randomness cannot be "
                     f"measured.")
    value = float(((in_ref != logged).any(-1))[choice].double().mean())
    status = "warn" if value < threshold else "pass"
    sentence = (f"{value:.1%} of requests show another top {e} than {what}: the logging ranking is "
                f"randomised." if status == "pass" else
                f"Only {value:.1%} of requests show another top {e} than {what}: the logging ranking is "
                f"near-deterministic, so the logs say little about rankings that differ from it; add "
                f"per-request randomisation to the logging policy.")
    return check("logging_randomness", status, value, f">= {threshold:g}", sentence)


# ------------------------------------------------------------------------------------------------
# The examination curve and the lists
# ------------------------------------------------------------------------------------------------

def theta_degenerate(exam: ExaminationEstimate, exposure: int, floor: float,
                     eta_bound: float = 10.0) -> dict[str, Any]:
    """theta-hat at the last exposed position below ``floor``, or eta-hat at or past shared.eta's bounds
    [0, ``eta_bound``] (a fit that puts every click on the top slots, or none on them): fail. A fit that
    did not converge: warn. An assumed theta (method "fixed") passes."""
    threshold = f"theta[{exposure - 1}] >= {floor:g}, eta in (0, {eta_bound:g})"
    last = float(exam.theta_at(torch.tensor([exposure - 1]))[0])
    if exam.method == "fixed":
        return check("theta_degenerate", "pass", last, threshold,
                     f"theta is assumed (shared.eta_mode: fixed, eta {exam.eta:g}), not estimated.")
    eta = exam.eta
    if not last >= floor or not 0 < eta < eta_bound:
        return check("theta_degenerate", "fail", last, threshold,
                     f"The estimated examination curve is degenerate (eta {eta:.3g}, theta at position "
                     f"{exposure} {last:.2g}): the logged clicks sit almost only on the top slots (or ignore "
                     f"position), so the estimates divide by ~0; check the logged positions and clicks, or "
                     f"assume theta with shared.eta_mode: fixed.")
    if not all(exam.converged.values()):
        return check("theta_degenerate", "warn", last, threshold,
                     f"The examination fit did not converge ({exam.converged}): theta-hat (eta {eta:.3g}) "
                     f"may be off; compare it with the free per-position curve in the value model.")
    return check("theta_degenerate", "pass", last, threshold,
                 f"theta-hat is a proper curve (eta {eta:.3g}, theta at position {exposure} {last:.3g}).")


def truncated_lists(mask: torch.Tensor, exposure: int, threshold: float) -> dict[str, Any]:
    """Share of requests whose logged list has no more than E candidates: a re-ranking of those can only
    reorder what was shown, and items the logging policy did not show have no logged position."""
    value = float((mask.sum(-1) <= exposure).double().mean())
    status = graded(False, value, threshold)
    sentence = (f"{value:.1%} of requests log at most {exposure} candidates: the lists are long enough to "
                f"re-rank." if status == "pass" else
                f"{value:.1%} of requests log at most {exposure} candidates (the exposure depth): the logs "
                f"look truncated to what was shown, so a new ranking has little to choose from and unshown "
                f"candidates cannot be valued; log the whole candidate list with each item's position.")
    return check("truncated_lists", status, value, f"<= {threshold:g}", sentence)


def served_exploration(data: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """For logs of a served model (the log contract's served weights present): the share of requests
    whose served weights were drawn by exploration (a logged propensity). None (a share of 0) means the
    logs are the model's own deterministic ranking: fail; below MIN_EXPLORED_SHARE: warn. None for logs
    without served weights (a randomised static logging policy, or logs that do not say)."""
    weights, log_p = data.get("served_w"), data.get("served_log_propensity")
    if weights is None or log_p is None or weights.shape[0] != data["mask"].shape[0] or not len(log_p):
        return None
    value = float(torch.isfinite(log_p).double().mean())
    status = "fail" if value == 0 else "warn" if value < MIN_EXPLORED_SHARE else "pass"
    sentence = (f"{value:.1%} of the logged requests were served explored weights with a logged propensity."
                if status == "pass" else
                f"only {value:.1%} of the logged requests were served explored weights: the logs are (almost "
                f"all) the serving model's own deterministic ranking, which the position-based estimators "
                f"read as if candidates had moved at random, so they over-rate what that model ranks high; "
                f"serve with exploration (serve.explore.share > 0) and judge on the logs it writes.")
    return check("served_exploration", status, value, f"> 0 (warn below {MIN_EXPLORED_SHARE:g})", sentence)


# ------------------------------------------------------------------------------------------------
# Support: where a policy's value comes from
# ------------------------------------------------------------------------------------------------

def low_support_share(idx: torch.Tensor, theta: torch.Tensor, logged_theta: torch.Tensor,
                      item_value: torch.Tensor, mask: torch.Tensor, floor: float) -> float:
    """Share of a ranking's value sum_j theta_j m_{pi(j)} on items logged where theta-hat < ``floor``.

    idx [N, E] the ranking, theta [E], logged_theta, item_value (the outcome model's expected value of
    the examined item), mask [N, L]. Priced by the model, not by the logged labels: IPS gives an unlogged
    item 0 and a deep one a huge weight, so it would hide the share this measures."""
    real = torch.gather(mask, 1, idx)
    value = theta.to(torch.float64) * torch.gather(item_value.to(torch.float64), 1, idx) * real
    low = torch.gather(logged_theta.to(torch.float64), 1, idx) < floor
    total = float(value.sum())
    return float((value * low).sum()) / total if total > 0 else 0.0


def low_support(policy: str, share: float, threshold: float, floor: float, judged: bool) -> dict[str, Any]:
    """The low_support check of one policy: fail above ``threshold`` for a policy the gate compares
    (``judged``), warn for the other baselines."""
    status = graded(False, share, threshold)
    if status == "fail" and not judged:
        status = "warn"
    sentence = (f"{share:.1%} of {policy}'s value comes from items the logs barely examined."
                if status == "pass" else
                f"{share:.1%} of {policy}'s value comes from items logged where theta-hat is below {floor:g} "
                f"(deep or unlogged), so its estimate rests on items the logs barely saw (e.g. logs written "
                f"by another policy's ranking); evaluate on logs with a randomised or {policy}-like logging "
                f"ranking, or with ground truth.")
    return check("low_support", status, share, f"<= {threshold:g}", sentence, policy)


def policy_rankings(held: HeldOut, runs: PolicyRuns) -> dict[str, torch.Tensor]:
    """Top-E item indices [N, E] of every policy the evaluation ranked (weight policies and logged)."""
    from grade.value.baselines import logged_scores

    data, e = held.data, min(held.cfg.exposure_depth, held.data["mask"].shape[1])
    out = {}
    for name in runs.table.policies:
        if name in runs.weights:
            out[name] = top_e(fuse(data["z"], runs.weights[name].to(data["z"].dtype), data["mask"]), e)
        elif name == "logged":
            out[name] = top_e(logged_scores(data), e)
    return out


def support_checks(held: HeldOut, runs: PolicyRuns, cfg: DiagnosticsConfig,
                   model_names: Iterable[str]) -> list[dict[str, Any]]:
    """low_support of every ranked policy, in report order."""
    from grade.evaluate.held_out import estimator_inputs

    vm, data, ev = held.value_model, held.data, held.cfg
    kind = PRIMARY_KIND[held.business.primary_metric]
    model = held.estimator
    if model is None or model.models is None:  # the estimated flavour's estimator reads no outcome model
        model = estimator_inputs(data, vm, held.business, "dm", ev.estimator_max_weight, ev.exposure_depth,
                                 ev.batch_size)
    judged = {*JUDGED, *model_names}
    return [low_support(name, low_support_share(idx, model.theta, model.logged_theta, model.models[kind],
                                                data["mask"], cfg.support_floor),
                        cfg.max_low_support_share, cfg.support_floor, name in judged)
            for name, idx in policy_rankings(held, runs).items()]


# ------------------------------------------------------------------------------------------------
# All checks, and report.json's "diagnostics"
# ------------------------------------------------------------------------------------------------

def run_checks(held: HeldOut, runs: PolicyRuns, model_names: Iterable[str]) -> list[dict[str, Any]]:
    """Every check of this module on the held-out requests (none without logged positions and clicks)."""
    from grade.evaluate.held_out import has_logged_feedback
    from grade.value.baselines import static_weights

    data, cfg, e = held.data, held.cfg.diagnostics, held.cfg.exposure_depth
    if not has_logged_feedback(data):
        return []
    t = time.monotonic()
    exam = held.value_model.examination if held.value_model is not None else None
    policies = {name: w for name, w in runs.weights.items() if name != "static"}
    reference = reference_ranking(data, static_weights(held.spec), policies, 2 * e)
    out = [position_variation(data, reference, e, cfg.min_position_variation,
                              exam is None or exam.method != "fixed"),
           logging_randomness(data, reference, e, cfg.min_logging_randomness),
           truncated_lists(data["mask"], e, cfg.max_truncated_share)]
    served = served_exploration(data)
    if served is not None:
        out.append(served)
    if exam is not None:
        out.insert(1, theta_degenerate(exam, e, cfg.theta_floor))
        out += support_checks(held, runs, cfg, model_names)
    counts = [sum(c["status"] == s for c in out) for s in ("fail", "warn")]
    log.info("diagnostics: %d checks (%d fail, %d warn) in %.1fs", len(out), *counts, time.monotonic() - t)
    return out


def diagnostics_section(checks: Iterable[dict[str, Any]], extra: Iterable[dict[str, Any]] = (),
                        click_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json's "diagnostics": this module's ``checks``, then the ``extra`` checks of other modules
    (e.g. the click-model check of grade.value.examination), and the optional ``click_model`` detail.
    Every check must have exactly the agreed keys and a known status (ValueError otherwise)."""
    out = [*checks, *extra]
    for c in out:
        if tuple(sorted(c)) != tuple(sorted(CHECK_KEYS)) or c["status"] not in STATUSES:
            raise ValueError(f"diagnostic check {c.get('name')!r}: expected the keys {CHECK_KEYS} and a "
                             f"status in {STATUSES}, got {c}")
    return {"checks": out, **({"click_model": click_model} if click_model is not None else {})}


def failed(section: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The failed checks of a report's "diagnostics" (none for a report written before diagnostics)."""
    return [c for c in (section or {}).get("checks", []) if c["status"] == "fail"]


def click_profile(data: dict[str, torch.Tensor], depth: int) -> list[float]:
    """Click rate of the items logged at each position 0..depth-1 (NaN where none was logged), for the
    report's figure next to theta-hat."""
    if "click" not in data or "position" not in data:
        return []
    pos, real = data["position"], data["mask"] & (data["position"] >= 0) & (data["position"] < depth)
    n = torch.bincount(pos[real], minlength=depth).double()
    clicks = torch.bincount(pos[real], weights=data["click"][real].double(), minlength=depth)
    return [float(c / k) if k > 0 else float("nan") for c, k in zip(clicks, n, strict=True)]
