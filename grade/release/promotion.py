"""The promotion gate: bless a candidate only when it beats what runs now; fail closed otherwise.

The decision is a first-class artifact, the **blessing**: candidate (name, URI, content hash),
baseline (``incumbent`` = the production model evaluated on the same held-out requests, or
``static`` for the first model), thresholds, every check with its value, the verdict and reasons.

Checks (config section ``promote``):

- primary: the lower end of the primary metric's lift CI vs the baseline is above ``min_lift``. By
  default the report's own ``primary_flavour`` and ``primary_metric``: the true flavour with ground
  truth, else the ``estimated`` flavour (counterfactual estimates from the logs), and the metric of the
  declared business value (OPM for orders). Reports written before the estimated flavour existed
  (primary flavour ``prior``) are judged on ``fallback_flavour``/``fallback_metric``. When the
  interval straddles ``min_lift`` and the lift's minimum detectable effect is above the lift, the
  reason says how many requests would decide ("not enough evidence: about N requests needed");
- guardrails (non-inferiority): the CI lower bound of each guardrail metric's lift (CTR, CVR, GPM) in the
  same flavour is at or above -margin (``guardrails``: a plain metric's entry, or the flavour's own
  ``estimated/<metric>``); never the point estimate; the primary metric itself is not also a guardrail;
- diagnostics (report.json ``diagnostics.checks``): judging without ground truth, a failed diagnostic
  about the logs, the candidate or the baseline refuses ("cannot judge: <its sentence>"); a warning is
  listed and never blocks.

A missing metric, an unknown candidate, a candidate whose content differs from what was evaluated,
a report that did not evaluate the current production model, or no thresholds at all: NOT blessed.
A report field the gate reads that is missing or malformed is bad input (InputError, exit 2).
The blessing is a :class:`grade.release.blessing.Blessing`.
When blessed, the candidate is registered (idempotent) and the alias moves by compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from grade.core import store
from grade.core.config import ranged, setting
from grade.core.errors import ConfigError, InputError
from grade.core.store import paths
from grade.model.registry import DEFAULT_MODEL, AliasConflict, Registry
from grade.release.blessing import Blessing, Check, Fields, Thresholds

log = logging.getLogger("grade.release.promotion")

#: default -margins of non-inferiority: with ground truth, and of the estimated flavour (each the minimum
#: detectable effect of the guardrail's lift at the demo's size, so that a candidate that truly holds it
#: passes with 80% power; the measurement: docs/promotion.md)
GUARDRAILS = {"ctr": -0.005, "cvr": -0.01, "gpm": -0.005,
              "estimated/ctr": -0.07, "estimated/cvr": -0.20, "estimated/gpm": -0.16}
#: flavours a guardrail entry may name ('<flavour>/<metric>')
GUARD_FLAVOURS = ("true", "estimated")
#: statuses of a diagnostic check (report.json diagnostics.checks[].status)
DIAGNOSTIC_STATUSES = ("pass", "warn", "fail")


@dataclasses.dataclass
class PromoteConfig:
    model_name: str = setting(DEFAULT_MODEL, derived="shared.model_name")
    """registry model name whose production alias is gated (an alias of shared.model_name)"""
    candidate_name: str = "grade"
    """the candidate's policy name in report.json"""
    primary_metric: str = ""
    """metric whose lift CI must clear min_lift ('' = the report's primary_metric, the declared value's)"""
    primary_flavour: str = ""
    """metric flavour of the primary check and the guardrails ('' = the report's primary_flavour)"""
    fallback_flavour: str = setting("replay", retired=True)
    """flavour used for reports whose primary flavour is 'prior' (written before the estimated flavour)"""
    fallback_metric: str = setting("ndcg_order", retired=True)
    """primary metric used for such reports"""
    min_lift: float | None = ranged(0.0, ">= -1")
    """the primary lift's CI lower bound must be above this (null: no threshold -> never blessed)"""
    guardrails: dict[str, float] = ranged(GUARDRAILS, ">= -1")
    """metric -> -margin of non-inferiority: the lift's CI lower bound vs the baseline must be at or above it
    (ctr -0.005: CTR shown not to drop more than 0.5%); 'estimated/<metric>' for that flavour only (its
    intervals are about ten times as wide: docs/promotion.md)"""

    def margins(self, flavour: str) -> dict[str, float]:
        """metric -> -margin of the guardrails judged in ``flavour`` (its own entries over the plain ones)."""
        plain = {k: v for k, v in self.guardrails.items() if "/" not in k}
        own = {k.split("/", 1)[1]: v for k, v in self.guardrails.items() if k.startswith(f"{flavour}/")}
        return {**plain, **own}

    def validate(self) -> None:
        for key in self.guardrails:
            flavour, _, metric = key.rpartition("/")
            if not metric or (flavour and flavour not in GUARD_FLAVOURS):
                raise ConfigError(f"promote.guardrails.{key}: expected a metric or <flavour>/<metric> with "
                                  f"flavour one of {list(GUARD_FLAVOURS)}")
        # the prior flavour measures the policies with the MTL model's own predictions, which a policy
        # fitted to them games (docs/promotion.md): the gate never decides on it
        for key in ("primary_flavour", "fallback_flavour"):
            if getattr(self, key) == "prior":
                raise ConfigError(f"promote.{key}: 'prior' is not accepted (the gate never decides on the "
                                  f"MTL prior); expected '', true, estimated or replay")


