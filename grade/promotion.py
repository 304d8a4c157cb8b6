"""The promotion gate: bless a candidate only when it beats what runs now; fail closed otherwise.

The decision is a first-class artifact, the **blessing**: candidate (name, URI, content hash),
baseline (``incumbent`` = the production model evaluated on the same held-out requests, or
``static`` for the first model), thresholds, every check with its value, the verdict and reasons.

Checks (config section ``promote``):

- primary: the lower end of the primary metric's lift CI vs the baseline is above ``min_lift``
  (true OPM by default; without ground truth, ``fallback_flavour``/``fallback_metric``);
- guardrails: the lift of each guardrail metric (CTR, CVR, GPM) is not below its tolerance.

A missing metric, an unknown candidate, a candidate whose content differs from what was evaluated,
a report that did not evaluate the current production model, or no thresholds at all: NOT blessed.
When blessed, the candidate is registered (idempotent) and the alias moves by compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from grade import store
from grade.config import ranged
from grade.errors import InputError
from grade.registry import DEFAULT_MODEL, AliasConflict, Registry

log = logging.getLogger("grade.promotion")


@dataclasses.dataclass
class PromoteConfig:
    model_name: str = DEFAULT_MODEL
    """registry model name whose production alias is gated (an alias of shared.model_name)"""
    candidate_name: str = "grade"
    """the candidate's policy name in report.json"""
    primary_metric: str = "opm"
    """metric whose lift CI must clear min_lift"""
    primary_flavour: str = "true"
    """metric flavour for the primary check when the report has ground truth"""
    fallback_flavour: str = "replay"
    """flavour used when the report has no ground truth"""
    fallback_metric: str = "ndcg_order"
    """primary metric used when the report has no ground truth"""
    min_lift: float | None = ranged(0.0, ">= -1")
    """the primary lift's CI lower bound must be above this (null: no threshold -> never blessed)"""
    guardrails: dict[str, float] = ranged({"ctr": -0.005, "cvr": -0.01, "gpm": -0.005}, ">= -1")
    """metric -> lowest acceptable lift vs the baseline (e.g. ctr -0.005: CTR may drop at most 0.5%)"""


def report_folder(uri: str) -> str:
    """The report's folder, given the folder or its report.json."""
    return uri.rsplit("/", 1)[0] if uri.endswith(".json") else uri


