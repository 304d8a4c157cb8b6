"""One YAML config, a section per step; every key has a default, unknown keys are errors.

Each step defines its section as a dataclass in its own module (one line of doc per field);
this module maps section names to those classes, loads YAML, applies command-line overrides and
builds typed, validated configs: the one place where configuration is checked. Numeric fields
declare their range with :func:`ranged` (size-like ones an upper bound too); :func:`build` checks
every key's type and range (nested dataclasses included) and then calls the class's ``validate()``
hook, if any, for checks that need more than one field.

Not every dataclass field is a key (docs/pipeline.md, "Configuration"):

* a **derived** field (``ranged(..., derived=SOURCE)`` / ``setting(..., derived=SOURCE)``) takes the
  value of another key, e.g. every step's ``seed`` is ``shared.seed``; the step's own old name is
  an alias of that key;
* a **retired** field keeps its default as a constant; an old file that sets it still works;
* ``outcome`` is the old name of the ``value_model`` section (``outcome.model``: ``value_model.outcome``).

Every old name is accepted for one release and logs one warning per name per process.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib
import inspect
import json
import logging
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from grade.core.errors import ConfigError

T = TypeVar("T")

#: The registry's model name unless a config names another (grade.model.registry's default too).
DEFAULT_MODEL = "grade-mtf"

#: section name -> "module:Class" of its dataclass (imported lazily: sections stay independent).
SECTIONS: dict[str, str] = {
    "shared": "grade.core.config:SharedConfig",
    "simulator": "grade.data.simulator:SimulatorConfig",
    "features": "grade.data.features:FeaturesConfig",
    "value_model": "grade.value.value_model:ValueModelConfig",
    "pretrain": "grade.train.pretrain:PretrainConfig",
    "finetune": "grade.train.grpo:FinetuneConfig",
    "evaluate": "grade.evaluate.evaluation:EvaluateConfig",
    "promote": "grade.release.promotion:PromoteConfig",
    "business": "grade.value.business:BusinessConfig",
    "ablation": "grade.core.config:AblationConfig",
}


# ------------------------------------------------------------------------------------------------
# Declared ranges of numeric fields
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval of accepted numbers; ``text`` is how it was declared (and how errors show it)."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")
_COMPARISON = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def parse_bounds(text: str) -> Bounds:
    """``"> 0"``, ``">= 1"``, ``"<= 1"`` or an interval ``"[0, 1)"`` (``inf`` allowed) -> Bounds."""
    m = _INTERVAL.match(text.strip())
    if m:
        return Bounds(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", f"in {text.strip()}")
    m = _COMPARISON.match(text.strip())
    if not m:
        raise ValueError(f"bounds {text!r}: expected '> 0', '>= 1', '<= 1' or an interval like '[0, 1)'")
    op, number = m[1], float(m[2])
    if op.startswith(">"):
        return Bounds(number, math.inf, op == ">", True, f"{op} {m[2]}")
    return Bounds(-math.inf, number, True, op == "<", f"{op} {m[2]}")


def ranged(default: Any, bounds: str, *, derived: str | None = None, retired: bool = False) -> Any:
    """A dataclass field whose numbers (the value, or each element of a list / value of a mapping)
    must lie in ``bounds``; a list or dict default is copied per instance. ``derived``: the field is
    not a key but takes the value of the key (or ``DERIVED`` source) named; ``retired``: not a key,
    a constant (see the module docstring)."""
    return setting(default, derived=derived, retired=retired, bounds=parse_bounds(bounds))


def setting(default: Any, *, derived: str | None = None, retired: bool = False,
            bounds: Bounds | None = None) -> Any:
    """A dataclass field that is derived from another key or retired (see :func:`ranged`)."""
    meta: dict[str, Any] = {} if bounds is None else {"bounds": bounds}
    if derived is not None:
        meta["derived"] = derived
    if retired:
        meta["retired"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_bounds(bounds: Bounds, value: Any, where: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(bounds, v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_bounds(bounds, v, f"{where}.{k}")
    elif isinstance(value, (int, float)) and not bounds.contains(value):
        raise ConfigError(f"{where}: expected a value {bounds.text}, got {show(value)}")


def check(cfg: Any, where: str | None = None) -> Any:
    """Check the declared range of every field of a built config (nested dataclasses included), then
    its ``validate()`` hook; returns ``cfg``. Library entry points call it on configs made in code."""
    where = where or section_name(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{where}.{f.name}")
        elif "bounds" in f.metadata:
            _check_bounds(f.metadata["bounds"], value, f"{where}.{f.name}")
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()
    return cfg


# ------------------------------------------------------------------------------------------------
# Keys shared by several sections, and the ablations
# ------------------------------------------------------------------------------------------------

#: the largest seed (numpy and torch both take it)
MAX_SEED = 2**63 - 1
#: the declared range of every seed
SEED_RANGE = f"[0, {MAX_SEED}]"


@dataclasses.dataclass
class SharedConfig:
    seed: int = ranged(0, f"[0, {MAX_SEED}]")
    """random seed of every step run on the data (every fit, data order, sample and resample): the same
    data, config and seed give the same outputs; ablation.seeds sets one step's apart (the simulated
    world's own seed is simulator.seed)"""
    exposure_depth: int = ranged(10, "[1, 1000]")
    """E: items exposed per request, for every step (training reward and validation, evaluation, the
    simulator's headroom report)"""
    eta: float = ranged(1.0, "[0, 10]")
    """eta of the examination law theta_j = 1/(1+j)^eta that the metrics assume (true and prior
    flavours of fine-tuning's validation and of the evaluation, the oracle) and that the value model
    assumes when eta_mode is fixed; the simulated world's own eta is simulator.position_bias"""
    eta_mode: typing.Literal["estimated", "fixed"] = "estimated"
    """how the value model gets theta: estimated from the logged clicks (value_model.examination), or
    fixed, the power law with shared.eta"""
    model_name: str = DEFAULT_MODEL
    """registry model name: the one promotion gates and whose production model is the incumbent"""

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.model_name):
            raise ConfigError(f"shared.model_name: expected letters, digits, '.', '_' or '-', "
                              f"got {self.model_name!r}")