def report_folder(uri: str) -> str:
    """The report's folder, given the folder or its report.json."""
    return uri.rsplit("/", 1)[0] if uri.endswith(".json") else uri


def read_report(uri: str) -> dict[str, Any]:
    """report.json from a report folder or the file itself, checked against the folder's manifest
    (the evaluation published it: a report edited since is refused, IntegrityError); bad input ->
    InputError."""
    folder = report_folder(uri)
    name = uri.rsplit("/", 1)[-1] if uri.endswith(".json") else "report.json"
    path = store.join(folder, name)
    try:
        report = paths.loads(store.read_published_file(folder, name), path)
    except store.NotPublished as e:
        raise InputError(f"--report {uri}: {e}") from None
    if not isinstance(report, dict) or "policies" not in report:
        raise InputError(f"{path}: not an evaluation report (expected a 'policies' key)")
    return report


@dataclasses.dataclass
class GateEvidence:
    """What the gate reads from report.json, type-checked: a missing or malformed field -> InputError."""

    has_ground_truth: bool
    """whether the report's data had ground truth (true flavour) or not (fallback flavour)"""
    policies: list[str]
    """the evaluated policies"""
    models: dict[str, dict[str, Any]]
    """policy -> {uri, content_hash, version} of the evaluated model folders"""
    lifts: dict[str, dict[str, Any]]
    """baseline ('static', 'incumbent') -> policy -> flavour -> metric -> {lift, ci_low, ci_high}"""
    primary_flavour: str = "true"
    """the report's primary flavour (true with ground truth, else estimated)"""
    primary_metric: str = "opm"
    """the report's primary metric (the declared business value's)"""
    n_requests: int | None = None
    """held-out requests the lifts were measured on (None: not reported)"""
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)
    """the report's diagnostic checks (none in reports written before diagnostics existed)"""

    @classmethod
    def from_report(cls, report: dict[str, Any], source: str = "report.json") -> GateEvidence:
        fields = Fields(report, source)
        policies = fields.get("policies", dict)
        models = fields.get("models", dict)
        for name, info in models.items():
            model = Fields(info, f"{source}: models.{name}")
            model.get("content_hash", str, optional=True, absent_ok=True)
            model.get("version", str, optional=True, absent_ok=True)
        lifts = {"static": fields.get("lift_vs_static", dict)}
        incumbent = fields.get("lift_vs_incumbent", dict, absent_ok=True)
        if incumbent is not None:
            lifts["incumbent"] = incumbent
        for baseline, table in lifts.items():
            _check_lifts(table, f"{source}: lift_vs_{baseline}")
        truth = fields.get("has_ground_truth", bool)
        # reports of older versions may lack these: they led with true (truth) or prior, on OPM
        flavour = fields.get("primary_flavour", str, absent_ok=True) or ("true" if truth else "prior")
        metric = fields.get("primary_metric", str, absent_ok=True) or "opm"
        n = fields.get("n_requests", int, absent_ok=True)
        diagnostics = read_diagnostics(fields.get("diagnostics", dict, absent_ok=True), source)
        return cls(truth, list(policies), models, lifts, flavour, metric, n, diagnostics)

    def judged_on(self, cfg: PromoteConfig) -> tuple[str, str]:
        """(flavour, metric) of the primary check: the config's, else the report's (never the prior)."""
        if self.primary_flavour == "prior" and not cfg.primary_flavour:
            return cfg.fallback_flavour, cfg.fallback_metric
        return cfg.primary_flavour or self.primary_flavour, cfg.primary_metric or self.primary_metric

    def lift(self, baseline: str, policy: str, flavour: str, metric: str, key: str) -> float | None:
        """``key`` (lift, ci_low, ci_high, se, mde) of ``policy``'s lift vs ``baseline``; None when not
        reported."""
        entry = self.lifts.get(baseline, {}).get(policy, {}).get(flavour, {}).get(metric)
        return None if entry is None else entry.get(key)


