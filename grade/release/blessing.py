"""The blessing: the promotion gate's decision as a typed record (blessing.json).

Written by :mod:`grade.release.promotion`, stored with a promoted version in the registry, read by the
promote component and the pipeline's summaries. ``from_json`` validates every field, so a
truncated or hand-edited blessing is refused (InputError, exit 2) instead of being half-read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from grade.core.errors import InputError

#: Every verdict the gate writes.
VERDICTS = ("blessed", "not blessed", "already in production", "promoted", "conflict")
BASELINES = ("incumbent", "static")


@dataclasses.dataclass
class Check:
    """One gate check: a lift (or its CI lower bound) against its threshold."""

    name: str
    """what is checked, e.g. 'true/opm lift CI low'"""
    value: float | None
    """the report's value (None: missing from the report, which fails the check)"""
    threshold: str
    """the condition in words, e.g. '> 0.0'"""
    passed: bool
    """whether the value meets the threshold"""


@dataclasses.dataclass
class Thresholds:
    """The thresholds the decision was taken with (the promote config's)."""

    min_lift: float | None
    """the primary lift's CI lower bound must be above this (None: no primary check)"""
    guardrails: dict[str, float]
    """metric -> lowest acceptable lift"""


@dataclasses.dataclass
class Blessing:
    """The decision on one candidate; ``to_json()`` is blessing.json."""

    candidate: str
    """the candidate's policy name in report.json"""
    candidate_uri: str
    """the candidate model folder"""
    candidate_content_hash: str
    """content hash of the candidate folder (what the report must have evaluated)"""
    report: str | None
    """the evaluation report's URI"""
    registry: str
    """registry root"""
    model_name: str
    """registry model name"""
    thresholds: Thresholds
    """the thresholds applied"""
    incumbent_version: str | None
    """the production version when the decision was taken (None: first model)"""
    primary: str
    """'flavour/metric' of the primary check"""
    baseline: str
    """what the candidate is compared with: 'incumbent' or 'static'"""
    verdict: str = "not blessed"
    """one of VERDICTS"""
    blessed: bool = False
    """whether every check passed"""
    promoted: bool = False
    """whether the alias now points at the candidate"""
    checks: list[Check] = dataclasses.field(default_factory=list)
    """every check with its value"""
    reasons: list[str] = dataclasses.field(default_factory=list)
    """why (not) blessed"""
    version: str | None = None
    """the registered version (only once registered; key absent otherwise)"""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.version is None:
            del out["version"]
        return out

    @classmethod
    def from_json(cls, doc: Any, source: str = "blessing") -> Blessing:
        """The record of a parsed blessing.json; any missing or malformed field -> InputError."""
        fields = Fields(doc, source)
        thresholds = Fields(fields.get("thresholds", dict), f"{source}: thresholds")
        guardrails = thresholds.get("guardrails", dict)
        for metric, tol in guardrails.items():
            _number(tol, f"{source}: thresholds.guardrails.{metric}")
        checks = []
        for i, c in enumerate(fields.get("checks", list)):
            check = Fields(c, f"{source}: checks[{i}]")
            checks.append(Check(check.get("name", str), check.get("value", (int, float), optional=True),
                                check.get("threshold", str), check.get("passed", bool)))
        blessing = cls(
            candidate=fields.get("candidate", str), candidate_uri=fields.get("candidate_uri", str),
            candidate_content_hash=fields.get("candidate_content_hash", str),
            report=fields.get("report", str, optional=True), registry=fields.get("registry", str),
            model_name=fields.get("model_name", str),
            thresholds=Thresholds(thresholds.get("min_lift", (int, float), optional=True), dict(guardrails)),
            incumbent_version=fields.get("incumbent_version", str, optional=True),
            primary=fields.get("primary", str), baseline=fields.get("baseline", str),
            verdict=fields.get("verdict", str), blessed=fields.get("blessed", bool),
            promoted=fields.get("promoted", bool), checks=checks,
            reasons=[_text(r, f"{source}: reasons[{i}]") for i, r in enumerate(fields.get("reasons", list))],
            version=fields.get("version", str, optional=True, absent_ok=True))
        blessing.validate(source)
        return blessing

    def validate(self, source: str = "blessing") -> None:
        """Consistency of the verdict with the flags: a 'promoted' record must be blessed, and so on."""
        if self.verdict not in VERDICTS:
            raise InputError(f"{source}: verdict: expected one of {list(VERDICTS)}, got {self.verdict!r}")
        if self.baseline not in BASELINES:
            raise InputError(f"{source}: baseline: expected one of {list(BASELINES)}, got {self.baseline!r}")
        if self.promoted != (self.verdict == "promoted") or (self.promoted and not self.blessed):
            raise InputError(f"{source}: verdict {self.verdict!r} contradicts blessed={self.blessed}, "
                             f"promoted={self.promoted}")
        if self.blessed and self.verdict == "not blessed" or not self.blessed and self.verdict == "blessed":
            raise InputError(f"{source}: verdict {self.verdict!r} contradicts blessed={self.blessed}")


class Fields:
    """Typed access to one JSON object's fields, naming the source and field in every error (also used for
    the report fields the gate reads)."""

    def __init__(self, doc: Any, source: str) -> None:
        if not isinstance(doc, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(doc).__name__}")
        self.doc, self.source = doc, source

    def get(self, key: str, kind: type | tuple[type, ...], optional: bool = False,
            absent_ok: bool = False) -> Any:
        """The field's value; ``optional``: null is allowed; ``absent_ok``: a missing key gives None."""
        if key not in self.doc:
            if absent_ok:
                return None
            raise InputError(f"{self.source}: missing field '{key}'")
        value = self.doc[key]
        if value is None and optional:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InputError(f"{self.source}: field '{key}': expected {_kind_name(kind)}"
                             f"{' or null' if optional else ''}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{self.source}: field '{key}': expected a finite number, got {value!r}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"str": "a string", "bool": "true/false", "int": "a number", "float": "a number",
             "dict": "an object", "list": "a list"}
    return " or ".join(dict.fromkeys(names.get(k.__name__, k.__name__) for k in kinds))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: expected a finite number, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {value!r}")
    return value