#: The named ablations of the documented tables (docs/finetune.md, docs/evaluation.md): preset ->
#: the keys it sets over the file's (a command-line override wins). ``pipeline.params.ABLATIONS`` runs them.
ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "grade_gaussian": {"ablation.exploration": "gaussian"},
    "grade_fixed_kappa": {"ablation.adaptive_kappa": False},
    "grade_posterior_only": {"finetune.reward.post": 1.0, "finetune.reward.prior": 0.0,
                             "finetune.reward.format": 0.0},
    "grade_prior_only": {"finetune.reward.post": 0.0, "finetune.reward.prior": 1.0,
                         "finetune.reward.format": 0.0},
    # the guardrails at fixed prices instead of held as constraints
    "grade_guard_prices": {"ablation.guard_mode": "price"},
    # each other estimator of the declared value as the posterior (the default is dm)
    **{f"grade_{name}": {"finetune.reward.post_estimator": name}
       for name in ("ips", "snips", "switch", "shrunk", "dcg_ips")},
}

#: the steps whose seed ablation.seeds can set apart from shared.seed
SEED_STEPS = ("examination", "outcome", "pretrain", "finetune", "evaluate")


@dataclasses.dataclass
class AblationConfig:
    preset: str = ""
    """one row of the documented ablation tables ('' = none): grade_gaussian, grade_fixed_kappa,
    grade_posterior_only, grade_prior_only, grade_guard_prices, grade_ips, grade_snips, grade_switch,
    grade_shrunk, grade_dcg_ips: sets the keys grade.core.config.ABLATION_PRESETS lists, over the file's
    values (a --set of such a key still wins)"""
    seeds: dict[str, int] = ranged({}, f"[0, {MAX_SEED}]")
    """step -> its own seed instead of shared.seed (seed studies: examination, outcome, pretrain, finetune,
    evaluate)"""
    exploration: typing.Literal["dirichlet", "gaussian"] = "dirichlet"
    """Stage 2 exploration: dirichlet (GRADE) or gaussian (logistic-normal: softmax(logits + 0.3 eps))"""
    adaptive_kappa: bool = True
    """learn the Dirichlet concentration per request; false = kappa 150 (the target) for every request"""
    guard_mode: typing.Literal["price", "constraint"] = "constraint"
    """how Stage 2's posterior keeps the guardrails CTR and GPM (grade.value.guardrails): constraint
    prices each guardrail by a multiplier a controller raises while the served weights' estimated CTR
    (GPM) is below static's times (1 + finetune.reward.guard_margin) (the default, docs/finetune.md);
    price adds the fixed guard_prices (the earlier form)"""
    guard_prices: dict[str, float] = ranged({"clicks": 0.05, "gmv": 0.2}, "[0, 100]")
    """guard_mode price: value of a click and of one train mean order value of GMV added to the
    declared value in the posterior (chosen on the valid splits of three simulated markets)"""

    def validate(self) -> None:
        if self.preset and self.preset not in ABLATION_PRESETS:
            raise ConfigError(f"ablation.preset: expected '' or one of {sorted(ABLATION_PRESETS)}, "
                              f"got {self.preset!r}")
        bad = sorted(set(self.seeds) - set(SEED_STEPS))
        if bad:
            raise ConfigError(f"ablation.seeds: unknown step(s) {bad}; expected some of {list(SEED_STEPS)}")
        bad = sorted(set(self.guard_prices) ^ {"clicks", "gmv"})
        if bad:
            raise ConfigError(f"ablation.guard_prices: expected the keys clicks and gmv, got "
                              f"{sorted(self.guard_prices)}")