@dataclasses.dataclass
class Diagnostic:
    """One check of report.json's ``diagnostics.checks``: whether the logs meet what the estimators assume."""

    name: str
    """snake_case id, e.g. 'position_variation'"""
    status: str
    """pass, warn or fail (fail: a judgement without ground truth cannot be trusted)"""
    value: float | None
    """the measured quantity"""
    threshold: str
    """the condition in words, e.g. '>= 0.05'"""
    sentence: str
    """what it means and what to do, in one sentence"""
    policy: str | None
    """the policy a per-policy check is about, else None"""

    @property
    def label(self) -> str:
        return f"diagnostic {self.name}" + (f" ({self.policy})" if self.policy else "")


def read_diagnostics(doc: dict[str, Any] | None, source: str) -> list[Diagnostic]:
    """The checks of report.json's ``diagnostics`` (absent: none); a malformed one -> InputError."""
    if doc is None:
        return []
    where = f"{source}: diagnostics"
    out = []
    for i, item in enumerate(Fields(doc, where).get("checks", list)):
        check = Fields(item, f"{where}.checks[{i}]")
        status = check.get("status", str)
        if status not in DIAGNOSTIC_STATUSES:
            raise InputError(f"{where}.checks[{i}]: field 'status': expected one of "
                             f"{list(DIAGNOSTIC_STATUSES)}, got {status!r}")
        # value and policy may be null; a writer that leaves them out, or a value that could not be
        # measured (NaN), means the same
        raw = item.get("value") if isinstance(item, dict) else None
        value = None if isinstance(raw, float) and math.isnan(raw) else check.get(
            "value", (int, float), optional=True, absent_ok=True)
        out.append(Diagnostic(check.get("name", str), status, None if value is None else float(value),
                              check.get("threshold", str), check.get("sentence", str),
                              check.get("policy", str, optional=True, absent_ok=True)))
    return out


def _check_lifts(table: dict[str, Any], where: str) -> None:
    """policy -> flavour -> metric -> {lift, ci_low, ci_high: number or null}, or InputError."""
    for policy, flavours in table.items():
        for flavour, metrics in Fields(flavours, f"{where}.{policy}").doc.items():
            for metric, entry in Fields(metrics, f"{where}.{policy}.{flavour}").doc.items():
                lift = Fields(entry, f"{where}.{policy}.{flavour}.{metric}")
                for key in ("lift", "ci_low", "ci_high"):
                    lift.get(key, (int, float), optional=True)
                for key in ("se", "mde"):  # absent in reports written before they existed
                    lift.get(key, (int, float), optional=True, absent_ok=True)


def decide(report: dict[str, Any], candidate_uri: str, registry: Registry, cfg: PromoteConfig,
           report_uri: str | None = None) -> Blessing:
    """The blessing (not yet acted upon): verdict, baseline, checks and reasons."""
    evidence = GateEvidence.from_report(report, report_uri or "report.json")
    name = cfg.candidate_name
    try:
        # every file against the manifest's sha256 before anything is decided or registered: a folder
        # changed after its evaluation would otherwise be promoted under the evaluated hash
        store.verify_published(candidate_uri)
        candidate_hash = store.content_hash(candidate_uri)
    except store.NotPublished as e:
        raise InputError(f"--candidate {candidate_uri}: {e}") from None
    current = registry.production()
    flavour, metric = evidence.judged_on(cfg)
    blessing = Blessing(
        candidate=name, candidate_uri=candidate_uri, candidate_content_hash=candidate_hash, report=report_uri,
        registry=registry.root, model_name=registry.model_name,
        thresholds=Thresholds(cfg.min_lift, cfg.margins("prior" if flavour == "replay" else flavour)),
        incumbent_version=current[0]["version"] if current else None, primary=f"{flavour}/{metric}",
        baseline="incumbent" if current is not None else "static")
    reasons = evidence_reasons(evidence, name, candidate_hash, current)
    if current is not None and current[0].get("content_hash") == candidate_hash:
        blessing.blessed, blessing.verdict = True, "already in production"
        blessing.reasons = [f"version {current[0]['version']} already serves this content"]
        return blessing
    if cfg.min_lift is None and not cfg.guardrails:
        reasons.append("no thresholds are configured")
    # guardrails in the judged flavour; a replay-judged (old) report has no CTR/GPM there: its prior's
    guard_flavour = "prior" if flavour == "replay" else flavour
    checks = diagnostic_checks(evidence, blessing, flavour) + threshold_checks(evidence, blessing, cfg,
                                                                              guard_flavour)
    reasons += [reason for _, reason in checks if reason]
    blessing.checks = [check for check, _ in checks]
    blessing.blessed = not reasons and all(c.passed for c in blessing.checks) and bool(blessing.checks)
    blessing.verdict = "blessed" if blessing.blessed else "not blessed"
    blessing.reasons = reasons or ["every check passed"]
    return blessing


