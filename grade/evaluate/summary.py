"""The evaluation's outputs besides the report: KFP metrics, the terminal table, strict JSON files."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from grade.core import store

log = logging.getLogger("grade.evaluate.evaluation")


MAIN_METRICS = ("ctr", "cvr", "opm", "gpm", "vpm")


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


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(finite(obj), indent=2, sort_keys=True) + "\n")


def finite(obj: Any) -> Any:
    """NaN/inf -> None: report.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


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


def _verdict(comparison: dict[str, Any], other: str, higher: bool, metric: str) -> str:
    """'best_static higher (+1.90% [+0.80, +3.00])': the paired lift and CI of ``metric``, when there is
    one."""
    lift = comparison.get(f"{metric}_lift_vs_{other}")
    ci = "" if not lift else (f" ({100 * lift['lift']:+.2f}% "
                              f"[{100 * lift['ci_low']:+.2f}, {100 * lift['ci_high']:+.2f}])")
    return f"{other} {'higher' if higher else 'NOT higher'}{ci}"


def format_table(report: dict[str, Any]) -> str:
    """A readable terminal table: metrics of every policy and lifts vs static with CIs."""
    flavour = report["primary_flavour"]
    lifts = report["lift_vs_static"]
    metrics = [m for m in MAIN_METRICS if any(m in v.get(flavour, {}) for v in report["policies"].values())]
    # next to the truth, the estimated flavour's lift of the primary metric (what a truth-free run would see)
    primary = report["primary_metric"]
    lifted = [m for m in dict.fromkeys((primary, "opm", "gpm", "ctr")) if m in metrics]
    estimated = flavour != "estimated" and any(primary in v.get("estimated", {})
                                               for v in report["policies"].values())
    head = f"{'policy':<16}" + "".join(f"{m.upper():>10}" for m in metrics) + \
        "".join(f"  {m.upper() + ' lift vs static [CI]':<31}"
                for m in lifted) + \
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
        row += "".join(cell(p, flavour, m) for m in lifted)
        lines.append(row + (cell(p, "estimated", primary) if estimated else ""))
    for m, c in report.get("comparisons", {}).items():
        if m == "oracle_above_all":
            lines.append("oracle above every policy: " + ", ".join(f"{k.upper()} {'yes' if v else 'NO'}"
                                                                 for k, v in c.items()))
        else:
            lines.append(f"{m} {flavour} {primary.upper()} vs: " + ", ".join(
                _verdict(c, k.removeprefix("beats_"), v, primary)
                for k, v in c.items() if k.startswith("beats_")))
    lines.append(report["headroom_sentence"])
    return "\n".join(lines + diagnostic_lines(report))


def diagnostic_lines(report: dict[str, Any]) -> list[str]:
    """One line per check that did not pass: status, name (and policy), value, threshold, sentence."""
    out = []
    for c in (report.get("diagnostics") or {}).get("checks", []):
        if c["status"] != "pass":
            about = f" [{c['policy']}]" if c["policy"] else ""
            value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
            out.append(f"diagnostic {c['status'].upper()} {c['name']}{about}: {value} "
                       f"(needs {c['threshold']}). {c['sentence']}")
    return out