def _step_seed(step: str) -> Any:
    return lambda get: get("ablation.seeds").get(step, get("shared.seed"))


def _guard_price(kind: str) -> Any:
    return lambda get: get("ablation.guard_prices")[kind]


def _fixed_eta(get: Any) -> float:
    return get("shared.eta") if get("shared.eta_mode") == "fixed" else 0.0


#: derived-field sources that are not one key: name -> function of a getter of resolved keys
DERIVED: dict[str, Any] = {
    **{f"seed:{step}": _step_seed(step) for step in SEED_STEPS},
    "eta:fixed": _fixed_eta,
    "guard_price:clicks": _guard_price("clicks"),
    "guard_price:gmv": _guard_price("gmv"),
}


def _alias_targets(source: str, value: Any) -> list[tuple[str, Any]]:
    """The keys an old name of a field derived from ``source`` sets, given its ``value``."""
    if source.startswith("seed:"):
        return [(f"ablation.seeds.{source[5:]}", value)]
    if source == "eta:fixed":
        try:
            fixed = _number(value, "") > 0
        except ConfigError:
            return [("shared.eta", value)]   # refused there, naming the old name
        return [("shared.eta", value), ("shared.eta_mode", "fixed")] if fixed else \
            [("shared.eta_mode", "estimated")]
    if source.startswith("guard_price:"):
        return [(f"ablation.guard_prices.{source[12:]}", value)]
    return [(source, value)]


# ------------------------------------------------------------------------------------------------
# Keys, derived and retired fields; old names
# ------------------------------------------------------------------------------------------------

#: old section names -> (new name, renamed nested keys)
SECTION_RENAMES: dict[str, tuple[str, dict[str, str]]] = {"outcome": ("value_model", {"model": "outcome"})}

_WARNED: set[str] = set()
_log = logging.getLogger(__name__)