def evidence_reasons(evidence: GateEvidence, name: str, candidate_hash: str,
                     current: tuple[dict[str, Any], str] | None) -> list[str]:
    """Why the report cannot judge this candidate: not evaluated, other content, stale incumbent."""
    reasons = []
    if name not in evidence.policies:
        reasons.append(f"the report has no metrics for candidate '{name}'")
    evaluated = evidence.models.get(name, {}).get("content_hash")
    if evaluated != candidate_hash:
        reasons.append(f"the candidate's content ({candidate_hash[:12]}) is not what the report evaluated "
                       f"({(evaluated or 'none')[:12]})")
    inc_version = evidence.models.get("incumbent", {}).get("version")
    if current is not None and inc_version != current[0]["version"]:
        reasons.append(f"the report evaluated incumbent version {inc_version}, but production is "
                       f"{current[0]['version']}: re-evaluate against the current production model")
    return reasons


def threshold_checks(evidence: GateEvidence, blessing: Blessing, cfg: PromoteConfig,
                     guard_flavour: str) -> list[tuple[Check, str | None]]:
    """The primary and guardrail checks, each with the reason it failed (None when passed)."""
    out: list[tuple[Check, str | None]] = []
    if cfg.min_lift is not None:
        out.append(primary_check(evidence, blessing, cfg.min_lift))
    for m, tol in sorted(cfg.margins(guard_flavour).items()):
        if f"{guard_flavour}/{m}" == blessing.primary:
            continue  # the primary check already judges this metric
        out.append(guardrail_check(evidence, blessing, f"{guard_flavour}/{m}", tol))
    return out


def primary_check(evidence: GateEvidence, blessing: Blessing, min_lift: float) -> tuple[Check, str | None]:
    """The primary lift's CI lower bound above ``min_lift``; when the interval cannot decide, how many
    requests would."""
    primary, baseline = blessing.primary, blessing.baseline
    entry = {key: evidence.lift(baseline, blessing.candidate, *primary.split("/", 1), key)
             for key in ("lift", "ci_low", "ci_high", "mde")}
    low = entry["ci_low"]
    passed = low is not None and low > min_lift
    check = Check(f"{primary} lift CI low", low, f"> {min_lift}", passed)
    if passed:
        return check, None
    if low is None:
        return check, f"{primary} lift vs {baseline} is missing from the report"
    reason = f"{primary} lift CI low {low:+.4f} is not above {min_lift}"
    needed = requests_needed(entry, min_lift, evidence.n_requests)
    if needed is not None:
        reason += (f" (lift {entry['lift']:+.4f}, minimum detectable effect {entry['mde']:.4f} at "
                   f"{evidence.n_requests:,} requests): not enough evidence: about {needed:,} requests "
                   f"needed")
    return check, reason


def requests_needed(entry: dict[str, float | None], min_lift: float, n: int | None) -> int | None:
    """Requests at which the minimum detectable effect shrinks to the point lift's distance above
    ``min_lift`` (the SE scales as 1/sqrt(n)), when the interval straddles ``min_lift`` and its MDE is
    above that distance; else None (the evidence decides, or more data would not help: lift below)."""
    lift, low, high, mde = (entry.get(k) for k in ("lift", "ci_low", "ci_high", "mde"))
    if None in (lift, low, high, mde) or not n:
        return None
    gap = lift - min_lift
    if not (low <= min_lift < high) or gap <= 0 or mde <= gap:
        return None
    return _round_up(n * (mde / gap) ** 2)