def read_report(uri: str) -> dict[str, Any]:
    """report.json from a report folder or the file itself; bad input -> InputError."""
    path = uri if uri.endswith(".json") else store.join(uri, "report.json")
    try:
        report = json.loads(store.read_bytes(path))
    except store.NotFound:
        raise InputError(f"{path}: report not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or "policies" not in report:
        raise InputError(f"{path}: not an evaluation report (expected a 'policies' key)")
    return report


def _lift(lifts: dict, flavour: str, metric: str) -> dict | None:
    entry = ((lifts or {}).get(flavour) or {}).get(metric)
    return entry if isinstance(entry, dict) else None


def decide(report: dict[str, Any], candidate_uri: str, registry: Registry, cfg: PromoteConfig,
           report_uri: str | None = None) -> dict[str, Any]:
    """The blessing (not yet acted upon): verdict, baseline, checks and reasons."""
    name = cfg.candidate_name
    reasons: list[str] = []
    checks: list[dict[str, Any]] = []
    try:
        candidate_hash = store.content_hash(candidate_uri)
    except store.NotPublished as e:
        raise InputError(f"--candidate {candidate_uri}: {e}") from None
    current = registry.production()
    blessing: dict[str, Any] = {
        "candidate": name, "candidate_uri": candidate_uri, "candidate_content_hash": candidate_hash,
        "report": report_uri, "registry": registry.root, "model_name": registry.model_name,
        "thresholds": {"min_lift": cfg.min_lift, "guardrails": cfg.guardrails},
        "incumbent_version": current[0]["version"] if current else None,
    }
    has_truth = bool(report.get("has_ground_truth", True))
    flavour, metric = (cfg.primary_flavour, cfg.primary_metric) if has_truth else (cfg.fallback_flavour,
                                                                                    cfg.fallback_metric)
    blessing["primary"] = f"{flavour}/{metric}"

    if name not in report.get("policies", {}):
        reasons.append(f"the report has no metrics for candidate '{name}'")
    evaluated = (report.get("models") or {}).get(name, {}).get("content_hash")
    if evaluated != candidate_hash:
        reasons.append(f"the candidate's content ({candidate_hash[:12]}) is not what the report evaluated "
                       f"({(evaluated or 'none')[:12]})")
    if current is not None:
        blessing["baseline"] = "incumbent"
        lifts = (report.get("lift_vs_incumbent") or {}).get(name)
        inc_version = ((report.get("models") or {}).get("incumbent") or {}).get("version")
        if inc_version != current[0]["version"]:
            reasons.append(f"the report evaluated incumbent version {inc_version}, but production is "
                           f"{current[0]['version']}: re-evaluate against the current production model")
        if current[0].get("content_hash") == candidate_hash:
            blessing.update(blessed=True, promoted=False, verdict="already in production", checks=[],
                            reasons=[f"version {current[0]['version']} already serves this content"])
            return blessing
    else:
        blessing["baseline"] = "static"
        lifts = (report.get("lift_vs_static") or {}).get(name)

    if cfg.min_lift is None and not cfg.guardrails:
        reasons.append("no thresholds are configured")
    if cfg.min_lift is not None:
        entry = _lift(lifts, flavour, metric)
        value = entry.get("ci_low") if entry else None
        passed = value is not None and value > cfg.min_lift
        checks.append({"name": f"{flavour}/{metric} lift CI low", "value": value, "threshold": f"> {cfg.min_lift}",
                       "passed": passed})
        if not passed:
            reasons.append(f"{flavour}/{metric} lift CI low {value} is not above {cfg.min_lift}" if value is not None
                           else f"{flavour}/{metric} lift vs {blessing['baseline']} is missing from the report")
    guard_flavour = flavour if has_truth else "prior"
    for m, tol in sorted(cfg.guardrails.items()):
        entry = _lift(lifts, guard_flavour, m)
        value = entry.get("lift") if entry else None
        passed = value is not None and value >= tol
        checks.append({"name": f"{guard_flavour}/{m} lift", "value": value, "threshold": f">= {tol}",
                       "passed": passed})
        if not passed:
            reasons.append(f"guardrail {guard_flavour}/{m}: lift {value} below {tol}" if value is not None
                           else f"guardrail {guard_flavour}/{m}: lift missing from the report")
    blessed = not reasons and all(c["passed"] for c in checks) and bool(checks)
    blessing.update(blessed=blessed, promoted=False, verdict="blessed" if blessed else "not blessed",
                    checks=checks, reasons=reasons or ["every check passed"])
    return blessing


def promote(report_uri: str, candidate_uri: str, registry_uri: str, cfg: PromoteConfig,
            data_uri: str | None = None) -> dict[str, Any]:
    """Gate, then register and move the alias when blessed. Returns the blessing (with the outcome)."""
    report = read_report(report_uri)
    registry = Registry(registry_uri, cfg.model_name)
    # read the alias (and its ETag) before deciding: the move is a compare-and-swap against it
    current = registry.production()
    blessing = decide(report, candidate_uri, registry, cfg, report_uri)
    if not blessing["blessed"] or blessing["verdict"] == "already in production":
        return blessing
    blessing_bytes = (json.dumps(blessing, indent=2, sort_keys=True) + "\n").encode()
    version, created = registry.register(candidate_uri, report_uri=report_uri, data_uri=data_uri,
                                         parent=current[0]["version"] if current else None,
                                         extra_files={"blessing.json": blessing_bytes})
    blessing["version"] = version
    try:
        registry.set_production(version, f"blessed vs {blessing['baseline']}: " + "; ".join(
            f"{c['name']}={c['value']:.4f}" for c in blessing["checks"] if c["value"] is not None),
            expected_etag=current[1] if current else None)
        blessing["promoted"] = True
        blessing["verdict"] = "promoted"
    except AliasConflict as e:
        blessing["promoted"] = False
        blessing["verdict"] = "conflict"
        blessing["reasons"] = [*blessing["reasons"], str(e)]
    return blessing


def format_blessing(b: dict[str, Any]) -> str:
    lines = [f"candidate '{b['candidate']}' vs {b.get('baseline', '?')}: {b['verdict'].upper()}"]
    for c in b.get("checks", []):
        v = "missing" if c["value"] is None else f"{c['value']:+.4f}"
        lines.append(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['name']:<28} {v:>10}  (needs {c['threshold']})")
    lines += [f"  - {r}" for r in b.get("reasons", [])]
    if b.get("version"):
        lines.append(f"  registered as {b['model_name']}/{b['version']}")
    return "\n".join(lines)