def _deprecated(old: str, instead: str) -> None:
    """One warning per old name per process."""
    if old not in _WARNED:
        _WARNED.add(old)
        _log.warning("config: %s is an old name, accepted for one release: %s", old, instead)


def is_key(f: dataclasses.Field) -> bool:
    """Whether a dataclass field is a config key (not derived from another key, not retired)."""
    return "derived" not in f.metadata and not f.metadata.get("retired")


def keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if is_key(f)]


def _path_fields(dotted: str) -> list[tuple[dataclasses.Field | None, Any]]:
    """(field, type) of each part of ``section.key[.key...]``; a part inside a mapping value has field
    None and the mapping's value type; raises KeyError for an unknown part."""
    section, *parts = dotted.split(".")
    tp: Any = section_class(section)
    out = []
    for part in parts:
        if dataclasses.is_dataclass(tp):
            field = {f.name: f for f in dataclasses.fields(tp)}[part]
            tp = typing.get_type_hints(tp)[part]
            out.append((field, tp))
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
            out.append((None, tp))
        else:
            raise KeyError(part)
    return out


def _default(dotted: str) -> Any:
    """The default value of a key (its field's default)."""
    *parent, last = dotted.split(".")
    cls = section_class(parent[0])
    for part in parent[1:]:
        cls = typing.get_type_hints(cls)[part]
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _rename_section(parts: list[str]) -> list[str]:
    if parts and parts[0] in SECTION_RENAMES:
        new, nested = SECTION_RENAMES[parts[0]]
        return [new, *([nested.get(parts[1], parts[1])] if len(parts) > 1 else []), *parts[2:]]
    return parts


def _assignments(dotted: str, value: Any) -> list[tuple[str, Any]]:
    """The keys ``dotted`` = ``value`` sets: itself, or (an old name, with a warning) its new keys."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{dotted}: expected section.key[.key...]")
    if parts[0] not in SECTIONS and parts[0] not in SECTION_RENAMES:
        raise ConfigError(f"unknown config section '{parts[0]}'; expected one of {sorted(SECTIONS)}")
    new = ".".join(_rename_section(parts))
    try:
        chain = _path_fields(new)
    except KeyError:
        raise _unknown_key(new, dotted) from None
    derived = next((f.metadata["derived"] for f, _ in chain if f is not None and "derived" in f.metadata),
                   None)
    if derived is not None:
        targets = _alias_targets(derived, value)
        names = [f"{k}: {v}" if k.endswith("eta_mode") else k for k, v in targets]
        _deprecated(dotted, f"use {' and '.join(names)}")
        return targets
    if any(f is not None and f.metadata.get("retired") for f, _ in chain):
        _deprecated(dotted, "no longer a key (its default is the only setting the documented tables use); "
                            "the value given still applies in this release")
    elif new != dotted:
        _deprecated(dotted, f"use {new}")
    return [(new, value)]


def _unknown_key(new: str, given: str) -> ConfigError:
    parts = new.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            chain = _path_fields(".".join(parts[:i]))
        except KeyError:
            continue
        tp = chain[-1][1] if chain else section_class(parts[0])
        if dataclasses.is_dataclass(tp):
            where = ".".join(given.split(".")[:i])
            return ConfigError(f"{where}: unknown key(s) ['{parts[i]}']; known keys: {keys(tp)}")
        return ConfigError(f"{'.'.join(given.split('.')[:i])}: expected a mapping of keys, got a value "
                           f"(so {given} is no key)")
    return ConfigError(f"{given}: unknown key")


def _leaves(data: dict[str, Any], origin: str) -> list[tuple[str, Any]]:
    """(dotted name as given, value) of every key in a raw config mapping (nested sections walked)."""
    out: list[tuple[str, Any]] = []
    for section, values in data.items():
        if section not in SECTIONS and section not in SECTION_RENAMES:
            raise ConfigError(f"{origin}unknown config section '{section}'; "
                              f"expected one of {sorted(SECTIONS)}")
        out += _walk(section, values)
    return out


def _walk(where: str, values: Any) -> list[tuple[str, Any]]:
    if values is None:
        return []
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {show(values)}")
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        dotted = f"{where}.{key}"
        try:
            tp = _path_fields(".".join(_rename_section(dotted.split("."))))[-1][1]
        except KeyError:
            raise _unknown_key(".".join(_rename_section(dotted.split("."))), dotted) from None
        out += _walk(dotted, value) if dataclasses.is_dataclass(tp) else [(dotted, value)]
    return out


def _coerced(target: str, value: Any, origin: str) -> Any:
    """``value`` typed for key ``target`` and checked against its declared range; errors name ``origin``."""
    chain = _path_fields(target)
    value = _coerce(chain[-1][1], value, origin)
    field = chain[-1][0] if chain[-1][0] is not None else chain[-2][0] if len(chain) > 1 else None
    if field is not None and "bounds" in field.metadata and not dataclasses.is_dataclass(chain[-1][1]):
        _check_bounds(field.metadata["bounds"], value, origin)
    return value


def _entry_to_mapping(given: dict[str, tuple[Any, str]], target: str, value: Any) -> tuple[str, Any]:
    """A mapping's entry (``ablation.seeds.pretrain``) as the whole mapping with that entry set."""
    if _path_fields(target)[-1][0] is not None:
        return target, value
    parent, key = target.rsplit(".", 1)
    base = given[parent][0] if parent in given else _default(parent)
    return parent, {**base, key: value}