def _round_up(n: float) -> int:
    """``n`` rounded up to two significant digits (an estimate, not a count)."""
    step = 10 ** max(0, math.floor(math.log10(max(n, 1))) - 1)
    return int(math.ceil(n / step) * step)


def guardrail_check(evidence: GateEvidence, blessing: Blessing, key: str,
                    tol: float) -> tuple[Check, str | None]:
    """Non-inferiority: the guardrail lift's CI lower bound at or above ``tol`` (= -margin), never the
    point estimate."""
    flavour, metric = key.split("/", 1)
    low = evidence.lift(blessing.baseline, blessing.candidate, flavour, metric, "ci_low")
    passed = low is not None and low >= tol
    check = Check(f"{key} lift CI low", low, f">= {tol} (non-inferiority margin {-tol:g})", passed)
    if passed:
        return check, None
    if low is None:
        return check, f"guardrail {key}: lift CI missing from the report"
    lift = evidence.lift(blessing.baseline, blessing.candidate, flavour, metric, "lift")
    point = "" if lift is None else f" (point lift {lift:+.4f})"
    return check, (f"guardrail {key}: lift CI low {low:+.4f} below {tol}{point}: a drop beyond the margin "
                   f"is not ruled out")


def diagnostic_checks(evidence: GateEvidence, blessing: Blessing,
                      flavour: str) -> list[tuple[Check, str | None]]:
    """Failed and warning diagnostics as checks: a failure blocks a judgement without ground truth
    ("cannot judge: <sentence>") unless it is about a policy other than the candidate and the baseline."""
    out: list[tuple[Check, str | None]] = []
    for d in evidence.diagnostics:
        if d.status == "pass":
            continue
        blocks = (d.status == "fail" and flavour != "true"
                  and d.policy in (None, blessing.candidate, blessing.baseline))
        out.append((Check(d.label, d.value, f"{d.threshold} ({d.status})", not blocks),
                    f"cannot judge: {d.sentence}" if blocks else None))
    return out


def promote(report_uri: str, candidate_uri: str, registry_uri: str, cfg: PromoteConfig,
            data_uri: str | None = None, before_acting: Callable[[], None] | None = None) -> Blessing:
    """Gate, then register and move the alias when blessed. Returns the blessing (with the outcome).

    Everything the gate reads is checked against its manifest first: the report (:func:`read_report`),
    every file of the candidate (:func:`decide`; again as the registry copies it). ``before_acting``
    runs once the candidate is blessed, before the first irreversible act (the registration): the
    caller's checks of its outputs and permissions, so a refusal there changes nothing.
    """
    report = read_report(report_uri)
    registry = Registry(registry_uri, cfg.model_name)
    # read the alias (and its ETag) before deciding: the move is a compare-and-swap against it
    current = registry.production()
    blessing = decide(report, candidate_uri, registry, cfg, report_uri)
    if not blessing.blessed or blessing.verdict == "already in production":
        return blessing
    if before_acting is not None:
        before_acting()
    blessing_bytes = (json.dumps(blessing.to_json(), indent=2, sort_keys=True) + "\n").encode()
    version, created = registry.register(candidate_uri, report_uri=report_uri, data_uri=data_uri,
                                         parent=current[0]["version"] if current else None,
                                         extra_files={"blessing.json": blessing_bytes})
    blessing.version = version
    try:
        registry.set_production(version, f"blessed vs {blessing.baseline}: " + "; ".join(
            f"{c.name}={c.value:.4f}" for c in blessing.checks if c.value is not None),
            expected_etag=current[1] if current else None)
        blessing.promoted, blessing.verdict = True, "promoted"
    except AliasConflict as e:
        blessing.promoted, blessing.verdict = False, "conflict"
        blessing.reasons = [*blessing.reasons, str(e)]
    return blessing


def format_blessing(b: Blessing) -> str:
    lines = [f"candidate '{b.candidate}' vs {b.baseline}: {b.verdict.upper()}"]
    for c in b.checks:
        v = "missing" if c.value is None else f"{c.value:+.4f}"
        lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name:<28} {v:>10}  (needs {c.threshold})")
    lines += [f"  - {r}" for r in b.reasons]
    if b.version:
        lines.append(f"  registered as {b.model_name}/{b.version}")
    return "\n".join(lines)