def _resolve(file_leaves: list[tuple[str, Any]],
             overrides: list[tuple[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """(dotted key -> value, the keys the overrides set): the file's keys (names of one key must agree),
    then the overrides in order."""
    given: dict[str, tuple[Any, str]] = {}
    overridden: set[str] = set()
    seen: dict[str, tuple[Any, str]] = {}
    for dotted, value in file_leaves:
        for target, v in _assignments(dotted, value):
            v = _coerced(target, v, dotted)
            if target in seen and seen[target][0] != v:
                first, origin = seen[target]
                raise ConfigError(f"{dotted}: {show(v)} disagrees with {origin}: {show(first)} "
                                  f"(one value, {target}; give it once)")
            seen[target] = (v, dotted)
            target, v = _entry_to_mapping(given, target, v)
            given[target] = (v, dotted)
    for dotted, value in overrides:
        for target, v in _assignments(dotted, value):
            target, v = _entry_to_mapping(given, target, _coerced(target, v, dotted))
            given.pop(target, None)
            given[target] = (v, dotted)
            overridden.add(target)
    return {target: v for target, (v, _) in given.items()}, overridden


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            value = {**value, **node[last]}  # one entry given by itself wins over the whole mapping
        node[last] = copy.deepcopy(value)
    return data


def _derived_values(cls: type, get: Any) -> dict[str, Any]:
    """Nested mapping of the derived fields of ``cls`` (and of its nested dataclasses)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "derived" in f.metadata:
            source = f.metadata["derived"]
            out[f.name] = DERIVED[source](get) if source in DERIVED else get(source)
        elif dataclasses.is_dataclass(hints[f.name]):
            inner = _derived_values(hints[f.name], get)
            if inner:
                out[f.name] = inner
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------
# Loading and building
# ------------------------------------------------------------------------------------------------

#: a config file larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 1 << 20
#: longest integer read from YAML (a longer one is refused naming its key, never converted)
MAX_DIGITS = 30


class LongNumber(str):
    """An integer literal of more than MAX_DIGITS digits, kept as text so it is never converted."""

    def __repr__(self) -> str:
        return f"a number of {len(self.lstrip('+-'))} digits"


class _Loader(yaml.SafeLoader):
    """YAML without anchors/aliases (a few lines of aliases expand to gigabytes) and without
    integers too long to convert."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              f"accepted in a config; write the value out")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: Any) -> Any:  # type: ignore[override]
        digits = str(node.value).replace("_", "")
        if len(digits.lstrip("+-")) > MAX_DIGITS:
            return LongNumber(digits)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def safe_load(text: str, where: str) -> Any:
    """Parse config YAML: bounded in size, no aliases, no over-long integers; errors name ``where``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes; a config holds at most {MAX_CONFIG_BYTES}")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def show(value: Any) -> str:
    """A value for an error message: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def section_class(name: str) -> type:
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def section_name(cls: type) -> str:
    """The section name of a section dataclass (its class name for any other dataclass)."""
    for name, target in SECTIONS.items():
        if target == f"{cls.__module__}:{cls.__qualname__}":
            return name
    return cls.__name__


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a config file (local path or s3:// URI); None or an empty file give {}."""
    if path is None:
        return {}
    path = str(path)
    if path.startswith("s3://"):
        from grade.core import store

        text = store.read_bytes(path).decode()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {p.stat().st_size} bytes; a config holds at most {MAX_CONFIG_BYTES}")
        text = p.read_text()
    data = safe_load(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    for name in data:
        if name not in SECTIONS and name not in SECTION_RENAMES:
            raise ConfigError(f"{path}: unknown config section '{name}'; expected one of {sorted(SECTIONS)}")
    return data


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping: unknown keys, mistyped values and values outside a
    field's declared range are errors naming ``where.key``; then the ``validate()`` hook runs."""
    where = where or section_name(cls)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {show(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {keys(cls)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in values.items()}
    return check(cls(**kwargs), where)


def _number(value: Any, where: str) -> float:
    """A float from a number or a number-like string (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, LongNumber):
        raise ConfigError(f"{where}: expected a number of at most {MAX_DIGITS} digits, got {value!r}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        return _number(value, where)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every section, built and validated: the YAML file, then ``overrides`` (dotted key -> value,
    applied in order; None values are skipped), with the ablation preset's keys over the file's (not over
    the overrides), then the derived fields. Old names are accepted with a warning. Returns section name
    -> config dataclass."""
    given, overridden = _resolve(_leaves(load_yaml(path), f"{path}: " if path else ""),
                                 [(k, v) for k, v in (overrides or {}).items() if v is not None])
    preset = given.get("ablation.preset", "")
    for dotted, value in ABLATION_PRESETS.get(preset, {}).items():
        if dotted not in overridden:
            given[dotted] = _coerced(dotted, value, f"ablation.preset {preset}")

    data = _nest(given)

    def get(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return _default(dotted)
            node = node[part]
        default = _default(dotted)
        return {**default, **node} if isinstance(default, dict) else node

    out = {}
    for name in SECTIONS:
        cls = section_class(name)
        out[name] = build(cls, _merge(data.get(name) or {}, _derived_values(cls, get)), name)
    return out


def load_section(path: str | Path | None, name: str, overrides: dict[str, Any] | None = None):
    """Load and validate one section of the config file (all sections are validated);
    ``overrides``: key of that section -> value (None = not given)."""
    return load(path, {f"{name}.{k}": v for k, v in (overrides or {}).items()})[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (logged next to every output)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ------------------------------------------------------------------------------------------------
# Command line: --config, --set section.key=VALUE and flags derived from the dataclass fields
# ------------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the one-line doc under it in the class body (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _field(dotted: str) -> tuple[dataclasses.Field, Any, str]:
    """(field, its type, its doc) of ``section.key[.key...]``."""
    section, *keys = dotted.split(".")
    cls = section_class(section)
    for i, key in enumerate(keys):
        tp = typing.get_type_hints(cls)[key]
        if i < len(keys) - 1:
            cls = tp
    field = {f.name: f for f in dataclasses.fields(cls)}[keys[-1]]
    return field, tp, field_docs(cls).get(keys[-1], "")


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_value(text: str) -> Any:
    """A command-line value read like a YAML value (``3``, ``1e-3``, ``true``, ``[64, 32]``, ``null``)."""
    try:
        return safe_load(text, "--set")
    except ConfigError:
        return text


def parse_setting(text: str) -> tuple[str, Any]:
    """``section.key=VALUE`` -> (dotted key, value)."""
    dotted, sep, value = text.partition("=")
    if not sep or "." not in dotted:
        raise argparse.ArgumentTypeError(f"expected section.key=VALUE, got {text!r}")
    return dotted.strip(), parse_value(value)


def add_arguments(parser: argparse.ArgumentParser, keys: tuple[str, ...] = (),
                  renamed: dict[str, str] | None = None, config_help: str = "") -> None:
    """Add ``--config YAML``, repeatable ``--set section.key=VALUE`` and one flag per dotted key in
    ``keys`` (``--<key with dashes>`` without the section, or the name ``renamed`` gives it), whose
    help, type and choices come from the dataclass field. :func:`from_args` reads them back."""
    parser.add_argument("--config", metavar="YAML", help=config_help or "config file (local path or s3://)")
    parser.add_argument("--set", dest="config_settings", action="append", default=[], type=parse_setting,
                        metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. finetune.reward.post=0 (repeatable; read like a "
                             "YAML value, checked like one; applied after the file, before the flags below)")
    flags: dict[str, str] = {}
    for dotted in keys:
        field, tp, doc = _field(dotted)
        default_name = "--" + dotted.split(".", 1)[1].replace(".", "-").replace("_", "-")
        name = (renamed or {}).get(dotted) or default_name
        dest = "config_flag_" + name.lstrip("-").replace("-", "_")
        kwargs: dict[str, Any] = {"dest": dest, "help": f"{doc} ({dotted})", "type": parse_value}
        if tp is bool:
            kwargs.update(type=parse_bool, metavar="true|false")
        elif tp is str:
            kwargs.update(type=str)
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(type=str, choices=list(typing.get_args(tp)))
        parser.add_argument(name, **kwargs)
        flags[dest] = dotted
    parser.set_defaults(config_flags=flags)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every section from the arguments :func:`add_arguments` added: the YAML file, then each
    ``--set`` in order, then the flags that were given."""
    overrides = dict(args.config_settings)
    for dest, dotted in args.config_flags.items():
        if getattr(args, dest) is not None:
            overrides.pop(dotted, None)
            overrides[dotted] = getattr(args, dest)
    return load(args.config, overrides)


# ------------------------------------------------------------------------------------------------
# The full default configuration, documented (python -m components.config)
# ------------------------------------------------------------------------------------------------

def defaults_yaml(width: int = 100) -> str:
    """Every key with its default, in section order, each under its doc line as a YAML comment."""
    lines = ["# Every key of the GRADE-MTF configuration with its default (python -m components.config).",
             "# An empty file means these values; a file gives only the keys it changes."]
    for name in SECTIONS:
        lines += ["", f"{name}:"]
        lines += _documented(section_class(name), "  ", width)
    return "\n".join(lines) + "\n"


def _documented(cls: type, indent: str, width: int) -> list[str]:
    docs, hints, lines = field_docs(cls), typing.get_type_hints(cls), []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not is_key(f):
            continue
        doc = textwrap.wrap(docs.get(f.name, ""), width - len(indent) - 2)
        lines += [indent + "# " + line for line in doc]
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [f"{indent}{f.name}:", *_documented(hints[f.name], indent + "  ", width)]
        else:
            value = yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True, width=10_000)
            lines.append(f"{indent}{f.name}: {value.removesuffix(chr(10)).removesuffix('...').strip()}")
    return lines


def old_names_used() -> list[str]:
    """The old names this process has accepted (each warned about once)."""
    return sorted(_WARNED)
